"""Hungarian matching of predicted masks to padded targets, on device and inside jit.

Same cost as transformers' ``Mask2FormerHungarianMatcher``: for each image, on one set of uniform
random points shared by all its predictions and targets,

    cost = class_weight * (-softmax(class logits)[target class])
         + mask_weight  * pair-wise sigmoid BCE (mean over the points)
         + dice_weight  * pair-wise dice loss (+1 smoothing)

followed by an exact minimum-cost assignment (``optax.assignment.hungarian_algorithm``, vmapped
over the batch; no host callback).

Opt-in, not transformers' (``mask_loss="dense"``, the training loss's option): the two mask
costs over every cell of the (h, w) mask-logit grid instead of at points, the targets as area
averages on that grid (:func:`dense_targets`), by einsums; dice's sums are scaled by P / (h*w) so
that its +1 smoothing weighs what it does on P points. tests/test_dense_loss.py measures how
close this is to the uniform point costs' expected value.

Static shapes: targets are padded to M slots per image, with ``label_valid`` (B, M) marking the
real ones. A padded slot is never matched, and matching the valid slots gives the same optimum as
scipy's ``linear_sum_assignment`` on transformers' unpadded (Q, N_i) cost matrix.

The result is a :class:`Matching`: for each target slot the matched query (-1 when the slot is
padded, or unmatched because there are more targets than queries), and for each query the matched
target slot (-1 when unmatched).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2f_jax.modeling.deformable import sample_points

# Finite costs are clipped to this magnitude before the assignment so that the replacement for
# non-finite costs (below) and the dual potentials of the Hungarian algorithm stay finite in
# float32. Reaching it means the model has diverged.
_COST_LIMIT = 1e7

_HIGHEST = jax.lax.Precision.HIGHEST


class Matching(NamedTuple):
    """Fixed-size result of the matcher (a pytree; all int32, ``stop_gradient``-ed).

    target_to_query: (B, M) query matched to each target slot, -1 if none.
    query_to_target: (B, Q) target slot matched to each query, -1 if none.
    """

    target_to_query: jax.Array
    query_to_target: jax.Array


def _check_ndim(name: str, x, ndim: int, expected: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(x.shape)}.")


def _assign_one(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """(Q, M) cost, (M,) valid -> (M,) matched query per target, -1 if none."""
    num_queries, num_targets = cost.shape
    num_pairs = min(num_queries, num_targets)
    cost = cost.astype(jnp.float32)
    finite = jnp.isfinite(cost)
    cost = jnp.clip(jnp.where(finite, cost, 0.0), -_COST_LIMIT, _COST_LIMIT)
    # transformers (issue #21644) replaces nan/inf by finfo.max; that value would overflow the
    # potentials here. Any value above 2 * num_pairs * max|finite cost| keeps the intended
    # meaning: an assignment uses as few non-finite entries as it can.
    largest = jnp.max(jnp.where(finite & valid[None, :], jnp.abs(cost), 0.0))
    replacement = 2.0 * num_pairs * largest + 1.0
    cost = jnp.where(finite, cost, replacement)
    if num_queries >= num_targets:
        # Every column gets a row, and any row can take a constant column: the valid columns then
        # get the optimal assignment of the valid sub-matrix.
        pad_cost = 0.0
    else:
        # Every row gets a column: padded columns must cost more than any valid one, so that a
        # row takes one only when no valid column is left (exchange argument).
        pad_cost = jnp.max(jnp.where(valid[None, :], jnp.abs(cost), 0.0)) + 1.0
    cost = jnp.where(valid[None, :], cost, pad_cost)

    rows, cols = optax.assignment.hungarian_algorithm(cost)  # (num_pairs,) each
    target_to_query = jnp.full((num_targets,), -1, jnp.int32).at[cols].set(rows.astype(jnp.int32))
    return jnp.where(valid, target_to_query, -1)


def hungarian_assignment(
    cost_matrix: jax.Array, target_valid: Optional[jax.Array] = None
) -> jax.Array:
    """Exact minimum-cost assignment of targets (columns) to queries (rows), jittable.

    Args:
      cost_matrix: (..., Q, M) float; nan/inf allowed (used only when unavoidable).
      target_valid: (..., M) bool, False for padded target slots (never matched). Default: all
        valid.
    Returns:
      (..., M) int32: the query matched to each target slot, -1 for padded slots and for valid
      slots left unmatched (more valid targets than queries). Over the valid slots this is an
      optimal solution of ``scipy.optimize.linear_sum_assignment`` on the valid columns.
    """
    cost_matrix = jnp.asarray(cost_matrix)
    if cost_matrix.ndim < 2:
        raise ValueError(f"cost_matrix must have shape (..., Q, M), got {cost_matrix.shape}.")
    *batch, num_queries, num_targets = cost_matrix.shape
    if target_valid is None:
        target_valid = jnp.ones((*batch, num_targets), bool)
    target_valid = jnp.asarray(target_valid)
    if target_valid.shape != (*batch, num_targets):
        raise ValueError(
            f"target_valid must have shape {(*batch, num_targets)} to match cost_matrix "
            f"{cost_matrix.shape}, got {target_valid.shape}."
        )
    if num_queries == 0 or num_targets == 0:
        return jnp.full((*batch, num_targets), -1, jnp.int32)
    flat_cost = cost_matrix.reshape(-1, num_queries, num_targets)
    flat_valid = target_valid.reshape(-1, num_targets).astype(bool)
    out = jax.vmap(_assign_one)(flat_cost, flat_valid)  # (prod(batch), M)
    return out.reshape(*batch, num_targets)


def invert_matching(target_to_query: jax.Array, num_queries: int) -> jax.Array:
    """(B, M) matched query per target slot -> (B, Q) matched target slot per query (-1: none)."""
    batch_size, num_targets = target_to_query.shape
    query = jnp.where(target_to_query >= 0, target_to_query, num_queries)  # out of range: dropped
    slots = jnp.broadcast_to(jnp.arange(num_targets, dtype=jnp.int32), (batch_size, num_targets))
    return (
        jnp.full((batch_size, num_queries), -1, jnp.int32)
        .at[jnp.arange(batch_size)[:, None], query]
        .set(slots, mode="drop")
    )


def class_costs(class_queries_logits: jax.Array, class_labels: jax.Array) -> jax.Array:
    """(B, Q, K+1) logits, (B, M) labels -> (B, Q, M) ``-softmax(class logits)[target class]``."""
    num_classes = class_queries_logits.shape[-1]
    probs = jax.nn.softmax(class_queries_logits.astype(jnp.float32), axis=-1)  # (B, Q, K+1)
    labels = jnp.clip(class_labels.astype(jnp.int32), 0, num_classes - 1)
    return -jnp.take_along_axis(probs, labels[:, None, :], axis=2)  # (B, Q, M)


def point_mask_costs(
    masks_queries_logits: jax.Array, mask_labels: jax.Array, points: jax.Array
) -> Tuple[jax.Array, jax.Array]:
    """transformers' pair-wise mask costs on shared points: (B, Q, h, w) logits, (B, M, H, W)
    targets, (B, P, 2) points -> (sigmoid BCE averaged over the points, dice loss with +1
    smoothing), each (B, Q, M) and unweighted."""
    num_points = points.shape[1]
    # Channels-last so one sampler call reads all Q (or M) masks of an image at its P points.
    pred = sample_points(
        jnp.transpose(masks_queries_logits.astype(jnp.float32), (0, 2, 3, 1)), points
    )  # (B, P, Q)
    target = sample_points(
        jnp.transpose(mask_labels.astype(jnp.float32), (0, 2, 3, 1)), points
    )  # (B, P, M)

    # Pair-wise sigmoid BCE: softplus(-x) where the target is 1, softplus(x) where it is 0.
    bce_pos = jax.nn.softplus(-pred) / num_points
    bce_neg = jax.nn.softplus(pred) / num_points
    cost_mask = jnp.einsum("bpq,bpm->bqm", bce_pos, target, precision=_HIGHEST) + jnp.einsum(
        "bpq,bpm->bqm", bce_neg, 1.0 - target, precision=_HIGHEST
    )  # (B, Q, M)

    probs_mask = jax.nn.sigmoid(pred)  # (B, P, Q)
    numerator = 2.0 * jnp.einsum("bpq,bpm->bqm", probs_mask, target, precision=_HIGHEST)
    denominator = probs_mask.sum(1)[:, :, None] + target.sum(1)[:, None, :]  # (B, Q, M)
    cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return cost_mask, cost_dice


def dense_targets(mask_labels: jax.Array, grid_shape: Tuple[int, int]) -> jax.Array:
    """(B, M, H, W) masks -> (B, M, h, w) float32 area averages over the cells of the mask-logit
    grid: s x s blocks with s = ceil(H / h), after zero-padding H and W to s * h and s * w (the
    model's grid: its stride-4 features of an H x W input are ceil(H / 4) x ceil(W / 4), the
    padded pixels being zeros). Reshapes and a mean: no gather."""
    batch_size, num_slots, height, width = mask_labels.shape
    grid_h, grid_w = grid_shape
    stride = -(-height // grid_h)
    if stride < 1 or -(-height // stride) != grid_h or -(-width // stride) != grid_w:
        raise ValueError(
            f"dense mask loss: mask_labels of size {height}x{width} do not tile the {grid_h}x{grid_w} "
            f"mask-logit grid; expected ceil(H / s) = {grid_h} and ceil(W / s) = {grid_w} for one "
            f"integer stride s (the model's is 4: targets at the input size)."
        )
    masks = mask_labels.astype(jnp.float32)
    masks = jnp.pad(masks, ((0, 0), (0, 0), (0, stride * grid_h - height), (0, stride * grid_w - width)))
    masks = masks.reshape(batch_size, num_slots, grid_h, stride, grid_w, stride)  # (B, M, h, s, w, s)
    return masks.mean(axis=(3, 5))  # (B, M, h, w)


def dense_mask_costs(
    masks_queries_logits: jax.Array, targets: jax.Array, num_points: int
) -> Tuple[jax.Array, jax.Array]:
    """The point costs' expected value without points: (B, Q, h, w) logits, (B, M, h, w) targets
    (:func:`dense_targets`) -> (sigmoid BCE averaged over all h*w cells, dice loss), each
    (B, Q, M), unweighted and differentiable.

    Dice's sums are scaled by ``num_points / (h*w)``: the point sums over P points estimate
    P / (h*w) times the cell sums, so the +1 smoothing keeps the weight it has in the point loss.
    """
    batch_size, num_queries, grid_h, grid_w = masks_queries_logits.shape
    num_cells = grid_h * grid_w
    logits = masks_queries_logits.astype(jnp.float32).reshape(batch_size, num_queries, num_cells)  # (B, Q, N)
    target = targets.astype(jnp.float32).reshape(batch_size, targets.shape[1], num_cells)  # (B, M, N)
    # Two non-negative einsums rather than softplus(x) - x * t: no cancellation for large |x|.
    cost_mask = (
        jnp.einsum("bqn,bmn->bqm", jax.nn.softplus(-logits), target, precision=_HIGHEST)
        + jnp.einsum("bqn,bmn->bqm", jax.nn.softplus(logits), 1.0 - target, precision=_HIGHEST)
    ) / num_cells  # (B, Q, M)
    scale = num_points / num_cells
    probs = jax.nn.sigmoid(logits)  # (B, Q, N)
    numerator = 2.0 * scale * jnp.einsum("bqn,bmn->bqm", probs, target, precision=_HIGHEST)
    denominator = scale * (probs.sum(-1)[:, :, None] + target.sum(-1)[:, None, :])  # (B, Q, M)
    cost_dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return cost_mask, cost_dice


def matching_costs(
    class_queries_logits: jax.Array,
    masks_queries_logits: jax.Array,
    mask_labels: jax.Array,
    class_labels: jax.Array,
    points: Optional[jax.Array] = None,
    *,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    mask_loss: str = "points",
    num_points: Optional[int] = None,
) -> jax.Array:
    """Matching cost of every (query, target slot) pair, as transformers' matcher.

    Args:
      class_queries_logits: (B, Q, K+1).
      masks_queries_logits: (B, Q, h, w).
      mask_labels: (B, M, H, W), values in [0, 1].
      class_labels: (B, M) int; padded slots may hold anything.
      points: (B, P, 2) as (x, y) in [0, 1], shared by the predictions and targets of an image
        (``mask_loss="points"``).
      mask_loss: "points" (transformers') or "dense" (:func:`dense_mask_costs` over every cell
        of the mask-logit grid, targets by :func:`dense_targets`; ``num_points`` = P scales dice).
    Returns:
      (B, Q, M) float32 costs (padded slots are not masked here).
    """
    if mask_loss == "points":
        if points is None:
            raise ValueError('matching_costs with mask_loss="points" needs `points` (B, P, 2).')
        cost_mask, cost_dice = point_mask_costs(masks_queries_logits, mask_labels, points)
    elif mask_loss == "dense":
        if num_points is None:
            raise ValueError('matching_costs with mask_loss="dense" needs `num_points` (P, for dice).')
        targets = dense_targets(mask_labels, masks_queries_logits.shape[2:])
        cost_mask, cost_dice = dense_mask_costs(masks_queries_logits, targets, num_points)
    else:
        raise ValueError(f'mask_loss must be "points" or "dense", got {mask_loss!r}.')
    cost_class = class_costs(class_queries_logits, class_labels)
    return mask_weight * cost_mask + class_weight * cost_class + dice_weight * cost_dice


def match(cost: jax.Array, label_valid: jax.Array) -> Matching:
    """(B, Q, M) costs, (B, M) bool -> the minimum-cost :class:`Matching` (gradient-free)."""
    cost = jax.lax.stop_gradient(cost)
    target_to_query = hungarian_assignment(cost, label_valid.astype(bool))  # (B, M)
    query_to_target = invert_matching(target_to_query, cost.shape[1])  # (B, Q)
    return jax.lax.stop_gradient(Matching(target_to_query, query_to_target))


def hungarian_matcher(
    class_queries_logits: jax.Array,
    masks_queries_logits: jax.Array,
    mask_labels: jax.Array,
    class_labels: jax.Array,
    label_valid: Optional[jax.Array] = None,
    *,
    points: Optional[jax.Array] = None,
    key: Optional[jax.Array] = None,
    num_points: int = 12544,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    mask_loss: str = "points",
) -> Matching:
    """Matches queries to the valid target slots of each image (transformers' matcher, jittable).

    Args:
      class_queries_logits: (B, Q, K+1).
      masks_queries_logits: (B, Q, h, w).
      mask_labels: (B, M, H, W) float (targets padded to M slots).
      class_labels: (B, M) int.
      label_valid: (B, M) bool, False for padded slots. Default: all valid.
      points: (B, P, 2) uniform points in [0, 1) to use (e.g. transformers' ``torch.rand(1, P, 2)``
        draws, one per image, concatenated). Exactly one of ``points`` and ``key`` is required
        with ``mask_loss="points"``; neither is used with ``"dense"``.
      key: PRNG key; draws ``points`` of shape (B, num_points, 2).
      mask_loss: "points" (transformers') or "dense": the mask costs over every cell of the
        mask-logit grid (:func:`dense_mask_costs`, dice's sums scaled by ``num_points`` / cells).
    Returns:
      A :class:`Matching`, wrapped in ``stop_gradient`` (no gradient flows through the matcher).
    """
    batch_size, num_queries = _check_matcher_inputs(
        class_queries_logits, masks_queries_logits, mask_labels, class_labels
    )
    label_valid = checked_label_valid(label_valid, batch_size, mask_labels.shape[1])
    if mask_loss == "dense":
        points = None
    elif (points is None) == (key is None):
        raise ValueError("hungarian_matcher needs exactly one of `points` or `key`.")
    elif points is None:
        points = jax.random.uniform(key, (batch_size, num_points, 2), jnp.float32)
    elif points.ndim != 3 or points.shape[0] != batch_size or points.shape[2] != 2:
        raise ValueError(
            f"points must have shape (B, P, 2) with B={batch_size}, got {tuple(points.shape)}."
        )

    cost = matching_costs(
        jax.lax.stop_gradient(class_queries_logits),
        jax.lax.stop_gradient(masks_queries_logits),
        mask_labels,
        class_labels,
        None if points is None else jax.lax.stop_gradient(points),
        class_weight=class_weight,
        mask_weight=mask_weight,
        dice_weight=dice_weight,
        mask_loss=mask_loss,
        num_points=num_points,
    )  # (B, Q, M)
    return match(cost, label_valid)


def checked_label_valid(label_valid, batch_size: int, num_slots: int) -> jax.Array:
    """(B, M) bool validity of the padded target slots; all valid when None."""
    if label_valid is None:
        return jnp.ones((batch_size, num_slots), bool)
    if label_valid.shape != (batch_size, num_slots):
        raise ValueError(
            f"label_valid must have shape (B, M) = {(batch_size, num_slots)}, got "
            f"{tuple(label_valid.shape)}."
        )
    return label_valid.astype(bool)


def _check_matcher_inputs(class_queries_logits, masks_queries_logits, mask_labels, class_labels):
    _check_ndim("class_queries_logits", class_queries_logits, 3, "(B, Q, K+1)")
    _check_ndim("masks_queries_logits", masks_queries_logits, 4, "(B, Q, h, w)")
    _check_ndim("mask_labels", mask_labels, 4, "(B, M, H, W) (targets padded to M per image)")
    _check_ndim("class_labels", class_labels, 2, "(B, M)")
    batch_size, num_queries = class_queries_logits.shape[:2]
    if masks_queries_logits.shape[:2] != (batch_size, num_queries):
        raise ValueError(
            f"masks_queries_logits {tuple(masks_queries_logits.shape)} must start with (B, Q) = "
            f"{(batch_size, num_queries)} like class_queries_logits "
            f"{tuple(class_queries_logits.shape)}."
        )
    if mask_labels.shape[0] != batch_size or class_labels.shape != mask_labels.shape[:2]:
        raise ValueError(
            f"mask_labels (B, M, H, W) and class_labels (B, M) must agree with each other and "
            f"with B={batch_size}; got mask_labels {tuple(mask_labels.shape)}, class_labels "
            f"{tuple(class_labels.shape)}."
        )
    return batch_size, num_queries


def matching_to_indices(matching: Matching) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Host-side: transformers' format, per image (query indices ascending, target indices)."""
    target_to_query = np.asarray(matching.target_to_query)
    out = []
    for row in target_to_query:
        slots = np.nonzero(row >= 0)[0]
        order = np.argsort(row[slots], kind="stable")
        out.append((row[slots][order].astype(np.int64), slots[order].astype(np.int64)))
    return out
