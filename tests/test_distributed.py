"""``m2f-jax train`` on two processes (jax.distributed over 127.0.0.1, gloo CPU collectives, two
virtual CPU devices each) against one process with four devices, and a two-process run that loses
a process to SIGKILL after its second checkpoint, whose newest checkpoint is then damaged, that
resumes from the intact one, is preempted there (SIGTERM on one process: both stop after the same
step and save it) and resumes again to the end. Every run fine-tunes one randomly initialised
checkpoint.

Oracles: the single-process run (same global batches, same per-example keys: the program differs
only in where its collectives run, so float summation order may differ) and the uninterrupted
two-process run (the same program: resuming from a checkpoint must give its parameters bit for
bit). Every process started here is killed when the test ends, whatever happens.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.folders import save_hf_folder
from m2f_jax.config import Mask2FormerConfig
from m2f_jax.data.synthetic import write_dataset
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation
from m2f_jax.training import distributed
from m2f_jax.data.datasets import open_dataset
from m2f_jax.training.run import PRESETS
from tests import flip_64_bytes, largest_file
from tests._fast_compile import FAST_CPU_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "_distributed_train.py")
STEPS = 3
# smaller than the tiny preset (one pixel-decoder layer, two decoder layers): compiling the step is
# most of each run
MODEL = dict(PRESETS["tiny"], hidden_dim=32, feature_size=32, mask_feature_size=32, num_attention_heads=2,
             encoder_feedforward_dim=32, dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_queries=6,
             backbone_config=dict(PRESETS["tiny"]["backbone_config"], embed_dim=16, depths=[1, 1, 1, 1],
                                  num_heads=[1, 1, 2, 2]))
TRAIN = ["train", "--format", "semantic", "--steps", str(STEPS), "--batch-size", "4",
         "--crop", "64", "--num-points", "64", "--num-workers", "0", "--save-every", "1", "--keep", "3",
         "--lr", "3e-3", "--clip-norm", "1.0", "--min-scale", "0.8", "--max-scale", "1.25", "--seed", "5"]
# lr: large enough that 3 steps move the validation mIoU (0.124 -> 0.137 -> 0.190 in the
# single-process run), so that a validation scoring stale weights shows
TIMEOUT = 240  # s per run; the test takes ~3 minutes on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Started processes, all killed on exit."""

    def __init__(self, env):
        self.env, self.started = env, []

    def start(self, devices, argv, log, env=()):
        """``env``: variables added to the processes' environment."""
        process = subprocess.Popen([sys.executable, SCRIPT, str(devices), *argv], cwd=REPO, env={**self.env, **dict(env)},
                                   stdout=open(log + ".out", "w"), stderr=open(log + ".err", "w"))
        self.started.append((process, log))
        return process

    def run(self, group, status=0):
        """Waits for the (process, log) group; fails with their stderr when one does not end with
        ``status``."""
        deadline = time.monotonic() + TIMEOUT
        for process, log in group:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pass
            if process.returncode != status:
                self.kill()
                pytest.fail(f"{log}: exit {process.returncode}\n" + open(log + ".err").read()[-3000:])

    def kill(self):
        for process, _ in self.started:
            if process.poll() is None:
                process.kill()
                process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()


def _two_processes(procs, tmp, out, name, extra=(), sigterm=None):
    """``sigterm``: (process, exchange): that process sends itself SIGTERM after its Nth step's
    stop-flag exchange (tests/_distributed_train.py)."""
    port = _free_port()
    env = {} if sigterm is None else {"M2F_TEST_SIGTERM": "%d:%d" % sigterm}
    return [(procs.start(2, TRAIN + ["--data", tmp["data"], "--init", tmp["init"], "--out", out, "--coordinator-address",
                                     f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(p),
                                     "--distributed-timeout", "60", *extra], os.path.join(tmp["logs"], f"{name}{p}"), env),
             os.path.join(tmp["logs"], f"{name}{p}")) for p in range(2)]


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if "loss" in json.loads(line)]


def _params(out):
    return load_file(os.path.join(out, "hf", "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tmp = {"data": str(root / "data"), "logs": str(root), "init": str(root / "init")}
    write_dataset(tmp["data"], num_train=16, num_val=4, image_size=(64, 64), seed=0, formats=("semantic",))
    # one randomly initialised checkpoint for every run (initialising in each of the 7 processes
    # would compile the model's init 7 times)
    id2label = {int(k): v for k, v in open_dataset(tmp["data"], "semantic", "train").id2label.items()}
    config = Mask2FormerConfig.from_dict(dict(MODEL, id2label=id2label))
    module = Mask2FormerForUniversalSegmentation(config)
    args = jax.random.PRNGKey(5), np.zeros((1, 64, 64, 3), np.float32)
    params = jax.jit(module.init).lower(*args).compile(compiler_options=FAST_CPU_COMPILE)(*args)["params"]
    save_hf_folder(jax.tree_util.tree_map(np.asarray, params), config, tmp["init"])
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(root / "cache"), PYTHONPATH=REPO)
    outs = {name: str(root / name) for name in ("single", "two", "killed")}
    with _Processes(env) as procs:
        # the single-process 4-device run and the uninterrupted two-process run, side by side
        # the single-process run also validates (on its 4 devices) before the first step, after
        # step 2 and at the end: each validation must score the weights of its step
        single = (procs.start(4, TRAIN + ["--data", tmp["data"], "--init", tmp["init"], "--out", outs["single"],
                                          "--val-first", "--val-every", "2"],
                              os.path.join(tmp["logs"], "single")), os.path.join(tmp["logs"], "single"))
        two = _two_processes(procs, tmp, outs["two"], "two")
        procs.run([single] + two)

        # a second two-process run: process 1 is killed once the second checkpoint is complete, and
        # that checkpoint is then damaged (64 bytes flipped in its largest array file)
        killed = _two_processes(procs, tmp, outs["killed"], "killed")
        second = os.path.join(outs["killed"], "checkpoints", "2")
        deadline = time.monotonic() + TIMEOUT
        while not os.path.isdir(second) and time.monotonic() < deadline and killed[1][0].poll() is None:
            time.sleep(0.01)
        killed[1][0].send_signal(signal.SIGKILL)
        assert killed[1][0].wait() == -signal.SIGKILL, (
            "process 1 ended before it could be killed:\n" + open(killed[1][1] + ".err").read()[-3000:])
        killed[0][0].kill()  # process 0 waits in a collective for its lost peer
        killed[0][0].wait()
        steps_before = sorted(int(s) for s in os.listdir(os.path.dirname(second)) if s.isdigit())
        flip_64_bytes(largest_file(os.path.join(second, "state")))
        # resumed from step 1 with no checkpoint due at step 2; process 1 is preempted during
        # step 2 (SIGTERM after its first stop-flag exchange): both stop after step 2 and save it
        resumed = _two_processes(procs, tmp, outs["killed"], "resumed", ["--resume", "--save-every", "3"],
                                 sigterm=(1, 1))
        procs.run(resumed, status=128 + signal.SIGTERM)
        steps_stopped = sorted(int(s) for s in os.listdir(os.path.dirname(second)) if s.isdigit())
        finished = _two_processes(procs, tmp, outs["killed"], "finished", ["--resume"])
        procs.run(finished)
        err = {name: open(os.path.join(tmp["logs"], f"{name}0.err")).read() for name in ("resumed", "finished")}
    return {"outs": outs, "steps_before": steps_before, "steps_stopped": steps_stopped, "err": err, "data": tmp["data"]}


def test_two_processes_train_as_one_process_with_their_devices(runs):
    single, two = runs["outs"]["single"], runs["outs"]["two"]
    assert len(_losses(single)) == len(_losses(two)) == STEPS
    np.testing.assert_allclose(_losses(two), _losses(single), rtol=1e-4)
    a, b = _params(two), _params(single)
    assert a.keys() == b.keys()
    total = sum(v.size for v in a.values())
    apart = sum(int((np.abs(a[k] - b[k]) > 1e-5).sum()) for k in a)
    assert apart <= 1e-3 * total, f"{apart} of {total} parameter elements differ by more than 1e-5"


def test_validations_on_four_devices_score_the_weights_of_their_step(runs, tmp_path):
    """The single-process run validated its initial weights, step 2's and step 3's on 4 devices
    (the replicated copy of one validation's weights must not serve the next: the train step
    donates their buffers). Oracle for the last: ``m2f-jax eval`` of the export on one device."""
    from m2f_jax import cli

    with open(os.path.join(runs["outs"]["single"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    validations = [(r["step"], r["val_mIoU"]) for r in records if "val_mIoU" in r]
    assert [step for step, _ in validations] == [0, 2, 3]
    assert abs(validations[-1][1] - validations[0][1]) > 1e-3
    out = tmp_path / "metrics.json"
    assert cli.main(["eval", "--data", runs["data"], "--format", "semantic", "--task", "semantic", "--model",
                     os.path.join(runs["outs"]["single"], "hf"), "--out", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["mIoU"] == pytest.approx(validations[-1][1], abs=1e-6)


def test_a_process_killed_or_preempted_resumes_to_the_uninterrupted_parameters(runs):
    assert runs["steps_before"] == [1, 2]  # killed mid-run, two checkpoints kept
    # both processes find step 2 damaged and resume from step 1, the newest intact one
    resumed, finished = runs["err"]["resumed"], runs["err"]["finished"]
    assert "checkpoints/2 is damaged" in resumed or "checkpoints/2 cannot be read" in resumed
    assert "resuming from step 1, the newest intact checkpoint" in resumed
    assert "resumed from step 1" in resumed
    # SIGTERM on process 1 only: both ended with its status (checked when they were waited for)
    # after step 2, which they saved though no checkpoint was due, and the last run went on from it
    assert "SIGTERM: stopped after step 2, saved in" in resumed
    assert runs["steps_stopped"] == [1, 2]
    assert "resumed from step 2" in finished
    a, b = _params(runs["outs"]["killed"]), _params(runs["outs"]["two"])
    for key in b:  # the same program from the same state and input position: bit for bit on CPU
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # the checkpoint holds each process's input position, written by grain's handler
    last = os.path.join(runs["outs"]["killed"], "checkpoints", str(STEPS), "data")
    files = sorted(f for f in os.listdir(last) if f.endswith(".json"))
    assert files == ["process_0-of-2.json", "process_1-of-2.json"]
    positions = [json.load(open(os.path.join(last, f))) for f in files]
    assert positions[0] == positions[1] and (positions[0]["epoch"], positions[0]["batch"]) == (0, STEPS)


# ---- clear errors -------------------------------------------------------------------------------


def test_an_unreachable_coordinator_is_one_line_after_the_timeout(tmp_path):
    port = _free_port()  # nothing listens there
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "m2f_jax", "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
         "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
         "--distributed-timeout", "2"],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO), capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (f"error: process 1 of 2 could not reach the coordinator at 127.0.0.1:{port} "
                                     "within 2 s (Connection refused). Start process 0 with the same "
                                     "--coordinator-address (its host and a free port) and check that this host "
                                     "can reach it.")
    assert time.monotonic() - started >= 2


def test_a_global_batch_that_does_not_divide_over_the_devices_is_refused():
    class Mesh:  # the mesh's device count is all local_batch_size reads
        devices = np.empty(4, object)

    assert distributed.local_batch_size(8, Mesh()) == 8  # one process: all rows are its own
    with pytest.raises(distributed.DistributedError,
                       match=r"global batch size 6 does not divide over the 4 devices .* use a multiple of 4"):
        distributed.local_batch_size(6, Mesh())


def test_processes_that_disagree_are_named_with_what_differs(monkeypatch):
    values = {"arguments": {"lr": 3e-4}, "config": {"hidden_dim": 32}, "step": 7}
    other = dict(values, step=5)  # process 2 resumed from another checkpoint
    fingerprints = {name: distributed.fingerprint(v) for name, v in values.items()}
    names = sorted(values)

    def allgather(mine):  # processes 0 and 1 as this one, process 2 with `other`
        np.testing.assert_array_equal(mine, [fingerprints[n] for n in names])
        return np.stack([mine, mine, [distributed.fingerprint(other[n]) for n in names]])

    monkeypatch.setattr(distributed.jax, "process_count", lambda: 3)
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
    with pytest.raises(distributed.DistributedError) as error:
        distributed.check_agreement(values)
    assert str(error.value).startswith(
        "the processes of this run disagree: step (process(es) 2 differ from process 0). Start every "
        "process with the same arguments")
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", lambda mine: np.stack([mine] * 3))
    distributed.check_agreement(values)  # no error when they agree


def test_only_a_real_launch_starts_the_distributed_runtime_by_itself(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.cluster_detected()
    # the text JAX's TPU set-up leaves on a host that is not a TPU VM has commas but no host names
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "WARNING: could not determine TPU worker hostnames or IP addresses, "
                                               "please set env var `TPU_WORKER_HOSTNAMES` manually")
    assert not distributed.cluster_detected()
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0")
    assert not distributed.cluster_detected()  # one host
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")
    assert distributed.cluster_detected()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_detected()
