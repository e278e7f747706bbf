"""Evaluation as the Mask2Former paper reports it (NumPy; no jax needed).

* `semantic`: mIoU / fwIoU / mACC / pACC from one dataset-level confusion matrix (detectron2
  `SemSegEvaluator`).
* `panoptic`: PQ / SQ / RQ with panopticapi's rules, and the COCO panoptic PNG + JSON format.
* `instance`: mask AP through pycocotools `COCOeval(iouType="segm")`, top-100 per image.

Every metric is a fraction in [0, 1] (detectron2 prints percentages). The evaluators share one
shape: construct, `update(...)` per image, `compute()` -> dict, `reset()`.
`instance` needs pycocotools and is imported on first use.
"""
from m2f_jax.evaluation.panoptic import (
    PanopticEvaluator,
    id2rgb,
    panoptic_from_post_processing,
    pq_compute,
    read_coco_panoptic,
    rgb2id,
    write_coco_panoptic,
)
from m2f_jax.evaluation.semantic import SemanticEvaluator, confusion_matrix, semantic_metrics

_LAZY = {
    name: "m2f_jax.evaluation.instance"
    for name in (
        "COCO_METRIC_NAMES",
        "InstanceEvaluator",
        "coco_instance_ground_truth",
        "evaluate_instances",
        "instances_from_post_processing",
    )
}

__all__ = [
    "PanopticEvaluator",
    "SemanticEvaluator",
    "confusion_matrix",
    "id2rgb",
    "panoptic_from_post_processing",
    "pq_compute",
    "read_coco_panoptic",
    "rgb2id",
    "semantic_metrics",
    "write_coco_panoptic",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'm2f_jax.evaluation' has no attribute {name!r}")
