"""Throughput of the training input pipeline: ``BatchIterator`` over a ``SemanticDataset`` with
``TrainTransform`` (large-scale jitter to square crops), the batches a training step consumes,
for several ``num_workers``. CPU only; no JAX.

    python benchmarks/bench_pipeline.py                          # workers 0 1 2, batch 8, crop 1024
    python benchmarks/bench_pipeline.py --workers 0 2 --batches 16 --json /tmp/pipeline.json

The data is the synthetic dataset of ``m2f_jax.data.write_dataset`` in ADE20K (semantic) layout,
at a COCO-like image size (480x640 JPEGs, 64 training images, up to 15 classes and 12 shapes
per image), written once into ``--data`` (default: a folder in the temp directory, reused by
later runs with the same settings). For each worker count a new iterator (max_masks 32, seed 0,
prefetch 2) is built; its first batch is timed alone (worker start-up, the "first batch"
column) and excluded, then ``--batches`` batches are timed (default: 64 images' worth) and
reported as images/s. m2f_jax is imported from the tree this script is in; the table names the
machine, the date and that tree's commit (``+dirty`` when it has uncommitted changes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the tree this script is in
import m2f_jax  # noqa: E402
from m2f_jax.data import BatchIterator, SemanticDataset, TrainTransform, write_dataset  # noqa: E402

IMAGE_SIZE = (480, 640)
DATA = dict(num_thing_classes=10, num_stuff_classes=5, max_shapes=12, seed=0)


def build_dataset(root: str, num_images: int) -> SemanticDataset:
    marker = os.path.join(root, "done.json")
    if not os.path.exists(marker):
        start = time.perf_counter()
        write_dataset(root, num_train=num_images, num_val=1, image_size=IMAGE_SIZE, formats=("semantic",), **DATA)
        with open(marker, "w") as f:
            json.dump({"num_images": num_images, "image_size": IMAGE_SIZE, **DATA}, f)
        print(f"wrote {num_images} images to {root} in {time.perf_counter() - start:.1f} s")
    return SemanticDataset(root, "training")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()
        model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("Model name")), model)
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def commit() -> str:
    tree = os.path.dirname(os.path.dirname(os.path.abspath(m2f_jax.__file__)))
    git = lambda *a: subprocess.run(["git", "-C", tree, *a], capture_output=True, text=True)  # noqa: E731
    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown (not a git tree)"
    return head.stdout.strip() + ("+dirty" if git("diff", "--quiet", "HEAD", "--", ".").returncode else "")


def measure(dataset, workers: int, args) -> dict:
    transform = TrainTransform(crop_size=args.crop, min_scale=0.1, max_scale=2.0)
    iterator = BatchIterator(dataset, args.batch_size, transform, max_masks=args.max_masks, seed=0,
                             num_workers=workers, prefetch=args.prefetch)
    try:
        start = time.perf_counter()
        next(iterator)  # warm-up: starts the workers
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(args.batches):
            batch = next(iterator)
        seconds = time.perf_counter() - start
    finally:
        iterator.close()
    assert batch["pixel_values"].shape == (args.batch_size, args.crop, args.crop, 3), batch["pixel_values"].shape
    images = args.batches * args.batch_size
    return {"workers": workers, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--max-masks", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: 64 images' worth)")
    parser.add_argument("--images", type=int, default=64, help="training images in the dataset")
    parser.add_argument("--data", default=None, help="dataset folder (written if missing)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.batches is None:
        args.batches = max(1, -(-64 // args.batch_size))
    root = args.data or os.path.join(tempfile.gettempdir(), f"m2f_bench_pipeline_{args.images}_"
                                     f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}")
    print(f"m2f_jax from {os.path.dirname(os.path.abspath(m2f_jax.__file__))}")
    dataset = build_dataset(root, args.images)
    rows = []
    for workers in args.workers:
        rows.append(measure(dataset, workers, args))
        print(f"  workers={workers}: {rows[-1]['images_per_s']:.2f} images/s, first batch "
              f"{rows[-1]['first_batch_s']:.2f} s", flush=True)
    info = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "machine": machine(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": commit(), "python": platform.python_version(),
            "settings": {"batch_size": args.batch_size, "crop": args.crop, "max_masks": args.max_masks,
                         "prefetch": args.prefetch, "batches": args.batches, "images": args.images,
                         "image_size": list(IMAGE_SIZE), **DATA}}
    print(f"\nBatchIterator + TrainTransform (LSJ 0.1-2.0, crop {args.crop}), batch {args.batch_size}, "
          f"max_masks {args.max_masks}, {len(dataset)} images of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, "
          f"{args.batches} timed batches after 1 warm-up\n")
    print("| workers | images/s | first batch (s) |")
    print("|--------:|---------:|----------------:|")
    for row in rows:
        print(f"| {row['workers']} | {row['images_per_s']:.2f} | {row['first_batch_s']:.2f} |")
    print(f"\ncommand: {info['command']}\nmachine: {info['machine']}\ndate: {info['date']}\n"
          f"m2f_jax commit: {info['commit']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
