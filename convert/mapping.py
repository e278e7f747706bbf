"""HF (transformers) Mask2Former state dict <-> Flax params, by rules, not by a table of 760 keys.

Canonical names are transformers-5 in-memory names. Hub / ``save_pretrained`` files use the
legacy Swin layout (``attention.self.query`` ...), mapped to the canonical names first.

From a canonical name to a Flax path: split on '.', drop the ``swin`` wrapper, append a numeric
component to the one before it (``layers.3`` -> ``layers_3``, ``adapter_1.0`` -> ``adapter_1_0``).
The leaf follows the Flax module it lands in: ``weight`` -> ``kernel`` (Linear transposed, Conv
OIHW -> HWIO), ``scale`` (norms) or ``embedding``. ``nn.MultiheadAttention``'s fused
``in_proj_weight`` is split by rows into q/k/v.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Tuple

import numpy as np

BACKBONE = "model.pixel_level_module.encoder."

# Keys a checkpoint may hold that the Flax model has no use for.
IGNORED_SUFFIXES = (
    "relative_position_index",  # recomputed from the window size
    "criterion.empty_weight",  # recomputed from no_object_weight
    "swin.layernorm.weight",  # transformers' SwinModel final norm; never used by Mask2Former
    "swin.layernorm.bias",
)

# Hub / save_pretrained backbone layout -> transformers-5 in-memory layout (under BACKBONE).
_DISK_TO_MEMORY = [
    (r"^embeddings\.", "swin.embeddings."),
    (r"^encoder\.layers\.", "swin.encoder.layers."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.relative_position_bias_table$",
     ".attention.relative_position_bias.relative_position_bias_table"),
    (r"\.attention\.self\.relative_position_index$", ".attention.relative_position_bias.relative_position_index"),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(blocks\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
]
_MEMORY_TO_DISK = [
    (r"^swin\.embeddings\.", "embeddings."),
    (r"^swin\.encoder\.layers\.", "encoder.layers."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.relative_position_bias\.relative_position_bias_table$",
     ".attention.self.relative_position_bias_table"),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


class ConversionError(ValueError):
    """A checkpoint does not match the model: lists every missing, unexpected, mis-shaped key."""


def _rewrite_backbone(key: str, rules) -> str:
    if not key.startswith(BACKBONE):
        return key
    rest = key[len(BACKBONE):]
    for pattern, repl in rules:
        rest = re.sub(pattern, repl, rest)
    return BACKBONE + rest


def to_memory_layout(key: str) -> str:
    """Any HF key (Hub or in-memory layout) -> the transformers-5 in-memory name."""
    if key.startswith(BACKBONE + "swin.") or key.startswith(BACKBONE + "hidden_states_norms."):
        return key
    return _rewrite_backbone(key, _DISK_TO_MEMORY)


def to_disk_layout(key: str) -> str:
    """In-memory name -> the name ``save_pretrained`` writes (the Hub layout)."""
    return _rewrite_backbone(key, _MEMORY_TO_DISK)


def module_path(key: str) -> Tuple[Tuple[str, ...], str]:
    """Canonical HF key -> (Flax module path, HF leaf name)."""
    parts = key.split(".")
    leaf = parts.pop()
    path: List[str] = []
    for p in parts:
        if p == "swin" and path[-3:] == ["model", "pixel_level_module", "encoder"]:
            continue
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    return tuple(path), leaf


_ATOMIC = re.compile(r"^(adapter_\d+|layer_\d+)((?:_\d+)*)$")
_NUMBERED = re.compile(r"^(.*?)((?:_\d+)*)$")


def hf_module_name(path: Tuple[str, ...]) -> str:
    """Inverse of module_path for the module part: Flax path -> dotted HF prefix."""
    out = []
    for p in path:
        m = _ATOMIC.match(p) or _NUMBERED.match(p)
        base, suffix = m.group(1), m.group(2)
        out.append(base)
        out.extend(s for s in suffix.split("_") if s)
    if out[:3] == ["model", "pixel_level_module", "encoder"] and len(out) > 3 and out[3] in ("embeddings", "encoder"):
        out.insert(3, "swin")
    return ".".join(out)


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], object]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items") and not hasattr(v, "shape"):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat: Dict[Tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _hf_leaf_name(path: Tuple[str, ...]) -> str:
    """The HF key that would fill a Flax leaf (in-memory layout)."""
    mod, leaf = path[:-1], path[-1]
    if len(mod) >= 2 and mod[-2] == "cross_attn" and mod[-1] in ("q_proj", "k_proj", "v_proj"):
        name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
        return f"{hf_module_name(mod[:-1])}.{name} ({mod[-1][0]} rows)"
    name = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    return f"{hf_module_name(mod)}.{name}"


def _ignored(key: str) -> bool:
    return any(key.endswith(s) for s in IGNORED_SUFFIXES)


# (to Flax, back to PyTorch) axis permutations: Linear [out, in] <-> Dense [in, out]; Conv OIHW <-> HWIO
_LINEAR = ((1, 0), (1, 0))
_CONV = ((2, 3, 1, 0), (3, 2, 0, 1))


def hf_to_flax(state_dict: Dict[str, np.ndarray], target_shapes) -> dict:
    """Maps an HF state dict onto a Flax params tree.

    Args:
      state_dict: HF names (either layout) -> arrays (numpy or anything np.asarray takes).
      target_shapes: the Flax params tree (arrays or ShapeDtypeStructs), e.g. from
        ``jax.eval_shape(module.init, ...)["params"]``.
    Returns:
      A params tree of float32 numpy arrays with exactly the structure of ``target_shapes``.
    Raises:
      ConversionError listing every missing, unexpected and mis-shaped key.
    """
    targets = _flatten(dict(target_shapes))
    filled: Dict[Tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    # per mis-shaped checkpoint key, its two shapes (the error's first line) and the leaves it
    # left unfilled (not counted again as missing there)
    shape_errors: Dict[str, str] = {}
    misshaped_paths = set()

    def wrong_shape(source, paths, got, expected, detail):
        misshaped.append(f"{source}: checkpoint {got}, expected {expected}{detail}")
        shape_errors.setdefault(source, f"{source} has shape {got} in the checkpoint, the model expects {expected}")
        misshaped_paths.update(paths)

    def put(path, value, source, layout=None):
        """``layout``: (to ours, back to the checkpoint's) axis permutation of this weight."""
        if path not in targets:
            unexpected.append(source)
            return
        want = tuple(targets[path].shape)
        ours = tuple(value.shape) if layout is None else tuple(value.shape[i] for i in layout[0])
        if ours != want:
            # both shapes in the checkpoint's own layout (what its author sees)
            expected = want if layout is None else tuple(want[i] for i in layout[1])
            wrong_shape(source, [path], tuple(value.shape), expected, f" (for {'/'.join(path)} {want})")
            return
        filled[path] = np.asarray(value if layout is None else value.transpose(layout[0]), dtype=np.float32)

    for raw_key, raw_value in state_dict.items():
        key = to_memory_layout(raw_key)
        if _ignored(key):
            continue
        value = np.asarray(raw_value)
        mod, leaf = module_path(key)
        if leaf in ("in_proj_weight", "in_proj_bias"):
            kind = "kernel" if leaf == "in_proj_weight" else "bias"
            paths = [mod + (name, kind) for name in ("q_proj", "k_proj", "v_proj")]
            if paths[0] in targets:
                # q, k and v stacked on the rows, each [out, in] (Linear's layout)
                one = tuple(targets[paths[0]].shape)[::-1]
                expected = (3 * one[0],) + one[1:]
                if tuple(value.shape) != expected:
                    wrong_shape(raw_key, paths, tuple(value.shape), expected, " (q, k and v projections stacked)")
                    continue
            for path, part in zip(paths, np.split(value, 3, axis=0) if value.shape[0] % 3 == 0 else [value] * 3):
                put(path, part, raw_key, _LINEAR if kind == "kernel" else None)
            continue
        if leaf == "weight":
            if mod + ("kernel",) in targets:
                put(mod + ("kernel",), value, raw_key, {2: _LINEAR, 4: _CONV}.get(value.ndim))
            elif mod + ("scale",) in targets:
                put(mod + ("scale",), value, raw_key)
            elif mod + ("embedding",) in targets:
                put(mod + ("embedding",), value, raw_key)
            else:
                unexpected.append(raw_key)
            continue
        put(mod + (leaf,), value, raw_key)

    missing = [p for p in targets if p not in filled]
    if missing or unexpected or misshaped:
        lines = [_first_problem([p for p in missing if p not in misshaped_paths], list(dict.fromkeys(unexpected)),
                                list(shape_errors.values()))]
        if missing:
            lines.append(f"Missing ({len(missing)}): the model needs these, the checkpoint lacks them:")
            lines += [f"  {_hf_leaf_name(p)}  (Flax {'/'.join(p)})" for p in missing]
        if unexpected:
            lines.append(f"Unexpected ({len(unexpected)}): in the checkpoint, unknown to the model:")
            lines += [f"  {k}" for k in unexpected]
        if misshaped:
            lines.append(f"Wrong shape ({len(misshaped)}):")
            lines += [f"  {m}" for m in misshaped]
        raise ConversionError("\n".join(lines))
    return _unflatten(filled)


def _first_problem(missing, unexpected, misshaped) -> str:
    """The error's first line, which the command line prints alone: the first offending key and
    how many other problems the listing below it holds (each checkpoint key or model weight
    counted once). A wrong shape comes first: it points at the setting of the configuration that
    differs, where a missing or unexpected key only says that one does."""
    if misshaped:
        first = misshaped[0]
    elif missing:
        first = f"{_hf_leaf_name(missing[0])} is missing from the checkpoint"
    else:
        first = f"{unexpected[0]} is in the checkpoint but unknown to the model"
    others = len(missing) + len(unexpected) + len(misshaped) - 1
    more = f"and {others} other problem{'s' if others != 1 else ''}" if others else "no other problem"
    return f"The checkpoint does not match the model configuration: {first} ({more})."


def flax_to_hf(params, disk_layout: bool = True) -> Dict[str, np.ndarray]:
    """Flax params -> HF state dict (float32 numpy), in the Hub layout by default."""
    flat = _flatten(dict(params))
    out: Dict[str, np.ndarray] = {}
    fused: Dict[str, Dict[str, np.ndarray]] = {}
    for path, value in flat.items():
        value = np.asarray(value, dtype=np.float32)
        mod, leaf = path[:-1], path[-1]
        if len(mod) >= 2 and mod[-2] == "cross_attn" and mod[-1] in ("q_proj", "k_proj", "v_proj"):
            prefix = hf_module_name(mod[:-1])
            name = "in_proj_weight" if leaf == "kernel" else "in_proj_bias"
            fused.setdefault(f"{prefix}.{name}", {})[mod[-1]] = value.T if leaf == "kernel" else value
            continue
        prefix = hf_module_name(mod)
        if leaf == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
            name = "weight"
        elif leaf in ("scale", "embedding"):
            name = "weight"
        else:
            name = leaf
        out[f"{prefix}.{name}" if prefix else name] = value
    for key, parts in fused.items():
        out[key] = np.concatenate([parts["q_proj"], parts["k_proj"], parts["v_proj"]], axis=0)
    if disk_layout:
        out = {to_disk_layout(k): v for k, v in out.items()}
    return out


def used_keys(keys: Iterable[str]) -> List[str]:
    return [k for k in keys if not _ignored(to_memory_layout(k))]
