"""Evaluating a loaded model on a dataset split (``m2f-jax eval``): each image goes through
``m2f_jax.segment`` (the model's processor, results at the original size), then into the
evaluator of the task: mIoU (semantic), PQ (panoptic) or mask AP (instance).

Ground truth comes from the dataset loaders (``m2f_jax.data``), which skip crowd regions; for PQ
those pixels count as VOID, as panopticapi treats crowd and unlabelled pixels alike.
Instance predictions are the visible part of each instance in ``segment``'s id map.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def evaluate(model, dataset, task: str = "semantic", fmt: Optional[str] = None,
             max_images: Optional[int] = None, progress: bool = True) -> Dict[str, float]:
    from m2f_jax.evaluation.panoptic import PanopticEvaluator
    from m2f_jax.evaluation.semantic import SemanticEvaluator
    from m2f_jax.inference import segment
    from m2f_jax.training.run import semantic_target, write_progress

    num_labels = model.config.num_labels
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    if task == "semantic":
        evaluator = SemanticEvaluator(num_labels, ignore_index=255)
    elif task == "panoptic":
        is_thing = getattr(dataset, "is_thing", None)
        categories = {c + 1: bool(is_thing[c]) if is_thing is not None else True for c in range(num_labels)}
        evaluator = PanopticEvaluator(categories, void_id=0)
    elif task == "instance":
        images, predictions = [], []
    else:
        raise ValueError(f"task must be semantic, panoptic or instance, got {task!r}")

    for i in range(count):
        example = dataset[i]
        result = segment(model, example["image"], task=task)[0]
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
            images.append({"id": i, "masks": masks, "category_ids": classes + 1,
                           "height": masks.shape[1], "width": masks.shape[2]})
            seg = result["segmentation"]
            predictions.append([
                {"mask": seg == s["id"], "score": s["score"], "category_id": s["label_id"] + 1}
                for s in result["segments"]
            ])
        if progress:
            write_progress(i + 1, count)

    if task == "instance":
        from m2f_jax.evaluation.instance import InstanceEvaluator, coco_instance_ground_truth

        evaluator = InstanceEvaluator(coco_instance_ground_truth(images, list(range(1, num_labels + 1))))
        for i, preds in enumerate(predictions):
            evaluator.update(i, preds)
        metrics = evaluator.compute()
        return {k: float(v) for k, v in metrics.items() if np.isscalar(v)}
    metrics = evaluator.compute()
    if task == "semantic":
        return {k: float(metrics[k]) for k in ("mIoU", "fwIoU", "mACC", "pACC")}
    return {f"{name}_{k}": float(metrics[group][k])
            for group, name in (("All", "All"), ("Things", "Things"), ("Stuff", "Stuff"))
            for k in ("pq", "sq", "rq")}
