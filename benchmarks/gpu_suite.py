"""One-GPU suite: m2f_jax against transformers on the same GPU, in one run, same random weights
(Swin-T geometry, 133 labels, 100 queries; transformers' random init converted to our params with
``convert.mapping.hf_to_flax``).

    PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu_dry.json     # tiny sizes on CPU, every path

Measures:

1. Forward, batch 1, at 384x384 and 800x1088, fp32 and bf16: m2f_jax jitted (compile time on its
   own, then the median of 10 calls, each ``block_until_ready``) against transformers eager under
   ``torch.no_grad()`` (bf16: ``torch.autocast("cuda", dtype=torch.bfloat16)``), each call ended by
   ``torch.cuda.synchronize()``. fp32 rows run each framework's default precision (JAX: TF32 matmuls
   and convolutions; torch: TF32 off for matmuls, on for cuDNN convolutions); the "fp32 full" row
   at 384x384 is IEEE fp32 on both sides (JAX ``default_matmul_precision("highest")``, torch TF32 off).
2. Train step, 1024x1024 crops, 2 images, 8 target masks each, bf16 compute: ``make_train_step(...,
   compute_dtype=jnp.bfloat16)`` with the paper's AdamW as ``benchmarks/bench_train.py`` builds it,
   against transformers forward + backward + clipping + AdamW with bf16 autocast; 1 warm-up and 5
   timed steps.
3. Parity at 384x384: our fp32 forward against transformers fp32 with TF32 off, max abs difference
   of ``class_queries_logits`` and ``masks_queries_logits``, at JAX's default matmul precision and
   at "highest" (a separate jit, so a separate compile).

``--extra`` adds batch 8 forwards at 384x384 and transformers under ``torch.compile``.

Each framework's peak GPU memory is its own: the transformers rows run in one subprocess
(``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()`` per row) and
each m2f_jax row in its own subprocess (``peak_bytes_in_use`` of ``memory_stats()``, which cannot be
reset; the "fp32 full" row shares the 384x384 fp32 process, so its peak is that process's). Both
figures include the weights. JAX rows also record XLA's ``memory_analysis()`` of the program.

Ratios are transformers time / m2f_jax time (above 1: m2f_jax is faster). The bar from the issue, on
an H100: forward 384x384 batch 1 at most 6 ms (goal 3 ms); a train step at least 1.5x transformers
with autocast. The device image has transformers 5.17, not the 5.24 oracle that the tests pin.

Order: a CPU-only worker writes the random weights; every m2f_jax program is then compiled, all
side by side, into a persistent compilation cache (16 cores compile at once; XLA's autotuning then
shares the GPU, which can only cost m2f_jax speed), stopped 100 s before the budget ends; then the
transformers worker and each m2f_jax worker run alone, those whose programs are in the cache first.
Compile seconds are reported apart from every timing (side by side, each compile is slower than
alone). ``--no-precompile`` compiles in the measuring workers instead; ``--compile-cache DIR``
keeps the cache for a rerun on the same machine.

Budget: the whole run stops after ``--budget-s`` (default 270 s): a worker still running then is
killed and the rest are skipped. The JSON is rewritten after every measurement, and progress lines
with the elapsed time go to stderr, so a cut-off run still says how far it got. ``--only train,800``
runs only the workers whose names contain one of the strings (and the weights).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import _hf_model  # noqa: E402
from bench_train import _torch_optimizer, compiled_jax_step, make_batch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_PREFIX = "@@gpu_suite "
WEIGHTS, CONFIG, ORACLE = "weights.npz", "config.json", "oracle.npz"
MIB = 2**20
BAR = dict(forward_ms=6.0, forward_goal_ms=3.0, train_speedup=1.5)


@dataclasses.dataclass(frozen=True)
class Plan:
    forward_sizes: tuple  # ((H, W), ...); the first is also the parity input
    train_size: int
    train_batch: int
    targets: int  # ground-truth masks per training image
    forward_repeats: int
    train_steps: int
    extra_batch: int
    warmup: int
    reserve_s: float  # of the budget, kept for the measuring workers when precompiling
    dry: bool


FULL = Plan(forward_sizes=((384, 384), (800, 1088)), train_size=1024, train_batch=2, targets=8, forward_repeats=10,
            train_steps=5, extra_batch=8, warmup=2, reserve_s=100.0, dry=False)
DRY = Plan(forward_sizes=((64, 64), (64, 96)), train_size=128, train_batch=2, targets=3, forward_repeats=2,
           train_steps=1, extra_batch=2, warmup=1, reserve_s=120.0, dry=True)


# --- the jobs --------------------------------------------------------------------------------------


def forward_program(height: int, width: int, batch: int, dtype: str) -> str:
    return f"forward {height}x{width} b{batch} {dtype}"


def train_program(plan: Plan) -> str:
    return f"train {plan.train_size}x{plan.train_size} b{plan.train_batch} bf16"


def jobs(plan: Plan, extra: bool) -> list:
    """The subprocesses, in run order: the weights (CPU only), the transformers rows (they also
    write the parity oracle), then one m2f_jax process per row, the issue's bar first."""
    (h0, w0), (h1, w1) = plan.forward_sizes

    def jax_forward(h, w, b, dtype, parity=False):
        return dict(name=f"m2f_jax {forward_program(h, w, b, dtype)}", task="jax_forward",
                    height=h, width=w, batch=b, dtype=dtype, parity=parity)

    out = [
        dict(name="weights", task="weights"),
        dict(name="transformers", task="torch_required"),
        jax_forward(h0, w0, 1, "fp32", parity=True),
        jax_forward(h0, w0, 1, "bf16"),
        dict(name=f"m2f_jax {train_program(plan)}", task="jax_train"),
        jax_forward(h1, w1, 1, "fp32"),
        jax_forward(h1, w1, 1, "bf16"),
    ]
    if extra:
        out += [
            dict(name="transformers extra", task="torch_extra"),
            jax_forward(h0, w0, plan.extra_batch, "fp32"),
            jax_forward(h0, w0, plan.extra_batch, "bf16"),
        ]
    return out


# --- shared by the workers -------------------------------------------------------------------------


def log(who: str, message: str) -> None:
    elapsed = time.time() - float(os.environ.get("M2F_SUITE_T0", time.time()))
    print(f"[{elapsed:6.1f}s] {who}: {message}", file=sys.stderr, flush=True)


def emit(record: dict) -> None:
    print(RECORD_PREFIX + json.dumps(record), flush=True)


def pixel_values(batch: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, height, width, 3)).astype(np.float32)  # (B, H, W, 3)


def timed_calls(run, repeats: int, warmup: int) -> list:
    """Seconds of each of ``repeats`` calls of ``run`` (which waits for its device) after ``warmup``."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def measurement(program: str, framework: str, times: list, images: int, peak_mib, **extra) -> dict:
    median_s = float(np.median(times))
    per = "step" if program.startswith("train") else "image"
    ms = 1e3 * median_s if per == "step" else 1e3 * median_s / images
    return dict(type="measurement", program=program, framework=framework, ms=ms, ms_per=per,
                median_s=median_s, times_s=times, images_per_s=images / median_s, peak_mib=peak_mib, **extra)


def train_batch(plan: Plan, num_labels: int):
    """``make_batch``'s (images, masks, classes, valid), classes folded into the model's labels (the
    dry run's tiny model has fewer than 133)."""
    images, masks, classes, valid = make_batch(plan.train_batch, plan.train_size, plan.targets, plan.targets)
    return images, masks, classes % num_labels, valid


def build_torch_model(plan: Plan):
    """The transformers model in eval mode on the CPU, random init from seed 0: Swin-T geometry, or
    the tests' tiny config for the dry run."""
    if not plan.dry:
        return _hf_model()
    import torch
    import transformers

    from tests.hf_models import TINY, hf_config

    torch.manual_seed(0)
    config = hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"])
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


# --- transformers worker ---------------------------------------------------------------------------


def autocast(device: str, dtype: str):
    import torch

    return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


@contextlib.contextmanager
def tf32(enabled: bool):
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class TorchDevice:
    def __init__(self):
        import torch

        self.torch = torch
        self.name = "cuda" if torch.cuda.is_available() else "cpu"

    def sync(self):
        if self.name == "cuda":
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.name == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self):
        return self.torch.cuda.max_memory_allocated() / MIB if self.name == "cuda" else None

    def tensor(self, x_nhwc: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).to(self.name)  # (B, 3, H, W)

    def describe(self) -> dict:
        torch = self.torch
        return dict(type="info", framework="transformers", device=self.name,
                    device_name=torch.cuda.get_device_name() if self.name == "cuda" else "cpu",
                    torch=torch.__version__, cuda=torch.version.cuda,
                    tf32_default=dict(matmul=torch.backends.cuda.matmul.allow_tf32,
                                      cudnn=torch.backends.cudnn.allow_tf32))


def save_weights(model, workdir: str) -> None:
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    np.savez(os.path.join(workdir, WEIGHTS), **state)
    with open(os.path.join(workdir, CONFIG), "w") as f:
        f.write(model.config.to_json_string(use_diff=False))


def load_torch_weights(model, workdir: str) -> None:
    import torch

    path = os.path.join(workdir, WEIGHTS)
    if os.path.exists(path):
        with np.load(path) as state:
            model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files})


def torch_forward(model, dev: TorchDevice, program: str, x: np.ndarray, dtype: str, plan: Plan,
                  compile_s=None, **extra) -> dict:
    xt = dev.tensor(x)

    def run():
        with dev.torch.no_grad(), autocast(dev.name, dtype):
            model(xt)
        dev.sync()

    dev.reset_peak()
    times = timed_calls(run, plan.forward_repeats, plan.warmup)
    return measurement(program, "transformers", times, x.shape[0], dev.peak_mib(), compile_s=compile_s, **extra)


def torch_oracle(model, dev: TorchDevice, plan: Plan, workdir: str) -> dict:
    """fp32 with TF32 off on the parity input: saves the logits, returns the timing row."""
    h, w = plan.forward_sizes[0]
    x = pixel_values(1, h, w)
    with tf32(False):
        with dev.torch.no_grad():
            out = model(dev.tensor(x))
        np.savez(os.path.join(workdir, ORACLE),
                 class_queries_logits=out.class_queries_logits.float().cpu().numpy(),  # (1, Q, K+1)
                 masks_queries_logits=out.masks_queries_logits.float().cpu().numpy())  # (1, Q, H/4, W/4)
        return torch_forward(model, dev, forward_program(h, w, 1, "fp32 full"), x, "fp32", plan,
                             tf32=False)


def torch_train(model, dev: TorchDevice, plan: Plan) -> dict:
    """transformers forward (bf16 autocast) + backward + clipping + the paper's AdamW."""
    torch = dev.torch
    images, masks, classes, _ = train_batch(plan, model.config.num_labels)
    torch.manual_seed(0)
    model.train()
    optimizer = _torch_optimizer(model)
    xt = dev.tensor(images)
    mask_labels = [torch.from_numpy(m).to(dev.name) for m in masks]  # B x (M, H, W)
    class_labels = [torch.from_numpy(c.astype(np.int64)).to(dev.name) for c in classes]  # B x (M,)
    losses = []

    def step():
        with autocast(dev.name, "bf16"):
            loss = model(pixel_values=xt, mask_labels=mask_labels, class_labels=class_labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        dev.sync()

    dev.reset_peak()
    times = timed_calls(step, plan.train_steps, warmup=1)  # the warm-up allocates the Adam state
    model.eval()
    return measurement(train_program(plan), "transformers", times, plan.train_batch, dev.peak_mib(),
                       losses=losses)


def torch_compiled_forward(model, dev: TorchDevice, plan: Plan, dtype: str) -> dict:
    h, w = plan.forward_sizes[0]
    x = pixel_values(1, h, w)
    compiled = dev.torch.compile(model)
    xt = dev.tensor(x)
    t0 = time.perf_counter()
    with dev.torch.no_grad(), autocast(dev.name, dtype):
        compiled(xt)
    dev.sync()
    compile_s = time.perf_counter() - t0
    base = forward_program(h, w, 1, dtype)
    return torch_forward(compiled, dev, f"{base} torch.compile", x, dtype, plan, compile_s=compile_s,
                         compare_to=base)


def guarded(who: str, program: str, fn, *args, **kwargs) -> None:
    """Emits ``fn``'s record, or an error record: one failed row does not stop the others."""
    log(who, f"{program} ...")
    try:
        record = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported in the JSON, the suite goes on
        traceback.print_exc()
        emit(dict(type="error", program=program, worker=who, error=f"{type(err).__name__}: {err}"))
        return
    emit(record)
    log(who, f"{program}: {record['ms']:.2f} ms/{record['ms_per']}, peak {record['peak_mib']} MiB")


def weights_worker(plan: Plan, workdir: str) -> None:
    """The random-init transformers model's weights and config, for every other worker."""
    save_weights(build_torch_model(plan), workdir)
    log("weights", "written")


def torch_worker(job: dict, plan: Plan, workdir: str) -> None:
    who = job["name"]
    dev = TorchDevice()
    emit(dev.describe())
    model = build_torch_model(plan)
    load_torch_weights(model, workdir)
    log(who, f"model built on the CPU, moving to {dev.name}")
    model.to(dev.name)
    (h0, w0) = plan.forward_sizes[0]
    if job["task"] == "torch_required":
        for h, w in plan.forward_sizes:
            for dtype in ("fp32", "bf16"):
                program = forward_program(h, w, 1, dtype)
                guarded(who, program, torch_forward, model, dev, program, pixel_values(1, h, w), dtype, plan)
            if (h, w) == (h0, w0):
                guarded(who, "parity oracle + fp32 full", torch_oracle, model, dev, plan, workdir)
        guarded(who, train_program(plan), torch_train, model, dev, plan)
    else:
        for dtype in ("fp32", "bf16"):
            program = forward_program(h0, w0, plan.extra_batch, dtype)
            guarded(who, program, torch_forward, model, dev, program, pixel_values(plan.extra_batch, h0, w0),
                    dtype, plan)
        for dtype in ("fp32", "bf16"):
            guarded(who, f"{forward_program(h0, w0, 1, dtype)} torch.compile", torch_compiled_forward,
                    model, dev, plan, dtype)


# --- m2f_jax workers -------------------------------------------------------------------------------


def jax_peak_mib():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / MIB


def program_memory(compiled) -> dict:
    """XLA's static figures for one compiled program, MiB."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        analysis = None
    if analysis is None:
        return {}
    return {f"xla_{name}_mib": getattr(analysis, f"{name}_size_in_bytes") / MIB
            for name in ("argument", "output", "temp")}


def jax_info() -> dict:
    import jax

    device = jax.devices()[0]
    return dict(type="info", framework="m2f_jax", backend=jax.default_backend(), device_kind=device.device_kind,
                jax=jax.__version__)


def load_jax_model(workdir: str, plan: Plan):
    """(module, device params) from the transformers worker's weights, else from a fresh
    transformers model with the same seed. The dry run's module is the GPU's variant
    (``m2f_jax.modeling.variants``), so that the CPU traces the program the GPU runs."""
    import jax

    from bench_model import jax_model
    from convert.folders import param_shapes
    from convert.mapping import hf_to_flax
    from m2f_jax.config import Mask2FormerConfig
    from m2f_jax.modeling import variants
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    variant = variants.for_platform("gpu") if plan.dry else None
    weights = os.path.join(workdir, WEIGHTS)
    if not os.path.exists(weights):
        module, params = jax_model(build_torch_model(plan))
        return module.clone(variant=variant), params
    with open(os.path.join(workdir, CONFIG)) as f:
        config = Mask2FormerConfig.from_dict(json.load(f))
    with np.load(weights) as state:
        params = hf_to_flax({k: state[k] for k in state.files}, param_shapes(config))
    return Mask2FormerForUniversalSegmentation(config, variant=variant), jax.device_put(params)


def compile_forward(module, params, x, precision=None):
    """(compiled forward, compile seconds); ``precision`` wraps the lowering in
    ``jax.default_matmul_precision``."""
    import jax

    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    context = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    t0 = time.perf_counter()
    with context:
        compiled = forward.lower(params, x).compile()
    return compiled, time.perf_counter() - t0


def jax_forward_row(module, params, x, program: str, plan: Plan, precision=None):
    """(measurement, compiled forward)."""
    import jax

    compiled, compile_s = compile_forward(module, params, x, precision)
    times = timed_calls(lambda: jax.block_until_ready(compiled(params, x)), plan.forward_repeats, plan.warmup)
    record = measurement(program, "m2f_jax", times, x.shape[0], jax_peak_mib(), compile_s=compile_s,
                         precision=precision or "default", **program_memory(compiled))
    return record, compiled


def max_abs_errors(out, oracle) -> dict:
    return {name: float(np.max(np.abs(np.asarray(getattr(out, name), np.float32) - oracle[name])))
            for name in ("class_queries_logits", "masks_queries_logits")}


def jax_parity(module, params, x, compiled_default, plan: Plan, workdir: str) -> None:
    """Parity records at default and "highest" precision, and the "fp32 full" timing row."""
    who = "m2f_jax parity"
    path = os.path.join(workdir, ORACLE)
    if not os.path.exists(path):
        emit(dict(type="error", program="parity", worker=who, error="no transformers oracle"))
        return
    with np.load(path) as f:
        oracle = {k: f[k] for k in f.files}
    h, w = plan.forward_sizes[0]
    errors = {"default": max_abs_errors(compiled_default(params, x), oracle)}
    log(who, f"default precision: {errors['default']}")
    record, compiled_highest = jax_forward_row(module, params, x, forward_program(h, w, 1, "fp32 full"), plan,
                                               precision="highest")
    record["peak_note"] = "process peak, shared with the default-precision fp32 row"
    emit(record)
    errors["highest"] = max_abs_errors(compiled_highest(params, x), oracle)
    log(who, f"highest precision: {errors['highest']} (compile {record['compile_s']:.1f} s)")
    emit(dict(type="parity", size=f"{h}x{w}", oracle="transformers fp32, TF32 off",
              oracle_max_abs={k: float(np.max(np.abs(v))) for k, v in oracle.items()},
              max_abs_error=errors))


def jax_forward_worker(job: dict, plan: Plan, workdir: str, compile_only: bool) -> None:
    import jax
    import jax.numpy as jnp

    who = job["name"]
    module, params = load_jax_model(workdir, plan)
    if job["dtype"] == "bf16":
        module = module.clone(dtype=jnp.bfloat16)
    x = jax.device_put(pixel_values(job["batch"], job["height"], job["width"]))  # (B, H, W, 3)
    program = forward_program(job["height"], job["width"], job["batch"], job["dtype"])
    log(who, "params on the device, compiling")
    if compile_only:
        programs = {None: program, "highest": forward_program(job["height"], job["width"], 1, "fp32 full")}
        for precision in (None, "highest") if job["parity"] else (None,):
            _, compile_s = compile_forward(module, params, x, precision)
            emit(dict(type="compile", program=programs[precision], compile_s=compile_s))
            log(who, f"{programs[precision]} compiled in {compile_s:.1f} s")
        return
    record, compiled = jax_forward_row(module, params, x, program, plan)
    emit(record)
    log(who, f"{record['ms']:.2f} ms/image, compile {record['compile_s']:.1f} s, peak {record['peak_mib']} MiB")
    if job["parity"]:
        jax_parity(module, params, x, compiled, plan, workdir)


def jax_train_worker(job: dict, plan: Plan, workdir: str, compile_only: bool) -> None:
    import jax
    import jax.numpy as jnp

    from m2f_jax.training.train_step import TrainState, train_compiler_options

    who = job["name"]
    module, params = load_jax_model(workdir, plan)
    batch = train_batch(plan, module.config.num_labels)
    log(who, "params on the device, compiling")
    compiled, optimizer, data, compile_s = compiled_jax_step(module, params, batch, train_compiler_options(),
                                                             compute_dtype=jnp.bfloat16)
    log(who, f"compiled in {compile_s:.1f} s")
    if compile_only:
        emit(dict(type="compile", program=train_program(plan), compile_s=compile_s))
        return
    state = TrainState.create(params, optimizer.tx, 0)  # the Adam state is in the peak, as in torch
    losses = []

    def step():
        nonlocal state
        state, metrics = compiled(state, data)
        losses.append(float(jax.block_until_ready(metrics)["loss"]))

    times = timed_calls(step, plan.train_steps, warmup=1)
    record = measurement(train_program(plan), "m2f_jax", times, plan.train_batch, jax_peak_mib(),
                         compile_s=compile_s, losses=losses, **program_memory(compiled))
    emit(record)
    log(who, f"{record['ms']:.1f} ms/step, peak {record['peak_mib']} MiB")


def run_worker(job: dict, plan: Plan, workdir: str, compile_cache, compile_only: bool) -> None:
    if job["task"] == "weights":
        weights_worker(plan, workdir)
        return
    if job["task"].startswith("torch"):
        torch_worker(job, plan, workdir)
        return
    import jax

    if compile_cache:
        jax.config.update("jax_compilation_cache_dir", compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not compile_only:
        emit(jax_info())
    try:
        worker = jax_train_worker if job["task"] == "jax_train" else jax_forward_worker
        worker(job, plan, workdir, compile_only)
    except Exception as err:  # noqa: BLE001 - reported in the JSON
        traceback.print_exc()
        emit(dict(type="error", program=job["name"], worker=job["name"], error=f"{type(err).__name__}: {err}"))


# --- orchestration ---------------------------------------------------------------------------------


def versions() -> dict:
    out = {}
    for package in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def rows(records: list) -> list:
    """One row per program: both frameworks' figures and the ratio (transformers / m2f_jax)."""
    by_program, compile_s = {}, {}
    for rec in records:
        if rec["type"] == "measurement":
            by_program.setdefault(rec["program"], {})[rec["framework"]] = rec
        elif rec["type"] == "compile":
            compile_s[rec["program"]] = rec["compile_s"]
    out = []
    for program, pair in by_program.items():
        theirs = pair.get("transformers")
        ours = pair.get("m2f_jax") or by_program.get((theirs or {}).get("compare_to"), {}).get("m2f_jax")
        ratio = theirs["ms"] / ours["ms"] if ours and theirs else None
        out.append(dict(program=program, ms_per=(ours or theirs)["ms_per"],
                        m2f_jax_ms=ours and ours["ms"], transformers_ms=theirs and theirs["ms"], ratio=ratio,
                        m2f_jax_peak_mib=ours and ours["peak_mib"],
                        transformers_peak_mib=theirs and theirs["peak_mib"],
                        m2f_jax_compile_s=compile_s.get(program, ours and ours.get("compile_s")),
                        m2f_jax_load_s=ours and ours.get("compile_s") if program in compile_s else None,
                        m2f_jax_images_per_s=ours and ours["images_per_s"],
                        transformers_images_per_s=theirs and theirs["images_per_s"]))
    return out


def write_json(path, report: dict) -> None:
    if not path:
        return
    report["rows"] = rows(report["records"])
    report["devices"] = {rec["framework"]: rec.get("device_kind") or rec.get("device_name")
                         for rec in report["records"] if rec["type"] == "info"}
    report["elapsed_s"] = time.time() - report["t0"]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def run_jobs(indexed_jobs: list, args, workdir: str, deadline: float, report: dict, compile_only=False) -> list:
    """Runs the workers side by side until they end or ``deadline``; their records go into
    ``report`` as they come. Returns each worker's status."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    lines = queue.Queue()
    procs, t0 = {}, time.time()
    for index, job in indexed_jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(index), "--workdir", workdir]
        cmd += ["--dry-run"] * args.dry_run + ["--extra"] * args.extra + ["--compile-only"] * compile_only
        cmd += ["--compile-cache", args.compile_cache] if args.compile_cache else []
        procs[index] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                                        start_new_session=True)
        threading.Thread(target=_pump, args=(index, procs[index].stdout, lines), daemon=True).start()
    names = dict(indexed_jobs)
    running, killed = set(procs), set()
    while running:
        try:
            index, line = lines.get(timeout=max(deadline - time.time(), 0.01))
        except queue.Empty:
            for index in running:
                os.killpg(procs[index].pid, signal.SIGKILL)
            killed = set(running)
            break
        if line is None:
            running.discard(index)
        elif line.startswith(RECORD_PREFIX):
            record = json.loads(line[len(RECORD_PREFIX):])
            record["worker"] = names[index]["name"]
            report["records"].append(record)
            write_json(args.out, report)
        else:
            sys.stderr.write(line)
    statuses = []
    for index, proc in procs.items():
        returncode = proc.wait()
        status = "killed at its deadline" if index in killed else f"exit {returncode}" if returncode else "done"
        name = names[index]["name"] + (" (compile only)" if compile_only else "")
        statuses.append(dict(name=name, status=status, wall_s=time.time() - t0))
    return statuses


def _pump(index: int, stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((index, line))
    lines.put((index, None))


def _fmt(value, digits=2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.0f}"


def print_summary(report: dict, plan: Plan) -> None:
    table = rows(report["records"])
    info = {r["framework"]: r for r in report["records"] if r["type"] == "info"}
    jax_device = info.get("m2f_jax", {}).get("device_kind", "?")
    torch_device = info.get("transformers", {}).get("device_name", "?")
    print(f"\nMask2Former {'tiny (dry run)' if plan.dry else 'Swin-T'}, JAX on {jax_device}, "
          f"torch on {torch_device}; forward: ms per image, median of {plan.forward_repeats}; "
          f"train: ms per step, median of {plan.train_steps}; ratio = transformers / m2f_jax\n")
    print("| program | m2f_jax ms | transformers ms | ratio | m2f_jax peak MiB | transformers peak MiB |")
    print("|---|---|---|---|---|---|")
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"| {row['program']} | {_fmt(row['m2f_jax_ms'])} | {_fmt(row['transformers_ms'])} | {ratio} | "
              f"{_fmt(row['m2f_jax_peak_mib'], 0)} | {_fmt(row['transformers_peak_mib'], 0)} |")
    how = " (side by side, into the compilation cache)" if report["precompile"] else ""
    compiled = [f"{row['program']} {row['m2f_jax_compile_s']:.1f}" for row in table
                if row["m2f_jax_compile_s"] is not None and row["m2f_jax_ms"] is not None]
    torch_compiled = [f"{rec['program']} {rec['compile_s']:.1f}" for rec in report["records"]
                      if rec["type"] == "measurement" and rec.get("compile_s") is not None
                      and rec["framework"] == "transformers"]
    print()
    if compiled:
        print(f"m2f_jax compile s{how}: " + ", ".join(compiled))
    if torch_compiled:
        print("transformers torch.compile first call s: " + ", ".join(torch_compiled))
    for rec in report["records"]:
        if rec["type"] == "parity":
            for precision, errors in rec["max_abs_error"].items():
                print(f"parity {rec['size']} fp32 vs {rec['oracle']}, JAX {precision} precision: max abs "
                      f"class_queries_logits {errors['class_queries_logits']:.3g}, "
                      f"masks_queries_logits {errors['masks_queries_logits']:.3g}")
    print_bar(table, plan)
    for rec in report["records"]:
        if rec["type"] == "error":
            print(f"ERROR {rec['worker']}: {rec['program']}: {rec['error']}")
    for worker in report["workers"]:
        if worker["status"] != "done":
            print(f"worker {worker['name']}: {worker['status']}")


def print_bar(table: list, plan: Plan) -> None:
    h, w = plan.forward_sizes[0]
    by_program = {row["program"]: row for row in table}
    note = " (dry run: not meaningful)" if plan.dry else ""
    forward = [f"{dtype} {_fmt(by_program.get(forward_program(h, w, 1, dtype), {}).get('m2f_jax_ms'))} ms"
               for dtype in ("fp32", "bf16")]
    print(f"bar: forward {h}x{w} b1 at most {BAR['forward_ms']:g} ms (goal {BAR['forward_goal_ms']:g}): "
          f"{', '.join(forward)}{note}")
    train = by_program.get(train_program(plan), {}).get("ratio")
    print(f"bar: train step at least {BAR['train_speedup']:g}x transformers with autocast: "
          f"{'-' if train is None else f'{train:.2f}x'}{note}")


def run_phase(phase: list, args, workdir: str, deadline: float, report: dict, compile_only=False) -> None:
    """``run_jobs`` unless ``deadline`` has passed; the workers' statuses go into ``report``."""
    if time.time() >= deadline:
        report["workers"] += [dict(name=job["name"], status="skipped: budget spent", wall_s=0.0) for _, job in phase]
        return
    log("suite", f"{'compile ' if compile_only else ''}start " + ", ".join(job["name"] for _, job in phase))
    statuses = run_jobs(phase, args, workdir, deadline, report, compile_only)
    report["workers"] += statuses
    log("suite", "; ".join(f"{w['name']}: {w['status']}" for w in statuses))
    write_json(args.out, report)


def run_suite(args, plan: Plan, job_list: list, report: dict) -> None:
    """The weights; then (with precompiling) every selected m2f_jax program compiled side by side
    into the compilation cache, stopped ``plan.reserve_s`` before the budget ends; then each worker
    on its own, those whose programs are in the cache first."""
    selected = [s for s in (args.only or "").split(",") if s]
    chosen = [(i, job) for i, job in enumerate(job_list)
              if job["task"] == "weights" or not selected or any(s in job["name"] for s in selected)]
    deadline = report["t0"] + args.budget_s
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as workdir:
        if args.precompile and not args.compile_cache:
            args.compile_cache = os.path.join(workdir, "jax_cache")
        run_phase([job for job in chosen if job[1]["task"] == "weights"], args, workdir, deadline, report)
        jax_jobs = [job for job in chosen if job[1]["task"].startswith("jax")]
        if args.precompile and jax_jobs:
            run_phase(jax_jobs, args, workdir, deadline - plan.reserve_s, report, compile_only=True)
        compiled = {rec["worker"] for rec in report["records"] if rec["type"] == "compile"}
        measuring = [job for job in chosen if job[1]["task"] != "weights"]
        measuring.sort(key=lambda job: job[1]["task"].startswith("jax") and job[1]["name"] not in compiled)
        for job in measuring:
            run_phase([job], args, workdir, deadline, report)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON results, rewritten after every measurement")
    parser.add_argument("--dry-run", action="store_true", help="tiny model and sizes (CPU check of every path)")
    parser.add_argument("--extra", action="store_true", help="batch 8 forwards and torch.compile too")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop the whole run after this many seconds (default 270, dry run 900)")
    parser.add_argument("--no-precompile", dest="precompile", action="store_false",
                        help="compile each m2f_jax program in its measuring worker, one after the other")
    parser.add_argument("--only", help="comma-separated substrings: run only the workers whose name has one")
    parser.add_argument("--compile-cache", help="JAX persistent compilation cache folder (default: a temporary one)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plan = DRY if args.dry_run else FULL
    job_list = jobs(plan, args.extra)
    if args.worker is not None:
        run_worker(job_list[args.worker], plan, args.workdir, args.compile_cache, args.compile_only)
        return

    t0 = time.time()
    os.environ["M2F_SUITE_T0"] = str(t0)
    args.budget_s = args.budget_s or (900.0 if args.dry_run else 270.0)
    report = dict(suite="benchmarks/gpu_suite.py", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  argv=sys.argv[1:], dry_run=args.dry_run, precompile=args.precompile, budget_s=args.budget_s,
                  plan=dataclasses.asdict(plan), versions=versions(),
                  env={k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "JAX_PLATFORMS")},
                  t0=t0, records=[], workers=[])
    run_suite(args, plan, job_list, report)
    print_summary(report, plan)
    failed = [w for w in report["workers"] if w["status"] != "done"]
    sys.exit(1 if failed or any(r["type"] == "error" for r in report["records"]) else 0)


if __name__ == "__main__":
    main()
