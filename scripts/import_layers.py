"""The project's import graph, checked against its layers: ``python scripts/import_layers.py``
prints every module's imports of other project modules (function-level imports included) and
then each import that points from a lower layer to a higher one, or that closes a cycle; the
exit status is 1 when there is any.

Layers, bottom to top (a module may import its own layer or lower ones):
  0  config, modeling, processing, data, progress, and the conversion rules (convert)
  1  loading, inference, visualisation: hub, inference, visualize (and the package's lazy API)
  2  evaluation
  3  training (its validation is evaluation's)
  4  the command lines: m2f_jax.cli, m2f_jax.__main__, convert.__main__
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("m2f_jax", "convert")
LAYERS = [  # (layer, module prefixes); the longest matching prefix decides
    (0, ("m2f_jax.config", "m2f_jax.modeling", "m2f_jax.processing", "m2f_jax.data", "m2f_jax.progress", "convert")),
    (1, ("m2f_jax", "m2f_jax.hub", "m2f_jax.inference", "m2f_jax.visualize")),
    (2, ("m2f_jax.evaluation",)),
    (3, ("m2f_jax.training",)),
    (4, ("m2f_jax.cli", "m2f_jax.__main__", "convert.__main__")),
]


def modules(root: str = ROOT) -> Dict[str, str]:
    """Module name -> file, for the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(root, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def imports(root: str = ROOT) -> Dict[str, Set[str]]:
    """Module -> the project modules it imports (a ``from package import name`` of a submodule
    counts as that submodule)."""
    found = modules(root)
    graph = {}
    for module, path in found.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in found:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def layer(module: str) -> int:
    best = max((prefix for _, prefixes in LAYERS for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(level for level, prefixes in LAYERS if best in prefixes)


def problems(graph: Dict[str, Set[str]]) -> List[str]:
    """Imports from a lower layer to a higher one, and cycles (one line each)."""
    found = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                found.append("cycle: " + " -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


if __name__ == "__main__":
    graph = imports()
    for module in sorted(graph, key=lambda m: (layer(m), m)):
        print(f"{layer(module)} {module} -> {', '.join(sorted(graph[module])) or '-'}")
    issues = problems(graph)
    print("\n".join(issues) if issues else "no import from a lower layer to a higher one, no cycle")
    sys.exit(1 if issues else 0)
