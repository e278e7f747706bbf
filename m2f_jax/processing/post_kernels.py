"""The per-image JAX kernels of post-processing: the plain (dense) algorithms and their exact fast paths.

`post_processing` reads and checks the arguments, builds each image's `ResizeGeometry` and turns
what these kernels return into transformers' result formats; everything per pixel happens here.
Each kernel is jitted for one image (static shapes: one compile per shape; `mask_resize` buckets
the sizes).

The dense algorithms are transformers': resize the mask logits, sigmoid, weight by class
probabilities, argmax. Two fast paths compute the same result with less work on model-like outputs
(most queries predict the null class, most pixels belong to one confident query):

  * semantic argmax (without scores): bounds on every class score decide most pixels, exact
    scores are computed for the rest (`_semantic_plan`, `_semantic_bounds`, `_semantic_refine`);
  * panoptic with a target size: bounds on every query's probability decide most 16x16 output
    tiles, the rest are resized exactly for their candidate queries only (`_panoptic_tiled`).

Why they are exact: every resized value is a convex combination (bilinear weights are non-negative
and sum to one) of values on the coarser grid, and sigmoid is monotonic. So a class whose score is
bounded above its rivals' at the (<= 4) base pixels an output pixel interpolates wins there too
(semantic), and a query's probability anywhere in a tile lies between the sigmoids of the min and
max mask logit of the tile's footprint on the logit grid (panoptic). A pixel or tile is
decided only when one class / query wins by a margin larger than the float32 rounding between the
bounds and the dense computation (`_SEMANTIC_MARGIN`, `_PANOPTIC_MARGIN`); every other pixel gets
the dense path's own formulas, in the same order of operations. When the bounds decide too little
(unstructured logits), the dense kernel runs instead, so the fast paths never cost much more.

Work is started for every image of a batch before any result is read back (`start_*`, then
`finish_*`): JAX dispatches asynchronously, so one image's host-side planning overlaps another's
kernels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.processing.mask_resize import TILE, count_bucket, padded, resize_axis, resize_hw, take_queries

__all__ = [
    "PanopticTiles",
    "SemanticBounds",
    "finish_panoptic",
    "finish_semantic_argmax",
    "instance_finish",
    "semantic_with_scores",
    "start_panoptic",
    "start_semantic_argmax",
]


# ----------------------------------------------------------------------------------------------
# Semantic
# ----------------------------------------------------------------------------------------------


class SemanticBounds(NamedTuple):
    """Phase 1 of the two-phase semantic argmax (device arrays, read back by phase 2)."""

    labels: jax.Array  # (Ho, Wo) int32 labels at the bucketed output size, -1 = undecided
    undecided: jax.Array  # (Ho, Wo) bool: the valid output pixels phase 2 must compute
    needed: jax.Array  # (base_h, base_w) bool: the base pixels phase 2 reads
    num_undecided: jax.Array  # () int, undecided.sum()
    num_needed: jax.Array  # () int, needed.sum()


class _SemanticPlan(NamedTuple):
    """What phase 1 bounds (see the comment above `_CANDIDATE_BUCKETS`)."""

    candidates: np.ndarray  # (C,) int32 candidate class ids
    significant: np.ndarray  # (A,) int32 significant query ids, padded to a bucketed count
    weights: np.ndarray  # (A, C+1) float32 their candidate-class probabilities, last: best other class
    slack: np.ndarray  # (C+1,) float32 the same weights summed over the other queries


def semantic_with_scores(masks, class_probs, geometry):
    """(labels (H, W), class scores (K, H, W)) at the exact output size: the dense algorithm, every
    class kept (the scores are returned whole)."""
    mask_probs = resize_hw(masks, geometry.first, sigmoid=True)  # (Q, Hb, Wb)
    scores = resize_hw(_class_scores_first(class_probs, mask_probs), geometry.second)  # (K, H, W)
    return _argmax_first_axis(scores), scores


def start_semantic_argmax(masks, class_probs, geometry):
    """The (bucketed) label map of the dense argmax, or `SemanticBounds` for
    `finish_semantic_argmax` when the classes allow the two-phase argmax."""
    plan = _semantic_plan(class_probs)
    if plan is None:
        return _semantic_dense(masks, class_probs, geometry)
    candidate_probs = resize_hw(take_queries(masks, plan.significant), geometry.first, sigmoid=True)  # (A, Hb, Wb)
    return SemanticBounds(
        *_semantic_bounds(
            candidate_probs,
            plan.weights,
            plan.slack,
            plan.candidates,
            geometry.second_index(),
            geometry.output_size_array(),
        )
    )


def finish_semantic_argmax(masks, class_probs, geometry, started):
    """The (bucketed) label map: `started` itself unless it is `SemanticBounds`; then phase 2
    (exact scores where the bounds did not decide), or the dense argmax when too much is undecided."""
    if not isinstance(started, SemanticBounds):
        return started
    num_undecided = int(started.num_undecided)
    if num_undecided > _SPARSE_MAX_FRACTION * geometry.output_size[0] * geometry.output_size[1]:
        return _semantic_dense(masks, class_probs, geometry)  # bounds too loose: dense is cheaper
    if not num_undecided:
        return started.labels
    return _semantic_refine(
        masks,
        class_probs,
        started.labels,
        *_padded_nonzero(np.asarray(started.needed)),
        *_padded_nonzero(np.asarray(started.undecided)),
        geometry.first_taps(),
        geometry.second_taps(),
    )


@jax.jit
def _class_scores(class_weights, mask_probs):
    """(H, W, C) = sum_q class_weights[q, c] * mask_probs[q]; classes last for the argmax."""
    return jnp.einsum("qc,qhw->hwc", class_weights, mask_probs)


@jax.jit
def _resized_argmax(scores, second):
    """argmax over the last axis of the (optionally) resized (H, W, C) scores; the resize fuses
    into the reduction, which is its only consumer."""
    if second is not None:
        scores = resize_axis(resize_axis(scores, second[1], 1), second[0], 0)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _semantic_dense(masks, class_probs, geometry):
    """argmax over all classes, every pixel (the plain algorithm)."""
    mask_probs = resize_hw(masks, geometry.first, sigmoid=True)  # (Q, Hb, Wb)
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
    """What the two-phase argmax bounds (see `_SemanticPlan`), or None when the classes are too
    spread out for it to pay off."""
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
    slots = count_bucket(significant.size)
    slot_weights = np.zeros((slots, weights.shape[1]), np.float32)  # padding slots weigh nothing
    slot_weights[: significant.size] = weights[significant]
    slack = weights[~is_significant].sum(axis=0).astype(np.float32)
    return _SemanticPlan(candidates.astype(np.int32), padded(significant, slots).astype(np.int32), slot_weights, slack)


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


@jax.jit
def _class_scores_first(class_weights, mask_probs):
    """(C, H, W) = sum_q class_weights[q, c] * mask_probs[q] (transformers' layout; with few
    classes XLA's dot is ~3x faster this way than classes-last)."""
    return jnp.einsum("qc,qhw->chw", class_weights, mask_probs)


@jax.jit
def _argmax_first_axis(scores):
    return jnp.argmax(scores, axis=0).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Instance
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("return_masks",))
def instance_finish(logits, pair_score, is_real, rows, cols, threshold, return_masks):
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


# ----------------------------------------------------------------------------------------------
# Panoptic
# ----------------------------------------------------------------------------------------------


class PanopticTiles(NamedTuple):
    """An image started on the tiled panoptic path: what `_panoptic_tiled` needs."""

    query_logits: jax.Array  # (N, h, w) mask logits of the kept queries (padded to N slots)
    probs: jax.Array  # (N, Hb, Wb) their sigmoids after the first resize
    scores: np.ndarray  # (N,) float32 class scores, 0 for padding slots
    num_real: int  # kept queries; the slots after them are padding
    bounds: tuple  # (high, low), each (N, tiles_y, tiles_x), from `_panoptic_tile_bounds`


def start_panoptic(query_logits, scores, num_real, geometry, mask_threshold32):
    """The dense result (owner map, owned areas, thresholded areas), or `PanopticTiles` for
    `finish_panoptic` when there is a second resize (a target size) to decide tile by tile."""
    if geometry.second is None:  # no second resize: the dense path is all there is
        return _panoptic_dense(query_logits, scores, geometry, mask_threshold32)
    probs = resize_hw(query_logits, geometry.first, sigmoid=True)  # (N, Hb, Wb)
    bounds = _panoptic_tile_bounds(query_logits, scores, *geometry.tile_windows())
    return PanopticTiles(query_logits, probs, scores, num_real, bounds)


def finish_panoptic(started, geometry, mask_threshold32):
    """(owner map (bucketed), owned area, thresholded area per slot): `started` itself unless it
    is `PanopticTiles`; then the tiled path."""
    if isinstance(started, PanopticTiles):
        return _panoptic_tiled(started, geometry, mask_threshold32)
    return started


@jax.jit
def _panoptic_owners(weighted_probs, valid_hw, mask_threshold):
    """Pixel owner (query slot) map and, per slot, owned area and thresholded area, from the
    score-weighted probabilities (a separate stage: a fused producer makes XLA's argmax ~10x slower)."""
    owner = jnp.argmax(weighted_probs, axis=0).astype(jnp.int32)  # first max wins, as torch.argmax
    height, width = owner.shape
    inside = (jnp.arange(height) < valid_hw[0])[:, None] & (jnp.arange(width) < valid_hw[1])[None, :]
    slots = weighted_probs.shape[0]
    area = jnp.bincount(jnp.where(inside, owner, slots).reshape(-1), length=slots + 1)[:slots]
    original_area = jnp.sum((weighted_probs >= mask_threshold) & inside, axis=(1, 2))
    return owner, area, original_area


def _panoptic_dense(query_logits, scores, geometry, mask_threshold32):
    """Owner map and areas of the kept queries, every probability resized: sigmoid after the
    first resize, score weighting after the second, as transformers."""
    second = geometry.second_bucketed()
    probs = resize_hw(query_logits, geometry.first, sigmoid=True, query_scale=None if second is not None else scores)
    if second is not None:
        probs = resize_hw(probs, second, query_scale=scores)  # (N, Ht, Wt)
    return _panoptic_owners(probs, geometry.output_size_array(), mask_threshold32)


# Panoptic with a target size, by 16x16 output tiles. Every output value of a query lies between
# its score-weighted sigmoids of the min and max mask logit in the tile's footprint. Where one
# query's lower bound beats every other query's upper bound and no query straddles
# `mask_threshold`, the tile's owner and thresholded areas are known without resizing; the other
# tiles (segment boundaries) are resized exactly, for their candidate queries only. Exact, like
# the dense path; much less work on model-like outputs.
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
    y = tile_y[:, None] * TILE + jnp.arange(TILE)  # (U, T) output rows
    x = tile_x[:, None] * TILE + jnp.arange(TILE)
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


def _pow2_bucket(count: int) -> int:
    return 1 << max(2, (count - 1).bit_length())


def _panoptic_tiled(tiles: PanopticTiles, geometry, mask_threshold32):
    """Owner map and areas from the tile bounds (see `_panoptic_tile_bounds`), resizing exactly
    only the undecided tiles; the dense path when that would not save at least half the work."""
    query_logits, probs, scores, num_real, bounds = tiles
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
    owner_tiles = np.repeat(tile_owner.astype(np.int32), TILE * TILE).reshape(-1, TILE, TILE)
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
        tiles = padded(group, count)
        lists = np.concatenate([lists, np.repeat(lists[-1:], count - group.size, axis=0)])
        tile_y, tile_x = (tiles // tiles_x).astype(np.int32), (tiles % tiles_x).astype(np.int32)
        result = _panoptic_tile_exact(probs, scores, tile_y, tile_x, lists, second, output_size, mask_threshold32)
        pending.append((group, lists[: group.size], tile_y[: group.size], tile_x[: group.size], result))
    for group, lists, tile_y, tile_x, (owner, exact_area) in pending:
        owner = np.asarray(owner)[: group.size]
        owner_tiles[group] = owner
        rows_valid = tile_y[:, None] * TILE + np.arange(TILE) < geometry.output_size[0]
        cols_valid = tile_x[:, None] * TILE + np.arange(TILE) < geometry.output_size[1]
        area += np.bincount(owner[rows_valid[:, :, None] & cols_valid[:, None, :]], minlength=slots)
        used = lists >= 0
        np.add.at(original_area, lists[used], np.asarray(exact_area)[: group.size][used])
    owner_map = owner_tiles.reshape(tiles_y, tiles_x, TILE, TILE).transpose(0, 2, 1, 3)
    owner_map = owner_map.reshape(tiles_y * TILE, tiles_x * TILE)
    return owner_map, np.rint(area).astype(np.int64), np.rint(original_area).astype(np.int64)
