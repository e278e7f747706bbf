"""m2f_jax.segment: images in, segmentations out, in one call.

Images are processed with the model's own processor and batched only with images of the same
processed size, so padding never changes any image's answer; each result is at its image's
original size.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

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


def _image_list(images) -> List[Any]:
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, (list, tuple)):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]
    return list(images)


def segment(
    model,
    images,
    task: str = "panoptic",
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Optional[Sequence[int]] = None,
    batch_size: int = 8,
    processor=None,
) -> List[Dict[str, Any]]:
    """Segments images with a loaded model (``m2f_jax.load``).

    Args:
      model: a ``m2f_jax.Mask2Former``.
      images: one image or a list: file paths, PIL images or arrays (HWC or HW; any sizes).
      task: "panoptic", "instance" or "semantic".
      threshold, mask_threshold, overlap_mask_area_threshold, label_ids_to_fuse: as in the
        post-processing functions (transformers' meanings and defaults).
      batch_size: at most this many images (of equal processed size) per forward.
      processor: overrides ``model.processor`` (the checkpoint's preprocessor_config.json).
    Returns:
      One dict per image: ``segmentation`` (H, W) int32 map at the image's original size
      (panoptic: segment ids, 0 = no segment; instance: ids, -1 = background; semantic: class
      ids) and ``segments``, a list of {"id", "label_id", "label", "score", "area"}.
    """
    from m2f_jax.processing import post_processing as pp

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if processor is None:
        processor = model.processor
    if processor is None:
        from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

        processor = Mask2FormerImageProcessor()

    arrays = [load_image(im) for im in _image_list(images)]
    processed = [processor.preprocess(a)["pixel_values"][0] for a in arrays]  # each (h, w, 3), unpadded
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, pixels in enumerate(processed):
        groups[pixels.shape].append(i)

    id2label = model.config.id2label
    results: List[Optional[Dict[str, Any]]] = [None] * len(arrays)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            outputs = model(np.stack([processed[i] for i in chunk]))
            logits = {
                "class_queries_logits": np.asarray(outputs.class_queries_logits, np.float32),
                "masks_queries_logits": np.asarray(outputs.masks_queries_logits, np.float32),
            }
            sizes = [arrays[i].shape[:2] for i in chunk]
            for i, result in zip(chunk, _post_process(pp, task, logits, sizes, threshold, mask_threshold,
                                                      overlap_mask_area_threshold, label_ids_to_fuse)):
                results[i] = _with_names(result, id2label)
    return results


def _post_process(pp, task, logits, sizes, threshold, mask_threshold, overlap, fuse):
    if task == "semantic":
        out = pp.post_process_semantic_segmentation(logits, target_sizes=sizes, return_segmentation_scores=True)
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
        out = pp.post_process_instance_segmentation(logits, threshold=threshold, target_sizes=sizes)
        background = -1
    else:
        out = pp.post_process_panoptic_segmentation(
            logits, threshold=threshold, mask_threshold=mask_threshold,
            overlap_mask_area_threshold=overlap, label_ids_to_fuse=fuse, target_sizes=sizes,
        )
        background = 0
    results = []
    for item in out:
        seg = np.asarray(item["segmentation"])
        if not item["segments_info"]:
            # transformers' no-detection map is float -1; here it is the task's own background.
            seg = np.full(seg.shape, background, np.int32)
        seg = seg.astype(np.int32)
        ids, areas = np.unique(seg, return_counts=True)
        area_of = dict(zip(ids.tolist(), areas.tolist()))
        segments = [
            {"id": int(s["id"]), "label_id": int(s["label_id"]), "score": float(s["score"]),
             "area": int(area_of.get(int(s["id"]), 0))}
            for s in item["segments_info"]
        ]
        results.append({"segmentation": seg, "segments": segments})
    return results


def _with_names(result, id2label):
    for s in result["segments"]:
        s["label"] = id2label.get(s["label_id"], str(s["label_id"]))
    return result
