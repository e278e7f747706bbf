"""The activation functions a config can name, by their transformers names: Swin's `hidden_act`
and the decoder's `activation_function` (one table for both)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from m2f_jax.config import ACTIVATION_NAMES

__all__ = ["ACTIVATIONS", "activation", "gelu"]


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in torch's form ``x/2 (1 + erf(x / sqrt 2))``; jax.nn.gelu's erfc form costs
    about twice as much on XLA:CPU. Within 1e-6 of torch."""
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


_FUNCTIONS = {
    "gelu": gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}
# Config validation accepts exactly ACTIVATION_NAMES, so the table is those names, no more: a name
# added there without a function here fails at import, not at a model's first call.
ACTIVATIONS = {name: _FUNCTIONS[name] for name in ACTIVATION_NAMES}


def activation(name: str, option: str) -> Callable[[jax.Array], jax.Array]:
    """The function `name`; a ValueError naming `option` and the supported names otherwise."""
    if name not in ACTIVATIONS:
        raise ValueError(f"{option} {name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]
