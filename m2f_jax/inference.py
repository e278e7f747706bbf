"""m2f_jax.segment: images in, segmentations out, in one call (``iter_segment``: as a stream).

Images are processed with the model's own processor and batched with images of the same
processed size (by default: nothing is padded, every answer is transformers'), or of the same
size bucket (``buckets=True``: each image padded to one of a few sizes, its result cropped to
it); each result is at its image's original size. Batches are split over the local devices.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

TASKS = ("panoptic", "instance", "semantic")


def _pil_rgb(image) -> np.ndarray:
    """RGB uint8 (H, W, 3) of a PIL image; 16-bit grey ("I;16*", "I") is scaled to 8 bits
    (x * 255 / 65535), not clipped at 255 as ``convert("RGB")`` does."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.asarray(image).astype(np.float64)
        grey = np.clip(np.round(grey * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"))


def load_image(image) -> np.ndarray:
    """A path, PIL image or array -> uint8/float HWC RGB array (what the processor takes). Files
    are turned upright by their EXIF orientation (as ``transformers.image_utils.load_image`` and
    image viewers do) and 16-bit grey images are scaled to 8 bits."""
    from PIL import Image, ImageOps

    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No image file at {path}.")
        try:
            with Image.open(path) as im:
                return _pil_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"Cannot read {path} as an image: {e}") from e
    if isinstance(image, Image.Image):
        return _pil_rgb(image)
    array = np.asarray(image)
    if array.ndim not in (2, 3):
        raise ValueError(f"An image must be (H, W) or (H, W, C); got shape {array.shape}.")
    if array.ndim == 2 or array.shape[-1] == 1:  # grey: the model sees RGB
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=-1)
    return array


def _image_iter(images) -> Iterable[Any]:
    """One image, a list/tuple, a (N, H, W, C) array or any iterable (e.g. a generator) of images."""
    if isinstance(images, (str, os.PathLike)) or _is_single_image(images):
        return [images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, Iterable):
        return images
    return [images]


def _is_single_image(image) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image) or (isinstance(image, np.ndarray) and image.ndim in (2, 3)) or (
        hasattr(image, "shape") and hasattr(image, "dtype") and len(image.shape) in (2, 3))


# ----------------------------------------------------------------------------------------------
# Size buckets
# ----------------------------------------------------------------------------------------------

_BUCKET_MULTIPLE = 32  # Swin's total stride: bucket sides are multiples of it (and of size_divisor)


def _round_up(value: float, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def bucket_sizes(processor, steps: int = 3) -> List[Tuple[int, int]]:
    """The padded input sizes (height, width) that every image the processor resizes fits in.

    ``{"shortest_edge": S, "longest_edge": L}`` (the Hub's COCO setting 800/1333): the short side
    is at most S and the long side at most L (each rounded up to the size divisor), so the buckets
    are (S', g) and (g, S') for ``steps`` long sides g from S' to L' (multiples of 32 and of the
    divisor): 800/1333/32 gives (800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800).
    ``max_height/max_width`` and ``height/width`` give one bucket. A processor that does not resize
    (``do_resize=False``) has no bounded sizes: ValueError.
    """
    from m2f_jax.processing.image_processor import resolve_pad_size, resolve_size

    settings = processor.settings()
    if settings.get("pad_size"):
        return [tuple(int(v) for v in resolve_pad_size(settings["pad_size"]))]
    if not settings["do_resize"]:
        raise ValueError("size buckets need a processor that resizes (do_resize=True): without resizing "
                         "the processed sizes are the images' own, which no fixed set of buckets bounds.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    multiple = math.lcm(_BUCKET_MULTIPLE, int(settings["size_divisor"] or 1))
    size = resolve_size(settings["size"])
    if "shortest_edge" in size:
        short = _round_up(min(size["shortest_edge"], size["longest_edge"]), multiple)
        long = max(short, _round_up(size["longest_edge"], multiple))
        sides = sorted({_round_up(short + k * (long - short) / max(steps - 1, 1), multiple) for k in range(steps)})
        return sorted({(short, g) for g in sides} | {(g, short) for g in sides}, key=lambda s: (s[0] * s[1], s))
    height, width = (size["max_height"], size["max_width"]) if "max_height" in size else (size["height"], size["width"])
    return [(_round_up(height, multiple), _round_up(width, multiple))]


def _bucket_of(shape: Tuple[int, int], buckets: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """The smallest bucket (by area) that holds ``shape``; ``shape`` itself when none does."""
    fitting = [b for b in buckets if b[0] >= shape[0] and b[1] >= shape[1]]
    return min(fitting, key=lambda b: (b[0] * b[1], b)) if fitting else tuple(shape)


def _batch_count(n: int, batch_size: int, num_devices: int) -> int:
    """The number of images a forward of n real ones runs: the next power of two (at most
    ``batch_size``), a multiple of the device count; few distinct counts keep compiles rare."""
    count = 1
    while count < n:
        count *= 2
    count = max(n, min(count, batch_size))
    return _round_up(count, num_devices)


# ----------------------------------------------------------------------------------------------
# Segmenting
# ----------------------------------------------------------------------------------------------


class ImageError(ValueError):
    """One input image could not be read or processed; ``index`` is its position in the input."""

    def __init__(self, index: int, source: Any, message: str):
        super().__init__(message)
        self.index, self.source = index, source


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    shape = getattr(image, "shape", None) or getattr(image, "size", None)
    return f"{type(image).__name__} {tuple(shape) if shape is not None else ''}".strip()


def _prepared(processor, index: int, image):
    """(original HW RGB array, processed (h, w, 3) pixels) of one image; ImageError when the
    image itself is at fault (unreadable file, unusable array)."""
    try:
        array = load_image(image)
        return array, processor.preprocess(array)["pixel_values"][0]
    except (FileNotFoundError, ValueError, TypeError) as e:
        name = _describe(image)
        raise ImageError(index, image, str(e) if name in str(e) else f"{name}: {e}") from e


def _prefetched(function, items: Iterable[Any], lookahead: int):
    """``map(function, enumerate(items))`` on a thread, ``lookahead`` items ahead (decoding and
    resizing overlap the model's forward); exceptions come back as values."""
    from concurrent.futures import ThreadPoolExecutor

    def call(pair):
        try:
            return function(*pair)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        for pair in enumerate(items):
            pending.append(pool.submit(call, pair))
            if len(pending) > lookahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def iter_segment(
    model,
    images,
    task: str = "panoptic",
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    processor=None,
    buckets=False,
    devices=None,
    errors: str = "raise",
    return_masks: bool = False,
    return_images: bool = False,
) -> Iterator[Tuple[int, Any]]:
    """``segment`` as a stream: yields ``(index, result)`` as each batch finishes (not in input
    order), reading ``images`` (any iterable) a few items ahead. Arguments as ``segment``, and
    ``errors``: "raise" (an unreadable image raises ``ImageError``, a ValueError) or "yield"
    (it is yielded as ``(index, ImageError)`` and the others go on)."""
    import jax

    from m2f_jax.processing import post_processing as pp

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if errors not in ("raise", "yield"):
        raise ValueError(f"errors must be 'raise' or 'yield', got {errors!r}.")
    if return_masks and task != "instance":
        raise ValueError("return_masks is for task='instance' (each instance's full mask).")
    if processor is None:
        processor = model.processor
    if processor is None:
        from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

        processor = Mask2FormerImageProcessor()
    if devices is None:
        devices = jax.local_devices(backend=jax.devices()[0].platform)
    devices = list(devices)
    if batch_size is None:
        batch_size = (1 if devices[0].platform == "cpu" else 8) * len(devices)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if buckets is True:
        buckets = bucket_sizes(processor)
    buckets = [tuple(int(v) for v in b) for b in buckets] if buckets else None
    mesh = None
    if len(devices) > 1:
        from jax.sharding import Mesh

        mesh = Mesh(np.array(devices), ("data",))
    id2label = model.config.id2label
    options = (threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse, return_masks)

    def run(size, group):
        """Segments one group of (index, array, pixels) of equal processed or bucket size."""
        count = _batch_count(len(group), batch_size, len(devices))
        batch = np.zeros((count, *size, 3), np.float32)
        for k, (_, _, pixels) in enumerate(group):
            batch[k, : pixels.shape[0], : pixels.shape[1]] = pixels
        batch[len(group):] = batch[len(group) - 1]  # filler copies: each image's answer is its own
        outputs = model(batch) if mesh is None else model.sharded_call(batch, mesh)
        logits = {
            "class_queries_logits": np.asarray(outputs.class_queries_logits, np.float32)[: len(group)],
            "masks_queries_logits": np.asarray(outputs.masks_queries_logits, np.float32)[: len(group)],
        }
        geometry = {"target_sizes": [array.shape[:2] for _, array, _ in group]}
        if any(pixels.shape[:2] != tuple(size) for _, _, pixels in group):
            geometry.update(valid_sizes=[pixels.shape[:2] for _, _, pixels in group], padded_size=size)
        results = _post_process(pp, task, logits, geometry, *options)
        if return_images:
            for (_, array, _), result in zip(group, results):
                result["image"] = array
        return [(index, _with_names(result, id2label)) for (index, _, _), result in zip(group, results)]

    groups: Dict[tuple, list] = defaultdict(list)
    for item in _prefetched(lambda i, image: (i, *_prepared(processor, i, image)), _image_iter(images),
                            lookahead=max(2, batch_size)):
        if isinstance(item, ImageError):
            if errors == "raise":
                if isinstance(item.__cause__, FileNotFoundError):
                    raise item.__cause__  # the file's own error type, naming the path
                raise item
            yield item.index, item
            continue
        shape = tuple(item[2].shape[:2])
        size = _bucket_of(shape, buckets) if buckets else shape
        groups[size].append(item)
        if len(groups[size]) == batch_size:
            yield from run(size, groups.pop(size))
    for size, group in groups.items():
        yield from run(size, group)


def segment(model, images, task: str = "panoptic", **options) -> List[Dict[str, Any]]:
    """Segments images with a loaded model (``m2f_jax.load``).

    Args:
      model: a ``m2f_jax.Mask2Former``.
      images: one image or a list (or any iterable): file paths, PIL images or arrays (HWC or HW;
        any sizes).
      task: "panoptic", "instance" or "semantic".
      keyword options (passed on to :func:`iter_segment`):
      threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse: as in the
        post-processing functions (transformers' meanings and defaults).
      batch_size: at most this many images per forward (default: 8 per device on GPU/TPU, 1 on
        CPU). A forward's image count is padded to a power of two (and to a multiple of the device
        count) with copies, so a few programs serve every count.
      processor: overrides ``model.processor`` (the checkpoint's preprocessor_config.json).
      buckets: False (default): images are batched only with images of the same processed size,
        so nothing is padded and the results are transformers'; every new size compiles the model.
        True: each image is padded (bottom and right, with zeros, as transformers pads a batch) to
        the smallest of ``bucket_sizes(processor)`` that holds it and its result is cropped to its
        own region, so a few programs serve any photo (see the README for the effect on the
        outputs); or a list of (height, width) buckets.
      devices: the devices each batch is split over (default: all local devices of JAX's default
        platform); the parameters are replicated on them.
      return_masks: instance only: each result also has ``masks``, one pycocotools RLE dict per
        segment (its full mask, overlaps kept; COCO's format).
      return_images: each result also has ``image``, the (H, W, 3) RGB array that was segmented
        (as read: EXIF-upright, 8-bit), e.g. to draw the result on.
    Returns:
      One dict per image, in input order: ``segmentation`` (H, W) int32 map at the image's
      original size (panoptic: segment ids, 0 = no segment; instance: ids, -1 = background;
      semantic: class ids) and ``segments``, a list of {"id", "label_id", "label", "score", "area"}.
    Raises:
      FileNotFoundError for a missing file, else ImageError (a ValueError) naming the first image
      that cannot be read or processed.
    """
    if "errors" in options:
        raise TypeError("segment raises for a bad image; iter_segment(..., errors='yield') goes on past it.")
    results: Dict[int, Dict[str, Any]] = dict(iter_segment(model, images, task, **options))
    return [results[i] for i in range(len(results))]


def _post_process(pp, task, logits, geometry, threshold, mask_threshold, overlap, fuse, return_masks):
    """``segment``'s results from one batch of logits; ``geometry``: target_sizes and, for padded
    inputs, valid_sizes and padded_size."""
    if task == "semantic":
        out = pp.post_process_semantic_segmentation(logits, return_segmentation_scores=True, **geometry)
        results = []
        for item in out:
            seg = np.asarray(item["segmentation"]).astype(np.int32)
            scores = np.asarray(item["segmentation_scores"])
            labels, areas = np.unique(seg, return_counts=True)
            segments = [
                {"id": int(l), "label_id": int(l), "score": float(scores[l][seg == l].mean()), "area": int(a)}
                for l, a in zip(labels, areas)
            ]
            results.append({"segmentation": seg, "segments": segments})
        return results
    if task == "instance":
        out = pp.post_process_instance_segmentation(logits, threshold=threshold, return_binary_maps=return_masks,
                                                    **geometry)
        background = -1
    else:
        out = pp.post_process_panoptic_segmentation(
            logits, threshold=threshold, mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap, label_ids_to_fuse=fuse, **geometry,
        )
        background = 0
    results = []
    for item in out:
        seg = np.asarray(item["segmentation"])
        masks = None
        if return_masks and item["segments_info"]:
            masks = seg > 0  # (N, H, W) full masks; the id map paints later instances over earlier
            seg = np.full(masks.shape[1:], -1, np.int32)
            for n, mask in enumerate(masks):
                seg[mask] = item["segments_info"][n]["id"]
        if not item["segments_info"]:
            # transformers' no-detection map is float -1; here it is the task's own background.
            seg = np.full(seg.shape[-2:], background, np.int32)
        seg = seg.astype(np.int32)
        ids, areas = np.unique(seg, return_counts=True)
        area_of = dict(zip(ids.tolist(), areas.tolist()))
        segments = [
            {"id": int(s["id"]), "label_id": int(s["label_id"]), "score": float(s["score"]),
             "area": int(area_of.get(int(s["id"]), 0))}
            for s in item["segments_info"]
        ]
        result = {"segmentation": seg, "segments": segments}
        if return_masks:
            result["masks"] = [] if masks is None else [pp.mask_to_coco_rle(m) for m in masks]
        results.append(result)
    return results


def _with_names(result, id2label):
    for s in result["segments"]:
        s["label"] = id2label.get(s["label_id"], str(s["label_id"]))
    return result
