"""Mask2Former post-processing: semantic, instance and panoptic maps from the model's logits.

The three public functions take anything with `class_queries_logits` (B, Q, K+1) and
`masks_queries_logits` (B, Q, h, w) (attributes or dict keys; NumPy, JAX or torch arrays) and return
NumPy results in transformers' formats (`Mask2FormerImageProcessor.post_process_*`, v5.24).

Pipeline, as in transformers (conventions a reader cannot see in the code):
  * mask logits are upsampled bilinearly (PyTorch `align_corners=False`, no antialias) to an
    intermediate size, 384x384 by default, then (semantic scores, panoptic probabilities) bilinearly
    again to `target_sizes`; instance masks are binarised at the intermediate size and reach the
    target with PyTorch's legacy `nearest` (src = floor(dst * in / out)).
  * semantic: softmax over classes, null class dropped (not renormalised), einsum with the mask
    sigmoids, argmax; instance: top-Q (query, class) pairs scored by class prob x mean mask prob;
    panoptic: queries whose max softmax (null included) is a real class above `threshold`, pixel
    argmax of score-weighted mask probabilities, area-ratio filtering, optional label fusing.

Deliberate differences from transformers (everything else is kept, quirks included):
  1. Panoptic segment ids are unique. transformers resets its id counter to a fused label's id, so
     a later new segment can reuse an existing id (labels [0 (fused), 1, 0, 2] give ids [1, 2, 1, 2]);
     here every new segment gets the next unused id ([1, 2, 1, 3]). The queries of one fused label
     share one id and ONE `segments_info` entry (placed where the label first appears, `score` = max
     over its queries); transformers lists one entry per query. Where transformers has no collision
     and no repeated fused label the output is identical; the pixels of every segment always are.
  2. `return_coco_annotation=True` (instance) gives one pycocotools RLE dict
     (`{"size": [h, w], "counts": bytes}`, column-major, = `pycocotools.mask.encode`) per instance,
     of that instance's full binary mask (overlaps kept), in `segments_info` order. transformers
     returns its row-major "Kaggle" runs of the painted id map (background included); that encoding
     stays available as `binary_mask_to_rle` / `convert_segmentation_to_rle`.
  3. `intermediate_size` is configurable (transformers hard-codes (384, 384), issue #44901);
     `None` skips the intermediate resize.
  4. `valid_sizes` crops each image's valid (unpadded) region of a padded batch before resizing
     (transformers post-processes the padding too, issue #39382).
  5. Instance pairs are visited in descending class-probability order (ties: lower query, then
     lower class first), i.e. `topk(sorted=True)`; transformers uses `topk(sorted=False)`, whose order
     is implementation-defined. The order decides the instance ids and which overlapping instance
     is painted last (on top) in the id map; the set of instances and their masks do not change.

Quirks kept for parity: instance background is -1 and its map is float32; a panoptic image without
any kept query returns a float32 map of -1 (otherwise int32 with 0 = no segment); instance
`mask_threshold` / `overlap_mask_area_threshold` are unused; `return_binary_maps=True` with no
instance returns the -1 map; panoptic `mask_threshold` compares score-weighted probabilities.

Speed: the per-image work runs in jitted JAX kernels (one compile per shape; output sizes are
bucketed to multiples of 32 and query / pixel counts to a few sizes to keep compiles rare).
Instance and panoptic only upsample the queries that can pass the thresholds. The semantic argmax
(without scores) first bounds every class score from the few significant queries and candidate
classes, and computes exact scores only where the bounds do not decide (segment boundaries);
panoptic with a target size decides 16x16 output tiles from per-query bounds and resizes only
the undecided tiles' candidate queries. Both are exact (see `_semantic_plan`, `_panoptic_tiled`),
only faster on model-like outputs; unstructured logits fall back to the plain dense algorithm.
The first call for a new shape pays the compiles (seconds on a 2-core machine).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.processing.rle import binary_mask_to_rle, convert_segmentation_to_rle, mask_to_coco_rle

__all__ = [
    "DEFAULT_INTERMEDIATE_SIZE",
    "MASK_STRIDE",
    "SemanticSegmentationOutput",
    "binary_mask_to_rle",
    "convert_segmentation_to_rle",
    "linear_taps",
    "mask_to_coco_rle",
    "nearest_indices",
    "post_process_instance_segmentation",
    "post_process_panoptic_segmentation",
    "post_process_semantic_segmentation",
]

DEFAULT_INTERMEDIATE_SIZE = (384, 384)  # transformers' hard-coded size
MASK_STRIDE = 4  # mask logits are at 1/4 of the (padded) model input resolution
_OUTPUT_BUCKET = 32  # kernel output sizes are rounded up to a multiple of this, then cropped
_COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 64, 80, 96, 128, 192, 256, 384, 512)
# mean mask prob <= 1 up to float32 summation error; pairs below threshold / (1 + this) cannot pass
_MASK_SCORE_SLACK = 1e-4


class SemanticSegmentationOutput(dict):
    """`{"segmentation": (H, W) int64, "segmentation_scores": (K, H, W) float32}`, also readable
    as attributes (like transformers' `SemanticSegmentationPostProcessorOutput`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def _to_numpy(array) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "numpy"):  # torch tensor, without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _read_logits(outputs) -> tuple[np.ndarray, np.ndarray]:
    """(class_queries_logits (B, Q, K+1), masks_queries_logits (B, Q, h, w)) as float32 NumPy."""
    keys = ("class_queries_logits", "masks_queries_logits")
    if isinstance(outputs, Mapping):
        missing = [key for key in keys if key not in outputs]
        get = outputs.__getitem__
    else:
        missing = [key for key in keys if not hasattr(outputs, key)]
        get = functools.partial(getattr, outputs)
    if missing:
        raise ValueError(f"outputs must provide {keys} (as attributes or dict keys); missing {missing}")
    class_logits = _to_numpy(get(keys[0])).astype(np.float32, copy=False)
    mask_logits = _to_numpy(get(keys[1])).astype(np.float32, copy=False)
    if class_logits.ndim != 3:
        raise ValueError(
            f"class_queries_logits must have shape (batch, num_queries, num_labels + 1), got {class_logits.shape}"
        )
    if mask_logits.ndim != 4:
        raise ValueError(
            f"masks_queries_logits must have shape (batch, num_queries, height, width), got {mask_logits.shape}"
        )
    if class_logits.shape[:2] != mask_logits.shape[:2]:
        raise ValueError(
            "class_queries_logits and masks_queries_logits must agree on (batch, num_queries), got "
            f"{class_logits.shape[:2]} and {mask_logits.shape[:2]}"
        )
    if class_logits.shape[-1] < 2:
        raise ValueError(f"class_queries_logits needs at least one class plus the null class, got {class_logits.shape}")
    if min(mask_logits.shape[2:]) < 1:
        raise ValueError(f"masks_queries_logits has an empty spatial size: {mask_logits.shape}")
    if class_logits.shape[1] < 1:
        raise ValueError(f"the outputs hold no queries: class_queries_logits has shape {class_logits.shape}")
    for name, logits in zip(keys, (class_logits, mask_logits)):
        if not np.isfinite(logits).all():
            raise ValueError(
                f"{name} holds {int(np.isnan(logits).sum())} NaN and {int(np.isinf(logits).sum())} infinite "
                "values; post-processing needs finite logits (a diverged model or a bf16 overflow?)"
            )
    return class_logits, mask_logits


def _size_pair(value, name: str, allow_float: bool = False) -> tuple:
    """(height, width) from an int or a pair; positive."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
    try:
        height, width = (float(v) if allow_float else int(v) for v in value)
        exact = allow_float or all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (height, width) pair, got {value!r}") from None
    if not exact or height <= 0 or width <= 0:
        raise ValueError(f"{name} must be a pair of positive {'numbers' if allow_float else 'integers'}, got {value!r}")
    return height, width


def _per_image_sizes(sizes, name: str, batch_size: int, allow_float: bool = False) -> list[tuple] | None:
    if sizes is None:
        return None
    if hasattr(sizes, "tolist") and not isinstance(sizes, (list, tuple)):
        sizes = sizes.tolist()
    if len(sizes) != batch_size:
        raise ValueError(
            f"{name} must hold one (height, width) per image: expected {batch_size} entries (the batch size), "
            f"got {len(sizes)}"
        )
    return [_size_pair(size, f"{name}[{i}]", allow_float) for i, size in enumerate(sizes)]


def _valid_extents(valid_sizes, padded_size, mask_hw, batch_size) -> list[tuple[float, float]] | None:
    """Each image's valid region in mask-logit pixels: valid_size * mask_size / padded_size."""
    if valid_sizes is None:
        if padded_size is not None:
            raise ValueError("padded_size is only used together with valid_sizes")
        return None
    if padded_size is None:
        padded_size = (MASK_STRIDE * mask_hw[0], MASK_STRIDE * mask_hw[1])
    padded_h, padded_w = _size_pair(padded_size, "padded_size", allow_float=True)
    extents = []
    for i, (valid_h, valid_w) in enumerate(_per_image_sizes(valid_sizes, "valid_sizes", batch_size, allow_float=True)):
        if valid_h > padded_h or valid_w > padded_w:
            raise ValueError(
                f"valid_sizes[{i}] = {(valid_h, valid_w)} exceeds the padded input size {(padded_h, padded_w)}"
            )
        extents.append((valid_h * mask_hw[0] / padded_h, valid_w * mask_hw[1] / padded_w))
    return extents


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


def _padded(array: np.ndarray, length: int) -> np.ndarray:
    """Repeat the last entry up to `length` (padding of bucketed outputs; cropped afterwards)."""
    if array.shape[0] == length:
        return array
    return np.concatenate([array, np.repeat(array[-1:], length - array.shape[0])])


def _padded_taps(taps, length):
    return tuple(_padded(part, length) for part in taps)


def _bucket(size: int) -> int:
    return -(-size // _OUTPUT_BUCKET) * _OUTPUT_BUCKET


def _count_bucket(count: int) -> int:
    for bucket in _COUNT_BUCKETS:
        if count <= bucket:
            return bucket
    return -(-count // 256) * 256


class _Geometry:
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
            _padded(nearest_indices(self.base_size[axis], self.output_size[axis]), self.bucket_size[axis])
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
            starts, ends = logit0[base0[::_TILE]], logit1[base1[_TILE - 1 :: _TILE]]
            length = int((ends - starts).max()) + 1
            windows.append(np.minimum(starts[:, None] + np.arange(length), ends[:, None]).astype(np.int32))
        return tuple(windows)

    def tile_valid_pixels(self):
        """(tiles_y, tiles_x) number of valid (unpadded) output pixels in each tile."""
        counts = []
        for axis in (0, 1):
            valid = np.arange(self.bucket_size[axis]) < self.output_size[axis]
            counts.append(valid.reshape(-1, _TILE).sum(axis=1))
        return np.outer(*counts)

    def output_size_array(self):
        return np.asarray(self.output_size, np.int32)

    def crop_output(self, array, dtype=None):
        """The valid (unbucketed) part of a kernel output, as a new (writable) NumPy array."""
        height, width = self.output_size
        return np.array(np.asarray(array)[..., :height, :width], dtype=dtype, copy=True)


# ----------------------------------------------------------------------------------------------
# JAX kernels (one image each; static shapes, so one compile per shape)
#
# Every resize is its own jitted stage so that its output is materialised: inside a single jit,
# XLA fuses a gather-based resize into each of its consumers and recomputes it per use (measured
# 5-10x slower than the staged version).
# ----------------------------------------------------------------------------------------------


def _resize_axis(x, taps, axis: int):
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
    x = _resize_axis(x, taps, axis)
    if sigmoid:
        x = jax.nn.sigmoid(x)
    return x if query_scale is None else x * query_scale[:, None, None]


@jax.jit
def _take_queries(mask_logits, query_index):
    return jnp.take(mask_logits, query_index, axis=0, mode="clip")


@functools.partial(jax.jit, static_argnames=("sigmoid",))
def _pointwise_stage(x, sigmoid: bool = False, query_scale=None):
    if sigmoid:
        x = jax.nn.sigmoid(x)
    return x if query_scale is None else x * query_scale[:, None, None]


def _resize_hw(x, taps_hw, sigmoid: bool = False, query_scale=None, h_axis: int = -2, w_axis: int = -1):
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


@jax.jit
def _class_scores(class_weights, mask_probs):
    """(H, W, C) = sum_q class_weights[q, c] * mask_probs[q]; classes last for the argmax."""
    return jnp.einsum("qc,qhw->hwc", class_weights, mask_probs)


@jax.jit
def _resized_argmax(scores, second):
    """argmax over the last axis of the (optionally) resized (H, W, C) scores; the resize fuses
    into the reduction, which is its only consumer."""
    if second is not None:
        scores = _resize_axis(_resize_axis(scores, second[1], 1), second[0], 0)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


# Semantic argmax in two exact phases (see `_semantic_plan`). Phase 1 bounds every class score
# at every base pixel; phase 2 computes exact scores only where the bounds do not decide.
_SEMANTIC_MARGIN = 2e-5  # relative float32 error allowed between the bounds and exact scores


@jax.jit
def _semantic_bounds(candidate_probs, weights, slack, candidates, second_index, valid_hw):
    """Phase 1: labels decided by bounds, and where phase 2 must compute exact scores.

    candidate_probs: (A, Hb, Wb) mask probabilities of the significant queries; weights: (A, C+1)
    their probabilities of the C candidate classes and, last, of the best non-candidate class;
    slack: (C+1,) the same weights summed over the other queries, whose mask probabilities are
    only known to lie in [0, 1]. Returns the output label map (-1 = undecided), the undecided
    output pixels, the base pixels phase 2 needs, and the two counts.
    """
    lower = jnp.einsum("ac,ahw->chw", weights, candidate_probs)  # (C+1, Hb, Wb) lower bounds
    # upper bounds are lower + slack; the last channel bounds all non-candidates. The reductions
    # over channels are unrolled into one elementwise pass (XLA's reduce over the leading axis of
    # this array is ~10x slower): best candidate by lower bound (first max, as argmax), and the two
    # largest upper bounds, to get the largest upper bound among the best one's rivals.
    num_channels = lower.shape[0]
    best, best_lower = jnp.zeros(lower.shape[1:], jnp.int32), lower[0]
    for channel in range(1, num_channels - 1):
        is_better = lower[channel] > best_lower
        best = jnp.where(is_better, channel, best)
        best_lower = jnp.where(is_better, lower[channel], best_lower)
    top_upper, top_channel = lower[0] + slack[0], jnp.zeros(lower.shape[1:], jnp.int32)
    second_upper = jnp.full(lower.shape[1:], -jnp.inf, lower.dtype)
    for channel in range(1, num_channels):
        upper = lower[channel] + slack[channel]
        is_top = upper > top_upper
        second_upper = jnp.where(is_top, top_upper, jnp.maximum(second_upper, upper))
        top_channel = jnp.where(is_top, channel, top_channel)
        top_upper = jnp.where(is_top, upper, top_upper)
    rival_upper = jnp.where(top_channel == best, second_upper, top_upper)
    certain = best_lower > rival_upper + _SEMANTIC_MARGIN * (best_lower + rival_upper)
    base_label = jnp.where(certain, jnp.take(candidates, best), -1)  # (Hb, Wb)
    # an output pixel is a convex combination of <= 4 base pixels (a 2x2 block): if one class wins
    # with certainty at all of them, it wins at the output pixel
    rows0, rows1, cols0, cols1 = second_index
    corner = [jnp.take(jnp.take(base_label, r, axis=0), c, axis=1) for r in (rows0, rows1) for c in (cols0, cols1)]
    decided = (corner[0] >= 0) & (corner[0] == corner[1]) & (corner[0] == corner[2]) & (corner[0] == corner[3])
    height, width = decided.shape
    inside = (jnp.arange(height) < valid_hw[0])[:, None] & (jnp.arange(width) < valid_hw[1])[None, :]
    undecided = ~decided & inside
    # every corner of an undecided output pixel has, within its 3x3 neighbourhood, an undecided
    # base pixel or a different label: mark those base pixels (a superset of what phase 2 reads)
    padded = jnp.pad(base_label, 1, mode="edge")
    base_h, base_w = base_label.shape
    needed = base_label < 0
    for dy in range(3):
        for dx in range(3):
            neighbour = padded[dy : dy + base_h, dx : dx + base_w]
            needed = needed | (neighbour < 0) | (neighbour != base_label)
    labels = jnp.where(decided, corner[0], -1)
    return labels, undecided, needed, jnp.sum(undecided), jnp.sum(needed)


@jax.jit
def _semantic_refine(mask_logits, class_probs, labels, needed_rows, needed_cols, out_rows, out_cols, first, second):
    """Phase 2: exact class scores (all queries, all classes) at the needed base pixels
    (`needed_rows/cols`), resampled to the undecided output pixels (`out_rows/cols`), argmax.
    Same formulas as the dense path: per pixel the first resize (width taps, then height taps),
    sigmoid, einsum, then the second resize. Index lists are padded with out-of-range entries,
    which the scatters drop."""
    base_h, base_w = first[0][0].shape[0], first[1][0].shape[0]
    flat_logits = mask_logits.reshape(mask_logits.shape[0], -1)  # (Q, h * w)
    mask_w = mask_logits.shape[2]
    (r0, r1, h0, h1), (c0, c1, w0, w1) = (
        tuple(jnp.take(part, index, mode="clip") for part in taps)
        for taps, index in zip(first, (needed_rows, needed_cols))
    )

    def logits_at(r, c):  # (Q, U)
        return jnp.take(flat_logits, r * mask_w + c, axis=1)

    top = logits_at(r0, c0) * w0 + logits_at(r0, c1) * w1
    bottom = logits_at(r1, c0) * w0 + logits_at(r1, c1) * w1
    probs = jax.nn.sigmoid(top * h0 + bottom * h1)  # (Q, U)
    scores = jnp.einsum("qu,qk->uk", probs, class_probs)  # (U, K)
    slot = jnp.zeros((base_h * base_w,), jnp.int32).at[needed_rows * base_w + needed_cols].set(
        jnp.arange(needed_rows.shape[0], dtype=jnp.int32), mode="drop"
    )
    (s0, s1, sh0, sh1), (t0, t1, sw0, sw1) = (
        tuple(jnp.take(part, index, mode="clip") for part in taps) for taps, index in zip(second, (out_rows, out_cols))
    )

    def scores_at(r, c):  # (V, K)
        return jnp.take(scores, jnp.take(slot, r * base_w + c, mode="clip"), axis=0, mode="clip")

    value = (scores_at(s0, t0) * sw0[:, None] + scores_at(s0, t1) * sw1[:, None]) * sh0[:, None] + (
        scores_at(s1, t0) * sw0[:, None] + scores_at(s1, t1) * sw1[:, None]
    ) * sh1[:, None]
    refined = jnp.argmax(value, axis=-1).astype(labels.dtype)
    return labels.at[out_rows, out_cols].set(refined, mode="drop")


@jax.jit
def _class_scores_first(class_weights, mask_probs):
    """(C, H, W) = sum_q class_weights[q, c] * mask_probs[q] (transformers' layout; with few
    classes XLA's dot is ~3x faster this way than classes-last)."""
    return jnp.einsum("qc,qhw->chw", class_weights, mask_probs)


@jax.jit
def _argmax_first_axis(scores):
    return jnp.argmax(scores, axis=0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("return_masks",))
def _instance_finish(logits, pair_score, is_real, rows, cols, threshold, return_masks):
    """Scores, kept flags and the painted id map (at the bucketed output size) of N candidates."""
    binary = logits > 0  # (N, Hb, Wb)
    binary_f = binary.astype(jnp.float32)
    mask_score = jnp.sum(jax.nn.sigmoid(logits) * binary_f, axis=(1, 2)) / (jnp.sum(binary_f, axis=(1, 2)) + 1e-6)
    score = pair_score * mask_score
    # a mask is empty at the output size iff it is empty on the rows / columns nearest-resize reads
    rows_read = jnp.zeros(binary.shape[1], bool).at[rows].set(True)
    cols_read = jnp.zeros(binary.shape[2], bool).at[cols].set(True)
    nonempty = jnp.any(binary & rows_read[None, :, None] & cols_read[None, None, :], axis=(1, 2))
    keep = is_real & nonempty & (score >= threshold)
    ids = jnp.cumsum(keep.astype(jnp.int32)) - 1
    # later instances overwrite earlier ones; ids grow with the order, so the max id wins
    painted = jnp.max(jnp.where(binary & keep[:, None, None], ids[:, None, None], -1), axis=0)  # (Hb, Wb)
    # nearest resize commutes with painting: resize the painted map once
    segmentation = jnp.take(jnp.take(painted, rows, axis=0), cols, axis=1).astype(jnp.float32)
    return segmentation, score, keep, (binary if return_masks else None)


@jax.jit
def _panoptic_finish(weighted_probs, valid_hw, mask_threshold):
    """Pixel owner (query slot) map and, per slot, owned area and thresholded area, from the
    score-weighted probabilities (a separate stage: a fused producer makes XLA's argmax ~10x slower)."""
    owner = jnp.argmax(weighted_probs, axis=0).astype(jnp.int32)  # first max wins, as torch.argmax
    height, width = owner.shape
    inside = (jnp.arange(height) < valid_hw[0])[:, None] & (jnp.arange(width) < valid_hw[1])[None, :]
    slots = weighted_probs.shape[0]
    area = jnp.bincount(jnp.where(inside, owner, slots).reshape(-1), length=slots + 1)[:slots]
    original_area = jnp.sum((weighted_probs >= mask_threshold) & inside, axis=(1, 2))
    return owner, area, original_area


# Panoptic with a target size, by 16x16 output tiles. Every output value of a query lies between
# its score-weighted sigmoids of the min and max mask logit in the tile's footprint. Where one
# query's lower bound beats every other query's upper bound and no query straddles
# `mask_threshold`, the tile's owner and thresholded areas are known without resizing; the other
# tiles (segment boundaries) are resized exactly, for their candidate queries only. Exact, like
# the dense path; much less work on model-like outputs.
_TILE = 16  # output tile side; output buckets (multiples of 32) are multiples of it
_PANOPTIC_MARGIN = 1e-5  # relative float32 error allowed between bounds and resized values
_SMALL_TILE_GROUP = 4  # undecided tiles with at most this many candidates are computed together
_TILE_MAX_WORK = 0.5  # fall back to the dense path above this share of its per-pixel work


@jax.jit
def _panoptic_tile_bounds(query_logits, score, row_window, col_window):
    """(N, tiles_y, tiles_x) upper and lower bounds of each query's score-weighted probability
    over each output tile. A resized probability is a convex combination of sigmoids of convex
    combinations of mask logits, so the sigmoid of the max / min logit over the tile's footprint
    on the mask logit grid bounds it (row_window (tiles_y, L) / col_window (tiles_x, M) list the
    footprint rows / columns, repeating the last one). Cheap: it reads the small logit grid."""
    num_queries, tiles_y, tiles_x = query_logits.shape[0], row_window.shape[0], col_window.shape[0]
    rows = jnp.take(query_logits, row_window.reshape(-1), axis=1)
    rows = rows.reshape(num_queries, tiles_y, -1, query_logits.shape[2])  # (N, tiles_y, L, w)
    row_high, row_low = rows.max(axis=2), rows.min(axis=2)  # (N, tiles_y, w)
    high = jnp.take(row_high, col_window.reshape(-1), axis=2).reshape(num_queries, tiles_y, tiles_x, -1).max(axis=3)
    low = jnp.take(row_low, col_window.reshape(-1), axis=2).reshape(num_queries, tiles_y, tiles_x, -1).min(axis=3)
    scale = score[:, None, None]
    return jax.nn.sigmoid(high) * scale, jax.nn.sigmoid(low) * scale


@jax.jit
def _panoptic_tile_exact(probs, score, tile_y, tile_x, candidates, second, valid_hw, mask_threshold):
    """Exact score-weighted resized probabilities of each undecided tile's candidate queries
    (candidates: (U, C) slots in ascending order, -1 = none), as the dense path computes them;
    returns the owning slot of every tile pixel and each candidate's thresholded area."""
    y = tile_y[:, None] * _TILE + jnp.arange(_TILE)  # (U, T) output rows
    x = tile_x[:, None] * _TILE + jnp.arange(_TILE)
    (r0, r1, h0, h1), (c0, c1, w0, w1) = (tuple(part[index] for part in taps) for taps, index in zip(second, (y, x)))
    slot = jnp.maximum(candidates, 0)  # (U, C)
    flat = probs.reshape(-1)
    base_h, base_w = probs.shape[1:]

    def at(r, c):  # (U, C, T, T)
        pixel = r[:, :, None] * base_w + c[:, None, :]  # (U, T, T)
        return jnp.take(flat, slot[:, :, None, None] * (base_h * base_w) + pixel[:, None], mode="clip")

    def weight(w, axis):
        return w[:, None, :, None] if axis == 0 else w[:, None, None, :]

    top = at(r0, c0) * weight(w0, 1) + at(r0, c1) * weight(w1, 1)
    bottom = at(r1, c0) * weight(w0, 1) + at(r1, c1) * weight(w1, 1)
    value = (top * weight(h0, 0) + bottom * weight(h1, 0)) * score[slot][:, :, None, None]
    value = jnp.where((candidates >= 0)[:, :, None, None], value, -jnp.inf)
    best, owner = value[:, 0], jnp.broadcast_to(slot[:, 0, None, None], value[:, 0].shape)
    for k in range(1, value.shape[1]):  # first max wins, as torch.argmax (slots are ascending)
        is_best = value[:, k] > best
        owner = jnp.where(is_best, slot[:, k, None, None], owner)
        best = jnp.where(is_best, value[:, k], best)
    valid = (y < valid_hw[0])[:, :, None] & (x < valid_hw[1])[:, None, :]  # (U, T, T)
    original_area = jnp.sum((value >= mask_threshold) & valid[:, None], axis=(2, 3))  # (U, C)
    return owner, original_area


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _float32_at_least(value: float) -> np.float32:
    """Smallest float32 >= value, so that `f32 >= it` equals transformers' `float(f32) >= value`."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return rounded


def _setup(outputs, target_sizes, intermediate_size, valid_sizes, padded_size):
    class_logits, mask_logits = _read_logits(outputs)
    batch_size = class_logits.shape[0]
    targets = _per_image_sizes(target_sizes, "target_sizes", batch_size)
    if intermediate_size is not None:
        intermediate_size = _size_pair(intermediate_size, "intermediate_size")
    extents = _valid_extents(valid_sizes, padded_size, mask_logits.shape[2:], batch_size)
    geometries = [
        _Geometry(
            mask_logits.shape[2:],
            None if extents is None else extents[i],
            intermediate_size,
            None if targets is None else targets[i],
        )
        for i in range(batch_size)
    ]
    return class_logits, mask_logits, geometries


_GEOMETRY_DOC = """
        target_sizes: per image (height, width) of the output, e.g. the original image sizes; `None`
            keeps the intermediate size (or the cropped mask size when `intermediate_size=None`).
            Its length must equal the batch size.
        intermediate_size: (height, width) the mask logits are first upsampled to (transformers
            hard-codes (384, 384)); an int means a square; `None` skips this resize.
        valid_sizes: per image (height, width), in pixels of the padded model input, of the image's
            valid (unpadded) region, which starts at the top-left corner (what the image processor
            gave each image before padding the batch). Only that region of the mask logits,
            `valid_size * mask_logits_size / padded_size` logit pixels (a fractional last row or
            column is resampled exactly), is resized to the intermediate / target size. With an
            integer number of logit pixels this equals running on the cropped logits.
        padded_size: (height, width) of the padded model input (`pixel_values.shape[-2:]`); defaults
            to 4 x the mask logits size (Mask2Former's mask logits have stride 4). Only with
            `valid_sizes`.
"""


# ----------------------------------------------------------------------------------------------
# Semantic
# ----------------------------------------------------------------------------------------------


def post_process_semantic_segmentation(
    outputs,
    target_sizes=None,
    return_segmentation_scores: bool = False,
    intermediate_size=DEFAULT_INTERMEDIATE_SIZE,
    valid_sizes=None,
    padded_size=None,
):
    """Semantic segmentation maps, as transformers' `post_process_semantic_segmentation`.

    Per pixel: argmax over classes of sum_q softmax(class_logits)[q, :-1] * sigmoid(mask)[q],
    computed at the intermediate size and bilinearly resized (the scores, not the map) to the target.

    Args:
        outputs: model outputs with `class_queries_logits` and `masks_queries_logits`.
        return_segmentation_scores: also return the (K, H, W) float32 class scores.
    {geometry}
    Returns:
        A list (one per image) of (H, W) int64 class-id maps, or of `SemanticSegmentationOutput`
        dicts `{{"segmentation", "segmentation_scores"}}` when `return_segmentation_scores`.
    """
    class_logits, mask_logits, geometries = _setup(outputs, target_sizes, intermediate_size, valid_sizes, padded_size)
    class_probs = _softmax(class_logits)[..., :-1]  # null class dropped, not renormalised (as HF)
    pending = []
    for i, geometry in enumerate(geometries):
        masks = geometry.masks(mask_logits[i])
        if return_segmentation_scores:  # exact output size: the scores are returned whole
            mask_probs = _resize_hw(masks, geometry.first, sigmoid=True)  # (Q, Hb, Wb)
            scores = _resize_hw(_class_scores_first(class_probs[i], mask_probs), geometry.second)  # (K, H, W)
            pending.append((_argmax_first_axis(scores), scores))
            continue
        plan = _semantic_plan(class_probs[i])
        if plan is None:
            pending.append((_semantic_dense(masks, class_probs[i], geometry), None))
            continue
        candidates, significant, weights, slack = plan
        candidate_probs = _resize_hw(_take_queries(masks, significant), geometry.first, sigmoid=True)  # (A, Hb, Wb)
        phase1 = _semantic_bounds(
            candidate_probs, weights, slack, candidates, geometry.second_index(), geometry.output_size_array()
        )
        pending.append((None, phase1))
    if not return_segmentation_scores:
        for i, (geometry, (labels, phase1)) in enumerate(zip(geometries, pending)):
            if phase1 is None:
                continue
            labels, undecided, needed, num_undecided, num_needed = phase1
            num_undecided, num_needed = int(num_undecided), int(num_needed)
            masks = geometry.masks(mask_logits[i])
            if num_undecided > _SPARSE_MAX_FRACTION * geometry.output_size[0] * geometry.output_size[1]:
                labels = _semantic_dense(masks, class_probs[i], geometry)  # bounds too loose: dense is cheaper
            elif num_undecided:
                labels = _semantic_refine(
                    masks,
                    class_probs[i],
                    labels,
                    *_padded_nonzero(np.asarray(needed)),
                    *_padded_nonzero(np.asarray(undecided)),
                    geometry.first_taps(),
                    geometry.second_taps(),
                )
            pending[i] = (labels, None)
    results = []
    for geometry, (labels, scores) in zip(geometries, pending):
        if return_segmentation_scores:
            results.append(
                SemanticSegmentationOutput(
                    segmentation=np.asarray(labels).astype(np.int64), segmentation_scores=np.array(scores, copy=True)
                )
            )
        else:
            results.append(geometry.crop_output(labels, np.int64))
    return results


def _semantic_dense(masks, class_probs, geometry):
    """argmax over all classes, every pixel (the plain algorithm)."""
    mask_probs = _resize_hw(masks, geometry.first, sigmoid=True)  # (Q, Hb, Wb)
    return _resized_argmax(_class_scores(class_probs, mask_probs), geometry.second_bucketed())


# The semantic argmax without scores takes an exact shortcut. A trained model gives most queries
# to the null class and most pixels to one confident query, so:
#   * candidate classes: those with the most summed probability; the others are bounded together
#     by one extra channel weighted, per query, by its largest non-candidate probability;
#   * significant queries: those with a candidate-class (or bound) probability >= 1%; the others
#     only add a bounded slack (their mask probabilities lie in [0, 1]).
# Phase 1 (`_semantic_bounds`) computes lower / upper bounds of every class score on the base grid
# from the significant queries alone; a class whose lower bound beats every other upper bound
# wins there, and wins at an output pixel if it wins at all of the (<= 4) base pixels it
# interpolates. Phase 2 (`_semantic_refine`) computes exact scores, all queries and classes, for
# the rest (mostly segment boundaries). When the bounds leave too much undecided (e.g. random
# logits), the dense path runs instead. Either way the result is the full argmax.
_CANDIDATE_BUCKETS = (8, 16, 32, 64)
_CANDIDATE_MIN_MASS = 0.2  # classes with less summed probability over the queries rarely win
_SIGNIFICANT_QUERY_WEIGHT = 0.01
_SPARSE_MAX_FRACTION = 0.25  # above this share of undecided output pixels, dense is cheaper


def _semantic_plan(class_probs: np.ndarray):
    """(candidate ids (C,), significant query ids (A,), their (A, C+1) weights, slack (C+1,)) for
    the two-phase argmax, or None when the classes are too spread out for it to pay off."""
    num_classes = class_probs.shape[1]
    mass = class_probs.sum(axis=0)
    wanted = int(np.count_nonzero(mass >= _CANDIDATE_MIN_MASS))
    size = next((bucket for bucket in _CANDIDATE_BUCKETS if bucket >= wanted), None)
    if size is None or 2 * size > num_classes:
        return None
    candidates = np.argsort(-mass, kind="stable")[:size]
    others = np.ones(num_classes, bool)
    others[candidates] = False
    weights = np.concatenate([class_probs[:, candidates], class_probs[:, others].max(axis=1, keepdims=True)], axis=1)
    is_significant = weights.max(axis=1) >= _SIGNIFICANT_QUERY_WEIGHT
    if not is_significant.any():
        return None
    significant = np.flatnonzero(is_significant)
    slots = _count_bucket(significant.size)
    slot_weights = np.zeros((slots, weights.shape[1]), np.float32)  # padding slots weigh nothing
    slot_weights[: significant.size] = weights[significant]
    slack = weights[~is_significant].sum(axis=0).astype(np.float32)
    return candidates.astype(np.int32), _padded(significant, slots).astype(np.int32), slot_weights, slack


def _padded_nonzero(mask: np.ndarray):
    """(rows, cols) of a boolean map's true pixels, padded to a bucketed length with an
    out-of-range row (dropped by the scatters that use them)."""
    rows, cols = np.nonzero(mask)
    length = _pixel_bucket(rows.size)
    padded_rows = np.full(length, max(mask.shape), np.int32)
    padded_cols = np.zeros(length, np.int32)
    padded_rows[: rows.size], padded_cols[: cols.size] = rows, cols
    return padded_rows, padded_cols


def _pixel_bucket(count: int) -> int:
    """Round a pixel count up to 1, 1.25, 1.5 or 1.75 times a power of two (>= 1024)."""
    if count <= 1024:
        return 1024
    power = 1 << ((count - 1).bit_length() - 1)  # largest power of two < count
    return next(power * step // 4 for step in (5, 6, 7, 8) if power * step // 4 >= count)


post_process_semantic_segmentation.__doc__ = post_process_semantic_segmentation.__doc__.format(geometry=_GEOMETRY_DOC)


# ----------------------------------------------------------------------------------------------
# Instance
# ----------------------------------------------------------------------------------------------


def post_process_instance_segmentation(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes=None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    intermediate_size=DEFAULT_INTERMEDIATE_SIZE,
    valid_sizes=None,
    padded_size=None,
):
    """Instance segmentation, as transformers' `post_process_instance_segmentation`.

    The Q best (query, class) pairs by class probability (null class excluded) are scored by
    class probability x mean sigmoid over the mask's positive logits (at the intermediate size);
    pairs with score >= `threshold` and a non-empty mask at the output size are kept, in descending
    class-probability order (see difference 5 in the module docstring), with ids 0, 1, ...

    Args:
        outputs: model outputs with `class_queries_logits` and `masks_queries_logits`.
        threshold: minimum instance score (`>=`).
        mask_threshold, overlap_mask_area_threshold: accepted and unused, as in transformers.
        return_coco_annotation: `segmentation` becomes a list of pycocotools RLE dicts, one per
            instance (its full mask) in `segments_info` order.
        return_binary_maps: `segmentation` becomes the (N, H, W) float32 stack of instance masks
            (the (H, W) -1 map when N = 0, as transformers).
    {geometry}
    Returns:
        A list (one per image) of `{{"segmentation", "segments_info"}}`; `segmentation` is an (H, W)
        float32 id map with -1 for background (later instances painted over earlier ones) unless a
        return flag is set; `segments_info` holds `{{"id", "label_id", "was_fused": False, "score"}}`.
    """
    del mask_threshold, overlap_mask_area_threshold  # unused, as in transformers
    if return_coco_annotation and return_binary_maps:
        raise ValueError("return_coco_annotation and return_binary_maps can not be both set to True.")
    class_logits, mask_logits, geometries = _setup(outputs, target_sizes, intermediate_size, valid_sizes, padded_size)
    num_queries, num_classes = class_logits.shape[1], class_logits.shape[2] - 1
    pair_probs = _softmax(class_logits)[..., :-1].reshape(len(geometries), -1)  # (B, Q*K)
    # descending probability, ties by flat index (= query-major, then class): topk(sorted=True)
    order = np.argsort(-pair_probs, axis=1, kind="stable")[:, :num_queries]
    lowest_candidate = threshold / (1 + _MASK_SCORE_SLACK) if threshold > 0 else -np.inf
    threshold32 = _float32_at_least(threshold)
    return_masks = return_coco_annotation or return_binary_maps

    pending = []
    for i, geometry in enumerate(geometries):
        probs = pair_probs[i, order[i]]
        candidates = order[i][probs >= lowest_candidate]  # the others cannot reach the threshold
        if candidates.size == 0:
            pending.append(None)
            continue
        slots = _count_bucket(candidates.size)
        is_real = np.arange(slots) < candidates.size
        flat = _padded(candidates, slots)
        rows, cols = geometry.nearest_bucketed()
        query_logits = _take_queries(geometry.masks(mask_logits[i]), (flat // num_classes).astype(np.int32))
        logits = _resize_hw(query_logits, geometry.first)  # (N, Hb, Wb), not binarised yet
        kernel_out = _instance_finish(
            logits, pair_probs[i, flat], is_real, rows, cols, threshold32, return_masks=return_masks
        )
        pending.append((kernel_out, flat % num_classes))

    results = []
    for geometry, item in zip(geometries, pending):
        if item is None:
            segmentation, segments, masks = np.full(geometry.output_size, -1, np.float32), [], None
        else:
            (segmentation, scores, keep, binary), labels = item
            segmentation = geometry.crop_output(segmentation)
            scores, keep = np.asarray(scores), np.asarray(keep)
            kept = np.flatnonzero(keep)
            segments = [
                {"id": n, "label_id": int(labels[j]), "was_fused": False, "score": round(float(scores[j]), 6)}
                for n, j in enumerate(kept)
            ]
            masks = None
            if return_masks and kept.size:
                rows = nearest_indices(geometry.base_size[0], geometry.output_size[0])
                cols = nearest_indices(geometry.base_size[1], geometry.output_size[1])
                kept_binary = np.asarray(binary)[kept]
                masks = kept_binary[:, rows][:, :, cols]  # (N, H, W) bool at the output size
        if return_coco_annotation:
            segmentation = [] if masks is None else [mask_to_coco_rle(mask) for mask in masks]
        elif return_binary_maps and masks is not None:
            segmentation = masks.astype(np.float32)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


post_process_instance_segmentation.__doc__ = post_process_instance_segmentation.__doc__.format(geometry=_GEOMETRY_DOC)


# ----------------------------------------------------------------------------------------------
# Panoptic
# ----------------------------------------------------------------------------------------------


def _panoptic_dense(query_logits, scores, geometry, mask_threshold32):
    """Owner map and areas of the kept queries, every probability resized: sigmoid after the
    first resize, score weighting after the second, as transformers."""
    second = geometry.second_bucketed()
    probs = _resize_hw(query_logits, geometry.first, sigmoid=True, query_scale=None if second is not None else scores)
    if second is not None:
        probs = _resize_hw(probs, second, query_scale=scores)  # (N, Ht, Wt)
    return _panoptic_finish(probs, geometry.output_size_array(), mask_threshold32)


def _pow2_bucket(count: int) -> int:
    return 1 << max(2, (count - 1).bit_length())


def _panoptic_tiled(query_logits, probs, scores, num_real, bounds, geometry, mask_threshold32):
    """Owner map and areas from the tile bounds (see `_panoptic_tile_bounds`), resizing exactly
    only the undecided tiles; the dense path when that would not save at least half the work."""
    high, low = (np.asarray(bound) for bound in bounds)  # (N, tiles_y, tiles_x)
    slots, tiles_y, tiles_x = high.shape
    high, low = high.reshape(slots, -1), low.reshape(slots, -1)  # (N, tiles)
    real = (np.arange(slots) < num_real)[:, None]  # padding slots (score 0) never own a pixel
    best_low = np.where(real, low, -np.inf).max(axis=0)
    may_own = real & (high >= best_low - _PANOPTIC_MARGIN * np.abs(best_low))
    threshold = float(mask_threshold32)
    above = low >= threshold + _PANOPTIC_MARGIN * abs(threshold)  # every pixel counts
    below = high < threshold - _PANOPTIC_MARGIN * abs(threshold)  # no pixel counts
    straddles = real & ~above & ~below
    candidates = (may_own | straddles).T  # (tiles, N)
    decided = (may_own.sum(axis=0) == 1) & ~straddles.any(axis=0)
    undecided = np.flatnonzero(~decided)
    # undecided tiles in two groups by number of candidates, each padded to a bucketed width
    num_candidates = candidates[undecided].sum(axis=1)
    groups = [undecided[num_candidates <= _SMALL_TILE_GROUP], undecided[num_candidates > _SMALL_TILE_GROUP]]
    widths = [_SMALL_TILE_GROUP, _pow2_bucket(int(num_candidates.max(initial=1)))]
    work = sum(_pow2_bucket(group.size) * width for group, width in zip(groups, widths) if group.size)
    if work > _TILE_MAX_WORK * slots * decided.size:
        return _panoptic_dense(query_logits, scores, geometry, mask_threshold32)

    pixels = geometry.tile_valid_pixels().reshape(-1)  # valid output pixels per tile
    tile_owner = may_own.argmax(axis=0)  # the single possible owner of a decided tile
    area = np.bincount(tile_owner[decided], weights=pixels[decided], minlength=slots)
    # thresholded areas: from the bounds, except for the candidates of undecided tiles (exact)
    by_bounds = above & ~(candidates.T & ~decided)
    original_area = (by_bounds * pixels).sum(axis=1).astype(np.float64)
    owner_tiles = np.repeat(tile_owner.astype(np.int32), _TILE * _TILE).reshape(-1, _TILE, _TILE)
    second, output_size = geometry.second_bucketed(), geometry.output_size_array()
    pending = []
    for group, width in zip(groups, widths):
        if not group.size:
            continue
        # candidate slots in ascending order (the argmax tie rule), padded with -1
        order = np.argsort(~candidates[group], axis=1, kind="stable")
        order = np.pad(order, ((0, 0), (0, max(0, width - slots))))[:, :width]
        lists = np.where(np.arange(width) < candidates[group].sum(axis=1, keepdims=True), order, -1).astype(np.int32)
        count = _pow2_bucket(group.size)  # coarse buckets: few compiles
        tiles = _padded(group, count)
        lists = np.concatenate([lists, np.repeat(lists[-1:], count - group.size, axis=0)])
        tile_y, tile_x = (tiles // tiles_x).astype(np.int32), (tiles % tiles_x).astype(np.int32)
        result = _panoptic_tile_exact(probs, scores, tile_y, tile_x, lists, second, output_size, mask_threshold32)
        pending.append((group, lists[: group.size], tile_y[: group.size], tile_x[: group.size], result))
    for group, lists, tile_y, tile_x, (owner, exact_area) in pending:
        owner = np.asarray(owner)[: group.size]
        owner_tiles[group] = owner
        rows_valid = tile_y[:, None] * _TILE + np.arange(_TILE) < geometry.output_size[0]
        cols_valid = tile_x[:, None] * _TILE + np.arange(_TILE) < geometry.output_size[1]
        area += np.bincount(owner[rows_valid[:, :, None] & cols_valid[:, None, :]], minlength=slots)
        used = lists >= 0
        np.add.at(original_area, lists[used], np.asarray(exact_area)[: group.size][used])
    owner_map = owner_tiles.reshape(tiles_y, tiles_x, _TILE, _TILE).transpose(0, 2, 1, 3)
    owner_map = owner_map.reshape(tiles_y * _TILE, tiles_x * _TILE)
    return owner_map, np.rint(area).astype(np.int64), np.rint(original_area).astype(np.int64)


def post_process_panoptic_segmentation(
    outputs,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse=None,
    target_sizes=None,
    intermediate_size=DEFAULT_INTERMEDIATE_SIZE,
    valid_sizes=None,
    padded_size=None,
):
    """Panoptic segmentation, as transformers' `post_process_panoptic_segmentation`, with unique ids.

    Queries whose max softmax (null class included) is a real class with probability > `threshold`
    are kept (ascending query order). Each pixel goes to the kept query with the largest
    score x mask probability; a query becomes a segment when it owns some pixels and
    owned / (score-weighted prob >= `mask_threshold`) area > `overlap_mask_area_threshold`.

    Ids (difference 1 in the module docstring): segments get ids 1, 2, ... in query order; all
    segments of a label in `label_ids_to_fuse` share the id of its first segment and one
    `segments_info` entry (score = max over the fused queries). Ids never collide.

    Args:
        outputs: model outputs with `class_queries_logits` and `masks_queries_logits`.
        threshold: minimum class probability of a kept query (strict `>`).
        mask_threshold: threshold on the score-weighted mask probability (`>=`), for the area ratio.
        overlap_mask_area_threshold: minimum owned / thresholded area ratio (strict `>`).
        label_ids_to_fuse: labels whose segments are merged into one (e.g. stuff classes); `None`
            means none (transformers logs a warning; this does not).
    {geometry}
    Returns:
        A list (one per image) of `{{"segmentation", "segments_info"}}`: an (H, W) int32 id map
        (0 = no segment) and `{{"id", "label_id", "was_fused", "score"}}` per segment. An image with
        no kept query gets a float32 map of -1 and `[]`, as in transformers.
    """
    label_ids_to_fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
    class_logits, mask_logits, geometries = _setup(outputs, target_sizes, intermediate_size, valid_sizes, padded_size)
    num_labels = class_logits.shape[-1] - 1
    probs = _softmax(class_logits)
    pred_scores, pred_labels = probs.max(axis=-1), probs.argmax(axis=-1)  # null class included
    keep_all = (pred_labels != num_labels) & (pred_scores > np.float32(threshold))  # float32 compare, as torch
    mask_threshold32 = np.float32(mask_threshold)

    pending = []
    for i, geometry in enumerate(geometries):
        kept = np.flatnonzero(keep_all[i])
        if kept.size == 0:
            pending.append(None)
            continue
        slots = _count_bucket(kept.size)
        scores = np.zeros(slots, np.float32)
        scores[: kept.size] = pred_scores[i, kept]
        query_logits = _take_queries(geometry.masks(mask_logits[i]), _padded(kept, slots).astype(np.int32))
        if geometry.second is None:  # no second resize: the dense path is all there is
            pending.append(_panoptic_dense(query_logits, scores, geometry, mask_threshold32))
            continue
        probs = _resize_hw(query_logits, geometry.first, sigmoid=True)  # (N, Hb, Wb)
        bounds = _panoptic_tile_bounds(query_logits, scores, *geometry.tile_windows())
        pending.append(("tiles", query_logits, probs, scores, kept.size, bounds))
    for i, (geometry, item) in enumerate(zip(geometries, pending)):
        if item is not None and item[0] == "tiles":
            pending[i] = _panoptic_tiled(*item[1:], geometry, mask_threshold32)

    results = []
    for i, (geometry, item) in enumerate(zip(geometries, pending)):
        if item is None:
            results.append({"segmentation": np.full(geometry.output_size, -1, np.float32), "segments_info": []})
            continue
        owner, area, original_area = (np.asarray(x) for x in item)
        kept = np.flatnonzero(keep_all[i])
        segment_of_slot = np.zeros(area.shape[0], np.int32)  # padding slots never own pixels
        segments, fused_entries = [], {}
        for slot, query in enumerate(kept):
            owned, thresholded = int(area[slot]), int(original_area[slot])
            if not (owned > 0 and thresholded > 0):
                continue
            # transformers divides int64 tensors: a float32 ratio, compared as a Python float
            if not float(np.float32(owned) / np.float32(thresholded)) > overlap_mask_area_threshold:
                continue
            label = int(pred_labels[i, query])
            score = round(float(pred_scores[i, query]), 6)
            fused = label in label_ids_to_fuse
            if fused and label in fused_entries:
                entry = fused_entries[label]
                entry["score"] = max(entry["score"], score)
            else:
                entry = {"id": len(segments) + 1, "label_id": label, "was_fused": fused, "score": score}
                segments.append(entry)
                if fused:
                    fused_entries[label] = entry
            segment_of_slot[slot] = entry["id"]
        height, width = geometry.output_size
        segmentation = np.take(segment_of_slot, np.asarray(owner)[:height, :width])  # a new array
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


post_process_panoptic_segmentation.__doc__ = post_process_panoptic_segmentation.__doc__.format(geometry=_GEOMETRY_DOC)
