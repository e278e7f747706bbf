"""Inference speed: jitted m2f_jax forward vs transformers' eager forward, same machine, same run,
same weights (Swin-T geometry, 133 labels, random weights).

    python benchmarks/bench_model.py                 # 384x384 and 800x1088, batch 1 and 4
    python benchmarks/bench_model.py --quick         # 384x384, batch 1 only, fewer repeats

Each (framework, size, batch) runs in its own subprocess so that peak memory is its own: the
figure is the peak resident memory during the timed forwards minus the resident memory before
them (weights and framework already loaded). Compile time (JAX's first call) is reported on its
own line and is not in the latency.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
NUM_LABELS = 133


class PeakRSS:
    """Polls /proc/self/statm in a thread; peak resident bytes while active."""

    def __init__(self, interval=0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _hf_model():
    import torch
    import transformers

    torch.manual_seed(0)
    bb = transformers.SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **SWIN_T)
    config = transformers.Mask2FormerConfig(
        backbone_config=bb, id2label={i: str(i) for i in range(NUM_LABELS)},
        label2id={str(i): i for i in range(NUM_LABELS)},
    )
    return transformers.Mask2FormerForUniversalSegmentation(config).eval()


def timing_result(result: dict, times, batch: int, mem: PeakRSS) -> dict:
    """``result`` plus median seconds, images/s and the peak memory increase in MB."""
    result["median_s"] = float(np.median(times))
    result["images_per_s"] = batch / result["median_s"]
    result["peak_mem_mb"] = (mem.peak - mem.base) / 2**20
    return result


def jax_model(torch_model):
    """(Flax module, device params) with the transformers model's config and weights."""
    import jax

    from convert.folders import param_shapes
    from convert.mapping import hf_to_flax
    from m2f_jax.config import Mask2FormerConfig
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    config = Mask2FormerConfig.from_dict(torch_model.config.to_dict())
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return Mask2FormerForUniversalSegmentation(config), jax.device_put(hf_to_flax(state, param_shapes(config)))


def worker(framework, height, width, batch, repeats, threads) -> dict:
    x = np.random.default_rng(0).normal(size=(batch, height, width, 3)).astype(np.float32)
    torch_model = _hf_model()
    result = dict(framework=framework, size=f"{height}x{width}", batch=batch)
    if framework == "transformers":
        import torch

        torch.set_num_threads(threads)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            torch_model(xt)  # warm-up
            times = []
            with PeakRSS() as mem:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    torch_model(xt)
                    times.append(time.perf_counter() - t0)
    else:
        import jax

        module, params = jax_model(torch_model)
        del torch_model
        forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
        xj = jax.device_put(x)
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, xj))
        result["compile_s"] = time.perf_counter() - t0
        times = []
        with PeakRSS() as mem:
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(forward(params, xj))
                times.append(time.perf_counter() - t0)
    return timing_result(result, times, batch, mem)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--worker", nargs=4, metavar=("FRAMEWORK", "H", "W", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    if args.worker:
        fw, h, w, b = args.worker
        print(json.dumps(worker(fw, int(h), int(w), int(b), repeats, args.threads)))
        return

    cases = [(384, 384, 1)] if args.quick else [(384, 384, 1), (384, 384, 4), (800, 1088, 1), (800, 1088, 4)]
    rows = []
    for h, w, b in cases:
        for fw in ("transformers", "m2f_jax"):
            cmd = [sys.executable, __file__, "--worker", fw, str(h), str(w), str(b),
                   "--repeats", str(repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))), env=dict(os.environ, PYTHONPATH=os.getcwd()))
            if out.returncode:
                sys.exit(f"{fw} {h}x{w} b{b} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  done {fw} {h}x{w} batch {b}", file=sys.stderr)

    import platform

    print(f"\nMask2Former Swin-T, {NUM_LABELS} labels, fp32, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, median of {repeats}\n")
    print("| input | batch | transformers ms | m2f_jax ms | transformers img/s | m2f_jax img/s | speed-up "
          "| transformers peak MB | m2f_jax peak MB | m2f_jax compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        t, j = rows[i], rows[i + 1]
        print(f"| {t['size']} | {t['batch']} | {1e3 * t['median_s']:.0f} | {1e3 * j['median_s']:.0f} | "
              f"{t['images_per_s']:.2f} | {j['images_per_s']:.2f} | {j['images_per_s'] / t['images_per_s']:.2f}x "
              f"| {t['peak_mem_mb']:.0f} | {j['peak_mem_mb']:.0f} | {j['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
