"""Evaluating a loaded model on a dataset split (``m2f-jax eval``): each image goes through
``m2f_jax.segment`` (the model's processor, results at the original size), then into the
evaluator of the task: mIoU (semantic), PQ (panoptic) or mask AP (instance).

Ground truth comes from the dataset loaders (``m2f_jax.data``), which skip crowd regions; for PQ
those pixels count as VOID, as panopticapi treats crowd and unlabelled pixels alike.
Instance predictions are every query's best (query, class) pairs with their full masks (the Q best
by class probability, as Mask2Former's instance inference), with no score threshold and no overlap
removal, scored as detectron2 does; COCOeval keeps the 100 best per image.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def evaluate(model, dataset, task: str = "semantic", fmt: Optional[str] = None,
             max_images: Optional[int] = None, progress: bool = True,
             batch_size: Optional[int] = None) -> Dict[str, float]:
    """Metrics of ``model`` on ``dataset`` (``m2f_jax.data``) for ``task``. Images are batched and
    spread over the local devices as ``m2f_jax.segment`` does (exact sizes, no size buckets)."""
    from m2f_jax.evaluation.panoptic import PanopticEvaluator
    from m2f_jax.evaluation.semantic import SemanticEvaluator
    from m2f_jax.inference import iter_segment
    from m2f_jax.progress import write_progress
    from m2f_jax.data.datasets import semantic_target

    num_labels = model.config.num_labels
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    options = {}
    if task == "semantic":
        evaluator = SemanticEvaluator(num_labels, ignore_index=255)
    elif task == "panoptic":
        is_thing = getattr(dataset, "is_thing", None)
        categories = {c + 1: bool(is_thing[c]) if is_thing is not None else True for c in range(num_labels)}
        evaluator = PanopticEvaluator(categories, void_id=0)
    elif task == "instance":
        from m2f_jax.evaluation.instance import InstanceEvaluator, coco_instance_ground_truth

        # every query's (query, class) pair with its full mask, no threshold, no overlap removal;
        # ground truth and predictions are kept as RLE until all images are seen
        options = {"threshold": 0.0, "return_masks": True}
        categories = list(range(1, num_labels + 1))
        ground_truth = {"images": [], "annotations": [], "categories": coco_instance_ground_truth([], categories)["categories"]}
        predictions: Dict[int, list] = {}
    else:
        raise ValueError(f"task must be semantic, panoptic or instance, got {task!r}")

    pending: Dict[int, dict] = {}  # examples whose image is in flight, by index

    def images():
        for i in range(count):
            example = dataset[i]
            pending[i] = example
            yield example["image"]

    for done, (i, result) in enumerate(iter_segment(model, images(), task=task, batch_size=batch_size, **options), 1):
        example = pending.pop(i)
        masks, classes = example["masks"], example["class_ids"]
        if task == "semantic":
            evaluator.update(result["segmentation"], semantic_target(masks, classes))
        elif task == "panoptic":
            gt = np.zeros(masks.shape[1:], np.int32)  # 0 = VOID (unlabelled or crowd)
            for k, m in enumerate(masks):
                gt[m] = k + 1
            gt_info = [{"id": k + 1, "category_id": int(c) + 1, "iscrowd": 0} for k, c in enumerate(classes)]
            pred_info = [{"id": s["id"], "category_id": s["label_id"] + 1, "iscrowd": 0} for s in result["segments"]]
            evaluator.update(gt, gt_info, result["segmentation"], pred_info)
        else:
            image = {"id": i, "masks": masks, "category_ids": np.asarray(classes) + 1,
                     "height": masks.shape[1], "width": masks.shape[2]}
            part = coco_instance_ground_truth([image], categories)
            for annotation in part["annotations"]:
                annotation["id"] = len(ground_truth["annotations"]) + 1
                ground_truth["annotations"].append(annotation)
            ground_truth["images"] += part["images"]
            predictions[i] = [{"segmentation": rle, "score": s["score"], "category_id": s["label_id"] + 1}
                              for rle, s in zip(result["masks"], result["segments"])]
        if progress:
            write_progress(done, count)

    if task == "instance":
        evaluator = InstanceEvaluator(ground_truth)
        for i in sorted(predictions):
            evaluator.update(i, predictions.pop(i))
        return {k: float(v) for k, v in evaluator.compute().items() if np.isscalar(v)}
    metrics = evaluator.compute()
    if task == "semantic":
        return {k: float(metrics[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")}
    return {f"{name}_{k}": float(metrics[group][k])
            for group, name in (("All", "All"), ("Things", "Things"), ("Stuff", "Stuff"))
            for k in ("pq", "sq", "rq")}

