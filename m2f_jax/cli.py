"""The ``m2f-jax`` command line (also ``python -m m2f_jax``): segment, eval, train, convert, smoke.

Errors the user can fix (missing files, bad arguments, unreadable images) print one line and
exit non-zero; they never print a traceback.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
import time
from typing import List, Optional

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "default_model")
EXAMPLES = os.path.join(ASSETS, "examples")


class UserError(Exception):
    """An error whose message is the whole story (no traceback)."""


def _default_images() -> List[str]:
    if not os.path.isdir(EXAMPLES):
        return []
    return sorted(os.path.join(EXAMPLES, f) for f in os.listdir(EXAMPLES) if f.lower().endswith((".png", ".jpg")))


def _load_model(name: Optional[str]):
    import m2f_jax

    path = name or DEFAULT_MODEL
    if name is None and not os.path.isdir(DEFAULT_MODEL):
        raise UserError(f"the embedded default model is missing ({DEFAULT_MODEL}); pass --model")
    try:
        return m2f_jax.load(path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise UserError(str(e).splitlines()[0]) from e


def _upscaled(array, min_side: int):
    """The image repeated by the smallest integer factor that brings its short side to
    ``min_side`` (pixel replication; the overlay resizes the map to it the same way), so that
    labels stay legible on small images; unchanged when already large enough or min_side is 0."""
    import numpy as np

    factor = -(-min_side // min(array.shape[:2])) if min_side > 0 else 1
    if factor <= 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def expand_inputs(arguments: List[str]):
    """Image paths from files, folders (their image files, sorted; not recursive) and glob
    patterns (``**`` recursive), in order, without repeats; and one error line per argument that
    names nothing."""
    import glob

    paths, errors, seen = [], [], set()
    for argument in arguments:
        if os.path.isdir(argument):
            found = [os.path.join(argument, f) for f in sorted(os.listdir(argument))
                     if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(argument, f))]
            if not found:
                errors.append(f"{argument}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.exists(argument) or not glob.has_magic(argument):
            found = [argument]  # a missing file is reported when it is read
        else:
            found = sorted(p for p in glob.glob(argument, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append(f"{argument}: no file matches this pattern")
        for path in found:
            if path not in seen:
                seen.add(path)
                paths.append(path)
    return paths, errors


def _output_stems(paths: List[str]) -> List[str]:
    """An output name per input: its file name without extension, made unique with -2, -3, ...
    when two inputs share a name."""
    stems, used = [], set()
    for path in paths:
        stem = base = os.path.splitext(os.path.basename(path))[0]
        n = 1
        while stem in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def _writable_folder(path: str) -> None:
    """Creates ``path`` if needed and checks that a file can be written there (before any work)."""
    try:
        os.makedirs(path, exist_ok=True)
        # a name of its own: every process of a multi-process run checks the same folder at once
        fd, probe = tempfile.mkstemp(prefix=".m2f_write_test_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to the output folder {path}: {e.strerror or e}") from e


def cmd_segment(args) -> int:
    from m2f_jax.inference import ImageError, iter_segment
    from m2f_jax.progress import Progress
    from m2f_jax.visualize import overlay

    paths, input_errors = expand_inputs(args.images) if args.images else (_default_images(), [])
    for message in input_errors:
        print(f"error: {message}", file=sys.stderr)
    if not paths:
        raise UserError("no images to segment" + ("" if args.images else " (and no embedded example images found)"))
    model = _load_model(args.model)
    _writable_folder(args.out)
    stems = _output_stems(paths)
    thresholds = {} if args.threshold is None else {"threshold": args.threshold}
    progress = Progress(len(paths), enabled=None if not args.quiet else False)
    failures, written = len(input_errors), 0
    print(f"{'image':<28} {'segments':>8}  top segments (label score area)")
    for index, result in iter_segment(model, paths, task=args.task, batch_size=args.batch_size,
                                      buckets=not args.exact_sizes, errors="yield", return_images=True,
                                      **thresholds):
        path = paths[index]
        if isinstance(result, ImageError):
            progress.update()
            progress.print(f"error: {result}", file=sys.stderr)
            failures += 1
            continue
        overlay(_upscaled(result.pop("image"), args.min_overlay_size),
                {"segmentation": result["segmentation"], "segments_info": result["segments"]},
                model.config.id2label).save(os.path.join(args.out, f"{stems[index]}_{args.task}.png"))
        with open(os.path.join(args.out, f"{stems[index]}_{args.task}.json"), "w") as f:
            json.dump({"image": path, "task": args.task, "segments": result["segments"]}, f, indent=1)
        written += 2
        top = sorted(result["segments"], key=lambda s: -s["area"])[:4]
        desc = ", ".join(f"{s['label']} {s['score']:.2f} {s['area']}" for s in top)
        progress.update()
        progress.print(f"{os.path.basename(path)[:28]:<28} {len(result['segments']):>8}  {desc}")
    print(f"wrote {written} files to {args.out}" + (f"; {failures} inputs failed" if failures else ""))
    return 2 if failures else 0


def cmd_eval(args) -> int:
    from m2f_jax.data.datasets import DataError, open_dataset
    from m2f_jax.evaluation.run import evaluate

    model = _load_model(args.model)
    try:
        dataset = open_dataset(args.data, args.format, args.split)
        metrics = evaluate(model, dataset, task=args.task, fmt=args.format, max_images=args.max_images,
                           progress=not args.quiet, batch_size=args.batch_size)
    except (FileNotFoundError, DataError) as e:
        raise UserError(str(e)) from e
    for name, value in metrics.items():
        if isinstance(value, float):
            print(f"{name:<12} {100 * value:6.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def train_args(args):
    """The ``TrainArgs`` of parsed ``train`` arguments."""
    from m2f_jax.training.run import TrainArgs

    fields = {f for f in TrainArgs.__dataclass_fields__}
    return TrainArgs(**{k: v for k, v in vars(args).items() if k in fields})


def cmd_train(args) -> int:
    from m2f_jax.data.datasets import DataError
    from m2f_jax.training.checkpoint import DamagedCheckpointError
    from m2f_jax.training.distributed import DistributedError
    from m2f_jax.training.run import InitError, train

    targs = train_args(args)
    _writable_folder(targs.out)
    try:
        summary = train(targs)
    except (FileNotFoundError, DamagedCheckpointError, DataError, DistributedError, InitError) as e:
        raise UserError(str(e)) from e
    print(json.dumps({k: summary[k] for k in ("step", "val_initial", "val", "export", "stopped")}))
    if summary["stopped"] is not None:  # the shell's status for a process ended by that signal
        return 128 + int(signal.Signals[summary["stopped"]])
    return 0


def cmd_convert(args) -> int:
    from convert.__main__ import main as convert_main

    return convert_main([args.src, args.dst, "--to", args.to] + (["--overwrite"] if args.overwrite else []))


def smoke(size: int = 384, repeats: int = 3) -> int:
    """A random-weights forward of the Swin-T geometry on a synthetic image: shapes and timing."""
    import jax
    import numpy as np

    from m2f_jax.config import Mask2FormerConfig, SwinConfig
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    config = Mask2FormerConfig(
        backbone_config=SwinConfig(depths=(2, 2, 6, 2), out_features=("stage1", "stage2", "stage3", "stage4")),
        id2label={i: f"class_{i}" for i in range(133)},
    )
    module = Mask2FormerForUniversalSegmentation(config)
    # A synthetic "photo": smooth gradients and a disc, normalised like the processor does.
    yy, xx = np.mgrid[0 : size, 0 : size] / size
    image = np.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(float)], -1)
    pixels = ((image - 0.45) / 0.25)[None].astype(np.float32)  # (1, H, W, 3)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), pixels)["params"]
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(params, pixels))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, pixels))
        times.append(time.perf_counter() - t0)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"Mask2Former Swin-T geometry, random weights, {n / 1e6:.1f}M parameters, device {jax.devices()[0]}")
    print(f"input                 {pixels.shape} (NHWC)")
    print(f"class_queries_logits  {out.class_queries_logits.shape}")
    print(f"masks_queries_logits  {out.masks_queries_logits.shape}")
    print(f"first call (compile)  {compile_s:.2f} s")
    print(f"forward, median       {1e3 * float(np.median(times)):.1f} ms over {repeats} runs")
    return 0


def cmd_smoke(args) -> int:
    return smoke(args.size, args.repeats)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2f-jax", description="Mask2Former in JAX: segment, evaluate, train, convert.")
    sub = parser.add_subparsers(dest="command")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-compilation-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (default: on, in "
                             "$JAX_COMPILATION_CACHE_DIR or ~/.cache/m2f_jax/jax)")
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("segment", help="segment images; writes an overlay PNG and a JSON of segments per image")
    p.add_argument("images", nargs="*",
                   help="image files, folders or glob patterns such as 'photos/**/*.jpg' (default: the "
                        "embedded example images)")
    p.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded model)")
    p.add_argument("--task", choices=("panoptic", "instance", "semantic"), default="panoptic")
    p.add_argument("--threshold", type=float, default=None, help="minimum segment score (default 0.5)")
    p.add_argument("--out", default="m2f_out", help="output folder (default: m2f_out)")
    p.add_argument("--min-overlay-size", type=int, default=256,
                   help="small images are drawn enlarged by an integer factor up to this short side, "
                        "so labels stay legible (default 256; 0: always the image's own size)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward (default: 8 per device on GPU/TPU, 1 on CPU)")
    p.add_argument("--exact-sizes", action="store_true",
                   help="run every processed size as it is (transformers' results; one compile per "
                        "size) instead of padding to a few size buckets (see README)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)

    p = add_parser("eval", help="evaluate a checkpoint on a dataset (mIoU, PQ or mask AP)")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", choices=("semantic", "panoptic", "instance"), required=True)
    p.add_argument("--model", help="checkpoint folder or Hub id (default: the embedded model)")
    p.add_argument("--task", choices=("panoptic", "instance", "semantic"), default="semantic")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward (default: 8 per device on GPU/TPU, 1 on CPU)")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = add_parser("train", help="train or fine-tune on a dataset")
    p.add_argument("--data", required=True, help="dataset root")
    p.add_argument("--format", choices=("semantic", "panoptic", "instance"), default="semantic")
    p.add_argument("--init", default="tiny", help="preset (tiny, swin-t), config .json, or checkpoint to fine-tune")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--val-size", type=_positive_int, default=None,
                   help="validation and the exported processor resize images to VAL_SIZE x VAL_SIZE "
                        "(default: --crop)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="runs/m2f")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=0, help="validation mIoU every N steps (0: at the end)")
    p.add_argument("--val-first", action="store_true", help="also validate the initial weights (a baseline)")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--min-scale", type=float, default=0.1)
    p.add_argument("--max-scale", type=float, default=2.0)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--num-points", type=int, default=None,
                   help="points sampled per mask for the loss (default: the config's train_num_points)")
    p.add_argument("--mask-loss", choices=("points", "dense"), default="points",
                   help="points: transformers' point-sampled mask and dice losses; dense: over every cell "
                        "of the 1/4-resolution mask logits, no sampling (README, Training)")
    p.add_argument("--max-masks", type=int, default=32, help="targets per image, padded to this static size")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-norm", type=float, default=0.01, help="full-model gradient clipping (paper: 0.01)")
    p.add_argument("--backbone-multiplier", type=float, default=0.1, help="backbone learning-rate factor")
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    group = p.add_argument_group("several hosts (one process per host; --batch-size is the global batch)")
    group.add_argument("--distributed", action="store_true",
                       help="start jax.distributed from the cluster environment (automatic on a Cloud TPU slice "
                            "and under SLURM or Open MPI with several tasks)")
    group.add_argument("--coordinator-address", help="host:port of process 0 (with --num-processes, --process-id)")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    group.add_argument("--distributed-timeout", type=int, default=300,
                       help="seconds to wait for every process to join (default 300)")
    p.set_defaults(func=cmd_train)

    p = add_parser("convert", help="convert a checkpoint folder HF <-> Flax")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=("auto", "flax", "hf"), default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace files DST already has")
    p.set_defaults(func=cmd_convert)

    p = add_parser("smoke", help="random-weights Swin-T forward on a synthetic image: shapes and timing")
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=cmd_smoke)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        # The main job: segment the embedded examples with the embedded model; until that model
        # ships, the random-weights smoke forward.
        default = "segment" if os.path.isdir(DEFAULT_MODEL) and _default_images() else "smoke"
        args = parser.parse_args([default] + list(argv or []))
    if not args.no_compilation_cache:
        from m2f_jax.hub import enable_compilation_cache

        enable_compilation_cache()
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
