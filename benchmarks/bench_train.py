"""Training speed and memory: one m2f_jax train step (jitted: train-mode forward, every loss term
with the on-device matcher, backward, AdamW update) vs transformers' forward + backward + AdamW
step, same machine, same run, same initial weights.

    python benchmarks/bench_train.py                  # Swin-T geometry, 384x384 crops, batch 2
    python benchmarks/bench_train.py --quick          # fewer timed steps
    python benchmarks/bench_train.py --quick --hugepages   # both workers with glibc's THP malloc
    python benchmarks/bench_train.py --quick --rounds 3    # alternate the two workers 3 times

``--hugepages`` runs both workers with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35,
kernel THP mode "madvise" or "always"): malloc then asks for 2 MiB transparent huge pages. A train
step writes GBs of freshly mapped buffers (XLA's temporaries, torch's activations); with 4 KiB
pages each first write is a page fault (the "page faults / step" column). The setting is the same
for both frameworks, so the ratio stays a like-for-like comparison.

The model is Mask2Former with a Swin-T backbone, 133 labels, 100 queries, 9 decoder layers,
12544 loss points per mask (transformers' defaults = the paper's COCO recipe), random weights.
Each image has ``--targets`` random blob masks. Both sides use the paper's optimizer: AdamW lr 1e-4,
weight decay 0.05 except norms and embeddings, backbone lr x0.1, full-model gradient clipping to
norm 0.01; dropout, drop-path (0.1) and LayerDrop active.

Each framework runs in its own subprocess. Peak memory is the peak resident memory from the
first step to the last minus the resident memory before the first (weights, and for JAX the
compiled step, already in memory): optimizer state, gradients and activations on both sides.
The first step is a warm-up and is not timed; the JAX compile time is reported on its own.

A shared CPU drifts by 20-30% over minutes, and the two workers run one after the other, so one
round's ratio moves with it. ``--rounds R`` runs transformers, m2f_jax, transformers, ... R times
each and reports every round's ratio and their median; later JAX workers load the compiled step
from a persistent compilation cache (the compile time is the first round's).

The m2f_jax step is compiled with ``train_compiler_options()``, as ``m2f-jax train`` compiles it;
``--xla-defaults`` compiles it with XLA's defaults instead, to measure what the options do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import NUM_LABELS, PeakRSS, _hf_model, jax_model, timing_result  # noqa: E402


def make_batch(batch: int, size: int, targets: int, max_masks: int, seed: int = 0):
    """Random images and ``targets`` blob masks per image (union of random discs), padded to
    ``max_masks`` with a validity mask for m2f_jax."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((batch, max_masks, size, size), np.float32)
    classes = np.zeros((batch, max_masks), np.int32)
    for b in range(batch):
        for k in range(targets):
            for _ in range(3):
                cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 16, size / 5)
                masks[b, k] = np.maximum(masks[b, k], ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32))
            classes[b, k] = rng.integers(0, NUM_LABELS)
    valid = np.arange(max_masks)[None, :].repeat(batch, 0) < targets
    return images, masks, classes, valid


def _torch_optimizer(model, lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1):
    """The paper's AdamW parameter groups (the original repo's build_optimizer): backbone lr
    x0.1, no weight decay on norms and embeddings; four groups, so torch's foreach AdamW
    updates each group in a few fused calls."""
    import torch

    groups = {}
    for name, p in model.named_parameters():
        no_decay = "norm" in name or "embed" in name or "relative_position_bias_table" in name
        backbone = "pixel_level_module.encoder." in name
        groups.setdefault((backbone, no_decay), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr * (backbone_multiplier if backbone else 1.0),
          "weight_decay": 0.0 if no_decay else weight_decay} for (backbone, no_decay), ps in groups.items()],
        lr=lr,
    )


def compiled_jax_step(module, params, batch, compiler_options, compute_dtype=None):
    """This benchmark's m2f_jax train step (the paper's optimizer, every loss term) compiled for
    ``batch`` = (images, masks, classes, valid) from ``make_batch``: (compiled step, optimizer,
    device batch, compile seconds)."""
    import jax

    from m2f_jax.modeling.criterion import LossConfig
    from m2f_jax.training.optimizer import make_optimizer
    from m2f_jax.training.train_step import TrainState, make_train_step

    images, masks, classes, valid = batch
    optimizer = make_optimizer(params, learning_rate=1e-4, weight_decay=0.05, backbone_multiplier=0.1,
                               clip_norm=0.01, total_steps=10_000)
    step_fn = jax.jit(make_train_step(module, LossConfig.from_config(module.config), optimizer,
                                      compute_dtype=compute_dtype), donate_argnums=0,
                      compiler_options=compiler_options)
    data = jax.device_put(dict(pixel_values=images, mask_labels=masks, class_labels=classes, label_valid=valid))
    t0 = time.perf_counter()
    abstract = jax.eval_shape(lambda p: TrainState.create(p, optimizer.tx, 0), params)
    compiled = step_fn.lower(abstract, data).compile()
    return compiled, optimizer, data, time.perf_counter() - t0


def worker(framework: str, size: int, batch: int, targets: int, steps: int, threads: int, dtype: str,
           xla_defaults: bool = False) -> dict:
    images, masks, classes, valid = make_batch(batch, size, targets, max_masks=max(targets, 1))
    torch_model = _hf_model()  # SwinConfig's default drop_path_rate 0.1
    result = dict(framework=framework, size=size, batch=batch)
    times = []
    if framework == "transformers":
        import torch

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        torch_model.train()
        opt = _torch_optimizer(torch_model)
        xt = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        mask_labels = [torch.from_numpy(masks[b, :targets]) for b in range(batch)]
        class_labels = [torch.from_numpy(classes[b, :targets].astype(np.int64)) for b in range(batch)]

        def step():
            loss = torch_model(pixel_values=xt, mask_labels=mask_labels, class_labels=class_labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.01)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        with PeakRSS() as mem:
            result["first_loss"] = step()  # warm-up (allocates the Adam state)
            faults = _minor_faults()
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
    else:
        import jax
        import jax.numpy as jnp

        from m2f_jax.training.train_step import TrainState, train_compiler_options

        module, params = jax_model(torch_model)
        del torch_model
        cache = os.environ.get("M2F_BENCH_COMPILE_CACHE")
        if cache:  # --rounds: the first JAX worker compiles, the later ones load
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        options = {} if xla_defaults else train_compiler_options()
        result["compiler_options"] = options
        compiled, optimizer, data, result["compile_s"] = compiled_jax_step(
            module, params, (images, masks, classes, valid), options,
            compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else None,
        )
        with PeakRSS() as mem:
            # the Adam state is allocated inside the measured region, as torch's first step does
            state = TrainState.create(params, optimizer.tx, 0)
            state, metrics = compiled(state, data)  # warm-up
            result["first_loss"] = float(metrics["loss"])
            faults = _minor_faults()
            for _ in range(steps):
                t0 = time.perf_counter()
                state, metrics = compiled(state, data)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
    result["faults_per_step"] = (_minor_faults() - faults) / steps
    return timing_result(result, times, batch, mem)


def _minor_faults() -> int:
    """Minor page faults of this process so far (first writes to freshly mapped pages)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 timed steps instead of 4")
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--targets", type=int, default=8, help="ground-truth masks per image")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="m2f_jax compute dtype (params and optimizer stay float32)")
    parser.add_argument("--hugepages", action="store_true",
                        help="both workers with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (see above)")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two workers this many times")
    parser.add_argument("--xla-defaults", action="store_true",
                        help="compile the m2f_jax step without train_compiler_options() (XLA's defaults)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 4)
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.batch, args.targets, steps, args.threads, args.dtype,
                                args.xla_defaults)))
        return

    env = dict(os.environ)
    if args.hugepages:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and "malloc.hugetlb" not in t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + ["glibc.malloc.hugetlb=1"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    rounds = []
    with tempfile.TemporaryDirectory() as cache:
        env["M2F_BENCH_COMPILE_CACHE"] = cache if args.rounds > 1 else ""
        for r in range(args.rounds):
            rows = {}
            for fw in ("transformers", "m2f_jax"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", fw, "--size", str(args.size),
                       "--batch", str(args.batch), "--targets", str(args.targets), "--steps", str(steps),
                       "--threads", str(args.threads), "--dtype", args.dtype]
                cmd += ["--xla-defaults"] if args.xla_defaults else []
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
                if out.returncode:
                    sys.exit(f"{fw} failed:\n{out.stderr[-3000:]}")
                rows[fw] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  round {r + 1}: done {fw} ({rows[fw]['median_s']:.2f} s/step)", file=sys.stderr)
            rounds.append(rows)

    ratios = [rows["m2f_jax"]["images_per_s"] / rows["transformers"]["images_per_s"] for rows in rounds]
    t, j = ({key: float(np.median([rows[fw][key] for rows in rounds]))
             for key in ("median_s", "images_per_s", "peak_mem_mb", "faults_per_step")}
            for fw in ("transformers", "m2f_jax"))
    first = rounds[0]
    print(f"\nMask2Former Swin-T train step, {NUM_LABELS} labels, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.targets} targets/image, m2f_jax {args.dtype}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, median of {steps} steps"
          f"{f', median of {args.rounds} alternating rounds' if args.rounds > 1 else ''}"
          f"{', GLIBC_TUNABLES=' + env['GLIBC_TUNABLES'] if args.hugepages else ''}"
          f", m2f_jax compiler options {first['m2f_jax']['compiler_options'] or 'XLA defaults'}\n")
    print("| | step s | img/s | peak MB | page faults / step | first loss | compile s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| transformers | {t['median_s']:.2f} | {t['images_per_s']:.3f} | {t['peak_mem_mb']:.0f} | "
          f"{t['faults_per_step']:.0f} | {first['transformers']['first_loss']:.2f} | - |")
    print(f"| m2f_jax | {j['median_s']:.2f} | {j['images_per_s']:.3f} | {j['peak_mem_mb']:.0f} | "
          f"{j['faults_per_step']:.0f} | {first['m2f_jax']['first_loss']:.2f} | {first['m2f_jax']['compile_s']:.0f} |")
    print(f"| ratio (m2f_jax / transformers) | speed {float(np.median(ratios)):.2f}x | | "
          f"memory {j['peak_mem_mb'] / max(t['peak_mem_mb'], 1e-9):.2f}x | | | |")
    if args.rounds > 1:
        print("\nspeed ratio per round: " + ", ".join(f"{x:.2f}x" for x in ratios))


if __name__ == "__main__":
    main()
