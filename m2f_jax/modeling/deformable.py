"""Multi-scale deformable attention as a pure, gather-based function, and its Flax layer.

Both samplers below have exactly the semantics of
``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
with locations given in [0, 1] (``grid = 2 * loc - 1``): pixel coordinate ``x * W - 0.5``,
out-of-range corners contribute 0 and the weights are not renormalised (:func:`_pixel_coords`).
``sample_points`` (the point-sampled loss) reads out-of-range corners from a real zero border;
the deformable attention gives them weight 0 and has a hand-written backward.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.modeling import variants
from m2f_jax.modeling.dense import Dense


def _pixel_coords(h: int, w: int, x: jax.Array, y: jax.Array):
    """Points (x, y) in [0, 1] on an (h, w) map -> the top-left corner (x0, y0) int32 and the
    fractional offsets (fx, fy) float32 (the weights of the right column and the bottom row),
    with grid_sample's align_corners=False pixel coordinate ``x * W - 0.5``."""
    x = x.astype(jnp.float32) * w - 0.5
    y = y.astype(jnp.float32) * h - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    return x0.astype(jnp.int32), y0.astype(jnp.int32), x - x0, y - y0


def _bilinear_corners(h, w, x0, y0, fx, fy):
    """The four bilinear corners of top-left corners (x0, y0) with offsets (fx, fy) on an (h, w)
    map, in the order top-left, top-right, bottom-left, bottom-right: (dy, dx, inside, weight),
    the weight 0 where the corner lies outside the map (grid_sample's zero padding)."""
    for dy, dx, wy, wx in ((0, 0, 1 - fy, 1 - fx), (0, 1, 1 - fy, fx), (1, 0, fy, 1 - fx), (1, 1, fy, fx)):
        xi, yi = x0 + dx, y0 + dy
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        yield dy, dx, inside, jnp.where(inside, wy * wx, 0.0)


def _corners(h: int, w: int, points: jax.Array):
    """Bilinear corners of ``points`` (..., 2) on an (h, w) map that has a one-pixel zero border:
    flat indices into the bordered map (4, ...) int32 and weights (4, ...) float32. Corners outside
    the image are clipped onto the border, so they read zeros. Order: top-left, top-right,
    bottom-left, bottom-right."""
    x0, y0, fx, fy = _pixel_coords(h, w, points[..., 0], points[..., 1])
    cols = [jnp.clip(x0 + dx, -1, w) + 1 for dx in (0, 1)]
    rows = [jnp.clip(y0 + dy, -1, h) + 1 for dy in (0, 1)]
    index = jnp.stack([rows[dy] * (w + 2) + cols[dx] for dy in (0, 1) for dx in (0, 1)])
    weight = jnp.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return index, weight


def _bordered(features: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, (H+2)(W+2), C) with a one-pixel zero border, flattened row-major."""
    n, h, w, c = features.shape
    padded = jnp.pad(features, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return padded.reshape(n, (h + 2) * (w + 2), c)


def _gather(flat: jax.Array, index: jax.Array) -> jax.Array:
    """flat (N, S, C), index (N, P) (always in range) -> (N, P, C)."""
    return jnp.take_along_axis(flat, index[..., None], axis=1, mode="promise_in_bounds")


def sample_points(features: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinearly samples ``features`` at normalised ``points``.

    Args:
      features: (N, H, W, C).
      points: (N, P, 2) as (x, y) in [0, 1] (any value allowed; outside reads zeros).
    Returns:
      (N, P, C), in the dtype of ``features``.
    """
    _, h, w, _ = features.shape
    index, weight = _corners(h, w, points)  # (4, N, P)
    flat = _bordered(features)
    weight = weight.astype(features.dtype)
    out = _gather(flat, index[0]) * weight[0, ..., None]
    for k in range(1, 4):
        out = out + _gather(flat, index[k]) * weight[k, ..., None]
    return out


_BLOCK = 63  # top-left x positions per table row: 2 map rows x 64 columns fill 128 lanes


def sample_maps(maps: jax.Array, points: jax.Array) -> jax.Array:
    """Bilinearly samples single-channel ``maps`` at per-map normalised ``points`` (the "xla"
    variant's sampler of the point-sampled loss; :func:`sample_points`' semantics).

    XLA:TPU charges a gather about one (8, 128) tile per index whatever the row holds, so the
    maps are first laid out as a table of 128-lane rows, each holding a 2 x 64 window (two map
    rows, 64 columns, the window's columns overlapping the next one's by one): any sample's four
    corners lie in one row, read with one index instead of four single-element gathers. A
    corner outside the map gets weight 0.

    Args:
      maps: (N, H, W).
      points: (N, P, 2) as (x, y) in [0, 1] (any value allowed; outside reads zeros).
    Returns:
      (N, P) float32.
    """
    n, h, w = maps.shape
    num_blocks = -(-(w + 1) // _BLOCK)  # covering the top-left x in [-1, W - 1]
    width = _BLOCK * num_blocks + 1
    padded = jnp.pad(maps, ((0, 0), (1, 1), (1, width - w - 1)))  # (N, H+2, width): [y+1, x+1] = map[y, x]
    blocks = padded[:, :, : _BLOCK * num_blocks].reshape(n, h + 2, num_blocks, _BLOCK)
    next_column = padded[:, :, _BLOCK::_BLOCK][..., None]  # (N, H+2, nb, 1): the block's 64th column
    windows = jnp.concatenate([blocks, next_column], axis=-1)  # (N, H+2, nb, 64)
    table = jnp.concatenate([windows[:, :-1], windows[:, 1:]], axis=-1).reshape(-1, 128)  # (N (H+1) nb, 128)

    x0, y0, fx, fy = _pixel_coords(h, w, points[..., 0], points[..., 1])  # (N, P)
    padded_x = jnp.clip(x0, -1, w - 1) + 1  # [0, W]; clamped samples have all weights 0
    padded_y = jnp.clip(y0, -1, h - 1) + 1  # [0, H]
    lane = padded_x % _BLOCK  # the top-left corner's lane
    index = (np.arange(n, dtype=np.int32)[:, None] * (h + 1) + padded_y) * num_blocks + padded_x // _BLOCK
    rows = _take_f32(table, index)  # (N, P, 128)
    lanes = np.arange(128, dtype=np.int32)
    weights = None
    for dy, dx, _, weight in _bilinear_corners(h, w, x0, y0, fx, fy):
        term = (lanes == (lane + 64 * dy + dx)[..., None]) * weight[..., None]
        weights = term if weights is None else weights + term  # (N, P, 128)
    return jnp.sum(rows * weights, axis=-1)


# --- multi-scale deformable attention, "xla" variant (GPU, TPU) ----------------------------------
#
# Plain JAX, differentiated by JAX (grad and jvp). The four bilinear corners of a sample are
# adjacent pixels, so the value is first rearranged into a corner table: for each level, head and
# top-left corner position (y0, x0) in [-1, H) x [-1, W), one row holding the hd channels of the
# four corners (top-left, top-right, bottom-left, bottom-right; zeros outside the map), 4 hd = 128
# wide for the Swin-T pixel decoder. One gather of one row per sample then reads all four corners,
# a full 128-lane row of a TPU tile. Gathering each corner's hd = 32 channels alone would take 4x
# the rows, each a quarter-filled tile row, and XLA:TPU charges a gathered row about a whole tile
# whatever it holds. Per-sample arrays are (L*P, N), N = B*Sq*nh the minor axis.
#
# The gather reads the value in its own dtype and upcasts (exact), so under bf16 it moves half
# the bytes while the arithmetic stays float32; the custom_jvp below makes the backward's
# scatter-add accumulate in float32 as well. The function is rematerialised in the backward
# (jax.checkpoint): its residuals would otherwise be the gathered rows.


@jax.custom_jvp
def _take_f32(table: jax.Array, index: jax.Array) -> jax.Array:
    """table (R, C) any float dtype, index (...) int32 in [0, R) -> (..., C) float32 rows."""
    return table.at[index].get(mode="promise_in_bounds").astype(jnp.float32)


@_take_f32.defjvp
def _take_f32_jvp(primals, tangents):
    table, index = primals
    table_dot, _ = tangents  # the integer index has no tangent
    # the tangent is gathered from the float32 table, so its transpose scatter-adds in float32
    return _take_f32(table, index), table_dot.astype(jnp.float32).at[index].get(mode="promise_in_bounds")


def _corner_table(value, spatial_shapes):
    """(B, S, nh, hd) -> (B * S4 * nh, 4 hd), S4 = sum (H_l + 1)(W_l + 1): row
    ((b * S4 + start4_l + (y0 + 1)(W_l + 1) + x0 + 1) * nh + head) holds the channels of pixels
    (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1) of level l, zero outside it."""
    b, _, nh, hd = value.shape
    levels, start = [], 0
    for h, w in spatial_shapes:
        level = value[:, start : start + h * w].reshape(b, h, w, nh, hd)
        start += h * w
        padded = jnp.pad(level, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))  # (B, H+2, W+2, nh, hd)
        corners = [padded[:, dy : dy + h + 1, dx : dx + w + 1] for dy in (0, 1) for dx in (0, 1)]
        levels.append(jnp.concatenate(corners, axis=-1).reshape(b, -1, nh, 4 * hd))  # (B, (H+1)(W+1), nh, 4hd)
    return jnp.concatenate(levels, axis=1).reshape(-1, 4 * hd)


def _msda_gather(value, spatial_shapes, sampling_locations, attention_weights):
    b, s, nh, hd = value.shape
    _, sq, _, nl, npt, _ = sampling_locations.shape
    n = b * sq * nh
    locations = jnp.transpose(sampling_locations, (3, 4, 5, 0, 1, 2)).reshape(nl, npt, 2, n)  # (L, P, 2, N)
    attention = jnp.transpose(attention_weights, (3, 4, 0, 1, 2)).reshape(nl, npt, n)  # (L, P, N)
    sizes = np.array(spatial_shapes, np.int32)  # (L, 2) as (H, W)
    per_level = lambda v: v.reshape(nl, 1, 1)  # broadcast over (P, N)
    h, w = per_level(sizes[:, 0]), per_level(sizes[:, 1])
    positions = (sizes[:, 0] + 1) * (sizes[:, 1] + 1)  # corner-table rows per level and head
    start = per_level(np.concatenate([[0], np.cumsum(positions)[:-1]]).astype(np.int32))
    x0, y0, fx, fy = _pixel_coords(h, w, locations[:, :, 0], locations[:, :, 1])  # (L, P, N)
    # A top-left corner below -1 or from H (W) on has no corner inside: clamped, all weights 0.
    position = start + (jnp.clip(y0, -1, h - 1) + 1) * (w + 1) + jnp.clip(x0, -1, w - 1) + 1  # (L, P, N)
    sample = np.arange(n, dtype=np.int32)
    base = (sample // (sq * nh)) * (int(positions.sum()) * nh) + sample % nh  # (N,) batch and head
    index = (base + position * nh).reshape(nl * npt, n)  # (L*P, N)
    coefs = []
    for _, _, _, weight in _bilinear_corners(h, w, x0, y0, fx, fy):
        coefs.append((weight * attention).reshape(nl * npt, n))
    coef = jnp.repeat(jnp.stack(coefs, axis=-1), hd, axis=-1)  # (L*P, N, 4hd), float32
    rows = _take_f32(_corner_table(value, spatial_shapes), index)  # (L*P, N, 4hd) float32
    out = jnp.sum(rows * coef, axis=0).reshape(n, 4, hd).sum(axis=1)  # (N, hd)
    return out.reshape(b, sq, nh * hd).astype(value.dtype)


# --- multi-scale deformable attention, "cpu" variant ----------------------------------------------
#
# The value stays in its natural (B, S, nh, hd) layout, viewed as N = B*S*nh rows of hd: one
# sample of one head is one row gather, so nothing is transposed or padded. A corner outside its
# level gets weight 0 (its index is clamped to any valid row), which is grid_sample's zero padding.
#
# How it is made fast on XLA:CPU:
# * The corner rows and weights of all samples are computed once, as (n, 4, N) tables, and the
#   gathers run in a ``lax.scan`` over the n = L*P samples. The tables are computed for all levels
#   and points in one pass (per-sample slices make XLA recompute the attention softmax in each).
#   Written as straight-line code, XLA fuses the corner arithmetic into every gather and scatter
#   and recomputes it for each of the hd channels; a loop's inputs are materialised, so each
#   gather reads a plain index.
# * Rows are uint32, so the gathers carry no negative-index wrap-around.
# * The backward is hand-written (custom_vjp): each corner is gathered once more and reduced
#   against the output gradient, and the value gradient is scatter-added row by row. The four
#   corners' dot products are one 4-operand reduce: XLA:CPU then fuses the gathers and products
#   into it (a plain sum goes to a library reduce that reads each gathered corner from memory).
#   XLA's own derivative of the gathers would re-gather the corners into several consumers.
# * Under ``vmap`` (the train step maps the model over examples) the forward and backward fold
#   the mapped axis into the batch axis (custom_vmap) instead of batching every gather.


def _corner_tables(spatial_shapes, value_shape, sampling_locations, attention_weights):
    """Every sample's bilinear corners, computed for all levels and points at once.

    The inputs are transposed once to the per-sample layout (L, P, B, Sq, nh) (the loop's
    slices), so every table below is computed in that layout: transposing the (4, ...) tables
    instead would move 4x as much data (and, in the backward, the corner dot products as well).

    Args:
      spatial_shapes: static ((H_0, W_0), ...).
      value_shape: (B, S, nh, hd) of the value; its rows are the (B*S*nh, hd) view.
      sampling_locations: (B, Sq, nh, L, P, 2) as (x, y) in [0, 1].
      attention_weights: (B, Sq, nh, L, P).
    Returns:
      rows: (n, 4, N) uint32 into the value rows, n = L*P (level-major), N = B*Sq*nh; a corner
        outside its level is clamped onto any valid row and has weight 0.
      coefs: (n, 4, N) float32, bilinear weight x attention weight.
      pieces: weight, inside (L, P, 4, B, Sq, nh) and fx, fy, attention (L, P, B, Sq, nh), for
        the backward.
    """
    b, s, nh, _ = value_shape
    _, sq, _, nl, npt, _ = sampling_locations.shape
    num_samples = nl * npt
    locations = jnp.transpose(sampling_locations.astype(jnp.float32), (3, 4, 5, 0, 1, 2))  # (L, P, 2, B, Sq, nh)
    attention = jnp.transpose(attention_weights.astype(jnp.float32), (3, 4, 0, 1, 2))  # (L, P, B, Sq, nh)
    sizes = np.array(spatial_shapes, np.int32)  # (L, 2) as (H, W)
    per_level = lambda v: v.reshape(nl, 1, 1, 1, 1)  # broadcast over (P, B, Sq, nh)
    h, w = per_level(sizes[:, 0]), per_level(sizes[:, 1])
    start = per_level(np.concatenate([[0], np.cumsum(sizes[:, 0] * sizes[:, 1])[:-1]]).astype(np.int32))
    x0, y0, fx, fy = _pixel_coords(h, w, locations[:, :, 0], locations[:, :, 1])  # (L, P, B, Sq, nh)
    batch = (np.arange(b, dtype=np.int32) * s)[:, None, None]  # (B, 1, 1)
    head = np.arange(nh, dtype=np.int32)  # (nh,)
    rows, weights, insides = [], [], []
    for dy, dx, inside, weight in _bilinear_corners(h, w, x0, y0, fx, fy):
        pixel = start + jnp.clip(y0 + dy, 0, h - 1) * w + jnp.clip(x0 + dx, 0, w - 1)  # (L, P, B, Sq, nh)
        rows.append((batch + pixel) * nh + head)
        weights.append(weight)
        insides.append(inside.astype(jnp.float32))
    weight, inside = jnp.stack(weights, axis=2), jnp.stack(insides, axis=2)  # (L, P, 4, B, Sq, nh)
    coef = weight * attention[:, :, None]
    rows = jnp.stack(rows, axis=2).astype(jnp.uint32)
    per_sample = lambda t: t.reshape(num_samples, 4, -1)  # (L, P, 4, B, Sq, nh) -> (L*P, 4, N), a view
    return per_sample(rows), per_sample(coef), (weight, inside, fx, fy, attention)


def _take(rows, index):
    # rows (R, hd), index (N,) uint32, always in range -> (N, hd)
    return rows.at[index].get(mode="promise_in_bounds")


def _lane_dots(corners, g):
    # 4 x (N, hd), (N, hd) -> (4, N): one 4-operand reduce over the channel axis
    zeros = (jnp.float32(0),) * len(corners)
    sums = jax.lax.reduce(tuple(c * g for c in corners), zeros,
                          lambda x, y: tuple(a + b for a, b in zip(x, y)), (1,))
    return jnp.stack(sums)


def _msda_forward(spatial_shapes, value, sampling_locations, attention_weights):
    b, s, nh, hd = value.shape
    rows = value.reshape(b * s * nh, hd)
    index, coef, _ = _corner_tables(spatial_shapes, value.shape, sampling_locations, attention_weights)
    coef = coef.astype(value.dtype)

    def add_sample(out, tables):
        index, coef = tables  # (4, N) each
        for k in range(4):
            out = out + _take(rows, index[k]) * coef[k][:, None]
        return out, None

    out, _ = jax.lax.scan(add_sample, jnp.zeros((index.shape[2], hd), value.dtype), (index, coef))  # (N, hd)
    return out.reshape(b, -1, nh * hd)


def _msda_backward(spatial_shapes, value, sampling_locations, attention_weights, grad):
    b, s, nh, hd = value.shape
    rows = value.reshape(b * s * nh, hd)
    g = grad.reshape(-1, hd)  # (N, hd)
    index, coef, (weight, inside, fx, fy, a) = _corner_tables(
        spatial_shapes, value.shape, sampling_locations, attention_weights
    )
    coef = coef.astype(g.dtype)
    g32 = g.astype(jnp.float32)

    def sample_grads(d_rows, tables):
        index, coef = tables  # (4, N) each
        # <grad, corner value>; a corner outside the level read a clamped row (masked below)
        dots = _lane_dots([_take(rows, index[k]).astype(jnp.float32) for k in range(4)], g32)
        for k in range(4):
            d_rows = d_rows.at[index[k]].add(g * coef[k][:, None], mode="promise_in_bounds")
        return d_rows, dots

    d_rows, dots = jax.lax.scan(sample_grads, jnp.zeros_like(rows), (index, coef))  # dots (n, 4, N)
    _, sq, _, nl, npt, _ = sampling_locations.shape
    masked = inside * dots.reshape(nl, npt, 4, b, sq, nh)  # (L, P, 4, B, Sq, nh)
    m = [masked[:, :, k] for k in range(4)]  # (L, P, B, Sq, nh) each
    d_attn = sum(weight[:, :, k] * m[k] for k in range(4))  # elementwise, not a reduce over the corner axis
    d_fx = a * ((1 - fy) * (m[1] - m[0]) + fy * (m[3] - m[2]))
    d_fy = a * ((1 - fx) * (m[2] - m[0]) + fx * (m[3] - m[1]))
    sizes = np.array(spatial_shapes, np.float32).reshape(nl, 1, 1, 1, 1, 2)  # (H, W) per level
    d_loc = jnp.stack([d_fx * sizes[..., 1], d_fy * sizes[..., 0]], axis=2)  # x = loc_x * W - 0.5
    d_loc = jnp.transpose(d_loc, (3, 4, 5, 0, 1, 2))  # (L, P, 2, B, Sq, nh) -> (B, Sq, nh, L, P, 2)
    d_attn = jnp.transpose(d_attn, (2, 3, 4, 0, 1))  # (L, P, B, Sq, nh) -> (B, Sq, nh, L, P)
    return (d_rows.reshape(value.shape), d_loc.astype(sampling_locations.dtype),
            d_attn.astype(attention_weights.dtype))


def _batch_folded(fn, spatial_shapes):
    """``fn(spatial_shapes, *arrays)``, every array batched on axis 0, as a function of the
    arrays whose ``vmap`` folds the mapped axis into that batch axis."""
    folded = jax.custom_batching.custom_vmap(functools.partial(fn, spatial_shapes))

    @folded.def_vmap
    def rule(axis_size, in_batched, *arrays):
        arrays = [
            x.reshape((-1,) + x.shape[2:]) if batched
            else jnp.broadcast_to(x[None], (axis_size,) + x.shape).reshape((-1,) + x.shape[1:])
            for x, batched in zip(arrays, in_batched)
        ]
        outs = folded(*arrays)
        unfold = lambda y: y.reshape((axis_size, -1) + y.shape[1:])
        return jax.tree.map(unfold, outs), jax.tree.map(lambda _: True, outs)

    return folded


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _msda(value, spatial_shapes, sampling_locations, attention_weights):
    return _batch_folded(_msda_forward, spatial_shapes)(value, sampling_locations, attention_weights)


def _msda_fwd(value, spatial_shapes, sampling_locations, attention_weights):
    out = _msda(value, spatial_shapes, sampling_locations, attention_weights)
    return out, (value, sampling_locations, attention_weights)


def _msda_bwd(spatial_shapes, residuals, grad):
    return _batch_folded(_msda_backward, spatial_shapes)(*residuals, grad)


_msda.defvjp(_msda_fwd, _msda_bwd)


def multi_scale_deformable_attention(
    value: jax.Array,
    spatial_shapes: Sequence[Tuple[int, int]],
    sampling_locations: jax.Array,
    attention_weights: jax.Array,
) -> jax.Array:
    """Multi-scale deformable attention (Zhu et al.), gather-based; the bilinear sampling and
    the weighted sum are float32 whatever the dtype of ``value`` (as the original CUDA kernel).
    The implementation follows ``variants.current()``.

    Args:
      value: (B, S, nh, hd), the levels flattened row-major and concatenated; S = sum(H_l W_l).
      spatial_shapes: static ((H_0, W_0), ...), one per level.
      sampling_locations: (B, Sq, nh, L, P, 2) as (x, y) in [0, 1].
      attention_weights: (B, Sq, nh, L, P), already softmaxed over L * P.
    Returns:
      (B, Sq, nh * hd) in the dtype of ``value``, heads major in the channel axis.
    """
    num_levels = sampling_locations.shape[3]
    spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
    if len(spatial_shapes) != num_levels:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {num_levels} levels.")
    if sum(h * w for h, w in spatial_shapes) != value.shape[1]:
        raise ValueError(f"spatial_shapes {list(spatial_shapes)} do not add up to S={value.shape[1]}.")
    locations = sampling_locations.astype(jnp.float32)
    if variants.current() == "xla":
        core = jax.checkpoint(_msda_gather, static_argnums=(1,))
        return core(value, spatial_shapes, locations, attention_weights.astype(jnp.float32))
    value32 = value.astype(jnp.float32)
    out = _msda(value32, spatial_shapes, locations, attention_weights.astype(jnp.float32))
    return out.astype(value.dtype)


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
        value = Dense(c, dtype=self.dtype, name="value_proj")(hidden_states)
        value = value.reshape(b, s, nh, c // nh)  # (B, S, nh, hd)
        offsets = Dense(nh * nl * npt * 2, dtype=self.dtype, name="sampling_offsets")(query)
        offsets = offsets.reshape(b, s, nh, nl, npt, 2)  # (B, S, nh, L, P, 2)
        attn = Dense(nh * nl * npt, dtype=self.dtype, name="attention_weights")(query)
        attn = jax.nn.softmax(attn.reshape(b, s, nh, nl * npt).astype(jnp.float32), axis=-1)
        attn = attn.reshape(b, s, nh, nl, npt)  # (B, S, nh, L, P)
        # Offsets are in pixels of each level; (W, H) normaliser, static.
        normalizer = np.array([[w, h] for h, w in spatial_shapes], np.float32)  # (L, 2)
        # Sampling stays in fp32 under bf16 compute, as the original CUDA kernel does.
        locations = (
            reference_points[:, :, None, :, None, :].astype(jnp.float32)
            + offsets.astype(jnp.float32) / normalizer[None, None, None, :, None, :]
        )  # (B, S, nh, L, P, 2)
        out = multi_scale_deformable_attention(value, spatial_shapes, locations, attn)  # (B, S, C)
        out = Dense(c, dtype=self.dtype, name="output_proj")(out)
        return out, attn
