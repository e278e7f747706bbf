"""Test-only XLA:CPU options: LLVM -O0 and XLA's elemental emitters instead of the fusion emitters
compile a train step ~3x faster (same HLO, same semantics). Only those this jaxlib knows (newer
ones dropped the elemental emitters)."""
import jax
import numpy as np


def _accepted(options: dict) -> dict:
    known = {}
    for name, value in options.items():
        try:
            jax.jit(lambda x: x + 1).lower(np.zeros(2, np.float32)).compile(compiler_options={name: value})
        except jax.errors.JaxRuntimeError:
            continue
        known[name] = value
    return known


FAST_CPU_COMPILE = _accepted({"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False})
