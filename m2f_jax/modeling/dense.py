"""The model's Linear layers: ``flax.linen.Dense``'s parameters, computed per variant
(``variants.py``): on the "xla" variant (GPU, TPU) ``x @ W + b`` differentiated by JAX, as
``nn.Dense``; on the "cpu" variant with the hand-written backward below.

Same ``kernel`` (in, out) and ``bias`` (out,) as ``nn.Dense``, so checkpoints and the converter do
not see a difference. What differs is the gradient's form. For ``y = x @ W + b`` with
``x`` (M, K) and the output gradient ``g`` (M, N):

* ``dW = x^T @ g`` is one dot contracting the row axis of both operands, which XLA:CPU's
  matmul takes as it is (a transposed-operand flag);
* ``db = 1^T @ g`` is a matrix-vector product;
* ``dx = g @ W^T``.

XLA's own derivative of ``nn.Dense`` lets the producer of ``g`` (the GELU or ReLU backward, the
LayerNorm backward) fuse into each of the three consumers, so that elementwise chain runs three
times, once writing ``g`` transposed for the weight gradient and once inside a column reduction
for the bias. Here ``g`` reaches three dots, which nothing fuses into, so it is computed once;
this matters most in the Swin MLPs and the pixel decoder's FFNs. Same sums, another order; the
parity tests cover every layer that uses it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2f_jax.modeling import variants


def _rows(a: jax.Array) -> jax.Array:
    return a.reshape(-1, a.shape[-1])  # (..., C) -> (M, C)


def _weight_gradient(x: jax.Array, grad: jax.Array, dtype) -> jax.Array:
    # x (M, K), grad (M, N) -> (K, N): contracts the row axis of both, accumulated in fp32
    dw = jax.lax.dot_general(x, grad, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dw.astype(dtype)


def _bias_gradient(grad: jax.Array, dtype) -> jax.Array:
    # grad (M, N) -> (N,) as a matrix-vector product (a column sum would be a reduction fusion)
    ones = jnp.ones((1, grad.shape[0]), grad.dtype)
    return (jnp.dot(ones, grad, preferred_element_type=jnp.float32)[0]).astype(dtype)


@jax.custom_vjp
def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """(..., K) @ (K, N) + (N,) -> (..., N)."""
    return jnp.dot(x, kernel) + bias


def _linear_fwd(x, kernel, bias):
    return linear(x, kernel, bias), (x, kernel)


def _linear_bwd(residuals, grad):
    x, kernel = residuals
    g = _rows(grad)  # (M, N)
    dx = jnp.dot(grad, kernel.T)  # (..., K)
    return dx, _weight_gradient(_rows(x), g, kernel.dtype), _bias_gradient(g, kernel.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def linear_no_bias(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(..., K) @ (K, N) -> (..., N)."""
    return jnp.dot(x, kernel)


def _linear_no_bias_fwd(x, kernel):
    return linear_no_bias(x, kernel), (x, kernel)


def _linear_no_bias_bwd(residuals, grad):
    return _linear_bwd(residuals, grad)[:2]  # the bias gradient is dropped unused (dead code)


linear_no_bias.defvjp(_linear_no_bias_fwd, _linear_no_bias_bwd)


class Dense(nn.Module):
    """``nn.Dense`` (same fields that the model uses, same parameters and dtype promotion)."""

    features: int
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # x: (..., K) -> (..., features)
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        plain = variants.current() == "xla"
        if not self.use_bias:
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return jnp.dot(x, kernel) if plain else linear_no_bias(x, kernel)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.dot(x, kernel) + bias if plain else linear(x, kernel, bias)
