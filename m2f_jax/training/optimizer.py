"""Mask2Former's optimizer: AdamW with the original repo's parameter groups, full-model gradient
clipping, a poly or step schedule with linear warmup, and optional gradient accumulation.

Defaults are the original repo's (``train_net.py:build_optimizer`` + ``maskformer2_R50_*.yaml``):
AdamW (torch defaults betas (0.9, 0.999), eps 1e-8), lr 1e-4, weight decay 0.05, backbone lr x0.1,
``CLIP_TYPE: full_model`` with ``CLIP_VALUE`` 0.01 (L2 norm of all gradients together).

The update applied to each leaf, in order (as torch/detectron2 does it):

1. clip the whole gradient tree to global L2 norm ``clip_norm``;
2. Adam moments and bias correction;
3. + weight_decay * param, on the leaves :func:`weight_decay_mask` marks (decoupled, AdamW);
4. x -learning_rate(step), x backbone_multiplier on the backbone. The multiplier scales the
   decay term too, as torch's per-group lr does.

Parameter groups are decided by path (``"model/pixel_level_module/encoder/..."``), see
:func:`weight_decay_mask` and :func:`backbone_mask`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

BACKBONE_PREFIX = ("model", "pixel_level_module", "encoder")

# Leaf names that are embeddings: nn.Embed tables (queries_features, queries_embedder and the
# decoder's level_embed), the pixel decoder's level_embed parameter, and Swin's position tables.
EMBEDDING_LEAF_NAMES = frozenset(
    {"embedding", "level_embed", "relative_position_bias_table", "absolute_pos_embed"}
)


def _path_names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _norm_modules(params) -> set:
    """Paths of the modules that own a ``scale`` leaf. In this model only LayerNorm and GroupNorm
    have one (their names do not always say so: the pixel decoder's GroupNorms are ``*_1``)."""
    return {
        _path_names(path)[:-1]
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if _path_names(path)[-1] == "scale"
    }


def weight_decay_mask(params) -> Any:
    """Same tree as ``params``: True where AdamW applies weight decay.

    Excluded (decay 0), as ``WEIGHT_DECAY_NORM: 0.0`` and ``WEIGHT_DECAY_EMBED: 0.0`` do:

    * every leaf of a normalisation module (``scale`` and its sibling ``bias``);
    * embeddings: leaves named ``embedding`` (query features/positions, decoder level embedding),
      ``level_embed`` (pixel decoder), ``relative_position_bias_table``, ``absolute_pos_embed``.

    Everything else decays, biases of Dense/Conv layers included (detectron2 decays them too).
    One deliberate difference: the original repo's pixel-decoder ``level_embed`` is an
    ``nn.Parameter``, not an ``nn.Embedding``, so detectron2 decays it; here it counts as an
    embedding like its decoder twin.
    """
    norms = _norm_modules(params)

    def decays(path, _):
        names = _path_names(path)
        return not (names[:-1] in norms or names[-1] in EMBEDDING_LEAF_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def backbone_mask(params) -> Any:
    """Same tree as ``params``: True for the Swin backbone, ``model/pixel_level_module/encoder``."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_names(path)[: len(BACKBONE_PREFIX)] == BACKBONE_PREFIX, params
    )


def make_schedule(
    learning_rate: float,
    *,
    schedule: str,
    total_steps: int,
    warmup_steps: int = 0,
    poly_power: float = 0.9,
    step_milestones: Sequence[int] = (),
    step_gamma: float = 0.1,
    warmup_factor: float = 0.0,
) -> optax.Schedule:
    """lr at optimizer update ``count`` (0-based).

    * ``"poly"``: detectron2 ``WarmupPolyLR``: ``lr * (1 - count / total_steps) ** poly_power``.
    * ``"step"``: detectron2 ``WarmupMultiStepLR``: ``lr * step_gamma ** (number of milestones
      <= count)``.

    Linear warmup multiplies by ``warmup_factor + (1 - warmup_factor) * count / warmup_steps``
    while ``count < warmup_steps`` (detectron2's "linear" warmup, factor 0 by default here).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    milestones = tuple(int(m) for m in step_milestones)
    if schedule == "poly":

        def base(count):
            frac = jnp.clip(count / total_steps, 0.0, 1.0)
            return learning_rate * (1.0 - frac) ** poly_power

    elif schedule == "step":
        if list(milestones) != sorted(milestones):
            raise ValueError(f"step_milestones must be increasing, got {milestones}.")

        def base(count):
            passed = sum((count >= m).astype(jnp.float32) for m in milestones)
            return learning_rate * step_gamma**passed

    else:
        raise ValueError(f"schedule must be 'poly' or 'step', got {schedule!r}.")

    def fn(count):
        count = jnp.asarray(count, jnp.float32)
        lr = base(count)
        if warmup_steps > 0:
            alpha = jnp.minimum(count / warmup_steps, 1.0)
            lr = lr * (warmup_factor + (1.0 - warmup_factor) * alpha)
        return lr

    return fn


class Optimizer(NamedTuple):
    """``tx, learning_rate = make_optimizer(...)``.

    tx: the optax transformation (wrapped in ``optax.MultiSteps`` when accumulating).
    learning_rate: ``fn(train_step) -> lr`` of the *next* update, where ``train_step`` counts
      calls of the train step (``TrainState.step``); with ``accumulate_steps = k`` the optimizer
      updates once per k of them, at schedule index ``train_step // k``.
    """

    tx: optax.GradientTransformation
    learning_rate: Callable[[Any], jax.Array]


def make_optimizer(
    params,
    *,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    backbone_multiplier: float = 0.1,
    clip_norm: float | None = 0.01,
    schedule: str = "poly",
    total_steps: int,
    warmup_steps: int = 0,
    warmup_factor: float = 0.0,
    poly_power: float = 0.9,
    step_milestones: Sequence[int] = (),
    step_gamma: float = 0.1,
    accumulate_steps: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> Optimizer:
    """AdamW as the paper trains Mask2Former (module docstring). ``params`` is the model's param
    tree (or its ``jax.eval_shape``), used only for the path-based masks.

    ``total_steps``, ``warmup_steps`` and ``step_milestones`` count optimizer updates (train steps
    divided by ``accumulate_steps``). ``clip_norm=None`` disables clipping.
    """
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}.")
    lr_fn = make_schedule(
        learning_rate,
        schedule=schedule,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        warmup_factor=warmup_factor,
        poly_power=poly_power,
        step_milestones=step_milestones,
        step_gamma=step_gamma,
    )
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts += [
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params)),
        optax.scale_by_learning_rate(lr_fn),
    ]
    if backbone_multiplier != 1.0:
        parts.append(optax.masked(optax.scale(backbone_multiplier), backbone_mask(params)))
    tx = optax.chain(*parts)
    if accumulate_steps > 1:
        # Averages the k micro-batch gradients, then runs the chain above once (clipping included).
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_steps).gradient_transformation()

    def learning_rate_at(train_step):
        return lr_fn(jnp.asarray(train_step) // accumulate_steps)

    return Optimizer(tx, learning_rate_at)
