"""Training and evaluation transforms with static output shapes (NumPy + Pillow).

A transform maps an example (``image`` (H, W, 3) uint8, ``masks`` (N, H, W) bool, ``class_ids``
(N,)) and a ``np.random.Generator`` to::

    {"pixel_values": (h, w, 3) float32   # NHWC layout, ImageNet-normalised
     "pixel_mask":   (h, w) int32         # 1 = image, 0 = padding
     "masks":        (N', h, w) bool      # N' <= N: masks left empty are dropped
     "class_ids":    (N',) int64}

where (h, w) is fixed by the transform. Conventions:

* Normalisation as transformers' processor: ``(pixel / 255 - mean) / std``, ImageNet mean/std.
* Padding goes to the bottom and right and happens *after* normalisation with 0 (what
  transformers' processor does, so the model sees the same padding in training and inference);
  ``pixel_mask`` marks it. Masks are padded with False.
* Image resize: PIL bilinear on the uint8 image (transformers' PIL backend). Mask resize: nearest,
  source pixel ``floor((i + 0.5) * in / out)``, so image and masks stay aligned.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from m2f_jax.processing.image_processor import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

Size = Union[int, Tuple[int, int]]


def _pair(size: Size, name: str) -> Tuple[int, int]:
    pair = (size, size) if np.isscalar(size) else tuple(size)
    if len(pair) != 2 or any(int(v) != v or v <= 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}.")
    return int(pair[0]), int(pair[1])


def normalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
              std: Sequence[float] = IMAGENET_DEFAULT_STD) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 ``(image / 255 - mean) / std``."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return (image.astype(np.float32) * np.float32(1 / 255) - mean) / std


def nearest_indices(in_size: int, out_size: int, start: int = 0, count: Optional[int] = None) -> np.ndarray:
    """Source indices of output pixels ``start .. start + count`` of a nearest resize in -> out."""
    count = out_size - start if count is None else count
    positions = (np.arange(start, start + count) + 0.5) * (in_size / out_size)
    return np.minimum(positions.astype(np.int64), in_size - 1)


def resize_and_crop(image: np.ndarray, masks: np.ndarray, resized_hw: Tuple[int, int],
                    offset: Tuple[int, int], crop_hw: Tuple[int, int]):
    """The window ``offset + crop_hw`` of the image and masks resized to ``resized_hw``, computed
    without building the full resized arrays (the same pixels: PIL's ``box`` keeps the filter
    positions of the full resize). The window is clipped to the resized size."""
    height, width = image.shape[:2]
    new_h, new_w = resized_hw
    y0, x0 = offset
    crop_h, crop_w = min(crop_hw[0], new_h - y0), min(crop_hw[1], new_w - x0)
    scale_y, scale_x = height / new_h, width / new_w
    box = (x0 * scale_x, y0 * scale_y, (x0 + crop_w) * scale_x, (y0 + crop_h) * scale_y)
    pixels = np.asarray(Image.fromarray(image).resize((crop_w, crop_h), Image.BILINEAR, box=box))
    rows = nearest_indices(height, new_h, y0, crop_h)
    cols = nearest_indices(width, new_w, x0, crop_w)
    return pixels, masks[:, rows[:, None], cols[None, :]]  # (h', w', 3), (N, h', w')


def pad_and_pack(pixels: np.ndarray, masks: np.ndarray, class_ids: np.ndarray, out_hw: Tuple[int, int],
                 mean, std) -> Dict[str, np.ndarray]:
    """Normalises, pads to ``out_hw`` (bottom/right) and drops masks left empty."""
    h, w = pixels.shape[:2]
    pixel_values = np.zeros((*out_hw, 3), np.float32)
    pixel_values[:h, :w] = normalize(pixels, mean, std)
    pixel_mask = np.zeros(out_hw, np.int32)
    pixel_mask[:h, :w] = 1
    keep = masks.any(axis=(1, 2))  # an example may have no mask at all (its queries learn "no object")
    padded_masks = np.zeros((int(keep.sum()), *out_hw), bool)
    padded_masks[:, :h, :w] = masks[keep]
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "masks": padded_masks,
            "class_ids": np.asarray(class_ids, np.int64)[keep]}


class TrainTransform:
    """Large-scale jitter (Mask2Former's COCO recipe, detectron2's ``ResizeScale`` +
    ``FixedSizeCrop`` + ``RandomFlip``):

    1. scale s ~ U(min_scale, max_scale); resize keeping the aspect ratio so the image fits in
       ``s * crop_size``: factor ``min(s * crop_h / H, s * crop_w / W)``, sizes rounded;
    2. random crop of at most ``crop_size`` (offset ``round(U(0, 1) * max(resized - crop, 0))``);
    3. horizontal flip with probability ``flip_prob`` (of the crop, before padding, so the
       padding stays bottom/right; the same as flipping the input first);
    4. normalise, pad to ``crop_size``, drop masks with no pixel left.

    The random draws are the same whatever ``flip_prob`` is (scale, offsets, flip), so two
    transforms differing only in ``flip_prob`` give mirrored outputs for the same generator.
    """

    def __init__(self, crop_size: Size = 1024, min_scale: float = 0.1, max_scale: float = 2.0,
                 flip_prob: float = 0.5, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale <= max_scale, got {min_scale}, {max_scale}.")
        self.crop_size = _pair(crop_size, "crop_size")
        self.min_scale, self.max_scale, self.flip_prob = min_scale, max_scale, flip_prob
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def output_size(self) -> Tuple[int, int]:
        return self.crop_size

    def __call__(self, example: Dict[str, np.ndarray], rng: np.random.Generator) -> Dict[str, np.ndarray]:
        image, masks = example["image"], example["masks"]
        height, width = image.shape[:2]
        crop_h, crop_w = self.crop_size
        scale = rng.uniform(self.min_scale, self.max_scale)
        factor = min(scale * crop_h / height, scale * crop_w / width)
        resized = (max(int(round(height * factor)), 1), max(int(round(width * factor)), 1))
        offset = tuple(int(round(max(r - c, 0) * rng.uniform())) for r, c in zip(resized, self.crop_size))
        flip = rng.uniform() < self.flip_prob
        pixels, masks = resize_and_crop(image, masks, resized, offset, self.crop_size)
        if flip:
            pixels, masks = pixels[:, ::-1], masks[:, :, ::-1]
        return pad_and_pack(pixels, masks, example["class_ids"], self.crop_size, self.mean, self.std)


class EvalTransform:
    """Resize so the image fits in ``size`` keeping its aspect ratio (the longer side fills it),
    then pad bottom/right to ``size``. ``rng`` is unused."""

    def __init__(self, size: Size = 1024, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD):
        self.size = _pair(size, "size")
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def output_size(self) -> Tuple[int, int]:
        return self.size

    def __call__(self, example: Dict[str, np.ndarray], rng: Optional[np.random.Generator] = None):
        image = example["image"]
        height, width = image.shape[:2]
        factor = min(self.size[0] / height, self.size[1] / width)
        resized = (min(max(int(round(height * factor)), 1), self.size[0]),
                   min(max(int(round(width * factor)), 1), self.size[1]))
        pixels, masks = resize_and_crop(image, example["masks"], resized, (0, 0), resized)
        return pad_and_pack(pixels, masks, example["class_ids"], self.size, self.mean, self.std)
