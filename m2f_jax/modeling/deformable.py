"""Multi-scale deformable attention as a pure, gather-based function, and its Flax layer.

The bilinear sampler below has exactly the semantics of
``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
with locations given in [0, 1] (``grid = 2 * loc - 1``): pixel coordinate ``x * W - 0.5``,
out-of-range corners contribute 0 and the weights are not renormalised. Out-of-range corners
read a real zero border (never a clamped pixel). The same function serves the deformable
attention and the point-sampled loss.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def sample_points(features: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinearly samples ``features`` at normalised ``points``.

    Args:
      features: (N, H, W, C).
      points: (N, P, 2) as (x, y) in [0, 1] (any value allowed; outside reads zeros).
    Returns:
      (N, P, C), in the dtype of ``features``.
    """
    n, h, w, c = features.shape
    points = points.astype(jnp.float32)
    x = points[..., 0] * w - 0.5  # (N, P) pixel coordinates, align_corners=False
    y = points[..., 1] * h - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0  # weight of the right column
    fy = y - y0  # weight of the bottom row
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)

    # A one-pixel zero border: every corner outside the image is clipped onto it.
    padded = jnp.pad(features, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (N, H+2, W+2, C)
    flat = padded.reshape(n, (h + 2) * (w + 2), c)  # (N, (H+2)(W+2), C)

    def corner(yi, xi, weight):
        xi = jnp.clip(xi, -1, w) + 1
        yi = jnp.clip(yi, -1, h) + 1
        idx = yi * (w + 2) + xi  # (N, P)
        vals = jnp.take_along_axis(flat, idx[..., None], axis=1)  # (N, P, C)
        return vals * weight[..., None].astype(vals.dtype)

    out = corner(y0, x0, (1 - fy) * (1 - fx))
    out = out + corner(y0, x0 + 1, (1 - fy) * fx)
    out = out + corner(y0 + 1, x0, fy * (1 - fx))
    out = out + corner(y0 + 1, x0 + 1, fy * fx)
    return out


def multi_scale_deformable_attention(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention (Zhu et al.), gather-based.

    Args:
      value: (B, S, nh, hd), the levels flattened row-major and concatenated; S = sum(H_l W_l).
      spatial_shapes: static ((H_0, W_0), ...), one per level.
      sampling_locations: (B, Sq, nh, L, P, 2) as (x, y) in [0, 1].
      attention_weights: (B, Sq, nh, L, P), already softmaxed over L * P.
    Returns:
      (B, Sq, nh * hd), heads major in the channel axis.
    """
    b, s, nh, hd = value.shape
    _, sq, _, num_levels, num_points, _ = sampling_locations.shape
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels.")
    if sum(h * w for h, w in spatial_shapes) != s:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not add up to S={s}.")

    out = jnp.zeros((b, sq, nh, hd), value.dtype)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes):
        v = value[:, start : start + h * w]  # (B, HW, nh, hd)
        start += h * w
        v = v.reshape(b, h, w, nh, hd).transpose(0, 3, 1, 2, 4)  # (B, nh, H, W, hd)
        v = v.reshape(b * nh, h, w, hd)  # (B*nh, H, W, hd)
        loc = sampling_locations[:, :, :, level]  # (B, Sq, nh, P, 2)
        loc = loc.transpose(0, 2, 1, 3, 4).reshape(b * nh, sq * num_points, 2)
        sampled = sample_points(v, loc)  # (B*nh, Sq*P, hd)
        sampled = sampled.reshape(b, nh, sq, num_points, hd)
        weights = attention_weights[:, :, :, level].astype(sampled.dtype)  # (B, Sq, nh, P)
        out = out + jnp.einsum("bnqpd,bqnp->bqnd", sampled, weights)
    return out.reshape(b, sq, nh * hd)


class MultiscaleDeformableAttention(nn.Module):
    """The pixel decoder's MSDeformAttn; parameter names mirror transformers'."""

    embed_dim: int
    num_heads: int
    n_levels: int = 3
    n_points: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings, reference_points, spatial_shapes):
        # hidden_states, position_embeddings: (B, S, C); reference_points: (B, S, L, 2) as (x, y)
        b, s, c = hidden_states.shape
        nh, nl, npt = self.num_heads, self.n_levels, self.n_points
        query = hidden_states + position_embeddings
        value = nn.Dense(c, dtype=self.dtype, name="value_proj")(hidden_states)
        value = value.reshape(b, s, nh, c // nh)  # (B, S, nh, hd)
        offsets = nn.Dense(nh * nl * npt * 2, dtype=self.dtype, name="sampling_offsets")(query)
        offsets = offsets.reshape(b, s, nh, nl, npt, 2)  # (B, S, nh, L, P, 2)
        attn = nn.Dense(nh * nl * npt, dtype=self.dtype, name="attention_weights")(query)
        attn = jax.nn.softmax(attn.reshape(b, s, nh, nl * npt).astype(jnp.float32), axis=-1)
        attn = attn.reshape(b, s, nh, nl, npt)  # (B, S, nh, L, P)
        # Offsets are in pixels of each level; (W, H) normaliser, static.
        normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)  # (L, 2)
        # Sampling stays in fp32 under bf16 compute, as the original CUDA kernel does.
        locations = (
            reference_points[:, :, None, :, None, :].astype(jnp.float32)
            + offsets.astype(jnp.float32) / normalizer[None, None, None, :, None, :]
        )  # (B, S, nh, L, P, 2)
        out = multi_scale_deformable_attention(
            value.astype(jnp.float32), spatial_shapes, locations, attn
        ).astype(self.dtype)  # (B, S, C)
        out = nn.Dense(c, dtype=self.dtype, name="output_proj")(out)
        return out, attn
