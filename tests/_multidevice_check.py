"""Shared setup of tests/test_train_step.py, and the script it runs in a subprocess with 4 CPU
devices (XLA_FLAGS must be set before jax is imported, so not in the pytest process).

One train step of a small Mask2Former (dropout, drop-path and LayerDrop all active) on a global
batch of 4 images, from the same state and step key, computed

* in the test process: ``jit(make_train_step(...))`` on one device, the whole batch
  (:func:`single_device_run`, which also runs more steps for the overfitting check);
* here, on 4 devices (:func:`main`):
  ``pmap``: ``make_pmap_train_step``, one example per device (keys from the device's position);
  ``sharded``: ``make_sharded_train_step`` over a 4-device "data" mesh, fed the batch in reverse
  order with ``example_index`` = 3, 2, 1, 0 (each example keeps its own key; only the order of
  the sums changes).

``python tests/_multidevice_check.py OUT.npz`` writes the params after each variant (flattened,
keyed by path) and their metrics (``metrics/<variant>/<name>``) to OUT.npz.
"""
import os
import sys

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m2f_jax.config import Mask2FormerConfig  # noqa: E402
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation  # noqa: E402
from m2f_jax.training import train_step as ts  # noqa: E402
from m2f_jax.modeling.criterion import LossConfig  # noqa: E402
from m2f_jax.training.optimizer import make_optimizer  # noqa: E402
from tests._fast_compile import FAST_CPU_COMPILE  # noqa: E402
from tests.hf_models import hf_config  # noqa: E402

# A smaller sibling of tests.hf_models.TINY (one pixel-decoder layer), with every source of
# randomness on: config.dropout is also the decoder LayerDrop probability.
BACKBONE = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7,
                drop_path_rate=0.2)
MODEL = dict(hidden_dim=32, feature_size=32, mask_feature_size=32, num_attention_heads=2,
             encoder_feedforward_dim=16, dim_feedforward=32, num_queries=6, decoder_layers=2,
             encoder_layers=1, dropout=0.1)
NUM_LABELS = 3
BATCH, SIZE, SLOTS = 4, 64, 3
OPTIMIZER = dict(learning_rate=1e-4, total_steps=100)  # the paper's lr, weight decay, clipping
SEED = 42
OVERFIT_STEPS = 14  # Adam at lr 1e-4 needs a few steps to beat the matching's jumps


def setup():
    config = Mask2FormerConfig.from_dict(hf_config(BACKBONE, MODEL, NUM_LABELS).to_dict())
    module = Mask2FormerForUniversalSegmentation(config)
    loss_config = LossConfig.from_config(config, train_num_points=32)
    # Random params from the shapes alone: compiling module.init costs more than the step.
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32), shapes
    )
    return module, loss_config, params, make_batch()


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    # Targets per image 2, 1, 3, 0 (an image without targets included).
    label_valid = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool)
    masks = np.zeros((BATCH, SLOTS, SIZE, SIZE), np.float32)
    for b in range(BATCH):
        for m in range(SLOTS):
            y, x = rng.integers(0, SIZE // 2, 2)
            masks[b, m, y : y + SIZE // 2, x : x + SIZE // 2] = 1.0
    return dict(
        pixel_values=rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
        pixel_mask=np.ones((BATCH, SIZE, SIZE), np.int32),
        mask_labels=masks,
        class_labels=rng.integers(0, NUM_LABELS, (BATCH, SLOTS)).astype(np.int32),
        label_valid=label_valid,
    )


def flat(tree, prefix=""):
    return {
        prefix + jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def first_step(compute_dtype=None, compiler_options=None, example_groups=None, platform=None):
    """The first train step of the test model on its batch, in this process: (params before,
    state after, metrics, the compiled step, batch, step key). ``compiler_options`` are added to
    FAST_CPU_COMPILE."""
    module, loss_config, params, batch = setup()
    optimizer = make_optimizer(params, **OPTIMIZER)
    state = ts.TrainState.create(params, optimizer.tx, jax.random.key(SEED))
    step_key = jax.random.fold_in(state.key, 0)  # what step 0 draws from by default
    step = jax.jit(ts.make_train_step(module, loss_config, optimizer, compute_dtype=compute_dtype,
                                      example_groups=example_groups, platform=platform))
    options = {**FAST_CPU_COMPILE, **(compiler_options or {})}
    compiled = step.lower(state, batch, step_key).compile(compiler_options=options)
    state1, metrics = compiled(state, batch, step_key)
    return params, state1, metrics, compiled, batch, step_key


def single_device_run():
    """The reference step in this process, then OVERFIT_STEPS more on the same batch and key."""
    params, state1, metrics, compiled, batch, step_key = first_step()
    losses, state_n = [float(metrics["loss"])], state1
    for _ in range(OVERFIT_STEPS):  # a fixed objective: the same batch and key every step
        state_n, m = compiled(state_n, batch, step_key)
        losses.append(float(m["loss"]))
    return {
        "params0": flat(params),
        "params": flat(state1.params),
        "step": int(state1.step),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "overfit_losses": losses,
    }


def main(out_path):
    t0 = time.time()
    assert jax.device_count() == 4, jax.devices()
    module, loss_config, params, batch = setup()
    optimizer = make_optimizer(params, **OPTIMIZER)
    state0 = ts.TrainState.create(params, optimizer.tx, jax.random.key(SEED))

    p_step = ts.make_pmap_train_step(module, loss_config, optimizer, donate=False)
    pmap_args = (ts.replicate(state0), ts.split_for_pmap(batch, 4))
    mesh = ts.make_mesh()
    s_step = ts.make_sharded_train_step(module, loss_config, optimizer, mesh, donate=False)
    reversed_batch = {k: v[::-1] for k, v in batch.items()}
    reversed_batch["example_index"] = np.arange(BATCH, dtype=np.int32)[::-1].copy()
    sharded_args = (ts.replicate_on_mesh(state0, mesh), ts.shard_batch(reversed_batch, mesh))
    # Lower both (Python, serial), then compile them in parallel.
    lowered = {"pmap": p_step.lower(*pmap_args), "sharded": s_step.lower(*sharded_args)}
    t_lower = time.time() - t0
    with ThreadPoolExecutor(len(lowered)) as pool:
        futures = {
            name: pool.submit(low.compile, compiler_options=FAST_CPU_COMPILE)
            for name, low in lowered.items()
        }
        compiled = {name: f.result() for name, f in futures.items()}
    t_compile = time.time() - t0 - t_lower

    out = {}
    state, metrics = compiled["pmap"](*pmap_args)
    state, metrics = ts.unreplicate(state), ts.unreplicate(metrics)
    out.update(flat(state.params, "pmap/") | flat(metrics, "metrics/pmap/"))
    out["step/pmap"] = np.asarray(state.step)

    state, metrics = compiled["sharded"](*sharded_args)
    out.update(flat(state.params, "sharded/") | flat(metrics, "metrics/sharded/"))
    out["step/sharded"] = np.asarray(state.step)
    out["timing"] = np.array([t_lower, t_compile, time.time() - t0])
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
