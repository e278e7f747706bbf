"""Segmenting a folder of photos, the job a user runs: ``m2f-jax segment FOLDER`` against
transformers (its processor, model and panoptic post-processing, image by image), same machine,
same run, same weights.

    python benchmarks/bench_photos.py              # 8 scikit-image photos, Swin-T geometry
    python benchmarks/bench_photos.py --photos 6   # the first 6

The photos are scikit-image's samples at the Hub's COCO processor settings (shortest edge 800,
longest 1333, size divisor 32); they process to several sizes (printed). The checkpoint is a
randomly initialised transformers model of the Swin-T geometry (133 labels) saved with
``save_pretrained``. Every run is a new process, timed from its start to its exit (imports,
loading, compiling, writing included):

* transformers, once;
* ``m2f-jax segment`` with size buckets (the default): first run with an empty compilation
  cache, second run in a new process with that cache;
* ``m2f-jax segment --exact-sizes``: the same, with a cache of its own.

Then the effect of the buckets on the outputs, on a trained model (random weights give maps of
one class): see ``agreement``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWIN_T = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
NUM_LABELS = 133
HUB_PROCESSOR = dict(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32, ignore_index=255)
# name, transform: mixed aspect ratios and one portrait
PHOTOS = (("astronaut", None), ("coffee", None), ("chelsea", None), ("rocket", None), ("coins", None),
          ("hubble_deep_field", None), ("page", None), ("rocket", "portrait"))

TRANSFORMERS_JOB = r"""
import glob, sys, time
import torch, transformers
from PIL import Image
folder, ckpt = sys.argv[1], sys.argv[2]
processor = transformers.Mask2FormerImageProcessorPil.from_pretrained(ckpt)
model = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(ckpt).eval()
for path in sorted(glob.glob(folder + "/*.png")):
    image = Image.open(path).convert("RGB")
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=inputs["pixel_values"])
    processor.post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])
"""


def write_photos(folder: str, count: int) -> list:
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    shapes = []
    for k, (name, transform) in enumerate(PHOTOS[:count]):
        image = getattr(skimage.data, name)()
        if transform == "portrait":
            image = np.ascontiguousarray(np.swapaxes(image, 0, 1))
        Image.fromarray(image).save(os.path.join(folder, f"{k:02d}_{name}.png"))
        shapes.append(image.shape[:2])
    return shapes


def write_checkpoint(folder: str) -> None:
    import torch
    import transformers

    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    torch.manual_seed(0)
    config = transformers.Mask2FormerConfig(
        backbone_config=transformers.SwinConfig(**SWIN_T, out_features=["stage1", "stage2", "stage3", "stage4"]),
        num_labels=NUM_LABELS, id2label={i: f"class_{i}" for i in range(NUM_LABELS)},
        label2id={f"class_{i}": i for i in range(NUM_LABELS)},
    )
    transformers.Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    Mask2FormerImageProcessor(**HUB_PROCESSOR).save_pretrained(folder)


def timed(command: list, env: dict) -> float:
    start = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{command} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return seconds


def agreement(count: int = 24) -> dict:
    """The buckets' effect on a trained model's outputs: the embedded default model (trained on
    the synthetic scenes at 96x96) with a shortest-edge processor (96 / 256 / 32: buckets 96x96,
    96x192, 192x96, 96x256, 256x96), on ``count`` synthetic scenes of mixed sizes; per image the
    fraction of pixels whose semantic class, and whose panoptic class, is the same with buckets
    as at the exact size."""
    import m2f_jax
    from m2f_jax.cli import DEFAULT_MODEL
    from m2f_jax.data.synthetic import render_scene
    from m2f_jax.inference import bucket_sizes
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    model = m2f_jax.load(DEFAULT_MODEL)
    settings = {k: v for k, v in model.processor.to_dict().items() if k in ("image_mean", "image_std")}
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 96, "longest_edge": 256}, size_divisor=32,
                                          **settings)
    rng = np.random.default_rng(0)
    images = [render_scene(0, "val", i, image_size=tuple(int(v) for v in rng.integers(64, 200, 2))).image
              for i in range(count)]
    rows = {"semantic": [], "panoptic": [], "padded": 0}
    for task in ("semantic", "panoptic"):
        exact = m2f_jax.segment(model, images, task=task, processor=processor)
        bucketed = m2f_jax.segment(model, images, task=task, processor=processor, buckets=True)
        for a, b in zip(exact, bucketed):
            if task == "semantic":
                same = a["segmentation"] == b["segmentation"]
            else:  # compare each pixel's class (segment ids are arbitrary)
                label = lambda r: np.vectorize({0: -1, **{s["id"]: s["label_id"] for s in r["segments"]}}.get,
                                               otypes=[np.int64])(r["segmentation"])
                same = label(a) == label(b)
            rows[task].append(float(np.mean(same)))
    shapes = [tuple(processor.preprocess(im)["pixel_values"].shape[1:3]) for im in images]
    rows["padded"] = sum(shape not in bucket_sizes(processor) for shape in shapes)
    return {"images": count, "padded_images": rows["padded"],
            **{f"{t}_agreement_mean": float(np.mean(rows[t])) for t in ("semantic", "panoptic")},
            **{f"{t}_agreement_min": float(np.min(rows[t])) for t in ("semantic", "panoptic")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=len(PHOTOS))
    parser.add_argument("--agreement-only", action="store_true", help="only the buckets' effect on the outputs")
    parser.add_argument("--no-agreement", action="store_true", help="skip the bucket effect measurement")
    args = parser.parse_args()
    if args.agreement_only:
        print(json.dumps(agreement()))
        return

    from m2f_jax.inference import bucket_sizes, _bucket_of
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    work = tempfile.mkdtemp(prefix="m2f_bench_photos_")
    try:
        folder, ckpt = os.path.join(work, "photos"), os.path.join(work, "ckpt")
        shapes = write_photos(folder, args.photos)
        write_checkpoint(ckpt)
        processor = Mask2FormerImageProcessor(**HUB_PROCESSOR)
        processed = [processor.preprocess(np.zeros((*s, 3), np.uint8))["pixel_values"].shape[1:3] for s in shapes]
        buckets = [_bucket_of(p, bucket_sizes(processor)) for p in processed]
        print(f"{len(shapes)} photos; processed sizes {sorted(set(processed))} ({len(set(processed))} distinct); "
              f"buckets {sorted(set(buckets))} ({len(set(buckets))})", flush=True)
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        times = {"transformers": timed([sys.executable, "-c", TRANSFORMERS_JOB, folder, ckpt], env)}
        print(f"transformers: {times['transformers']:.1f} s", flush=True)
        caches = {}
        for mode, flags in (("buckets", []), ("exact", ["--exact-sizes"])):
            caches[mode] = os.path.join(work, f"cache_{mode}")
            run_env = dict(env, JAX_COMPILATION_CACHE_DIR=caches[mode])
            for run in ("first", "second"):
                command = [sys.executable, "-m", "m2f_jax", "segment", folder, "--model", ckpt, "--quiet",
                           "--out", os.path.join(work, f"out_{mode}"), *flags]
                times[f"{mode}/{run}"] = timed(command, run_env)
                print(f"m2f-jax segment ({mode}), {run} run: {times[f'{mode}/{run}']:.1f} s "
                      f"({times['transformers'] / times[f'{mode}/{run}']:.2f}x transformers)", flush=True)
        result = {"photos": len(shapes), "processed_sizes": len(set(processed)), "buckets": len(set(buckets)),
                  "seconds": {k: round(v, 1) for k, v in times.items()},
                  "speedup": {k: round(times["transformers"] / v, 2) for k, v in times.items() if k != "transformers"}}
        if not args.no_agreement:
            effect = agreement()
            result["bucket_effect"] = effect
            print(f"buckets' effect (embedded trained model, {effect['images']} synthetic scenes, "
                  f"{effect['padded_images']} padded): pixels of the same class with buckets as at the exact "
                  f"size: semantic {100 * effect['semantic_agreement_mean']:.2f}% (lowest "
                  f"{100 * effect['semantic_agreement_min']:.2f}%), panoptic "
                  f"{100 * effect['panoptic_agreement_mean']:.2f}% (lowest {100 * effect['panoptic_agreement_min']:.2f}%)")
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
