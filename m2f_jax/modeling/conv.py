"""The pixel decoder's convolutions (1x1 projections and the 3x3 FPN output conv), NHWC, stride 1.

On the "xla" variant (GPU, TPU; ``variants.py``) a plain ``lax.conv_general_dilated``
differentiated by JAX, as ``nn.Conv``; on the "cpu" variant the formulation below.

Same parameters as ``flax.linen.Conv`` (``kernel`` (kh, kw, in, out), ``bias`` (out,)), so
checkpoints and the converter do not see a difference. What differs is how the gradient is
computed: XLA:CPU lowers a convolution's weight gradient to a "convolution" whose window is the
whole feature map, which its CPU kernels run several times slower than the forward. Here

* a 1x1 conv is a matmul over channels (its weight gradient is a matmul too);
* a k x k conv runs XLA's convolution forward and input gradient, with the weight gradient
  written as one matmul per tap: ``dK[i, j] = x_shifted(i, j)^T @ dy`` (see
  ``_tap_weight_gradient`` for the layout).

Both are exact reformulations (same sums, another order); the parity tests cover them.
"""
from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2f_jax.modeling import variants

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel_shape) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), _same_padding(kernel.shape), dimension_numbers=_DIMENSIONS)


@jax.custom_vjp
def conv2d_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(B, H, W, Cin) * (kh, kw, Cin, Cout) -> (B, H, W, Cout): stride 1, zero "same" padding
    (as torch's ``padding=k // 2`` for odd k)."""
    if kernel.shape[:2] == (1, 1):
        return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
    return _conv(x, kernel)


def _conv2d_fwd(x, kernel):
    return conv2d_same(x, kernel), (x, kernel)


def _conv2d_bwd(residuals, grad):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    if (kh, kw) == (1, 1):
        dx = jnp.einsum("bhwo,io->bhwi", grad, kernel[0, 0])
        return dx, jnp.einsum("bhwi,bhwo->io", x, grad)[None, None]
    _, input_vjp = jax.vjp(lambda inputs: _conv(inputs, kernel), x)
    (dx,) = input_vjp(grad)
    return dx, _tap_weight_gradient(x, grad, kernel.shape)


def _tap_weight_gradient(x, grad, kernel_shape):
    """dK[i, j] = sum over pixels of x(pixel + tap offset) (x) dy(pixel), for a "same"-padded
    k x k conv: (B, H, W, Cin), (B, H, W, Cout) -> (kh, kw, Cin, Cout).

    Each tap's shifted input is a contiguous run of rows of the padded input seen as a
    (positions, Cin) matrix: tap (i, j) of output pixel (h, w) reads padded position
    (h + i) * Wp + (w + j), so the taps read rows i * Wp + j + [0, H * Wp). The run includes the
    Wp - W padding columns of each output row, whose gradient is zero here (the gradient is padded
    to width Wp), so they add exact zeros. The gradient is transposed once for all taps,
    (Cout, positions): the dot then has both operands in the layout XLA:CPU's matmul takes, where
    contracting two (positions, C) matrices made it transpose every tap's shifted input (9 copies
    of the input per 3x3 conv, ~1 s of a Swin-T train step's thread time at 96x96x256).
    """
    kh, kw, cin, cout = kernel_shape
    b, h, w, _ = x.shape
    (top, bottom), (left, right) = _same_padding(kernel_shape)
    # one spare row at the bottom: the last tap's run ends kw - 1 positions past the padded map
    padded = jnp.pad(x, ((0, 0), (top, bottom + 1), (left, right), (0, 0)))  # (B, Hp + 1, Wp, Cin)
    wp = padded.shape[2]
    rows = padded.reshape(b, -1, cin)  # (B, (Hp + 1) * Wp, Cin)
    n = h * wp
    grad_rows = jnp.pad(grad, ((0, 0), (0, 0), (0, wp - w), (0, 0))).reshape(b * n, cout)
    grad_t = jax.lax.optimization_barrier(grad_rows.T)  # (Cout, B * H * Wp), materialised once
    taps = [
        grad_t @ rows[:, i * wp + j : i * wp + j + n].reshape(b * n, cin)  # (Cout, Cin)
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps).transpose(0, 2, 1).reshape(kernel_shape)


conv2d_same.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv2d(nn.Module):
    """``nn.Conv(features, kernel_size, padding=k // 2)`` for stride-1 odd kernels, same params."""

    features: int
    kernel_size: Tuple[int, int] = (1, 1)
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # x: (B, H, W, Cin) -> (B, H, W, features)
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, x.shape[-1], self.features)
        )
        conv = _conv if variants.current() == "xla" else conv2d_same
        y = conv(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y
