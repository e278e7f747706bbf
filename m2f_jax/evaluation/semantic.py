"""mIoU, fwIoU, mACC and pACC as detectron2's `SemSegEvaluator` computes them.

One confusion matrix is accumulated over the whole dataset (`update` per image or batch,
`compute` once), never a mean of per-image scores. Conventions a reader cannot see in the code:
  * the matrix is (K + 1) x (K + 1), rows = prediction, columns = ground truth (detectron2's
    layout); ground truth equal to `ignore_index` goes to the extra column, which is not counted,
    so predictions on ignored pixels count nowhere (not even in a class's predicted area);
  * IoU_c = TP / (GT_c + Pred_c - TP) and ACC_c = TP / GT_c; a class without ground-truth pixels
    has NaN IoU and accuracy and is left out of mIoU and mACC (HF `evaluate`'s `mean_iou` counts a
    class that is predicted but absent from the ground truth as IoU 0 instead);
  * fwIoU weighs each class's IoU by its share of the (non-ignored) ground-truth pixels;
  * every number is a fraction in [0, 1] (detectron2 reports percentages).
Boundary IoU (optional in recent detectron2) is not computed.
"""

from __future__ import annotations

import numpy as np

from m2f_jax.processing.arrays import as_numpy

__all__ = ["SemanticEvaluator", "confusion_matrix", "semantic_metrics"]


def confusion_matrix(prediction, ground_truth, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(K + 1, K + 1) int64 counts: [predicted class, ground-truth class], last column = ignored.

    `prediction` and `ground_truth` are integer label maps of the same shape (one image (H, W) or
    a batch (B, H, W)); predictions must lie in [0, K), ground truth in [0, K) or equal `ignore_index`.
    """
    prediction, ground_truth = as_numpy(prediction), as_numpy(ground_truth)
    if prediction.shape != ground_truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {ground_truth.shape} differ in shape")
    for name, labels in (("prediction", prediction), ("ground truth", ground_truth)):
        if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise TypeError(f"{name} must hold integer labels, got dtype {labels.dtype}")
    prediction = prediction.reshape(-1).astype(np.int64)
    ground_truth = ground_truth.reshape(-1).astype(np.int64)
    if prediction.size and (prediction.min() < 0 or prediction.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}), got [{prediction.min()}, {prediction.max()}]")
    ignored = ground_truth == ignore_index if ignore_index is not None else np.zeros(ground_truth.shape, bool)
    bad = ~ignored & ((ground_truth < 0) | (ground_truth >= num_classes))
    if bad.any():
        raise ValueError(
            f"ground-truth labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, "
            f"got {np.unique(ground_truth[bad])[:10].tolist()}"
        )
    ground_truth = np.where(ignored, num_classes, ground_truth)
    bins = num_classes + 1
    return np.bincount(bins * prediction + ground_truth, minlength=bins * bins).reshape(bins, bins)


def semantic_metrics(matrix: np.ndarray) -> dict:
    """detectron2's `SemSegEvaluator.evaluate` on a (K + 1, K + 1) confusion matrix.

    Returns `{"mIoU", "fwIoU", "mACC", "pACC"}` (floats, NaN when undefined) and the per-class
    `"IoU"` and `"ACC"` arrays of shape (K,) (NaN for classes without ground truth).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    counted = matrix[:-1, :-1]  # drops ignored ground truth
    true_positive = np.diagonal(counted)
    ground_truth_area = counted.sum(axis=0)
    predicted_area = counted.sum(axis=1)
    union = ground_truth_area + predicted_area - true_positive
    has_ground_truth = ground_truth_area > 0
    iou_valid = has_ground_truth & (union > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(has_ground_truth, true_positive / ground_truth_area, np.nan)
        iou = np.where(iou_valid, true_positive / union, np.nan)
        class_weight = ground_truth_area / ground_truth_area.sum()
    total = ground_truth_area.sum()
    return {
        "mIoU": float(iou[iou_valid].mean()) if iou_valid.any() else float("nan"),
        "fwIoU": float((iou[iou_valid] * class_weight[iou_valid]).sum()) if iou_valid.any() else float("nan"),
        "mACC": float(accuracy[has_ground_truth].mean()) if has_ground_truth.any() else float("nan"),
        "pACC": float(true_positive.sum() / total) if total > 0 else float("nan"),
        "IoU": iou,
        "ACC": accuracy,
    }


class SemanticEvaluator:
    """Dataset-level mIoU (detectron2 `SemSegEvaluator`): `update(pred, gt)` per image, then `compute()`.

        evaluator = SemanticEvaluator(num_classes=150, ignore_index=255)   # ADE20K, reduce_labels
        for prediction, label in data:
            evaluator.update(prediction, label)        # (H, W) or (B, H, W) integer maps
        evaluator.compute()["mIoU"]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.confusion_matrix = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def update(self, prediction, ground_truth) -> None:
        self.confusion_matrix += confusion_matrix(prediction, ground_truth, self.num_classes, self.ignore_index)

    def compute(self) -> dict:
        return semantic_metrics(self.confusion_matrix)
