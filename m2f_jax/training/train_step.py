"""One training step (forward in train mode, every loss term, gradients, optimizer update) on one
device, with ``jax.pmap``, or with ``jax.jit`` over a ``NamedSharding`` mesh.

**Same global batch, same result.** The three entry points compute the loss of the *global*
batch, so on one batch they give the same update up to float summation order:

* Randomness is per example: example ``i`` of the global batch (``i`` = its index in the global
  batch) gets ``fold_in(step_key, i)``, split into its dropout/drop-path/LayerDrop key and its
  point-sampling key. The forward and the loss are ``vmap``-ed over examples, so an example's
  draws do not depend on how the batch is split over devices. This needs a PRNG whose bits are
  exact under ``vmap`` (threefry, the default, or philox); with ``rbg`` keys a vmapped draw uses
  only the first key of the batch (XLA ``RngBitGenerator``'s batching rule), which is still random
  but depends on the split. Per-example LayerDrop follows: each image skips its own layers.
* Normalisation is over the global batch, as transformers does on one process:
  ``loss_mask``/``loss_dice`` are sums over all matched pairs / ``max(total targets, 1)``, and
  ``loss_cross_entropy`` is the weighted mean over all B*Q queries of the global batch. The
  criterion is called per example (batch of 1) for its sums and denominators
  (``mask2former_loss_sums``); the step divides the global sums by the global denominators
  (``psum``-ed under pmap).

On one device this is transformers' loss on the same batch (same terms, same normalisation;
the random points differ, being drawn per example). Deviation from transformers on several
devices (DDP + accelerate averages per-device losses): there each device's cross-entropy is a
weighted mean over its own queries, and ``num_masks`` is clamped at 1 *per device* (at world size
globally); here both are global, so the result does not depend on the number of devices.
Float summation order still does: the tests see 4-device vs 1-device differences of ~2e-6 in
params after an AdamW step at lr 1e-4 (Adam's ``g / (|g| + eps)`` magnifies rounding in gradients
near eps; the gradients themselves agree to ~1e-10).

Batches are dicts of arrays: ``pixel_values`` (B, H, W, 3) float, ``mask_labels`` (B, M, H, W),
``class_labels`` (B, M) int, ``label_valid`` (B, M) bool; ``pixel_mask`` is ignored (as in
transformers, padded pixels are image content).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import flax.linen as nn
from flax import jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2f_jax.modeling import variants
from m2f_jax.modeling.criterion import LossConfig, mask2former_loss_sums
from m2f_jax.training.optimizer import Optimizer

BATCH_KEYS = ("pixel_values", "mask_labels", "class_labels", "label_valid")
PMAP_AXIS = "batch"
MESH_AXIS = "data"

Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step needs that changes during training (a pytree of arrays; checkpointable).

    step: int32 scalar, train steps done (micro-steps when accumulating gradients).
    params: the model's param tree (float32 whatever the compute dtype).
    opt_state: the optax state.
    rng: raw key data of the base key (``jax.random.key_data``); step ``s`` uses
      ``fold_in(base key, s)``, so a restored state draws what the interrupted run would have.
    rng_impl: the PRNG implementation name (static).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    rng_impl: str = flax.struct.field(pytree_node=False, default="threefry2x32")

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> "TrainState":
        """``rng``: an int seed (threefry key) or a typed key (``jax.random.key``)."""
        if isinstance(rng, (int, np.integer)):
            rng = jax.random.key(int(rng))
        if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            raise ValueError(
                "TrainState.create needs an int seed or a typed key from jax.random.key(...), "
                f"got dtype {rng.dtype} (a legacy PRNGKey? wrap it with jax.random.wrap_key_data)."
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(rng),
            rng_impl=str(jax.random.key_impl(rng)),
        )

    @property
    def key(self) -> jax.Array:
        return jax.random.wrap_key_data(self.rng, impl=self.rng_impl)


# XLA:CPU compile options for the train step (see train_compiler_options).
CPU_TRAIN_COMPILER_OPTIONS = {
    # YNNPACK, XLA:CPU's kernel library, keeps the matmuls and convolutions but not the
    # reductions: its reduce fusions run the backward reductions (softmax, LayerNorm) far slower
    # than XLA's own loops, and hold their operands in memory where XLA fuses them.
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    ),
}


@functools.lru_cache(maxsize=None)
def _supported_cpu_options() -> Tuple[Tuple[str, str], ...]:
    try:  # the option and its enum values belong to this jaxlib's XLA; probe them once
        jax.jit(lambda x: jnp.sum(x * x), compiler_options=CPU_TRAIN_COMPILER_OPTIONS).lower(
            jnp.zeros((4,), jnp.float32)
        ).compile()
    except Exception as err:  # noqa: BLE001 - any rejection means: compile with XLA's defaults
        warnings.warn(
            f"XLA rejected m2f_jax's CPU train-step options ({err}); the step compiles with "
            "XLA's defaults (correct, but slower on CPU).",
            RuntimeWarning,
            stacklevel=3,
        )
        return ()
    return tuple(CPU_TRAIN_COMPILER_OPTIONS.items())


def train_compiler_options(backend: Optional[str] = None) -> Dict[str, str]:
    """``compiler_options`` for ``jax.jit`` of a train step: on the CPU backend (default: JAX's
    default backend) :data:`CPU_TRAIN_COMPILER_OPTIONS` (Swin-T step at 384x384, batch 2, on 2
    cores: ~10% faster and 0.55 GB less XLA temp memory, the same loss to 1e-6; README,
    Training benchmark), if this jaxlib accepts them; otherwise ``{}``. Numerics are XLA's
    either way: only which kernels run the reductions changes.

        step = jax.jit(make_train_step(...), donate_argnums=0, compiler_options=train_compiler_options())
    """
    if (backend or jax.default_backend()) != "cpu":
        return {}
    return dict(_supported_cpu_options())


def _per_example_numerators(module, cfg: LossConfig, params, example, key):
    """One example's loss sums (every weighted term's numerator), their denominators and its
    valid target count (the criterion's :class:`LossSums`)."""
    dropout_key, points_key = jax.random.split(key)
    out = module.apply(
        {"params": params},
        example["pixel_values"][None],  # (1, H, W, 3)
        deterministic=False,
        output_auxiliary_logits=True,
        rngs={"dropout": dropout_key},
    )
    sums = mask2former_loss_sums(
        out.class_queries_logits,
        out.masks_queries_logits,
        example["mask_labels"][None],
        example["class_labels"][None],
        example["label_valid"][None],
        config=cfg,
        auxiliary_logits=out.auxiliary_logits,
        key=points_key,
    )
    return sums.sums, sums.denominators, sums.num_targets, sums.invalid_labels


# Crops below this many pixels keep one chain: each chain is compiled, and small crops (as in the
# tests) gain less from a second core than they pay in compile time.
MIN_PIXELS_PER_CHAIN = 256 * 256


def default_example_groups(
    local_batch: int, image_size: Tuple[int, int], platform: Optional[str] = None
) -> int:
    """How many independent per-example chains a step traces: on CPU, for crops of at least
    ``MIN_PIXELS_PER_CHAIN`` pixels, one per core (at most one per example); else 1 (one
    ``vmap`` over the whole batch).

    XLA:CPU runs many of the step's ops (transposes, gathers, some reductions) on one thread;
    two independent chains let its executor run one example's op on each core, at the price of a
    longer compile (benchmarks/README.md has the figures).
    """
    platform = platform or jax.default_backend()
    if platform != "cpu" or image_size[0] * image_size[1] < MIN_PIXELS_PER_CHAIN:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(local_batch, cores))


def global_batch_losses(
    module: nn.Module,
    cfg: LossConfig,
    params,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    axis_name: Optional[str] = None,
    example_groups: Optional[int] = None,
    variant: Optional[str] = None,
) -> Metrics:
    """This device's share of every weighted loss term of the global batch (module docstring).

    Without ``axis_name`` the shares are the global-batch losses; with it (inside pmap/shard_map
    over ``axis_name``, the batch split in order over the axis) they sum over the axis to them.
    Example ``i`` draws from ``fold_in(key, batch["example_index"][i])`` when the batch has that
    (B,) int array (e.g. micro-batches of one accumulated step), else from ``fold_in(key, global
    index of i)``. ``example_groups``: the batch is cut into this many consecutive groups, each
    ``vmap``-ed on its own (independent chains; default: :func:`default_example_groups` on the
    "cpu" variant, else 1); the result does not depend on it beyond float rounding. ``variant``:
    the model's and the loss's (``m2f_jax.modeling.variants``; default: ``module.variant``, else
    :func:`variants.resolve`).
    """
    variant = variants.resolve(variant or getattr(module, "variant", None))
    with variants.use(variant):
        return _global_batch_losses(module.clone(variant=variant), cfg, params, batch, key, axis_name,
                                    example_groups, variant)


def _global_batch_losses(module, cfg, params, batch, key, axis_name, example_groups, variant):
    local_batch = batch["pixel_values"].shape[0]
    if "example_index" in batch:
        example_index = jnp.asarray(batch["example_index"], jnp.int32)
    else:
        first = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
        example_index = first + jnp.arange(local_batch)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, example_index)
    examples = {k: batch[k] for k in BATCH_KEYS}
    if example_groups is None:
        groups = default_example_groups(local_batch, batch["pixel_values"].shape[1:3]) if variant == "cpu" else 1
    else:
        groups = example_groups
    if not 1 <= groups <= local_batch:
        raise ValueError(f"example_groups must be in [1, {local_batch}] (the local batch), got {groups}.")
    per_group = jax.vmap(lambda ex, k: _per_example_numerators(module, cfg, params, ex, k))
    bounds = np.linspace(0, local_batch, groups + 1).round().astype(int)  # consecutive, near-equal
    outputs = [
        per_group({k: v[lo:hi] for k, v in examples.items()}, keys[lo:hi])
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    numerators, denominators, num_targets, invalid_labels = jax.tree_util.tree_map(
        lambda *parts: jnp.concatenate(parts, axis=0), *outputs
    )
    # Global denominators: the cross-entropy's class-weight sums add up over examples; the mask
    # and dice terms' num_masks is max(total targets, 1), not a sum of per-example clamps.
    ce_weight = {name: jnp.sum(values) for name, values in denominators.items() if name.startswith("loss_cross_entropy")}
    total_targets = jnp.sum(num_targets)
    if axis_name is not None:
        total_targets, ce_weight = jax.lax.psum((total_targets, ce_weight), axis_name)
    num_masks = jnp.maximum(total_targets, 1.0)
    terms = {name: jnp.sum(values) / ce_weight.get(name, num_masks) for name, values in numerators.items()}
    terms["invalid_labels"] = jnp.sum(invalid_labels)  # a count, not a loss term (see make_generic_train_step)
    return terms


def _split_optimizer(optimizer):
    if isinstance(optimizer, Optimizer):
        return optimizer.tx, optimizer.learning_rate
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer, None
    raise ValueError(
        "optimizer must be make_optimizer(...)'s result or an optax.GradientTransformation, "
        f"got {type(optimizer).__name__}."
    )


def make_generic_train_step(
    loss_terms_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], Metrics],
    optimizer,
    axis_name: Optional[str] = None,
) -> Callable[..., Tuple[TrainState, Metrics]]:
    """The step machinery without the model: ``loss_terms_fn(params, batch, key) -> {name:
    scalar}`` returns this device's share of each loss term (summed over ``axis_name`` when
    given); the loss is the sum of the terms whose name starts with "loss", the others (e.g.
    ``invalid_labels``) are metrics only. See :func:`make_train_step` for the rest."""
    def loss_of(terms):
        return sum(value for name, value in terms.items() if name.startswith("loss"))

    tx, lr_fn = _split_optimizer(optimizer)

    def train_step(state: TrainState, batch, rng=None):
        key = rng if rng is not None else jax.random.fold_in(state.key, state.step)

        def loss_fn(params):
            terms = loss_terms_fn(params, batch, key)
            return loss_of(terms), terms

        (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        if axis_name is not None:
            # Each device's loss is its share of the global-batch loss: the shares add up
            # (pmean of num_devices x share, without the two multiplications).
            grads, terms = jax.lax.psum((grads, terms), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(terms)
        metrics["loss"] = loss_of(terms)
        metrics["grad_norm"] = optax.tree.norm(grads)
        learning_rate = jnp.nan if lr_fn is None else lr_fn(state.step)
        metrics["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_train_step(
    module: nn.Module,
    loss_config,
    optimizer,
    axis_name: Optional[str] = None,
    *,
    compute_dtype=None,
    example_groups: Optional[int] = None,
    platform: Optional[str] = None,
) -> Callable[..., Tuple[TrainState, Metrics]]:
    """``train_step(state, batch, rng=None) -> (state, metrics)``, pure (jit/pmap it yourself, on
    CPU with ``compiler_options=train_compiler_options()``, or use :func:`make_pmap_train_step` /
    :func:`make_sharded_train_step`).

    Args:
      module: a ``Mask2FormerForUniversalSegmentation``; run with ``deterministic=False``
        (dropout, Swin drop-path and decoder LayerDrop active) and auxiliary predictions.
      loss_config: a ``LossConfig`` or ``Mask2FormerConfig``.
      optimizer: ``make_optimizer``'s ``(tx, learning_rate)``, or a bare optax transformation
        (then ``metrics["learning_rate"]`` is NaN).
      axis_name: the mapped axis the batch is split over (pmap/shard_map); gradients and metrics
        are summed over it so that every device holds the global-batch result.
      compute_dtype: e.g. ``jnp.bfloat16``: the module computes in it (params, gradients and
        optimizer state stay float32; the deformable sampling and the losses stay float32).
      example_groups: independent per-example chains in the traced step (see
        :func:`default_example_groups`: one per CPU core on CPU for crops from 256x256, else 1).
      platform: the platform the step is compiled for ("cpu", "gpu", "tpu"; default: JAX's
        default backend); it picks the variant of the model and the loss
        (``m2f_jax.modeling.variants``) unless ``module.variant`` or ``variants.use`` names one.
        Pass it when compiling for other devices than the host's, e.g. a TPU program from a CPU.
    The step key is ``rng`` if given, else ``fold_in(state.key, state.step)``.
    Metrics: every weighted loss term (``loss_mask``, ``loss_dice``, ``loss_cross_entropy`` and
    their ``_{i}`` auxiliary versions), ``loss``, ``grad_norm`` (global L2 norm of the gradient
    before clipping), ``learning_rate`` (of this step's update) and ``invalid_labels`` (valid
    target slots of the global batch whose class is outside [0, num_labels): when > 0 the loss
    terms are NaN and those examples add nothing to the gradient; see ``mask2former_loss``).
    """
    if isinstance(loss_config, LossConfig):
        cfg = loss_config
    else:
        cfg = LossConfig.from_config(loss_config)
    _split_optimizer(optimizer)  # fail early
    if compute_dtype is not None:
        module = module.clone(dtype=compute_dtype)
    variant = variants.resolve(getattr(module, "variant", None), platform)

    def loss_terms_fn(params, batch, key):
        return global_batch_losses(module, cfg, params, batch, key, axis_name, example_groups, variant)

    return make_generic_train_step(loss_terms_fn, optimizer, axis_name)


# --- pmap ---------------------------------------------------------------------------------------


def make_pmap_train_step(module, loss_config, optimizer, *, compute_dtype=None, donate=True, devices=None):
    """``p_step(replicated_state, device_batch) -> (replicated_state, replicated_metrics)``.

    ``device_batch`` has a leading device axis: :func:`split_for_pmap` of the global batch, so
    device d holds examples ``d*b .. d*b + b - 1``. Use :func:`replicate` / :func:`unreplicate`
    for the state. The step key comes from the (replicated) state. ``devices``: ``jax.pmap``'s
    (default: the local devices); the program is traced for their platform.
    """
    step = make_train_step(
        module, loss_config, optimizer, axis_name=PMAP_AXIS, compute_dtype=compute_dtype,
        platform=variants.platform_of(jax.local_devices() if devices is None else devices),
    )
    return jax.pmap(
        lambda state, batch: step(state, batch),
        axis_name=PMAP_AXIS,
        donate_argnums=(0,) if donate else (),
        devices=devices,
    )


def split_for_pmap(batch: Mapping[str, Any], num_devices: Optional[int] = None) -> Dict[str, Any]:
    """(B, ...) arrays -> (num_devices, B // num_devices, ...), global order kept."""
    num_devices = num_devices or jax.local_device_count()
    out = {}
    for name, x in batch.items():
        if x.shape[0] % num_devices:
            raise ValueError(
                f"batch[{name!r}] has {x.shape[0]} examples, not divisible by {num_devices} "
                "devices."
            )
        out[name] = x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
    return out


def replicate(tree):
    return jax_utils.replicate(tree)


def unreplicate(tree):
    return jax_utils.unreplicate(tree)


# --- jit over a mesh ----------------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (or the given) devices, axis ``"data"``."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (MESH_AXIS,))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> Dict[str, jax.Array]:
    """Places the global batch on the mesh, split on its leading axis."""
    sharding = NamedSharding(mesh, P(MESH_AXIS))
    return {name: jax.device_put(x, sharding) for name, x in batch.items()}


def replicate_on_mesh(tree, mesh: Mesh):
    return jax.device_put(tree, NamedSharding(mesh, P()))


def make_sharded_train_step(
    module, loss_config, optimizer, mesh: Mesh, *, compute_dtype=None, donate=True
):
    """``step(state, batch) -> (state, metrics)`` jitted over ``mesh``: the batch split on its
    leading axis (:func:`shard_batch`), params and optimizer state replicated
    (:func:`replicate_on_mesh`). It is the single-device program; XLA partitions it."""
    platform = variants.platform_of(mesh)
    step = make_train_step(module, loss_config, optimizer, compute_dtype=compute_dtype, platform=platform)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(MESH_AXIS))
    return jax.jit(
        lambda state, batch: step(state, batch),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=train_compiler_options(platform),
    )
