"""Preprocessing speed: m2f_jax's NumPy/Pillow processor vs transformers' PIL-backend processor
(the one available without torchvision), same images, same settings, same run.

    python benchmarks/bench_preprocess.py [--batch 8] [--repeats 5]

Images: 480x640 crops of scikit-image's sample photos; settings: the Hub checkpoints' 384x384
resize, and transformers' default shortest_edge 800 / longest_edge 1333 with size_divisor 32.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import skimage.data
    import transformers

    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    images = []
    for i in range(args.batch):
        p = photos[i % len(photos)]
        reps = (-(-480 // p.shape[0]), -(-640 // p.shape[1]), 1)
        images.append(np.ascontiguousarray(np.tile(p, reps)[:480, :640]))
    settings = {
        "384x384": dict(size={"height": 384, "width": 384}, size_divisor=0),
        "800/1333, /32": dict(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32),
    }
    print(f"| setting | batch | transformers ms | m2f_jax ms | speed-up |\n|---|---|---|---|---|")
    for name, kw in settings.items():
        ours, theirs = Mask2FormerImageProcessor(**kw), transformers.Mask2FormerImageProcessorPil(**kw)
        times = {"ours": [], "theirs": []}
        for _ in range(args.repeats):
            for key, fn in (("ours", lambda: ours.preprocess(images)),
                            ("theirs", lambda: theirs(images=images, return_tensors=None))):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        t, o = np.median(times["theirs"]), np.median(times["ours"])
        print(f"| {name} | {args.batch} | {1e3 * t:.0f} | {1e3 * o:.0f} | {t / o:.2f}x |")


if __name__ == "__main__":
    main()
