"""Checkpoints: exact restore of the real TrainState (step, params, AdamW + accumulation state,
rng), retention, and crash safety: a process SIGKILLed inside a save resumes from the previous
checkpoint and continues on the loss curve of an uninterrupted run.

The model is a stand-in (a two-layer MLP at Mask2Former-like param paths, with key-dependent
dropout) trained by the real step machinery (make_generic_train_step + make_optimizer), so that a
run costs a second, not a Mask2Former compile. Run as a script, this file is the child process
of the crash test.
"""
import json
import logging
import os
import signal
import subprocess
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import pytest  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from m2f_jax.training.checkpoint import CheckpointManager, abstract_state  # noqa: E402
from m2f_jax.training.optimizer import make_optimizer  # noqa: E402
from m2f_jax.training.train_step import TrainState, make_generic_train_step  # noqa: E402
from tests import flip_64_bytes, largest_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 7
NUM_STEPS = 8
SAVE_EVERY = 2
CRASH_STEP = 6  # the child dies inside the save of this step
CONFIG = {"model": "stand-in mlp", "hidden": 16, "learning_rate": 3e-2}


def fresh_state(accumulate_steps=1):
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(0, 0.3, shape), jnp.float32)  # noqa: E731
    params = {
        "model": {
            "pixel_level_module": {
                "encoder": {"proj": {"kernel": normal(4, 16), "bias": normal(16)}}
            },
            "norm": {"scale": 1.0 + normal(16), "bias": normal(16)},
        },
        "class_predictor": {"kernel": normal(16, 1), "bias": normal(1)},
    }
    optimizer = make_optimizer(
        params, learning_rate=CONFIG["learning_rate"], total_steps=NUM_STEPS, schedule="step",
        step_milestones=(5,), clip_norm=1.0, accumulate_steps=accumulate_steps,
    )
    return TrainState.create(params, optimizer.tx, jax.random.key(SEED)), optimizer


def stand_in_loss(params, batch, key):
    """MSE of a 2-layer MLP with dropout drawn from the step key."""
    enc = params["model"]["pixel_level_module"]["encoder"]["proj"]
    h = jnp.tanh(batch["x"] @ enc["kernel"] + enc["bias"])
    h = h * params["model"]["norm"]["scale"] + params["model"]["norm"]["bias"]
    keep = jax.random.bernoulli(key, 0.8, h.shape)
    h = jnp.where(keep, h / 0.8, 0.0)
    pred = h @ params["class_predictor"]["kernel"] + params["class_predictor"]["bias"]
    return {"loss_mse": jnp.mean((pred - batch["y"]) ** 2)}


def batch_at(position):
    """The data stream: batch ``position`` of a deterministic dataset."""
    rng = np.random.default_rng(1000 + position)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": np.sin(x.sum(-1, keepdims=True)).astype(np.float32)}


_STEPS = {}


def _jitted_step(optimizer):
    """One compiled step for all runs of this process (every fresh_state() builds the same
    optimizer)."""
    if "step" not in _STEPS:
        _STEPS["step"] = jax.jit(make_generic_train_step(stand_in_loss, optimizer))
    return _STEPS["step"]


def train(directory, num_steps=NUM_STEPS, on_loss=None):
    """Resumes from the latest checkpoint in ``directory`` if any; returns (state, {step: loss},
    the step it resumed from)."""
    state, optimizer = fresh_state()
    step_fn = _jitted_step(optimizer)
    manager = CheckpointManager(directory, save_every=SAVE_EVERY, keep=3)
    position, resumed_from = 0, None
    restored = manager.restore_latest(abstract_state(state))
    if restored is not None:
        state, extra = restored
        assert extra["config"] == CONFIG and extra["rng_impl"] == state.rng_impl
        position, resumed_from = extra["data_position"], int(state.step)
    losses = {}
    while int(state.step) < num_steps:
        batch = batch_at(position)
        position += 1
        state, metrics = step_fn(state, batch)
        step = int(state.step)
        losses[step] = float(metrics["loss"])
        if on_loss:
            on_loss(step, losses[step])
        extra = {
            "data_position": position,
            "rng_seed": SEED,
            "rng_impl": state.rng_impl,
            "config": CONFIG,
        }
        manager.save(step, state, extra)
    manager.wait_until_finished()
    manager.close()
    return state, losses, resumed_from


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_restore_is_exact_and_keeps_the_newest(tmp_path):
    state, optimizer = fresh_state(accumulate_steps=2)  # MultiSteps + AdamW + masks in opt_state
    step_fn = jax.jit(make_generic_train_step(stand_in_loss, optimizer))
    manager = CheckpointManager(tmp_path, save_every=2, keep=2)
    assert manager.restore_latest(abstract_state(state)) is None
    saved = {}
    for position in range(5):
        state, _ = step_fn(state, batch_at(position))
        if manager.save(int(state.step), state, {"data_position": position + 1}):
            saved[int(state.step)] = state
    manager.wait_until_finished()
    assert sorted(saved) == [2, 4] and manager.all_steps() == [2, 4]
    fresh, _ = fresh_state(accumulate_steps=2)
    restored, extra = manager.restore_latest(abstract_state(fresh))
    assert extra == {"data_position": 4}
    assert type(restored) is TrainState and restored.rng_impl == fresh.rng_impl
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved[4])
    for a, b in zip(_leaves(restored), _leaves(saved[4])):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 4
    # keep=2: the oldest goes once a newer one is saved.
    state, _ = step_fn(state, batch_at(5))
    manager.save(int(state.step), state, {})
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 6]
    manager.close()


def test_leftover_partial_save_is_ignored(tmp_path):
    """A tmp directory as an interrupted Orbax save leaves it (a newer step, partly written)."""
    state, optimizer = fresh_state()
    manager = CheckpointManager(tmp_path, save_every=1)
    manager.save(2, state.replace(step=jnp.int32(2)), {"data_position": 2})
    manager.close()
    partial = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{truncated")
    manager = CheckpointManager(tmp_path, save_every=1)
    assert manager.latest_step() == 2
    restored, extra = manager.restore_latest(abstract_state(state))
    assert int(restored.step) == 2 and extra == {"data_position": 2}
    manager.wait_until_finished()
    assert not partial.exists()  # cleaned up by the manager that opened the directory
    manager.close()


def _two_checkpoints(tmp_path):
    """Steps 2 and 4 of the stand-in run, saved; returns (manager factory, states by step, fresh)."""
    state, optimizer = fresh_state()
    step_fn = jax.jit(make_generic_train_step(stand_in_loss, optimizer))
    manager = CheckpointManager(tmp_path, save_every=2, keep=3)
    saved = {}
    for position in range(4):
        state, _ = step_fn(state, batch_at(position))
        if manager.save(int(state.step), state, {"data_position": position + 1}):
            saved[int(state.step)] = jax.device_get(state)
    manager.close()
    return (lambda: CheckpointManager(tmp_path, save_every=2, keep=3)), saved, fresh_state()[0]


@pytest.mark.parametrize("damage", ["truncate_largest", "delete_largest", "flip_64_bytes", "remove_metadata",
                                    "remove_extra"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, capfd, damage):
    """Damage to step 4 after it was saved: restore_latest says so on stderr and restores step 2
    exactly (its data position too); never step 4's damaged arrays."""
    reopen, saved, fresh = _two_checkpoints(tmp_path)
    step4 = str(tmp_path / "4")
    if damage == "truncate_largest":
        path = largest_file(step4 + "/state")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "delete_largest":
        os.remove(largest_file(step4 + "/state"))
    elif damage == "flip_64_bytes":
        flip_64_bytes(largest_file(step4 + "/state"))
    elif damage == "remove_metadata":
        for d, _, files in os.walk(step4):
            for f in files:
                if "METADATA" in f.upper():
                    os.remove(os.path.join(d, f))
    else:
        import shutil

        shutil.rmtree(step4 + "/extra")
    manager = reopen()
    restored, extra = manager.restore_latest(abstract_state(fresh))
    # the damaged step is deleted, so that the resumed run can save it again
    assert manager.all_steps() == [2] and manager.save(4, saved[4], {"data_position": 4}, force=True)
    manager.close()
    assert int(restored.step) == 2 and extra == {"data_position": 2}
    for a, b in zip(_leaves(restored), _leaves(saved[2])):
        np.testing.assert_array_equal(a, b)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # one warning: the step skipped, why, the step resumed from
    assert lines[0].startswith(f"warning: skipped checkpoint step(s) 4: {step4} "), lines
    assert ("cannot be read" in lines[0]) != ("is damaged" in lines[0]), lines
    assert lines[0].endswith("resuming from step 2, the newest intact checkpoint; deleting the damaged step(s) 4")


def test_what_a_failing_restore_logs_and_prints_is_one_warning_line(tmp_path, capfd):
    """Step 4's restore emits 2,000 lines through every route Orbax and TensorStore have to stderr
    (absl and Python logging with tracebacks, sys.stderr, file descriptor 2 as C++ logs do) before
    it fails: one warning line reaches stderr. Step 2's
    restore writes one line to file descriptor 2, which is passed on."""
    from absl import logging as absl_logging

    reopen, saved, fresh = _two_checkpoints(tmp_path)
    manager = reopen()
    real_restore = manager._manager.restore

    def noisy_restore(step, *args, **kwargs):
        if step == 4:
            for i in range(400):
                try:
                    raise OSError(f"tensorstore read {i} failed")
                except OSError:
                    absl_logging.exception("reading array %d", i)
                    logging.getLogger("asyncio").exception("Task exception was never retrieved")
            print("\n".join(["printed"] * 400), file=sys.stderr)
            os.write(2, b"E0000 tensorstore: NOT_FOUND\n" * 400)
            raise ValueError("Encountered error while reading array index\nmore details")
        os.write(2, b"W0000 an intact step's notice\n")
        return real_restore(step, *args, **kwargs)

    manager._manager.restore = noisy_restore
    restored, extra = manager.restore_latest(abstract_state(fresh))
    manager.close()
    assert int(restored.step) == 2 and extra == {"data_position": 2}
    lines = capfd.readouterr().err.splitlines()
    assert lines == [
        "W0000 an intact step's notice",
        f"warning: skipped checkpoint step(s) 4: {tmp_path / '4'} cannot be read (ValueError: Encountered error "
        "while reading array index); resuming from step 2, the newest intact checkpoint; deleting the damaged "
        "step(s) 4",
    ], lines[:5]
    assert logging.getLogger("absl").isEnabledFor(logging.WARNING) and sys.stderr is not None
    os.write(2, b"fd 2 is back\n")
    print("sys.stderr is back", file=sys.stderr)
    assert capfd.readouterr().err.splitlines() == ["fd 2 is back", "sys.stderr is back"]


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    from m2f_jax.training.checkpoint import DamagedCheckpointError

    reopen, _, fresh = _two_checkpoints(tmp_path)
    for step in ("2", "4"):
        flip_64_bytes(largest_file(str(tmp_path / step / "state")))
    manager = reopen()
    with pytest.raises(DamagedCheckpointError, match=r"no intact checkpoint in .*/2.*(damaged|cannot be read)"):
        manager.restore_latest(abstract_state(fresh))
    manager.close()


def test_killed_mid_save_resumes_on_the_uninterrupted_loss_curve(tmp_path):
    """The child trains 8 steps saving every 2 and is SIGKILLed while committing step 6 (its
    files written, the tmp directory not yet renamed). Resuming must restore step 4, not a
    broken 6, and reproduce the uninterrupted run's losses and final state."""
    crashed_dir, clean_dir = tmp_path / "crashed", tmp_path / "clean"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(crashed_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    child_losses = dict(json.loads(line) for line in child.stdout.splitlines() if line[:1] == "[")
    assert sorted(child_losses)[:CRASH_STEP] == list(range(1, CRASH_STEP + 1))
    left = sorted(p.name for p in crashed_dir.iterdir())
    assert "6" not in left and any(name.startswith("6.orbax-checkpoint-tmp") for name in left), left

    resumed_state, resumed_losses, resumed_from = train(crashed_dir)
    assert resumed_from == CRASH_STEP - SAVE_EVERY
    clean_state, clean_losses, _ = train(clean_dir)

    assert sorted(clean_losses) == list(range(1, NUM_STEPS + 1))
    assert sorted(resumed_losses) == list(range(resumed_from + 1, NUM_STEPS + 1))
    for step, loss in list(child_losses.items()) + list(resumed_losses.items()):
        np.testing.assert_allclose(loss, clean_losses[step], rtol=0, atol=1e-6, err_msg=str(step))
    assert int(resumed_state.step) == NUM_STEPS
    for a, b in zip(_leaves(resumed_state), _leaves(clean_state)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert len(set(clean_losses.values())) == NUM_STEPS  # a real curve, not a constant


def _crash_inside_the_commit_of(step):
    """Make Orbax's final rename of ``step``'s tmp directory kill this process."""
    from orbax.checkpoint._src.path import async_path

    rename = async_path.rename

    async def killing_rename(src, dst):
        if dst.name == str(step):
            os.kill(os.getpid(), signal.SIGKILL)
        return await rename(src, dst)

    async_path.rename = killing_rename


if __name__ == "__main__":
    _crash_inside_the_commit_of(CRASH_STEP)
    train(sys.argv[1], on_loss=lambda step, loss: print(json.dumps([step, loss]), flush=True))
    sys.exit("not killed")


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "orbax_510e072")


def test_a_training_checkpoint_written_by_release_510e072_resumes(tmp_path, capfd):
    """``tests/fixtures/orbax_510e072``: step 1 of ``m2f-jax train`` written by commit 510e072
    (the config beside it, the synthetic dataset below, the arguments here). The current code
    resumes it: the CRC-32 of every array, computed by that commit when it saved, matches what is
    restored (a changed state layout or a misread array is reported as damage, not resumed)."""
    import shutil

    from m2f_jax import cli
    from m2f_jax.data.synthetic import write_dataset

    write_dataset(str(tmp_path / "data"), num_train=4, num_val=2, image_size=(64, 64), seed=0, formats=("semantic",))
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), tmp_path / "run" / "checkpoints")
    rc = cli.main(["train", "--data", str(tmp_path / "data"), "--format", "semantic", "--init",
                   os.path.join(FIXTURE, "config.json"), "--steps", "1", "--batch-size", "2", "--crop", "64",
                   "--num-points", "64", "--num-workers", "0", "--save-every", "1", "--seed", "5",
                   "--out", str(tmp_path / "run"), "--resume", "--no-compilation-cache"])
    err = capfd.readouterr().err
    assert rc == 0, err[-3000:]
    assert "resumed from step 1" in err and "warning" not in err, err[-3000:]
    assert os.path.isfile(tmp_path / "run" / "hf" / "model.safetensors")
