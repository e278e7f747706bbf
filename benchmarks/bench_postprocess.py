"""Post-processing speed: m2f_jax vs transformers' Mask2FormerImageProcessorPil, same inputs.

Inputs mimic a trained model at 384x384 input: batch 8, 100 queries, 133 classes (COCO panoptic),
96x96 mask logits, target size 480x640. About a fifth of the queries are confident objects (one
class logit raised) with a disk-shaped mask; the rest predict the null class. With the default
thresholds (0.5) about that many instances / segments survive per image.

    python benchmarks/bench_postprocess.py            # 1 warm-up (compiles), median of 5 runs
    python benchmarks/bench_postprocess.py --quick    # median of 2 runs
    python benchmarks/bench_postprocess.py --random-logits   # worst case for m2f_jax's shortcuts

Times are wall-clock medians in ms, ours and transformers' runs interleaved; the ratio is
transformers / m2f_jax. Instance and panoptic are data-dependent (only queries that can pass the
thresholds are upsampled), and so is semantic (class / query pruning with exact bounds, see
m2f_jax/processing/post_kernels.py); `--random-logits` shows the case where none of that applies.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import numpy as np


def make_logits(batch, num_queries, num_classes, mask_size, object_fraction=0.2, seed=0):
    """(class_queries_logits, masks_queries_logits) as float32 NumPy, shaped like a trained model's.

    A fraction of the queries are confident objects (one class logit raised by 6-9) whose masks
    tile the image (positive on the query's Voronoi cell among the object queries); the others
    predict the null class (logit raised by 8-11, probability ~0.98) with random disk masks.
    """
    rng = np.random.default_rng(seed)
    class_logits = rng.normal(size=(batch, num_queries, num_classes + 1)).astype(np.float32)
    is_object = rng.random((batch, num_queries)) < object_fraction
    is_object[:, 0] = True  # at least one object per image
    labels = rng.integers(0, num_classes, size=(batch, num_queries))
    shape = (batch, num_queries)
    boost = np.where(is_object, rng.uniform(6.0, 9.0, shape), rng.uniform(8.0, 11.0, shape))
    b_index, q_index = np.indices((batch, num_queries))
    class_logits[b_index, q_index, np.where(is_object, labels, num_classes)] += boost.astype(np.float32)

    height, width = mask_size
    centers = rng.uniform(0, 1, size=(batch, num_queries, 2)) * np.array([height, width])
    rows = np.arange(height)[:, None]
    cols = np.arange(width)[None, :]
    distance = np.sqrt((rows - centers[..., 0, None, None]) ** 2 + (cols - centers[..., 1, None, None]) ** 2)
    # objects: signed distance to the boundary of their Voronoi cell (among the objects)
    object_distance = np.where(is_object[..., None, None], distance, np.inf)
    nearest_two = np.sort(object_distance, axis=1)[:, :2]  # (B, 2, h, w)
    other = np.where(distance == nearest_two[:, :1], nearest_two[:, 1:2], nearest_two[:, :1])
    cell_logits = np.clip(6.0 * (other - distance) / (0.05 * min(height, width)), -12.0, 12.0)
    # null queries: disks of random radius
    radius = rng.uniform(0.08, 0.4, size=(batch, num_queries)) * min(height, width)
    disk_logits = 8.0 * (radius[..., None, None] - distance) / radius[..., None, None]
    mask_logits = np.where(is_object[..., None, None], np.nan_to_num(cell_logits, posinf=12.0), disk_logits)
    mask_logits += rng.normal(scale=0.5, size=mask_logits.shape)
    return class_logits, mask_logits.astype(np.float32)


def interleaved_medians(first, second, repeats):
    """Median wall time (ms) of each function, timing them alternately so that both see the same
    machine load (the machine this was written on is shared)."""
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            bucket.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="median of 2 runs instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-queries", type=int, default=100)
    parser.add_argument("--num-classes", type=int, default=133)
    parser.add_argument("--mask-size", type=int, nargs=2, default=(96, 96))
    parser.add_argument("--target-size", type=int, nargs=2, default=(480, 640))
    parser.add_argument("--only", choices=("semantic", "instance", "panoptic"), nargs="*")
    parser.add_argument("--no-transformers", action="store_true", help="time m2f_jax only")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads for transformers (default: torch's)"
    )
    parser.add_argument(
        "--random-logits",
        action="store_true",
        help="unstructured N(0, 3^2) logits instead of model-like ones (worst case: no pruning applies)",
    )
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)

    from m2f_jax.processing import post_processing as ours

    if args.random_logits:
        rng = np.random.default_rng(0)
        class_logits = (3 * rng.normal(size=(args.batch, args.num_queries, args.num_classes + 1))).astype(np.float32)
        mask_logits = (3 * rng.normal(size=(args.batch, args.num_queries, *args.mask_size))).astype(np.float32)
    else:
        class_logits, mask_logits = make_logits(args.batch, args.num_queries, args.num_classes, tuple(args.mask_size))
    target_sizes = [tuple(args.target_size)] * args.batch
    np_outputs = {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}
    stuff = set(range(80, args.num_classes))  # COCO panoptic: labels 80.. are stuff

    if not args.no_transformers:
        import torch
        from transformers import Mask2FormerImageProcessorPil
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        hf = Mask2FormerImageProcessorPil()
        torch_outputs = SimpleNamespace(
            class_queries_logits=torch.from_numpy(class_logits), masks_queries_logits=torch.from_numpy(mask_logits)
        )

    cases = {
        "semantic": (
            lambda: ours.post_process_semantic_segmentation(np_outputs, target_sizes=target_sizes),
            lambda: hf.post_process_semantic_segmentation(torch_outputs, target_sizes=target_sizes),
        ),
        "instance": (
            lambda: ours.post_process_instance_segmentation(np_outputs, target_sizes=target_sizes),
            lambda: hf.post_process_instance_segmentation(torch_outputs, target_sizes=target_sizes),
        ),
        "panoptic": (
            lambda: ours.post_process_panoptic_segmentation(
                np_outputs, label_ids_to_fuse=stuff, target_sizes=target_sizes
            ),
            lambda: hf.post_process_panoptic_segmentation(
                torch_outputs, label_ids_to_fuse=stuff, target_sizes=target_sizes
            ),
        ),
    }
    kind = "random" if args.random_logits else "model-like"
    print(
        f"batch {args.batch}, {args.num_queries} queries, {args.num_classes} classes, mask logits "
        f"{tuple(args.mask_size)}, target {tuple(args.target_size)}, {kind} logits; "
        f"median of {repeats} interleaved runs after 1 warm-up; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
        + ("" if args.no_transformers else f", torch threads {torch.get_num_threads()}")
    )
    header = f"{'function':<10} {'transformers ms':>16} {'m2f_jax ms':>11} {'speed-up':>9}  segments/image (ours)"
    print(header)
    print("-" * len(header))
    for name, (ours_fn, hf_fn) in cases.items():
        if args.only and name not in args.only:
            continue
        result = ours_fn()  # warm-up: compiles the kernels for these shapes
        if args.no_transformers:
            ours_ms, _ = interleaved_medians(ours_fn, lambda: None, repeats)
            hf_ms = float("nan")
        else:
            hf_fn()
            ours_ms, hf_ms = interleaved_medians(ours_fn, hf_fn, repeats)
        if name == "semantic":
            detail = f"{np.mean([len(np.unique(r)) for r in result]):.1f} classes"
        else:
            detail = f"{np.mean([len(r['segments_info']) for r in result]):.1f}"
        print(f"{name:<10} {hf_ms:>16.1f} {ours_ms:>11.1f} {hf_ms / ours_ms:>8.1f}x  {detail}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
