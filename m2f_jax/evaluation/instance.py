"""Mask AP through pycocotools `COCOeval(iouType="segm")`, as Mask2Former / detectron2 evaluate it.

Predictions are per image: binary (H, W) masks or pycocotools RLE dicts, each with a `score` and
a `category_id` (the dataset's ids). Conventions a reader cannot see in the code:
  * the 100 highest-scoring predictions of an image are kept (Mask2Former's `instance_inference`
    top-K over queries x classes), with no score threshold and no NMS; with transformers'
    post-processing that is `post_process_instance_segmentation(threshold=0.0, ...)`;
  * masks are encoded as `pycocotools.mask.encode(np.asfortranarray(mask[:, :, None]))`
    (column-major uint8), and no `bbox` is passed, so COCO's small / medium / large ranges use the
    mask area (detectron2 drops `bbox` from segm results for this reason);
  * COCOeval's defaults: IoU .50:.05:.95, 101 recall points, maxDets (1, 10, 100);
  * numbers are fractions in [0, 1]; pycocotools' -1 ("no ground truth in this range") is NaN, as
    detectron2 reports it (detectron2 also multiplies by 100).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Mapping

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from m2f_jax.processing.arrays import as_numpy

__all__ = [
    "COCO_METRIC_NAMES",
    "InstanceEvaluator",
    "coco_instance_ground_truth",
    "evaluate_instances",
    "instances_from_post_processing",
]

COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _encode(mask) -> dict:
    mask = as_numpy(mask)
    if mask.ndim != 2:
        raise ValueError(f"a binary mask must be (H, W), got shape {mask.shape}")
    return mask_utils.encode(np.asfortranarray((mask > 0).astype(np.uint8)[:, :, None]))[0]


def _as_rle(segmentation, height: int | None, width: int | None) -> dict:
    """A compressed RLE dict from a binary mask or an RLE (compressed, str counts or uncompressed)."""
    if isinstance(segmentation, Mapping):
        size = [int(s) for s in segmentation["size"]]
        counts = segmentation["counts"]
        if isinstance(counts, (list, np.ndarray)):  # uncompressed RLE
            rle = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, *size)
        else:
            rle = {"size": size, "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        rle = _encode(segmentation)
    if height is not None and width is not None and list(rle["size"]) != [height, width]:
        raise ValueError(f"mask size {list(rle['size'])} differs from the image's [{height}, {width}]")
    return rle


def _quiet(verbose: bool):
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _load_ground_truth(ground_truth, verbose: bool) -> COCO:
    """A pycocotools COCO from a path or a dict (copied: COCOeval writes into annotations)."""
    if isinstance(ground_truth, COCO):
        return ground_truth
    if not isinstance(ground_truth, Mapping):
        with open(ground_truth) as f:
            ground_truth = json.load(f)
    dataset = copy.deepcopy(dict(ground_truth))
    dataset.setdefault("annotations", [])
    used_ids = {ann["id"] for ann in dataset["annotations"] if "id" in ann}
    next_id = max(used_ids, default=0) + 1
    for ann in dataset["annotations"]:
        if "id" not in ann:  # COCOeval matches by annotation id
            ann["id"], next_id = next_id, next_id + 1
        ann.setdefault("iscrowd", 0)
    coco = COCO()
    coco.dataset = dataset
    with _quiet(verbose):
        coco.createIndex()
    for ann in dataset["annotations"]:
        if "area" not in ann:  # area ranges need it; COCO's own files always have it
            ann["area"] = float(mask_utils.area(coco.annToRLE(ann)))
    return coco


def coco_instance_ground_truth(images, categories) -> dict:
    """A COCO instance ground-truth dict from binary masks.

    `images`: a list of `{"id", "masks": (N, H, W), "category_ids": (N,), "iscrowd": (N,) optional}`
    (`height`, `width` are taken from the masks, or given when N = 0); `categories`: COCO's list of
    `{"id", "name", ...}` or a list of ids. Segmentations are RLE with str counts (JSON-safe).
    """
    coco_images, annotations = [], []
    for image in images:
        masks = as_numpy(image["masks"])
        category_ids = np.asarray(image["category_ids"]).reshape(-1)
        crowd = np.asarray(image.get("iscrowd", np.zeros(len(category_ids), int))).reshape(-1)
        if masks.ndim != 3 or len(masks) != len(category_ids) or len(crowd) != len(category_ids):
            raise ValueError("masks (N, H, W), category_ids (N,) and iscrowd (N,) must agree")
        height, width = (masks.shape[1:] if len(masks) else (image["height"], image["width"]))
        coco_images.append({"id": image["id"], "height": int(height), "width": int(width)})
        for mask, category, is_crowd in zip(masks, category_ids, crowd):
            rle = _encode(mask)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": int(category),
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": int(is_crowd),
            })
    categories = [c if isinstance(c, Mapping) else {"id": int(c), "name": str(c)} for c in categories]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def instances_from_post_processing(result: Mapping, label_id_to_category_id=None) -> list[dict]:
    """COCO-style predictions `[{"segmentation", "score", "category_id"}]` from one
    `post_process_instance_segmentation` result made with `return_coco_annotation=True` (RLE list)
    or `return_binary_maps=True` ((N, H, W) masks). A painted (H, W) id map (neither flag) is
    accepted too but loses the pixels of instances painted over. `label_id` goes through
    `label_id_to_category_id` (mapping or sequence; identity when None).
    """
    segments = result["segments_info"]
    segmentation = result["segmentation"]
    if not segments:
        return []
    if isinstance(segmentation, list):
        masks = segmentation
    else:
        segmentation = as_numpy(segmentation)
        if segmentation.ndim == 3:
            masks = list(segmentation)
        else:
            masks = [segmentation == segment["id"] for segment in segments]
    predictions = []
    for mask, segment in zip(masks, segments):
        label = int(segment["label_id"])
        category = label if label_id_to_category_id is None else int(label_id_to_category_id[label])
        predictions.append({"segmentation": mask, "score": float(segment["score"]), "category_id": category})
    return predictions


def _prediction_list(predictions) -> list[dict]:
    """Predictions as a list of dicts, from a list or a dict of arrays
    `{"masks": (N, H, W) | list of RLE, "scores": (N,), "category_ids": (N,)}`."""
    if isinstance(predictions, Mapping):
        masks, scores = predictions["masks"], np.asarray(predictions["scores"]).reshape(-1)
        category_ids = np.asarray(predictions["category_ids"]).reshape(-1)
        if len(masks) != len(scores) or len(scores) != len(category_ids):
            raise ValueError("masks, scores and category_ids must have one entry per instance")
        return [
            {"segmentation": m, "score": float(s), "category_id": int(c)}
            for m, s, c in zip(masks, scores, category_ids)
        ]
    return [{**p, "segmentation": p["segmentation"] if "segmentation" in p else p["mask"]} for p in predictions]


class InstanceEvaluator:
    """Mask AP of instance predictions against COCO ground truth (a dict, a JSON path or a COCO).

        evaluator = InstanceEvaluator("instances_val2017.json")
        for image_id, predictions in outputs:
            evaluator.update(image_id, predictions)
        evaluator.compute()["AP"]

    `predictions` per image: a list of `{"segmentation" (or "mask"): binary (H, W) or RLE dict,
    "score", "category_id"}`, or `{"masks", "scores", "category_ids"}` arrays.
    """

    def __init__(self, ground_truth, max_detections_per_image: int = 100, verbose: bool = False):
        self.verbose = verbose
        self.ground_truth = _load_ground_truth(ground_truth, verbose)
        self.max_detections_per_image = max_detections_per_image
        self.reset()

    def reset(self) -> None:
        self.results: list[dict] = []
        self._seen_images: set = set()

    def update(self, image_id, predictions) -> None:
        if image_id not in self.ground_truth.imgs:
            raise KeyError(f"image {image_id} is not in the ground truth")
        if image_id in self._seen_images:
            raise ValueError(f"image {image_id} was already added")
        self._seen_images.add(image_id)
        image = self.ground_truth.imgs[image_id]
        predictions = _prediction_list(predictions)
        order = np.argsort([-float(p["score"]) for p in predictions], kind="stable")
        for i in order[: self.max_detections_per_image]:
            prediction = predictions[i]
            self.results.append({
                "image_id": image_id,
                "category_id": int(prediction["category_id"]),
                "segmentation": _as_rle(prediction["segmentation"], image.get("height"), image.get("width")),
                "score": float(prediction["score"]),
            })

    def _result_coco(self) -> COCO:
        if self.results:
            with _quiet(self.verbose):
                return self.ground_truth.loadRes(copy.deepcopy(self.results))
        # loadRes cannot take an empty list; an empty result set scores 0 where there is ground truth
        empty = COCO()
        empty.dataset = {"images": list(self.ground_truth.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(self.ground_truth.dataset.get("categories", []))}
        with _quiet(self.verbose):
            empty.createIndex()
        return empty

    def compute(self) -> dict:
        """The 12 COCO numbers by name (`COCO_METRIC_NAMES`) plus `per_category` AP
        (`{category_id: AP}`, detectron2's `precision[:, :, k, area=all, maxDets=100]` mean)."""
        coco_eval = COCOeval(self.ground_truth, self._result_coco(), iouType="segm")
        with _quiet(self.verbose):
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        metrics = {name: float(v) if v >= 0 else float("nan") for name, v in zip(COCO_METRIC_NAMES, coco_eval.stats)}
        precision = coco_eval.eval["precision"]  # (IoU thresholds, recall points, categories, areas, maxDets)
        per_category = {}
        for k, category_id in enumerate(coco_eval.params.catIds):
            values = precision[:, :, k, 0, -1]
            values = values[values > -1]
            per_category[int(category_id)] = float(values.mean()) if values.size else float("nan")
        metrics["per_category"] = per_category
        return metrics


def evaluate_instances(ground_truth, predictions: Mapping, max_detections_per_image: int = 100,
                       verbose: bool = False) -> dict:
    """`InstanceEvaluator` in one call; `predictions` maps image_id -> that image's predictions."""
    evaluator = InstanceEvaluator(ground_truth, max_detections_per_image, verbose)
    for image_id, image_predictions in predictions.items():
        evaluator.update(image_id, image_predictions)
    return evaluator.compute()
