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
the undecided tiles' candidate queries. Both are exact (see `post_kernels`, which holds every
kernel, and why), only faster on model-like outputs; unstructured logits fall back to the plain
dense algorithm. The first call for a new shape pays the compiles (seconds on a 2-core machine).

Layout: this module holds the public API, its argument checks and the result formats;
`mask_resize` the PyTorch-exact resize (taps, per-image geometry, jitted resize stages);
`post_kernels` the per-image kernels, dense and fast.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from m2f_jax.processing.arrays import as_numpy
from m2f_jax.processing.mask_resize import ResizeGeometry, count_bucket, nearest_indices, padded, resize_hw, take_queries
from m2f_jax.processing.post_kernels import (
    finish_panoptic,
    finish_semantic_argmax,
    instance_finish,
    semantic_with_scores,
    start_panoptic,
    start_semantic_argmax,
)
from m2f_jax.processing.rle import binary_mask_to_rle, convert_segmentation_to_rle, mask_to_coco_rle

__all__ = [
    "DEFAULT_INTERMEDIATE_SIZE",
    "MASK_STRIDE",
    "SemanticSegmentationOutput",
    "binary_mask_to_rle",
    "convert_segmentation_to_rle",
    "mask_to_coco_rle",
    "post_process_instance_segmentation",
    "post_process_panoptic_segmentation",
    "post_process_semantic_segmentation",
]

DEFAULT_INTERMEDIATE_SIZE = (384, 384)  # transformers' hard-coded size
MASK_STRIDE = 4  # mask logits are at 1/4 of the (padded) model input resolution
# mean mask prob <= 1 up to float32 summation error; pairs below threshold / (1 + this) cannot pass
_MASK_SCORE_SLACK = 1e-4


class NonFiniteLogitsError(ValueError):
    """The outputs hold NaN or infinite logits (a diverged model, a bf16 overflow): no map to make."""


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
    class_logits = as_numpy(get(keys[0])).astype(np.float32, copy=False)
    mask_logits = as_numpy(get(keys[1])).astype(np.float32, copy=False)
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
            raise NonFiniteLogitsError(
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
        ResizeGeometry(
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


def _with_geometry_doc(function):
    """Fill the `{geometry}` slot of a public function's docstring with the arguments above."""
    function.__doc__ = function.__doc__.format(geometry=_GEOMETRY_DOC)
    return function


# ----------------------------------------------------------------------------------------------
# Semantic
# ----------------------------------------------------------------------------------------------


@_with_geometry_doc
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
    pending = []  # per image: (labels, scores) with scores, else what start_semantic_argmax gave
    for i, geometry in enumerate(geometries):
        masks = geometry.masks(mask_logits[i])
        if return_segmentation_scores:
            pending.append(semantic_with_scores(masks, class_probs[i], geometry))
        else:
            pending.append(start_semantic_argmax(masks, class_probs[i], geometry))
    if not return_segmentation_scores:
        pending = [
            (finish_semantic_argmax(geometry.masks(mask_logits[i]), class_probs[i], geometry, started), None)
            for i, (geometry, started) in enumerate(zip(geometries, pending))
        ]
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


# ----------------------------------------------------------------------------------------------
# Instance
# ----------------------------------------------------------------------------------------------


@_with_geometry_doc
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
        slots = count_bucket(candidates.size)
        is_real = np.arange(slots) < candidates.size
        flat = padded(candidates, slots)
        rows, cols = geometry.nearest_bucketed()
        query_logits = take_queries(geometry.masks(mask_logits[i]), (flat // num_classes).astype(np.int32))
        logits = resize_hw(query_logits, geometry.first)  # (N, Hb, Wb), not binarised yet
        kernel_out = instance_finish(
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


# ----------------------------------------------------------------------------------------------
# Panoptic
# ----------------------------------------------------------------------------------------------


@_with_geometry_doc
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
        slots = count_bucket(kept.size)
        scores = np.zeros(slots, np.float32)
        scores[: kept.size] = pred_scores[i, kept]
        query_logits = take_queries(geometry.masks(mask_logits[i]), padded(kept, slots).astype(np.int32))
        pending.append(start_panoptic(query_logits, scores, kept.size, geometry, mask_threshold32))
    pending = [
        None if started is None else finish_panoptic(started, geometry, mask_threshold32)
        for geometry, started in zip(geometries, pending)
    ]

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
