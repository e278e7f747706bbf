"""`as_numpy`: the one conversion of array inputs (NumPy, JAX, torch, nested lists) to NumPy.

The bottom layer of m2f_jax's NumPy code (post-processing, RLE, evaluation): it imports nothing
from m2f_jax, and neither torch nor jax, so any module can use it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_numpy"]


def as_numpy(array) -> np.ndarray:
    """NumPy view of a NumPy / JAX / torch array, dtype kept (a torch tensor is detached and
    moved to the CPU through its own `.numpy()`, recognised without importing torch)."""
    if hasattr(array, "detach") and hasattr(array, "numpy"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)
