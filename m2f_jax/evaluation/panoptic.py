"""Panoptic quality (PQ, SQ, RQ) with panopticapi's rules (`panopticapi/evaluation.py` `pq_compute`),
and the COCO panoptic format (PNG + JSON) in and out.

A panoptic annotation is a segment-id map (H, W) plus `segments_info`, a list of
`{"id", "category_id", "iscrowd"}`; id `void_id` (0 in COCO) is VOID, unlabelled. The rules, per
image (statistics are summed over the dataset, then averaged over categories):
  * a ground-truth and a predicted segment of the same category match when IoU > 0.5, where the
    union leaves out the prediction's pixels on VOID; crowd ground truth (`iscrowd=1`) never matches;
    IoU > 0.5 makes matches unique, so no assignment problem is solved;
  * an unmatched non-crowd ground-truth segment is a FN;
  * an unmatched prediction is a FP unless more than half of its area lies on VOID plus the crowd
    region of its own category (as panopticapi: the LAST crowd segment of that category listed in
    `segments_info`; COCO has at most one per category and image);
  * per category PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP),
    RQ = TP / (TP + FP/2 + FN/2); categories with TP + FP + FN = 0 are left out of the averages
    (here their per-category values are NaN; panopticapi lists 0.0). All / Things / Stuff average
    over the categories of `categories` with `isthing` 1 / 0.

Differences from panopticapi, none of which changes a result on well-formed COCO data:
  * areas are pixel counts of the maps (panopticapi reads ground-truth areas from the JSON; COCO's
    are the pixel counts);
  * an average over no category is NaN (panopticapi divides by zero);
  * numbers are fractions in [0, 1] (detectron2 reports percentages).
As in panopticapi, a predicted id in the map but not in `segments_info` (other than VOID), a listed
prediction with no pixel, or a predicted category outside `categories` is an error; ground-truth
pixels whose id is not listed are neither VOID nor a segment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from m2f_jax.processing.arrays import as_numpy

__all__ = [
    "PanopticAnnotations",
    "PanopticEvaluator",
    "id2rgb",
    "panoptic_from_post_processing",
    "pq_compute",
    "read_coco_panoptic",
    "rgb2id",
    "write_coco_panoptic",
]

MAX_SEGMENT_ID = 256**3 - 1  # largest id an RGB PNG can hold
_METRIC_KEYS = ("pq", "sq", "rq")


# ----------------------------------------------------------------------------------------------
# COCO panoptic format
# ----------------------------------------------------------------------------------------------


def rgb2id(color) -> np.ndarray:
    """Segment ids of an (H, W, 3) RGB array: R + 256 G + 256^2 B (panopticapi `rgb2id`)."""
    color = as_numpy(color)
    if color.ndim != 3 or color.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {color.shape}")
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(segment_ids) -> np.ndarray:
    """(H, W, 3) uint8 RGB encoding of segment ids in [0, 256^3) (panopticapi `id2rgb`)."""
    segment_ids = as_numpy(segment_ids)
    if segment_ids.size and (segment_ids.min() < 0 or segment_ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_SEGMENT_ID}] to fit an RGB PNG")
    segment_ids = segment_ids.astype(np.int64)
    return np.stack([segment_ids % 256, segment_ids // 256 % 256, segment_ids // 65536], axis=-1).astype(np.uint8)


def _bounding_box(mask: np.ndarray) -> list[int]:
    """COCO `[x, y, width, height]` of a non-empty mask, inclusive pixel extents (panopticapi)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


class PanopticAnnotations(Sequence):
    """The annotations of a COCO panoptic JSON; item i is its annotation dict plus `segmentation`,
    the (H, W) int64 id map read from the PNG on access (a whole dataset would not fit in memory)."""

    def __init__(self, annotations: list[dict], png_dir: str):
        self._annotations = annotations
        self._png_dir = png_dir
        self._index = {ann["image_id"]: i for i, ann in enumerate(annotations)}

    def __len__(self) -> int:
        return len(self._annotations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        annotation = dict(self._annotations[index])
        with Image.open(os.path.join(self._png_dir, annotation["file_name"])) as png:
            annotation["segmentation"] = rgb2id(np.asarray(png.convert("RGB")))
        return annotation

    @property
    def image_ids(self) -> list:
        return [ann["image_id"] for ann in self._annotations]

    def by_image_id(self, image_id) -> dict:
        return self[self._index[image_id]]


def read_coco_panoptic(json_path, png_dir) -> tuple[PanopticAnnotations, list[dict]]:
    """Read a COCO panoptic JSON and its PNG folder: `(annotations, categories)`.

    `annotations[i]` is `{"image_id", "file_name", "segments_info", "segmentation"}` (plus any other
    keys of the JSON annotation), the PNG decoded lazily; `categories` is the JSON's list of
    `{"id", "name", "isthing", ...}`.
    """
    with open(json_path) as f:
        data = json.load(f)
    return PanopticAnnotations(data["annotations"], str(png_dir)), data.get("categories", [])


def write_coco_panoptic(json_path, png_dir, annotations, categories=None, images=None) -> dict:
    """Write annotations in the COCO panoptic format; returns the JSON dict written.

    Each annotation is `{"image_id", "segmentation": (H, W) ids in [0, 256^3), "segments_info"}`
    with optional `"file_name"` (default `"{image_id}.png"`). Every PNG is `id2rgb(segmentation)`;
    `segments_info` entries keep their keys and get `area` and `bbox` recomputed from the map,
    `iscrowd` defaulting to 0. `categories` and `images` are copied into the JSON when given.
    """
    os.makedirs(png_dir, exist_ok=True)
    written = []
    for annotation in annotations:
        segmentation = as_numpy(annotation["segmentation"])
        if segmentation.ndim != 2:
            raise ValueError(f"segmentation must be (H, W), got shape {segmentation.shape}")
        file_name = annotation.get("file_name", f"{annotation['image_id']}.png")
        Image.fromarray(id2rgb(segmentation)).save(os.path.join(png_dir, file_name))
        segments = []
        for segment in annotation["segments_info"]:
            mask = segmentation == segment["id"]
            area = int(mask.sum())
            segment = {"iscrowd": 0, **segment, "id": int(segment["id"]), "area": area}
            segment["bbox"] = _bounding_box(mask) if area else [0, 0, 0, 0]
            segments.append(_json_safe(segment))
        extra = {k: v for k, v in annotation.items() if k not in ("segmentation", "segments_info", "file_name")}
        written.append({**_json_safe(extra), "file_name": file_name, "segments_info": segments})
    data = {"annotations": written}
    if categories is not None:
        data["categories"] = _json_safe(list(categories))
    if images is not None:
        data["images"] = _json_safe(list(images))
    with open(json_path, "w") as f:
        json.dump(data, f)
    return data


def _json_safe(value):
    """NumPy scalars and arrays as plain Python values, recursively."""
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def panoptic_from_post_processing(result: Mapping, label_id_to_category_id=None) -> tuple[np.ndarray, list[dict]]:
    """`(segmentation, segments_info)` for `PanopticEvaluator.update` / `write_coco_panoptic` from one
    `post_process_panoptic_segmentation` result.

    The -1 map of an image without segments becomes VOID (0); `label_id` is mapped to the dataset's
    `category_id` through `label_id_to_category_id` (a mapping or sequence; identity when None), as
    detectron2 maps contiguous ids back to dataset ids.
    """
    segmentation = as_numpy(result["segmentation"])
    segmentation = np.where(segmentation < 0, 0, segmentation).astype(np.int64)
    segments = []
    for segment in result["segments_info"]:
        label = int(segment["label_id"])
        category = label if label_id_to_category_id is None else int(label_id_to_category_id[label])
        segments.append({"id": int(segment["id"]), "category_id": category, "iscrowd": 0})
    return segmentation, segments


# ----------------------------------------------------------------------------------------------
# PQ
# ----------------------------------------------------------------------------------------------


def _parse_categories(categories) -> dict[int, bool]:
    """`{category_id: isthing}` from a COCO `categories` list or a `{id: isthing}` mapping."""
    if isinstance(categories, Mapping):
        parsed = {int(k): bool(v) for k, v in categories.items()}
    else:
        parsed = {int(c["id"]): bool(c["isthing"]) for c in categories}
    if not parsed:
        raise ValueError("categories is empty")
    return parsed


def _segment_table(segments_info, what: str):
    ids = np.array([int(s["id"]) for s in segments_info], dtype=np.int64)
    category_ids = np.array([int(s["category_id"]) for s in segments_info], dtype=np.int64)
    crowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in segments_info], dtype=bool)
    if len(np.unique(ids)) != len(ids):
        raise ValueError(f"{what} segments_info lists a segment id twice: {ids.tolist()}")
    return ids, category_ids, crowd


def _lookup(sorted_values: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `keys` in `sorted_values` and whether each key is there."""
    position = np.clip(np.searchsorted(sorted_values, keys), 0, max(len(sorted_values) - 1, 0))
    found = sorted_values[position] == keys if len(sorted_values) else np.zeros(len(keys), bool)
    return position, found


class PanopticEvaluator:
    """Dataset-level PQ / SQ / RQ with panopticapi's rules (see the module docstring).

        evaluator = PanopticEvaluator(categories)   # COCO `categories` list, or {id: isthing}
        for gt_ids, gt_segments, pred_ids, pred_segments in data:
            evaluator.update(gt_ids, gt_segments, pred_ids, pred_segments)
        evaluator.compute()["All"]["pq"]
    """

    def __init__(self, categories, void_id: int = 0):
        self.categories = _parse_categories(categories)
        self.void_id = int(void_id)
        self._category_ids = np.array(sorted(self.categories), dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        num = len(self._category_ids)
        self.iou_sum = np.zeros(num, np.float64)
        self.true_positives = np.zeros(num, np.int64)
        self.false_positives = np.zeros(num, np.int64)
        self.false_negatives = np.zeros(num, np.int64)

    def update(self, gt_segmentation, gt_segments_info, pred_segmentation, pred_segments_info) -> None:
        """Add one image: (H, W) id maps and their `segments_info` lists."""
        gt_map = as_numpy(gt_segmentation).astype(np.int64)
        pred_map = as_numpy(pred_segmentation).astype(np.int64)
        if gt_map.shape != pred_map.shape or gt_map.ndim != 2:
            raise ValueError(f"expected two (H, W) maps of one shape, got {gt_map.shape} and {pred_map.shape}")
        gt_ids, gt_categories, gt_crowd = _segment_table(gt_segments_info, "ground-truth")
        pred_ids, pred_categories, _ = _segment_table(pred_segments_info, "predicted")
        if self.void_id in gt_ids or self.void_id in pred_ids:
            raise ValueError(f"segment id {self.void_id} is VOID and cannot be listed in segments_info")
        pred_category_index, known = _lookup(self._category_ids, pred_categories)
        if not known.all():
            raise KeyError(f"predicted category ids {pred_categories[~known].tolist()} are not in categories")

        # joint histogram of (gt id, pred id) over the image: panopticapi's np.unique(gt * 256^3 + pred)
        gt_values, gt_inverse = np.unique(gt_map, return_inverse=True)
        pred_values, pred_inverse = np.unique(pred_map, return_inverse=True)
        joint = np.bincount(
            gt_inverse.reshape(-1) * len(pred_values) + pred_inverse.reshape(-1),
            minlength=len(gt_values) * len(pred_values),
        ).reshape(len(gt_values), len(pred_values))  # (distinct gt ids, distinct pred ids)

        pred_column, pred_present = _lookup(pred_values, pred_ids)
        unlisted = np.setdiff1d(pred_values, np.append(pred_ids, self.void_id))
        if unlisted.size:
            raise KeyError(f"predicted segment ids {unlisted.tolist()} are in the map but not in segments_info")
        if not pred_present.all():
            raise KeyError(f"predicted segment ids {pred_ids[~pred_present].tolist()} are in segments_info but not in the map")
        gt_row, gt_present = _lookup(gt_values, gt_ids)
        by_pred = joint[:, pred_column]  # (distinct gt ids, pred segments)
        intersection = np.where(gt_present[:, None], by_pred[gt_row], 0)  # (gt segments, pred segments)
        gt_area = np.where(gt_present, joint.sum(axis=1)[gt_row], 0)
        pred_area = by_pred.sum(axis=0)
        void_row, has_void = _lookup(gt_values, np.array([self.void_id]))
        pred_on_void = by_pred[void_row[0]] if has_void[0] else np.zeros(len(pred_ids), np.int64)

        same_category = gt_categories[:, None] == pred_categories[None, :]
        union = pred_area[None, :] + gt_area[:, None] - intersection - pred_on_void[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, intersection / np.maximum(union, 1), 0.0)
        matched = same_category & ~gt_crowd[:, None] & (iou > 0.5)  # at most one per row and column
        gt_index, pred_index = np.nonzero(matched)
        num = len(self._category_ids)
        self.true_positives += np.bincount(pred_category_index[pred_index], minlength=num)
        self.iou_sum += np.bincount(pred_category_index[pred_index], weights=iou[gt_index, pred_index], minlength=num)

        gt_category_index, gt_known = _lookup(self._category_ids, gt_categories)
        missed = ~matched.any(axis=1) & ~gt_crowd & gt_known  # unknown gt categories only drop out
        self.false_negatives += np.bincount(gt_category_index[missed], minlength=num)

        # the crowd region of each category: the last crowd segment listed (panopticapi's dict)
        crowd_overlap = np.zeros(len(pred_ids), np.int64)
        crowd_of_category = {int(c): g for g, c in enumerate(gt_categories) if gt_crowd[g]}
        for p, category in enumerate(pred_categories):
            if int(category) in crowd_of_category:
                crowd_overlap[p] = intersection[crowd_of_category[int(category)], p]
        unmatched = ~matched.any(axis=0)
        counted = unmatched & ((pred_on_void + crowd_overlap) / pred_area <= 0.5)
        self.false_positives += np.bincount(pred_category_index[counted], minlength=num)

    def compute(self) -> dict:
        """`{"All" | "Things" | "Stuff": {"pq", "sq", "rq", "n"}, "per_category": {id: {...}}}`.

        `n` is the number of categories averaged (those with TP + FP + FN > 0); per-category entries
        hold `pq`, `sq`, `rq` (NaN when the category never appears), `tp`, `fp`, `fn` and `isthing`.
        """
        tp, fp, fn = self.true_positives, self.false_positives, self.false_negatives
        denominator = tp + 0.5 * fp + 0.5 * fn
        appears = (tp + fp + fn) > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            pq = np.where(appears, self.iou_sum / denominator, np.nan)
            sq = np.where(appears, np.where(tp > 0, self.iou_sum / np.maximum(tp, 1), 0.0), np.nan)
            rq = np.where(appears, tp / denominator, np.nan)
        is_thing = np.array([self.categories[int(c)] for c in self._category_ids], dtype=bool)
        results = {}
        for name, selected in (("All", np.ones_like(is_thing)), ("Things", is_thing), ("Stuff", ~is_thing)):
            averaged = selected & appears
            n = int(averaged.sum())
            results[name] = {
                key: float(values[averaged].mean()) if n else float("nan")
                for key, values in zip(_METRIC_KEYS, (pq, sq, rq))
            }
            results[name]["n"] = n
        results["per_category"] = {
            int(c): {
                "pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i]),
                "tp": int(tp[i]), "fp": int(fp[i]), "fn": int(fn[i]), "isthing": bool(is_thing[i]),
            }
            for i, c in enumerate(self._category_ids)
        }
        return results


def pq_compute(gt_json_file, pred_json_file, gt_folder=None, pred_folder=None, categories=None,
               void_id: int = 0) -> dict:
    """panopticapi's `pq_compute` on COCO panoptic files (same arguments; a folder defaults to its
    JSON path without `.json`). Every ground-truth image needs a prediction, matched by `image_id`;
    `categories` defaults to the ground-truth JSON's."""
    gt_folder = gt_folder if gt_folder is not None else str(gt_json_file).replace(".json", "")
    pred_folder = pred_folder if pred_folder is not None else str(pred_json_file).replace(".json", "")
    ground_truth, gt_categories = read_coco_panoptic(gt_json_file, gt_folder)
    predictions, _ = read_coco_panoptic(pred_json_file, pred_folder)
    evaluator = PanopticEvaluator(categories if categories is not None else gt_categories, void_id=void_id)
    predicted_ids = set(predictions.image_ids)
    for gt in ground_truth:
        if gt["image_id"] not in predicted_ids:
            raise KeyError(f"no prediction for image {gt['image_id']}")
        pred = predictions.by_image_id(gt["image_id"])
        evaluator.update(gt["segmentation"], gt["segments_info"], pred["segmentation"], pred["segments_info"])
    return evaluator.compute()
