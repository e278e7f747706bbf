"""Mask2Former's training loss (transformers' ``Mask2FormerLoss`` + the weighting of
``Mask2FormerForUniversalSegmentation.get_loss_dict``), jittable with static shapes.

Per prediction level (the final prediction, then each auxiliary one, each matched independently
with fresh points):

* ``loss_cross_entropy``: class_weight * weighted-mean cross-entropy over all B*Q queries, class
  weights ``[1]*K + [no_object_weight]``; unmatched queries target the "no object" class K.
* ``loss_mask``: mask_weight * sigmoid BCE, averaged over the points of each matched pair,
  summed over the pairs and divided by ``num_masks``.
* ``loss_dice``: dice_weight * dice loss (+1 smoothing) on the same points, summed / num_masks.

The points of each pair are importance-sampled as in transformers: ``int(P * oversample_ratio)``
uniform points, the ``int(importance_sample_ratio * P)`` most uncertain ones (uncertainty
``-|logit|`` of the matched prediction) kept, plus ``P - k`` fresh uniform points.

``num_masks = max(number of valid targets / world, 1)``; with ``axis_name`` the count is summed
over that mapped axis and divided by its size (transformers with accelerate).

**Dense mask loss** (``LossConfig.mask_loss="dense"``; opt-in, a training choice: the default
"points" is transformers' loss, and ``model(..., mask_labels=...)`` always uses it). The matcher's
mask costs and the mask and dice losses are computed over every cell of the (h, w) mask logits
instead of at points: the targets become area averages on that grid (s x s blocks, s = ceil(H /
h), 4 for the model's targets at the input size; H and W zero-padded to s*h, s*w as the model
pads its input), the BCE is averaged over the N = h*w cells, and dice's sums are scaled by
P / N (P = ``train_num_points``), so that the +1 smoothing weighs what it does on P points.
One set of pair-wise (Q x M) costs, einsums and no gathers, serves the matcher (without
gradient) and the loss (the matched pairs, by a one-hot mask). No random points: it is the
expected value of the uniform point loss (``importance_sample_ratio`` 0) up to the sampling's
bilinear interpolation of the logits inside a cell; tests/test_dense_loss.py measures the gap on
the model's own logits. There is no importance sampling of uncertain points.

Static shapes: targets are padded to M slots per image (``label_valid`` marks the real ones); the
mask terms are computed for all B*M slots and the unmatched ones are masked out.

Class labels of the valid slots must be in ``[0, num_labels)`` (``num_labels`` is "no object", not a
target class). Given concrete arrays, one outside is a ``ValueError``. Under a transformation (jit,
vmap, grad: the labels are tracers) it cannot raise; every loss term is then NaN, the returned
``"invalid_labels"`` counts the offending valid slots, and the gradient of that call is zero
(transformers' loss does not check the labels).

Randomness comes from ``key``, or from ``given_points`` to replay transformers' ``torch.rand``
draws exactly (the parity tests build them from recorded draws: tests/hf_models.py). ``given_points`` is a sequence with one dict
per prediction level, in transformers' draw order (final prediction first, then auxiliary 0, 1,
...)::

    {"matcher":     (B, P, 2)   # the B draws torch.rand(1, P, 2), concatenated
     "oversampled": (L, int(P * oversample_ratio), 2)
     "random":      (L, P - int(importance_sample_ratio * P), 2)}  # may be omitted when P - k == 0

Row r of "oversampled"/"random" belongs to the r-th matched pair in transformers' order: images in
batch order, and within an image by ascending query index. L must be at least the number of
matched pairs R = sum_i min(Q, N_i) (transformers draws exactly R rows; extra rows are ignored).
All levels must have the same L.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.deformable import sample_maps, sample_points
from m2f_jax.modeling.matcher import (
    Matching,
    _check_matcher_inputs,
    checked_label_valid,
    class_costs,
    dense_mask_costs,
    dense_targets,
    hungarian_matcher,
    match,
)

PREDICTION_KEYS = ("class_queries_logits", "masks_queries_logits")
MASK_LOSSES = ("points", "dense")
_TRAINING_ONLY = ("mask_loss",)  # LossConfig fields that Mask2FormerConfig does not have
# transformers' list of per-level dicts, or one dict of arrays stacked on a leading level axis.
AuxiliaryLogits = Union[Sequence[Mapping[str, jax.Array]], Mapping[str, jax.Array], None]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss-related fields of :class:`Mask2FormerConfig` (frozen: usable as a static arg)."""

    num_labels: int
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # A training choice, not a config.json key: "points" (transformers') or "dense" (module docstring).
    mask_loss: str = "points"

    def __post_init__(self):
        if self.mask_loss not in MASK_LOSSES:
            raise ValueError(f"mask_loss must be one of {MASK_LOSSES}, got {self.mask_loss!r}.")

    @classmethod
    def from_config(cls, config: Mask2FormerConfig, **overrides) -> "LossConfig":
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name not in _TRAINING_ONLY}
        fields.update(overrides)
        return cls(**fields)

    @property
    def num_oversampled_points(self) -> int:
        return int(self.train_num_points * self.oversample_ratio)  # transformers truncates

    @property
    def num_uncertain_points(self) -> int:
        return int(self.importance_sample_ratio * self.train_num_points)

    @property
    def num_random_points(self) -> int:
        return self.train_num_points - self.num_uncertain_points


def _as_loss_config(config: Union[LossConfig, Mask2FormerConfig, None], overrides) -> LossConfig:
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, LossConfig):
        config = dataclasses.replace(config, **overrides)
    elif isinstance(config, Mask2FormerConfig):
        config = LossConfig.from_config(config, **overrides)
    elif config is None:
        if "num_labels" not in overrides:
            raise ValueError("mask2former_loss needs `config` or at least `num_labels`.")
        config = LossConfig(**overrides)
    else:
        raise ValueError(
            f"config must be a LossConfig or Mask2FormerConfig, got {type(config).__name__}."
        )
    if config.num_oversampled_points < config.num_uncertain_points:
        raise ValueError(
            f"int(train_num_points * oversample_ratio) = {config.num_oversampled_points} must be "
            f">= int(importance_sample_ratio * train_num_points) = {config.num_uncertain_points}."
        )
    return config


def _is_concrete(x) -> bool:
    return x is None or not isinstance(x, jax.core.Tracer)


def check_class_labels(class_labels, label_valid, num_labels: int) -> None:
    """ValueError naming the first valid slot whose class label is outside ``[0, num_labels)``
    (concrete arrays only; under a trace :func:`mask2former_loss` flags it instead)."""
    labels = np.asarray(class_labels)
    valid = np.ones(labels.shape, bool) if label_valid is None else np.asarray(label_valid, bool)
    bad = np.argwhere(valid & ((labels < 0) | (labels >= num_labels)))
    if len(bad):
        image, slot = (int(i) for i in bad[0])
        raise ValueError(
            f"class label {int(labels[image, slot])} outside [0, num_labels={num_labels}) (image {image}, "
            f"target slot {slot}; {len(bad)} valid slot(s) out of range). Class ids are 0..num_labels-1; "
            f"num_labels is 'no object' and padded slots belong in label_valid=False."
        )


def sigmoid_bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Element-wise ``BCEWithLogitsLoss(reduction="none")`` (the stable form torch uses)."""
    return jnp.maximum(logits, 0.0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def num_masks_for_normalisation(label_valid: jax.Array, axis_name=None) -> jax.Array:
    """max(total valid targets / world size, 1), summed over ``axis_name`` when given."""
    num_masks = jnp.sum(label_valid.astype(jnp.float32))
    if axis_name is not None:
        num_masks = jax.lax.psum(num_masks, axis_name) / jax.lax.psum(1, axis_name)
    return jnp.maximum(num_masks, 1.0)


def class_loss(
    class_queries_logits: jax.Array,
    class_labels: jax.Array,
    matching: Matching,
    no_object_weight: float,
) -> jax.Array:
    """Weighted-mean CE over all B*Q queries; unmatched queries target "no object" (index K)."""
    total, weight_sum = class_loss_sums(class_queries_logits, class_labels, matching, no_object_weight)
    return total / weight_sum


def class_loss_sums(
    class_queries_logits: jax.Array,
    class_labels: jax.Array,
    matching: Matching,
    no_object_weight: float,
) -> Tuple[jax.Array, jax.Array]:
    """:func:`class_loss` as (sum of the weighted CE, sum of the class weights)."""
    batch_size, num_queries, num_classes = class_queries_logits.shape
    no_object = num_classes - 1
    matched = matching.target_to_query >= 0  # (B, M)
    query = jnp.where(matched, matching.target_to_query, num_queries)  # out of range: dropped
    target_classes = (
        jnp.full((batch_size, num_queries), no_object, jnp.int32)
        .at[jnp.arange(batch_size)[:, None], query]
        .set(class_labels.astype(jnp.int32), mode="drop")
    )  # (B, Q)
    log_probs = jax.nn.log_softmax(class_queries_logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, target_classes[..., None], axis=-1)[..., 0]  # (B, Q)
    class_weights = jnp.ones((num_classes,), jnp.float32).at[no_object].set(no_object_weight)
    weights = class_weights[target_classes]  # (B, Q)
    return jnp.sum(weights * nll), jnp.sum(weights)


def _pair_rows(matching: Matching) -> jax.Array:
    """(B*M,) row of transformers' (R, ...) draws for each target slot (0 for unmatched slots).

    transformers concatenates the matched pairs image by image, each image's pairs sorted by
    query index (scipy's linear_sum_assignment returns sorted rows).
    """
    target_to_query = matching.target_to_query  # (B, M)
    matched = target_to_query >= 0
    # Rank of each matched slot among its image's matched slots, ordered by query index.
    earlier = matched[:, None, :] & (target_to_query[:, None, :] < target_to_query[:, :, None])
    rank = jnp.sum(earlier, axis=-1)  # (B, M)
    counts = jnp.sum(matched, axis=-1)  # (B,)
    offset = jnp.cumsum(counts) - counts  # (B,) pairs of the previous images
    rows = jnp.where(matched, offset[:, None] + rank, 0)
    return rows.reshape(-1).astype(jnp.int32)


def _gather_rows(draws: jax.Array, rows: jax.Array, num_points: int) -> jax.Array:
    if draws.shape[0] == 0:  # no matched pair anywhere: transformers drew (0, P, 2)
        return jnp.zeros((rows.shape[0], num_points, 2), jnp.float32)
    return jnp.take(draws.astype(jnp.float32), rows, axis=0, mode="clip")


def top_k_indices(values: jax.Array, k: int) -> jax.Array:
    """(N, n) float -> (N, k) int32: the indices ``jax.lax.top_k(values, k)`` selects (ties to
    the lower index), in increasing index order rather than by value.

    The loss only needs the set (it averages over the points). XLA:CPU sorts for ``top_k``; here
    the k-th largest value is found by bisection on the float's order-preserving uint32 key (32
    counting passes) and the selection is compacted with a cumsum, ~2.5x faster at the loss's
    size (16 x 37632, k = 9408)."""
    n, size = values.shape
    bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))  # (N, n), monotone

    def halve(_, bounds):
        # invariant: count(key >= lo) >= k and count(key > hi) < k
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(key >= mid[:, None], axis=-1) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    bounds = (jnp.zeros((n,), jnp.uint32), jnp.full((n,), 0xFFFFFFFF, jnp.uint32))
    kth, _ = jax.lax.fori_loop(0, 32, halve, bounds)  # (N,) the k-th largest key
    above = key > kth[:, None]
    tie = key == kth[:, None]
    need = k - jnp.sum(above, axis=-1, dtype=jnp.int32)  # ties to take, lowest indices first
    take = above | (tie & (jnp.cumsum(tie, axis=-1, dtype=jnp.int32) <= need[:, None]))
    slot = jnp.where(take, jnp.cumsum(take, axis=-1, dtype=jnp.int32) - 1, k)  # k: spill column, sliced off
    index = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (n, size))
    out = jnp.zeros((n, k + 1), jnp.int32).at[jnp.arange(n)[:, None], slot].set(index, mode="drop")
    return out[:, :k]


def _sample_single(maps: jax.Array, points: jax.Array) -> jax.Array:
    """(N, h, w) maps, (N, P, 2) points -> (N, P) float32 bilinear samples (per variant)."""
    if variants.current() == "xla":
        return sample_maps(maps, points)
    return sample_points(maps[..., None], points)[..., 0]


def _importance_points(
    pred_masks: jax.Array,
    oversampled: jax.Array,
    random_points: jax.Array,
    num_uncertain: int,
) -> jax.Array:
    """(N, h, w) logits, (N, Ps, 2), (N, P-k, 2) -> (N, P, 2) points (no gradient)."""
    if num_uncertain > 0:
        logits = _sample_single(pred_masks, oversampled)  # (N, Ps)
        uncertainty = -jnp.abs(logits)
        if variants.current() == "xla":
            _, top = jax.lax.top_k(uncertainty, num_uncertain)  # (N, k)
        else:
            top = top_k_indices(uncertainty, num_uncertain)  # (N, k), the same set
        uncertain = jnp.take_along_axis(oversampled, top[..., None], axis=1)  # (N, k, 2)
        points = jnp.concatenate([uncertain, random_points], axis=1)
    else:
        points = random_points
    return jax.lax.stop_gradient(points)


def _level_losses(
    class_queries_logits: jax.Array,
    masks_queries_logits: jax.Array,
    mask_labels: jax.Array,
    class_labels: jax.Array,
    label_valid: jax.Array,
    draws: Dict[str, jax.Array],
    cfg: LossConfig,
):
    """Unweighted sums of one prediction level: ((mask sum over the matched pairs, dice sum, CE
    sum, CE class-weight sum), matching). With ``cfg.mask_loss == "dense"``, ``mask_labels`` are
    already :func:`dense_targets` on the logits' grid and ``draws`` is unused."""
    if cfg.mask_loss == "dense":
        return _dense_level_losses(
            class_queries_logits, masks_queries_logits, mask_labels, class_labels, label_valid, cfg
        )
    batch_size, num_queries, height, width = masks_queries_logits.shape
    num_slots = mask_labels.shape[1]
    num_pairs = batch_size * num_slots
    if "key" in draws:
        # One draw split three ways (one threefry in the compiled program instead of three).
        sizes = (
            batch_size * cfg.train_num_points,
            num_pairs * cfg.num_oversampled_points,
            num_pairs * cfg.num_random_points,
        )
        uniform = jax.random.uniform(draws["key"], (sum(sizes), 2), jnp.float32)
        match_points = uniform[: sizes[0]].reshape(batch_size, cfg.train_num_points, 2)
        oversampled = uniform[sizes[0] : sizes[0] + sizes[1]].reshape(
            num_pairs, cfg.num_oversampled_points, 2
        )
        random_points = uniform[sizes[0] + sizes[1] :].reshape(num_pairs, cfg.num_random_points, 2)
    else:
        match_points = draws["matcher"]
    matching = hungarian_matcher(
        class_queries_logits,
        masks_queries_logits,
        mask_labels,
        class_labels,
        label_valid,
        points=match_points,
        class_weight=cfg.class_weight,
        mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight,
    )
    if "key" not in draws:
        rows = _pair_rows(matching)
        oversampled = _gather_rows(draws["oversampled"], rows, cfg.num_oversampled_points)
        random_points = _gather_rows(draws["random"], rows, cfg.num_random_points)

    matched = (matching.target_to_query >= 0).reshape(-1)  # (B*M,)
    query = jnp.clip(matching.target_to_query, 0, num_queries - 1)  # (B, M)
    pred_masks = jnp.take_along_axis(
        masks_queries_logits.astype(jnp.float32), query[:, :, None, None], axis=1
    ).reshape(num_pairs, height, width)  # (B*M, h, w) the matched prediction of each slot
    target_masks = mask_labels.astype(jnp.float32).reshape(num_pairs, *mask_labels.shape[2:])

    points = _importance_points(
        jax.lax.stop_gradient(pred_masks), oversampled, random_points, cfg.num_uncertain_points
    )  # (B*M, P, 2)
    point_labels = _sample_single(target_masks, points)  # (B*M, P)
    point_logits = _sample_single(pred_masks, points)  # (B*M, P)

    bce = jnp.mean(sigmoid_bce_with_logits(point_logits, point_labels), axis=-1)  # (B*M,)
    mask_sum = jnp.sum(jnp.where(matched, bce, 0.0))
    probs = jax.nn.sigmoid(point_logits)
    numerator = 2.0 * jnp.sum(probs * point_labels, axis=-1)
    denominator = jnp.sum(probs, axis=-1) + jnp.sum(point_labels, axis=-1)
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)  # (B*M,)
    dice_sum = jnp.sum(jnp.where(matched, dice, 0.0))

    ce_sum, ce_weight_sum = class_loss_sums(class_queries_logits, class_labels, matching, cfg.no_object_weight)
    return (mask_sum, dice_sum, ce_sum, ce_weight_sum), matching


def _dense_level_losses(class_queries_logits, masks_queries_logits, targets, class_labels, label_valid, cfg):
    """:func:`_level_losses` for ``mask_loss="dense"``: one set of pair-wise costs over every
    cell serves the matcher (without gradient) and the loss (the matched pairs' entries)."""
    num_slots = targets.shape[1]
    cost_mask, cost_dice = dense_mask_costs(masks_queries_logits, targets, cfg.train_num_points)  # (B, Q, M) each
    cost = (
        cfg.class_weight * class_costs(jax.lax.stop_gradient(class_queries_logits), class_labels)
        + cfg.mask_weight * cost_mask
        + cfg.dice_weight * cost_dice
    )
    matching = match(cost, label_valid)
    pairs = matching.query_to_target[:, :, None] == jnp.arange(num_slots)  # (B, Q, M) one-hot, no gather
    mask_sum = jnp.sum(jnp.where(pairs, cost_mask, 0.0))
    dice_sum = jnp.sum(jnp.where(pairs, cost_dice, 0.0))
    ce_sum, ce_weight_sum = class_loss_sums(class_queries_logits, class_labels, matching, cfg.no_object_weight)
    return (mask_sum, dice_sum, ce_sum, ce_weight_sum), matching


def _stack_levels(
    class_queries_logits, masks_queries_logits, auxiliary_logits
) -> Dict[str, jax.Array]:
    """Final + auxiliary predictions -> {"class_queries_logits": (L, B, Q, K+1), ...}."""
    final = {
        "class_queries_logits": class_queries_logits,
        "masks_queries_logits": masks_queries_logits,
    }
    if auxiliary_logits is None:
        auxiliary_logits = []
    if isinstance(auxiliary_logits, Mapping):  # stacked arrays with a leading level axis
        missing = [k for k in PREDICTION_KEYS if k not in auxiliary_logits]
        if missing:
            raise ValueError(
                f"auxiliary_logits is missing {missing}; expected keys {PREDICTION_KEYS}."
            )
        aux = {k: jnp.asarray(auxiliary_logits[k]) for k in PREDICTION_KEYS}
    else:
        for i, level in enumerate(auxiliary_logits):
            if not isinstance(level, Mapping) or any(k not in level for k in PREDICTION_KEYS):
                raise ValueError(
                    f"auxiliary_logits[{i}] must be a dict with keys {PREDICTION_KEYS} "
                    "(transformers' `auxiliary_logits` format)."
                )
        aux = {k: [jnp.asarray(level[k]) for level in auxiliary_logits] for k in PREDICTION_KEYS}
    for k in PREDICTION_KEYS:
        level_shapes = [a.shape for a in aux[k]] if isinstance(aux[k], list) else [aux[k].shape[1:]]
        bad = [shape for shape in level_shapes if shape != final[k].shape]
        if bad:
            raise ValueError(
                f"auxiliary {k} must have shape (num_aux, *{tuple(final[k].shape)}) like the final "
                f"prediction; a level has shape {tuple(bad[0])}."
            )
    if isinstance(aux["class_queries_logits"], list):
        # one stack of final + auxiliary levels (stacking the auxiliary levels first and then
        # concatenating the final one copied the (L, B, Q, h, w) mask logits twice)
        return {k: jnp.stack([final[k]] + [a.astype(final[k].dtype) for a in aux[k]]) for k in PREDICTION_KEYS}
    return {k: jnp.concatenate([final[k][None], aux[k].astype(final[k].dtype)], axis=0) for k in PREDICTION_KEYS}


def _stack_given_points(given_points, num_levels, batch_size, cfg: LossConfig):
    if len(given_points) != num_levels:
        raise ValueError(
            f"given_points must have one entry per prediction level (final + auxiliary = "
            f"{num_levels}), got {len(given_points)}."
        )
    expected = {
        "matcher": (batch_size, cfg.train_num_points, 2),
        "oversampled": (None, cfg.num_oversampled_points, 2),
        "random": (None, cfg.num_random_points, 2),
    }
    stacked = {}
    for name, shape in expected.items():
        arrays = []
        for level, entry in enumerate(given_points):
            if name == "random" and cfg.num_random_points == 0 and name not in entry:
                arr = jnp.zeros((entry["oversampled"].shape[0], 0, 2), jnp.float32)
            elif name not in entry:
                raise ValueError(f"given_points[{level}] has no {name!r} entry.")
            else:
                arr = jnp.asarray(entry[name], jnp.float32)
            ok = arr.ndim == 3 and all(e is None or e == s for e, s in zip(shape, arr.shape))
            if not ok:
                raise ValueError(
                    f"given_points[{level}][{name!r}] must have shape "
                    f"{tuple('L' if e is None else e for e in shape)}, got {tuple(arr.shape)}."
                )
            arrays.append(arr)
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"given_points[*][{name!r}] must have the same shape at every level, got "
                f"{[tuple(a.shape) for a in arrays]}."
            )
        stacked[name] = jnp.stack(arrays)
    if stacked["oversampled"].shape[1] != stacked["random"].shape[1]:
        raise ValueError(
            "given_points 'oversampled' and 'random' must have the same number of rows L, got "
            f"{stacked['oversampled'].shape[1]} and {stacked['random'].shape[1]}."
        )
    return stacked


class LossSums(NamedTuple):
    """:func:`mask2former_loss_sums`' result: each weighted term as a sum and its denominator.

    sums: {term name: scalar}, "loss_mask", "loss_dice", "loss_cross_entropy" and their "_{i}"
      auxiliary versions, each already multiplied by its weight (NaN when ``invalid_labels`` > 0).
    denominators: {term name: scalar}, what :func:`mask2former_loss` divides each sum by:
      ``num_masks`` for the mask and dice terms, the level's sum of class weights (matched queries
      1, the others ``no_object_weight``) for the cross-entropy terms.
    num_targets: float32 scalar, the valid target slots of this call (not clamped, not summed
      over ``axis_name``): a caller normalising over several calls sums these.
    invalid_labels: int32 scalar (see :func:`mask2former_loss`).
    matchings: a :class:`Matching` with a leading level axis, gradient-free.
    """

    sums: Dict[str, jax.Array]
    denominators: Dict[str, jax.Array]
    num_targets: jax.Array
    invalid_labels: jax.Array
    matchings: Matching


def mask2former_loss(
    class_queries_logits: jax.Array,
    masks_queries_logits: jax.Array,
    mask_labels: jax.Array,
    class_labels: jax.Array,
    label_valid: Optional[jax.Array] = None,
    *,
    config: Union[LossConfig, Mask2FormerConfig, None] = None,
    auxiliary_logits: AuxiliaryLogits = None,
    key: Optional[jax.Array] = None,
    given_points: Optional[Sequence[Mapping[str, Any]]] = None,
    axis_name: Optional[Any] = None,
    with_matchings: bool = False,
    **config_overrides,
) -> Union[Dict[str, jax.Array], Tuple[Dict[str, jax.Array], Matching]]:
    """Mask2Former's weighted training losses, as transformers computes them.

    Args:
      class_queries_logits: (B, Q, K+1) final class logits.
      masks_queries_logits: (B, Q, h, w) final mask logits.
      mask_labels: (B, M, H, W) target masks, padded to M slots per image (values in [0, 1]).
        With ``mask_loss="dense"``: at the input size, H and W tiling the logits' grid (s x s
        cells, s = ceil(H / h); zero-padded to s * h, s * w).
      class_labels: (B, M) int target classes in [0, K) for the valid slots (anything in padded
        ones). Out of range: a ValueError for concrete arrays, NaN losses under jit (module docstring).
      label_valid: (B, M) bool, False for padded slots (default: all valid). Images without any
        valid target are fine.
      config: a :class:`LossConfig` or :class:`Mask2FormerConfig`; keyword ``config_overrides``
        (``num_labels``, ``class_weight``, ``mask_weight``, ``dice_weight``, ``no_object_weight``,
        ``train_num_points``, ``oversample_ratio``, ``importance_sample_ratio``, ``mask_loss``)
        replace its fields or, without a config, give them (``num_labels`` required).
      auxiliary_logits: the intermediate predictions, either transformers' format (a list of dicts
        with keys "class_queries_logits" and "masks_queries_logits", same shapes as the final
        ones) or one such dict of arrays stacked on a leading level axis. None: no aux losses.
      key: PRNG key for all random points. Exactly one of ``key`` and ``given_points`` with
        ``mask_loss="points"``; with "dense", ``key`` is optional and unused.
      given_points: replayed random points (format in the module docstring; "points" only).
      axis_name: a mapped axis (pmap/shard_map/vmap) over which ``num_masks`` is averaged.
      with_matchings: also return the matchings of all levels.
    Returns:
      Dict of scalars: "loss_mask", "loss_dice", "loss_cross_entropy" (final level), then
      "loss_mask_{i}", "loss_dice_{i}", "loss_cross_entropy_{i}" for auxiliary level i, all
      already multiplied by their weight, "loss", their sum, and "invalid_labels", the int32 count
      of valid slots whose class label is outside [0, K) (0 unless traced; when > 0 every term is
      NaN; not a loss term, so not in "loss"). With ``with_matchings``, the
      pair (losses, matchings): a :class:`Matching` whose arrays have a leading level axis
      (level 0 = final prediction, level i + 1 = auxiliary i), gradient-free.
      :func:`mask2former_loss_sums` gives the terms as sums and denominators.
    """
    out = mask2former_loss_sums(
        class_queries_logits,
        masks_queries_logits,
        mask_labels,
        class_labels,
        label_valid,
        config=config,
        auxiliary_logits=auxiliary_logits,
        key=key,
        given_points=given_points,
        axis_name=axis_name,
        **config_overrides,
    )
    losses = {name: value / out.denominators[name] for name, value in out.sums.items()}
    losses["loss"] = sum(losses.values())
    losses["invalid_labels"] = out.invalid_labels
    if with_matchings:
        return losses, out.matchings
    return losses


def mask2former_loss_sums(
    class_queries_logits: jax.Array,
    masks_queries_logits: jax.Array,
    mask_labels: jax.Array,
    class_labels: jax.Array,
    label_valid: Optional[jax.Array] = None,
    *,
    config: Union[LossConfig, Mask2FormerConfig, None] = None,
    auxiliary_logits: AuxiliaryLogits = None,
    key: Optional[jax.Array] = None,
    given_points: Optional[Sequence[Mapping[str, Any]]] = None,
    axis_name: Optional[Any] = None,
    **config_overrides,
) -> LossSums:
    """:func:`mask2former_loss` (same arguments) as a :class:`LossSums`: each weighted term's sum
    and denominator, ``sums[name] / denominators[name]`` being the loss's term, so that a caller
    normalising over a larger batch (the train step: per example, then the global batch) adds
    sums and denominators instead of re-deriving them."""
    cfg = _as_loss_config(config, config_overrides)
    batch_size, num_queries = _check_matcher_inputs(
        class_queries_logits, masks_queries_logits, mask_labels, class_labels
    )
    if class_queries_logits.shape[-1] != cfg.num_labels + 1:
        raise ValueError(
            f"class_queries_logits must have num_labels + 1 = {cfg.num_labels + 1} classes (the "
            f"last one is 'no object'), got {tuple(class_queries_logits.shape)}."
        )
    num_slots = mask_labels.shape[1]
    labels_concrete = _is_concrete(class_labels) and _is_concrete(label_valid)
    given_valid = label_valid  # None stays concrete; its all-True default is traced under jit
    label_valid = checked_label_valid(label_valid, batch_size, num_slots)
    if labels_concrete:
        check_class_labels(class_labels, given_valid, cfg.num_labels)
    class_labels = jnp.asarray(class_labels)
    out_of_range = label_valid & ((class_labels < 0) | (class_labels >= cfg.num_labels))  # (B, M)
    invalid_labels = jnp.sum(out_of_range, dtype=jnp.int32)
    # Traced: computed as if those slots were padding (finite, no index out of range), then NaN.
    label_valid = label_valid & ~out_of_range
    class_labels = jnp.where(out_of_range, 0, class_labels)
    levels = _stack_levels(class_queries_logits, masks_queries_logits, auxiliary_logits)
    num_levels = levels["class_queries_logits"].shape[0]

    if cfg.mask_loss == "dense":
        if given_points is not None:
            raise ValueError(
                "given_points replays transformers' point draws; mask_loss='dense' draws no points "
                "(pass neither, or a key, which it does not use)."
            )
        draws = {}
        # shared by every level: the area averages on the logits' grid
        mask_labels = dense_targets(mask_labels, masks_queries_logits.shape[2:])  # (B, M, h, w)
    elif (key is None) == (given_points is None):
        raise ValueError("mask2former_loss needs exactly one of `key` or `given_points`.")
    elif key is not None:
        draws = {"key": jax.random.split(key, num_levels)}
    else:
        draws = _stack_given_points(given_points, num_levels, batch_size, cfg)

    num_masks = num_masks_for_normalisation(label_valid, axis_name)

    def one_level(xs):
        level_class, level_masks, level_draws = xs
        return _level_losses(
            level_class, level_masks, mask_labels, class_labels, label_valid, level_draws, cfg
        )

    # "cpu" variant: one trace of the matcher for all levels, and one level's point buffers in
    # memory at a time. "xla": the levels written out one after another (no loop, whose body
    # XLA's cost model would count once; not one vmap over the levels, which would hold every
    # level's sampled rows at once: 10 GiB for a 1024x1024 example with 50 targets).
    level_inputs = (levels["class_queries_logits"], levels["masks_queries_logits"], draws)
    if variants.current() == "xla":
        per_level = [one_level(jax.tree.map(lambda x: x[i], level_inputs)) for i in range(num_levels)]
        (mask_sum, dice_sum, ce_sum, ce_weight_sum), matchings = jax.tree.map(
            lambda *xs: jnp.stack(xs), *per_level
        )
    else:
        (mask_sum, dice_sum, ce_sum, ce_weight_sum), matchings = jax.lax.map(one_level, level_inputs)

    sums: Dict[str, jax.Array] = {}
    denominators: Dict[str, jax.Array] = {}
    for level in range(num_levels):
        suffix = "" if level == 0 else f"_{level - 1}"
        sums[f"loss_mask{suffix}"] = cfg.mask_weight * mask_sum[level]
        sums[f"loss_dice{suffix}"] = cfg.dice_weight * dice_sum[level]
        sums[f"loss_cross_entropy{suffix}"] = cfg.class_weight * ce_sum[level]
        denominators[f"loss_mask{suffix}"] = num_masks
        denominators[f"loss_dice{suffix}"] = num_masks
        denominators[f"loss_cross_entropy{suffix}"] = ce_weight_sum[level]
    # where, not +NaN: NaN terms and a zero gradient, so one bad example of a train step does not
    # turn the parameters into NaN (its loss metric and the flag say what happened)
    sums = {name: jnp.where(invalid_labels > 0, jnp.nan, value) for name, value in sums.items()}
    num_targets = jnp.sum(label_valid.astype(jnp.float32))
    return LossSums(sums, denominators, num_targets, invalid_labels, matchings)
