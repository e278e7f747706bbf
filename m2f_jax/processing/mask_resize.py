"""Resizing mask logits exactly as PyTorch's `F.interpolate` does, for post-processing.

Three layers, used by `post_kernels` and `post_processing`:
  * 1-D taps, NumPy, computed once per size (cached): `linear_taps` (bilinear, `align_corners=False`,
    no antialias, PyTorch's float32 index and weight formulas) and `nearest_indices` (PyTorch's
    legacy `mode="nearest"`, src = floor(dst * in / out)).
  * `ResizeGeometry`: where one image's masks go, i.e. the optional first resize to the intermediate
    size (cropping the valid region of a padded batch) and the optional second one to the target
    size, with the taps of both, the output tiles of the tiled panoptic path, and the bucketing
    of kernel output sizes (multiples of 32, cropped afterwards) that keeps compiles rare.
  * `resize_hw`: the 2-D resize as jitted stages (width, then height: PyTorch's order of operations).

Nothing here knows what a class or a query means; see `post_kernels` for the algorithms.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TILE",
    "ResizeGeometry",
    "count_bucket",
    "linear_taps",
    "nearest_indices",
    "padded",
    "resize_axis",
    "resize_hw",
    "take_queries",
]

_OUTPUT_BUCKET = 32  # kernel output sizes are rounded up to a multiple of this, then cropped
_COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512)
TILE = 16  # side of the output tiles of the tiled panoptic path; output buckets are multiples of it


# ----------------------------------------------------------------------------------------------
# Interpolation taps (NumPy, computed once per geometry): PyTorch's index and weight formulas
# ----------------------------------------------------------------------------------------------


def _extent_rows(extent: float, in_size: int) -> int:
    """Number of input rows a region [0, extent) touches (fractional rows count, float noise not)."""
    return max(1, min(in_size, math.ceil(extent - 1e-6)))


@functools.lru_cache(maxsize=256)
def linear_taps(in_size: int, out_size: int, extent: float | None = None):
    """Indices and weights of 1-D bilinear resampling, `F.interpolate(mode="bilinear",
    align_corners=False)` conventions, computed in float32 as PyTorch does.

    `extent` (default `in_size`) resamples only the region [0, extent) of the input (rows beyond
    ceil(extent) are never read); with an integer extent this equals cropping to `extent` rows
    first. Returns (index0, index1, weight0, weight1), each of length `out_size`:
    out[j] = in[index0[j]] * weight0[j] + in[index1[j]] * weight1[j].
    """
    extent = float(in_size if extent is None else extent)
    rows = _extent_rows(extent, in_size)
    dst = np.arange(out_size)
    if rows == out_size and extent == rows:  # PyTorch copies when the sizes are equal
        index = dst.astype(np.int32)
        return _frozen(index, index, np.ones(out_size, np.float32), np.zeros(out_size, np.float32))
    scale = np.float32(extent) / np.float32(out_size)
    # scale * (dst + 0.5) - 0.5 rounded once to float32, as PyTorch's fused multiply-add gives it
    # (exact in float64); rounding twice moves weights by up to ~1e-5 on large sizes
    src = (np.float64(scale) * (dst + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    index0 = np.minimum(np.floor(src).astype(np.int64), rows - 1)
    weight1 = np.clip(src - index0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    index1 = np.where(index0 < rows - 1, index0 + 1, index0)
    weight0 = (np.float32(1) - weight1).astype(np.float32)
    return _frozen(index0.astype(np.int32), index1.astype(np.int32), weight0, weight1)


@functools.lru_cache(maxsize=256)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of each output pixel of PyTorch's legacy `mode="nearest"`: floor(dst * in / out)
    in float32, clamped (with PyTorch's exact special cases for equal and doubled sizes)."""
    dst = np.arange(out_size)
    if out_size == in_size:
        index = dst
    elif out_size == 2 * in_size:
        index = dst >> 1
    else:
        scale = np.float32(in_size) / np.float32(out_size)
        index = np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), in_size - 1)
    return _frozen(index.astype(np.int32))[0]


@functools.lru_cache(maxsize=64)
def _identity_taps(size: int):
    index = np.arange(size, dtype=np.int32)
    return _frozen(index, index, np.ones(size, np.float32), np.zeros(size, np.float32))


def _frozen(*arrays):
    for array in arrays:
        array.setflags(write=False)
    return arrays


def padded(array: np.ndarray, length: int) -> np.ndarray:
    """Repeat the last entry up to `length` (padding of bucketed outputs; cropped afterwards)."""
    if array.shape[0] == length:
        return array
    return np.concatenate([array, np.repeat(array[-1:], length - array.shape[0])])


def _padded_taps(taps, length):
    return tuple(padded(part, length) for part in taps)


def _bucket(size: int) -> int:
    return -(-size // _OUTPUT_BUCKET) * _OUTPUT_BUCKET


def count_bucket(count: int) -> int:
    """A query / candidate count rounded up to one of a few sizes (kernels compile per size)."""
    for bucket in _COUNT_BUCKETS:
        if count <= bucket:
            return bucket
    return -(-count // 256) * 256


# ----------------------------------------------------------------------------------------------
# Per-image geometry
# ----------------------------------------------------------------------------------------------


class ResizeGeometry:
    """Where one image's masks go: optional first resize to the intermediate size (with the valid
    crop), optional second resize to the target size. Sizes of the kernel outputs are bucketed."""

    def __init__(self, mask_hw, extent, intermediate_size, target_size):
        mask_h, mask_w = mask_hw
        extent_h, extent_w = extent if extent is not None else (float(mask_h), float(mask_w))
        if intermediate_size is not None:
            inter_h, inter_w = intermediate_size
            self.first = (linear_taps(mask_h, inter_h, extent_h), linear_taps(mask_w, inter_w, extent_w))
            self.base_size = (inter_h, inter_w)  # size the masks have after the first stage
            base_extent = (float(inter_h), float(inter_w))
        else:  # no intermediate resize: work on the (cropped) mask logits themselves
            self.first = None
            self.base_size = (_extent_rows(extent_h, mask_h), _extent_rows(extent_w, mask_w))
            base_extent = (extent_h, extent_w)
        self.crop = self.first is None and self.base_size != (mask_h, mask_w)
        self.target_size = target_size
        self.output_size = target_size if target_size is not None else self.base_size
        self.bucket_size = (_bucket(self.output_size[0]), _bucket(self.output_size[1]))
        if target_size is not None:
            self.second = tuple(
                linear_taps(self.base_size[axis], target_size[axis], base_extent[axis]) for axis in (0, 1)
            )
        else:
            self.second = None

    def masks(self, mask_logits: np.ndarray) -> np.ndarray:
        """The logits the kernel reads (cropped when there is no first resize to do it)."""
        if self.crop:
            return mask_logits[..., : self.base_size[0], : self.base_size[1]]
        return mask_logits

    def second_bucketed(self):
        if self.second is None:
            return None
        return tuple(_padded_taps(taps, self.bucket_size[axis]) for axis, taps in enumerate(self.second))

    def nearest_bucketed(self):
        """Legacy-nearest row / column indices from the base size to the (bucketed) output size."""
        return tuple(
            padded(nearest_indices(self.base_size[axis], self.output_size[axis]), self.bucket_size[axis])
            for axis in (0, 1)
        )

    def first_taps(self):
        """First-resize taps; identity taps (exact copies) when there is no first resize."""
        if self.first is not None:
            return self.first
        return tuple(_identity_taps(size) for size in self.base_size)

    def second_taps(self):
        """Bucketed second-resize taps; identity taps (padded) when there is no target size."""
        if self.second is not None:
            return self.second_bucketed()
        return tuple(
            _padded_taps(_identity_taps(size), self.bucket_size[axis]) for axis, size in enumerate(self.base_size)
        )

    def second_index(self):
        """(rows0, rows1, cols0, cols1): base-grid corners of every (bucketed) output pixel."""
        (rows0, rows1, _, _), (cols0, cols1, _, _) = self.second_taps()
        return rows0, rows1, cols0, cols1

    def tile_windows(self):
        """Footprint rows (tiles_y, L) and columns (tiles_x, M) of each output tile on the mask
        logit grid (what the two resizes read for it), padded by repeating the last one."""
        windows = []
        for axis in (0, 1):
            base0, base1 = self.second_taps()[axis][:2]  # output -> base
            logit0, logit1 = self.first_taps()[axis][:2]  # base -> mask logits
            starts, ends = logit0[base0[::TILE]], logit1[base1[TILE - 1 :: TILE]]
            length = int((ends - starts).max()) + 1
            windows.append(np.minimum(starts[:, None] + np.arange(length), ends[:, None]).astype(np.int32))
        return tuple(windows)

    def tile_valid_pixels(self):
        """(tiles_y, tiles_x) number of valid (unpadded) output pixels in each tile."""
        counts = []
        for axis in (0, 1):
            valid = np.arange(self.bucket_size[axis]) < self.output_size[axis]
            counts.append(valid.reshape(-1, TILE).sum(axis=1))
        return np.outer(*counts)

    def output_size_array(self):
        return np.asarray(self.output_size, np.int32)

    def crop_output(self, array, dtype=None):
        """The valid (unbucketed) part of a kernel output, as a new (writable) NumPy array."""
        height, width = self.output_size
        return np.array(np.asarray(array)[..., :height, :width], dtype=dtype, copy=True)


# ----------------------------------------------------------------------------------------------
# JAX resize stages (static shapes, so one compile per shape)
#
# Every resize is its own jitted stage so that its output is materialised: inside a single jit,
# XLA fuses a gather-based resize into each of its consumers and recomputes it per use (measured
# 5-10x slower than the staged version).
# ----------------------------------------------------------------------------------------------


def resize_axis(x, taps, axis: int):
    """Bilinear resampling of one axis from precomputed taps (indices are always in bounds;
    mode="clip" only spares XLA the out-of-bounds masking of the default mode)."""
    index0, index1, weight0, weight1 = taps
    shape = [1] * x.ndim
    shape[axis] = index0.shape[0]
    sample0 = jnp.take(x, index0, axis=axis, mode="clip")
    sample1 = jnp.take(x, index1, axis=axis, mode="clip")
    return sample0 * weight0.reshape(shape) + sample1 * weight1.reshape(shape)


@functools.partial(jax.jit, static_argnames=("axis", "sigmoid"))
def _resize_stage(x, taps, axis: int, sigmoid: bool = False, query_scale=None):
    x = resize_axis(x, taps, axis)
    if sigmoid:
        x = jax.nn.sigmoid(x)
    return x if query_scale is None else x * query_scale[:, None, None]


@jax.jit
def take_queries(mask_logits, query_index):
    return jnp.take(mask_logits, query_index, axis=0, mode="clip")


@functools.partial(jax.jit, static_argnames=("sigmoid",))
def _pointwise_stage(x, sigmoid: bool = False, query_scale=None):
    if sigmoid:
        x = jax.nn.sigmoid(x)
    return x if query_scale is None else x * query_scale[:, None, None]


def resize_hw(x, taps_hw, sigmoid: bool = False, query_scale=None, h_axis: int = -2, w_axis: int = -1):
    """2-D bilinear resize (width first, then height: PyTorch's order of operations; with the
    taps of `linear_taps` the result is bit-identical to `F.interpolate` in most cases measured,
    and within 2 ulp otherwise), then optionally a sigmoid and a per-query (axis 0) scale, as
    jitted stages."""
    if taps_hw is None:
        if sigmoid or query_scale is not None:
            return _pointwise_stage(x, sigmoid=sigmoid, query_scale=query_scale)
        return x
    x = _resize_stage(x, taps_hw[1], axis=w_axis % x.ndim)
    return _resize_stage(x, taps_hw[0], axis=h_axis % x.ndim, sigmoid=sigmoid, query_scale=query_scale)
