"""Run-length encodings of binary masks, in two conventions.

* COCO / pycocotools RLE (`mask_to_coco_rle`): runs over the mask flattened in **column-major**
  (Fortran) order, starting with a run of zeros, compressed into the ASCII string format of
  pycocotools' `rleToString`. The result is the dict `{"size": [h, w], "counts": bytes}` that
  `pycocotools.mask.encode` returns, and `pycocotools.mask.decode` accepts it.
* transformers' "RLE" (`binary_mask_to_rle`, `convert_segmentation_to_rle`): Kaggle style,
  **row-major**, a flat list `[start_1, length_1, start_2, length_2, ...]` with 1-based starts.
  It is not a COCO RLE; kept for parity with `transformers`.
"""

from __future__ import annotations

import numpy as np

from m2f_jax.processing.arrays import as_numpy

__all__ = [
    "binary_mask_to_rle",
    "convert_segmentation_to_rle",
    "mask_to_coco_rle",
    "coco_rle_counts",
]


def _check_2d(mask: np.ndarray, name: str) -> None:
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (height, width) array, got shape {mask.shape}")


def binary_mask_to_rle(mask) -> list[int]:
    """transformers' row-major, 1-based `[start, length, ...]` encoding of a binary (H, W) mask.

    Same values as `transformers.models.mask2former.image_processing_pil_mask2former.binary_mask_to_rle`
    (which returns NumPy int64 elements; these are Python ints and compare equal).
    """
    mask = as_numpy(mask)
    _check_2d(mask, "mask")
    pixels = np.concatenate([[0], (mask.reshape(-1) != 0).astype(np.int8), [0]])
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1  # 1-based positions where the value flips
    runs[1::2] -= runs[::2]  # (start, end) -> (start, length)
    return runs.tolist()


def convert_segmentation_to_rle(segmentation) -> list[list[int]]:
    """transformers' encoding of a segment-id map: one `binary_mask_to_rle` per unique value.

    Values are visited in ascending order and the background (-1 in instance maps) is included,
    exactly as in transformers.
    """
    segmentation = as_numpy(segmentation)
    _check_2d(segmentation, "segmentation")
    return [binary_mask_to_rle(segmentation == value) for value in np.unique(segmentation)]


def coco_rle_counts(mask) -> np.ndarray:
    """Uncompressed COCO run lengths of a binary (H, W) mask: column-major, zeros run first."""
    mask = as_numpy(mask)
    _check_2d(mask, "mask")
    flat = (mask.T.reshape(-1) != 0).astype(np.int8)  # column-major order
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds)
    if flat[0]:  # COCO counts always start with a (possibly empty) run of zeros
        counts = np.concatenate([[0], counts])
    return counts.astype(np.int64)


def _compress_counts(counts: np.ndarray) -> bytes:
    """pycocotools' `rleToString`, vectorised over runs.

    Each count (from the fourth on, as a difference to the count two places back: pycocotools tests
    `i > 2`) is written in
    little-endian groups of 5 bits; bit 0x20 marks "more groups follow"; 48 is added to each group
    so that the result is printable ASCII.
    """
    values = counts.astype(np.int64).copy()
    values[3:] -= counts[1:-2]
    chars = []  # one row of characters per 5-bit group round
    active = np.ones(values.shape, dtype=bool)  # values that still emit a group in this round
    emitted = []
    while active.any():
        group = values & 0x1F
        values = values >> 5  # arithmetic shift, as on the C `long` in pycocotools
        more = np.where(group & 0x10, values != -1, values != 0)
        chars.append((group | (more.astype(np.int64) << 5)) + 48)
        emitted.append(active.copy())
        active &= more
    if not chars:
        return b""
    table = np.stack(chars, axis=1).astype(np.uint8)  # (num_counts, rounds)
    keep = np.stack(emitted, axis=1)
    return table[keep].tobytes()  # row-major boolean indexing keeps each count's groups in order


def mask_to_coco_rle(mask) -> dict:
    """pycocotools-compatible compressed RLE of a binary (H, W) mask.

    Returns `{"size": [H, W], "counts": bytes}`, equal to `pycocotools.mask.encode(np.asfortranarray(
    mask.astype(np.uint8)))`; `.decode("ascii")` the counts to store them in JSON.
    """
    mask = as_numpy(mask)
    _check_2d(mask, "mask")
    height, width = mask.shape
    return {"size": [int(height), int(width)], "counts": _compress_counts(coco_rle_counts(mask))}
