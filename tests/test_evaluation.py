"""Evaluation metrics. Oracles: torchmetrics 1.9 (MulticlassJaccardIndex, MulticlassAccuracy,
PanopticQuality), pycocotools' COCOeval run directly, panopticapi's per-image rules written out as
plain loops, and hand-computed values (exact up to float64 rounding, atol 1e-12 unless stated)."""
import json

import numpy as np
import pytest
from PIL import Image

from m2f_jax.evaluation import (
    PanopticEvaluator,
    SemanticEvaluator,
    confusion_matrix,
    id2rgb,
    panoptic_from_post_processing,
    pq_compute,
    read_coco_panoptic,
    rgb2id,
    write_coco_panoptic,
)
from tests import TORCH_REASON

pycocotools = pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from m2f_jax.evaluation.instance import (  # noqa: E402
    COCO_METRIC_NAMES,
    InstanceEvaluator,
    coco_instance_ground_truth,
    evaluate_instances,
    instances_from_post_processing,
)

# ----------------------------------------------------------------------------------------------
# mIoU
# ----------------------------------------------------------------------------------------------

# 3 ignored ground-truth pixels (255); class 3 is predicted at (3, 1) (gt 2) and on an ignored pixel, never in the gt
GT_4X4 = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 2, 255]])
PRED_4X4 = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 0, 3], [2, 3, 2, 2]])


def test_miou_hand_computed_4x4():
    """Counted pixels: 13. Class 0: GT 4, pred 3 (the 0 at (2, 2) lies on ignore), TP 3 -> 3/4.
    Class 1: GT 4, pred 4, TP 3 -> 3/5. Class 2: GT 5, pred 5 (the 2 at (3, 3) is on ignore), TP 4
    -> 4/6. Class 3: no GT -> NaN, left out of the mean (HF evaluate would count it as 0)."""
    evaluator = SemanticEvaluator(num_classes=4, ignore_index=255)
    evaluator.update(PRED_4X4[:2], GT_4X4[:2])  # accumulation over two "images"
    evaluator.update(PRED_4X4[2:], GT_4X4[2:])
    result = evaluator.compute()
    np.testing.assert_allclose(result["IoU"][:3], [3 / 4, 3 / 5, 4 / 6], atol=1e-12)
    assert np.isnan(result["IoU"][3]) and np.isnan(result["ACC"][3])
    assert result["mIoU"] == pytest.approx((3 / 4 + 3 / 5 + 4 / 6) / 3, abs=1e-12)
    assert result["pACC"] == pytest.approx(10 / 13, abs=1e-12)
    assert result["mACC"] == pytest.approx((3 / 4 + 3 / 4 + 4 / 5) / 3, abs=1e-12)
    assert result["fwIoU"] == pytest.approx((4 * 3 / 4 + 4 * 3 / 5 + 5 * 4 / 6) / 13, abs=1e-12)
    # one update of the whole map gives the same matrix (pred rows, gt columns, last column ignored)
    matrix = confusion_matrix(PRED_4X4, GT_4X4, 4, 255)
    np.testing.assert_array_equal(matrix, evaluator.confusion_matrix)
    assert matrix[:, -1].sum() == 3 and matrix[3, 2] == 1  # the 3 at (3, 1) lies on class 2


def test_miou_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[4]]), np.array([[0]]), 4)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([[0]]), np.array([[7]]), 4, ignore_index=255)


def test_miou_matches_torchmetrics_per_class_iou_and_accuracy():
    """Oracle: torchmetrics MulticlassJaccardIndex(average=None) / MulticlassAccuracy, accumulated
    over 4 random images with ignored pixels; compared on classes with ground truth (rtol 1e-6)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    classification = pytest.importorskip("torchmetrics.classification")
    num_classes, rng = 7, np.random.default_rng(0)
    jaccard = classification.MulticlassJaccardIndex(num_classes=num_classes, average=None, ignore_index=255)
    pixel_acc = classification.MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=255)
    recall = classification.MulticlassAccuracy(num_classes=num_classes, average=None, ignore_index=255)
    evaluator = SemanticEvaluator(num_classes, ignore_index=255)
    for _ in range(4):
        gt = rng.integers(0, num_classes - 1, size=(37, 41))  # class 6 never in the ground truth
        gt[rng.random(gt.shape) < 0.15] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, np.minimum(gt, num_classes - 1), rng.integers(0, num_classes, gt.shape))
        evaluator.update(pred.astype(np.uint8), gt.astype(np.uint8))
        for metric in (jaccard, pixel_acc, recall):
            metric.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    result = evaluator.compute()
    present = np.arange(num_classes) < num_classes - 1
    np.testing.assert_allclose(result["IoU"][present], jaccard.compute().numpy()[present], rtol=1e-6)
    np.testing.assert_allclose(result["ACC"][present], recall.compute().numpy()[present], rtol=1e-6)
    assert np.isnan(result["IoU"][~present]).all()
    assert result["mIoU"] == pytest.approx(float(jaccard.compute().numpy()[present].mean()), rel=1e-6)
    assert result["pACC"] == pytest.approx(float(pixel_acc.compute()), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# PQ
# ----------------------------------------------------------------------------------------------

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 3, "name": "sky", "isthing": 0},
]


def _segments(*triples):
    return [{"id": i, "category_id": c, "iscrowd": crowd} for i, c, crowd in triples]


def _pq(gt, gt_segments, pred, pred_segments, categories=CATEGORIES, void_id=0):
    evaluator = PanopticEvaluator(categories, void_id=void_id)
    evaluator.update(np.array(gt), gt_segments, np.array(pred), pred_segments)
    return evaluator.compute()


def test_pq_iou_boundary_is_strict():
    """Thing gt 1 (4 px): pred 10 covers 2 of them, IoU 2/4 = 0.5 exactly -> no match: FN + FP.
    Stuff gt 2 (4 px): pred 11 (6 px) covers it, IoU 4/6 -> TP. Widening pred 10 to 3 px, IoU 3/4."""
    gt = [[1, 1, 1, 1, 2, 2, 2, 2]]
    result = _pq(gt, _segments((1, 1, 0), (2, 3, 0)), [[10, 10, 11, 11, 11, 11, 11, 11]],
                 _segments((10, 1, 0), (11, 3, 0)))
    person, sky = result["per_category"][1], result["per_category"][3]
    assert (person["tp"], person["fp"], person["fn"]) == (0, 1, 1) and person["pq"] == 0
    assert sky["pq"] == pytest.approx(2 / 3) and sky["sq"] == pytest.approx(2 / 3) and sky["rq"] == 1
    assert result["All"]["pq"] == pytest.approx(1 / 3) and result["All"]["n"] == 2
    assert result["Things"]["pq"] == 0 and result["Stuff"]["pq"] == pytest.approx(2 / 3)
    assert np.isnan(result["per_category"][2]["pq"])  # car never appears: not averaged

    result = _pq(gt, _segments((1, 1, 0), (2, 3, 0)), [[10, 10, 10, 11, 11, 11, 11, 11]],
                 _segments((10, 1, 0), (11, 3, 0)))
    assert result["per_category"][1]["tp"] == 1 and result["per_category"][1]["pq"] == pytest.approx(3 / 4)
    assert result["per_category"][3]["pq"] == pytest.approx(4 / 5)


VOID_GT = [[1, 1, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 3, 3]]
VOID_GT_SEGMENTS = _segments((1, 1, 0), (2, 3, 0), (3, 2, 0))
VOID_PRED = [[0, 10, 10, 10, 10, 10, 10, 10], [20, 20, 20, 20, 0, 0, 0, 0], [11, 11, 11, 11, 12, 12, 12, 12]]
VOID_PRED_SEGMENTS = _segments((10, 1, 0), (20, 3, 0), (11, 2, 0), (12, 1, 0))


def _check_void_case(result):
    """Pred 10 (person, 7 px, 4 on VOID) vs gt 1 (4 px): IoU = 3 / (7 + 4 - 3 - 4) = 3/4, a TP
    (3/8 without the VOID rule). Pred 20 = gt 2 (sky): IoU 1. Pred 11 (car) lies wholly on VOID:
    ignored. Pred 12 (person) is exactly half on VOID (not > 0.5): a FP. Gt 3 (car) unmatched: FN.
    person: PQ 0.75 / 1.5 = 0.5, SQ 0.75, RQ 2/3; car: 0 (FN only); sky: 1. All PQ = 1.5 / 3."""
    person, car, sky = (result["per_category"][c] for c in (1, 2, 3))
    assert (person["tp"], person["fp"], person["fn"]) == (1, 1, 0)
    assert (car["tp"], car["fp"], car["fn"]) == (0, 0, 1)
    assert person["pq"] == pytest.approx(0.5) and person["sq"] == pytest.approx(0.75)
    assert person["rq"] == pytest.approx(2 / 3) and sky["pq"] == 1
    assert result["Things"]["pq"] == pytest.approx(0.25) and result["Things"]["sq"] == pytest.approx(0.375)
    assert result["Things"]["rq"] == pytest.approx(1 / 3)
    assert result["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    assert result["All"]["pq"] == pytest.approx((0.5 + 0 + 1) / 3) and result["All"]["n"] == 3


def test_pq_void_rule_hand_computed():
    _check_void_case(_pq(VOID_GT, VOID_GT_SEGMENTS, VOID_PRED, VOID_PRED_SEGMENTS))


def test_pq_configurable_void_id():
    """The same case with VOID encoded as 99 in both maps."""
    gt = np.where(np.array(VOID_GT) == 0, 99, VOID_GT)
    pred = np.where(np.array(VOID_PRED) == 0, 99, VOID_PRED)
    _check_void_case(_pq(gt, VOID_GT_SEGMENTS, pred, VOID_PRED_SEGMENTS, void_id=99))


def test_pq_crowd_rule_hand_computed():
    """Gt 1 is a person crowd (px 0-5), gt 2 a person (px 6-7). Pred 10 (person) inside the crowd:
    never matched, ignored (not FP). Pred 11 (car) on the person crowd: a FP (the crowd of another
    category does not excuse it). Pred 12 = gt 2: TP. The crowd is not a FN.
    person PQ 1, car PQ 0; no stuff appears: Stuff NaN with n = 0."""
    result = _pq([[1, 1, 1, 1, 1, 1, 2, 2]], _segments((1, 1, 1), (2, 1, 0)),
                 [[10, 10, 10, 10, 11, 11, 12, 12]], _segments((10, 1, 0), (11, 2, 0), (12, 1, 0)))
    person, car = result["per_category"][1], result["per_category"][2]
    assert (person["tp"], person["fp"], person["fn"]) == (1, 0, 0) and person["pq"] == 1
    assert (car["tp"], car["fp"], car["fn"]) == (0, 1, 0)
    assert result["Things"]["pq"] == 0.5 and result["All"]["pq"] == 0.5
    assert result["Stuff"]["n"] == 0 and np.isnan(result["Stuff"]["pq"])

    # a prediction equal to a crowd region is still ignored, never a TP
    result = _pq([[1, 1, 0, 0]], _segments((1, 1, 1)), [[5, 5, 0, 0]], _segments((5, 1, 0)))
    assert result["All"]["n"] == 0

    # panopticapi keeps ONE crowd region per category, the last listed: a person prediction on the
    # first of two person crowds is a FP, on the second it is ignored
    gt, gt_segments = [[1, 1, 2, 2]], _segments((1, 1, 1), (2, 1, 1))
    assert _pq(gt, gt_segments, [[7, 7, 0, 0]], _segments((7, 1, 0)))["per_category"][1]["fp"] == 1
    assert _pq(gt, gt_segments, [[0, 0, 7, 7]], _segments((7, 1, 0)))["per_category"][1]["fp"] == 0


def test_pq_input_checks():
    with pytest.raises(KeyError):  # id in the map, not in segments_info
        _pq([[1, 1]], _segments((1, 1, 0)), [[5, 6]], _segments((5, 1, 0)))
    with pytest.raises(KeyError):  # listed prediction with no pixel
        _pq([[1, 1]], _segments((1, 1, 0)), [[5, 5]], _segments((5, 1, 0), (6, 1, 0)))
    with pytest.raises(KeyError):  # unknown predicted category
        _pq([[1, 1]], _segments((1, 1, 0)), [[5, 5]], _segments((5, 9, 0)))


def _panopticapi_loop(gt, gt_segments, pred, pred_segments, stats):
    """panopticapi `pq_compute_single_core`'s per-image rules as plain Python loops over a dict of
    pairwise intersections (the independent oracle for random cases with VOID and crowd)."""
    gt_info = {s["id"]: s for s in gt_segments}
    pred_info = {s["id"]: s for s in pred_segments}
    pairs = {}
    for g, p in zip(np.ravel(gt).tolist(), np.ravel(pred).tolist()):
        pairs[(g, p)] = pairs.get((g, p), 0) + 1
    gt_area = {g: sum(n for (a, _), n in pairs.items() if a == g) for g in gt_info}
    pred_area = {p: sum(n for (_, b), n in pairs.items() if b == p) for p in pred_info}
    gt_hit, pred_hit = set(), set()
    for (g, p), inter in pairs.items():
        if g not in gt_info or p not in pred_info or gt_info[g]["iscrowd"]:
            continue
        if gt_info[g]["category_id"] != pred_info[p]["category_id"]:
            continue
        iou = inter / (pred_area[p] + gt_area[g] - inter - pairs.get((0, p), 0))
        if iou > 0.5:
            cat = stats[gt_info[g]["category_id"]]
            cat["tp"], cat["iou"] = cat["tp"] + 1, cat["iou"] + iou
            gt_hit.add(g)
            pred_hit.add(p)
    crowd = {}
    for g, info in gt_info.items():
        if g in gt_hit:
            continue
        if info["iscrowd"]:
            crowd[info["category_id"]] = g
        else:
            stats[info["category_id"]]["fn"] += 1
    for p, info in pred_info.items():
        if p in pred_hit:
            continue
        ignored = pairs.get((0, p), 0)
        if info["category_id"] in crowd:
            ignored += pairs.get((crowd[info["category_id"]], p), 0)
        if ignored / pred_area[p] <= 0.5:
            stats[info["category_id"]]["fp"] += 1


def _random_panoptic(rng, shape, categories, things, void_fraction=0.0, crowd_fraction=0.0, blocks=4):
    """A random panoptic map from blocks x blocks tiles: (ids, segments_info, (category, instance)).
    A stuff category is one segment per image, a thing has up to 3 instances."""
    tiles = rng.integers(0, len(categories), size=(shape[0] // blocks, shape[1] // blocks))
    instance_tiles = rng.integers(1, 4, size=tiles.shape)
    category = np.kron(np.array(categories)[tiles], np.ones((blocks, blocks), int))
    instance = np.kron(instance_tiles, np.ones((blocks, blocks), int)) * np.isin(category, things)
    noisy = rng.random(shape) < 0.1  # pixel noise so that IoUs are not all 0 or 1
    category = np.where(noisy, np.array(categories)[rng.integers(0, len(categories), shape)], category)
    instance = np.where(np.isin(category, things), np.maximum(instance, 1), 0)
    ids = category * 16 + instance + 1
    ids[rng.random(shape) < void_fraction] = 0
    segments = []
    for segment_id in np.unique(ids[ids > 0]):
        cat = int((segment_id - 1) // 16)
        segments.append({"id": int(segment_id), "category_id": cat, "iscrowd": int(rng.random() < crowd_fraction)})
    return ids, segments, np.stack([category, instance], axis=-1)


def _perturbed(rng, ids, category_instance, categories, things, fraction):
    """Copy of a panoptic map with some 4x4 tiles changed to random segments."""
    ids = ids.copy()
    category_instance = category_instance.copy()
    h, w = ids.shape
    for _ in range(int(fraction * (h // 4) * (w // 4))):
        r, c = rng.integers(0, h // 4) * 4, rng.integers(0, w // 4) * 4
        cat = int(rng.choice(categories))
        inst = int(rng.integers(1, 4)) if cat in things else 0
        category_instance[r:r + 4, c:c + 4] = (cat, inst)
        ids[r:r + 4, c:c + 4] = cat * 16 + inst + 1
    return ids, category_instance


def _segments_of(ids):
    return [{"id": int(i), "category_id": int((i - 1) // 16), "iscrowd": 0} for i in np.unique(ids[ids > 0])]


def test_pq_matches_torchmetrics_without_void_or_crowd():
    """Oracle: torchmetrics PanopticQuality on (category, instance) maps; without VOID or crowd its
    rules coincide with panopticapi's. 5 random 32x32 images, things {1, 2}, stuff {3, 4} (rtol 1e-6)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    detection = pytest.importorskip("torchmetrics.detection")
    categories, things, stuff = [1, 2, 3, 4], [1, 2], [3, 4]
    rng = np.random.default_rng(1)
    oracle = detection.PanopticQuality(things=set(things), stuffs=set(stuff), return_sq_and_rq=True)
    oracle_per_class = detection.PanopticQuality(things=set(things), stuffs=set(stuff), return_per_class=True)
    evaluator = PanopticEvaluator({c: c in things for c in categories})
    for _ in range(5):
        gt_ids, gt_segments, gt_pairs = _random_panoptic(rng, (32, 32), categories, things)
        pred_ids, pred_pairs = _perturbed(rng, gt_ids, gt_pairs, categories, things, fraction=0.3)
        pred_ids = np.where(rng.random(pred_ids.shape) < 0.05, gt_ids[::-1], pred_ids)  # more noise
        pred_pairs = np.stack([(pred_ids - 1) // 16, (pred_ids - 1) % 16], axis=-1)
        evaluator.update(gt_ids, gt_segments, pred_ids, _segments_of(pred_ids))
        for metric in (oracle, oracle_per_class):
            metric.update(torch.from_numpy(pred_pairs)[None], torch.from_numpy(gt_pairs)[None])
    result = evaluator.compute()
    pq, sq, rq = oracle.compute().tolist()
    assert (result["All"]["pq"], result["All"]["sq"], result["All"]["rq"]) == pytest.approx((pq, sq, rq), rel=1e-6)
    per_class = oracle_per_class.compute().reshape(-1).numpy()  # things sorted, then stuff sorted
    ours = [result["per_category"][c]["pq"] for c in sorted(things) + sorted(stuff)]
    np.testing.assert_allclose(ours, per_class, rtol=1e-6)
    assert 0.1 < result["All"]["pq"] < 0.95  # a non-trivial case: some matches, some misses


def test_pq_matches_panopticapi_loops_with_void_and_crowd():
    """Oracle: `_panopticapi_loop` (panopticapi's rules as loops) on 6 random images with VOID
    pixels and crowd segments; TP/FP/FN exact, IoU sums to 1e-12."""
    categories, things = [1, 2, 3, 4], [1, 2]
    rng = np.random.default_rng(2)
    stats = {c: {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0} for c in categories}
    evaluator = PanopticEvaluator({c: c in things for c in categories})
    for _ in range(6):
        gt_ids, gt_segments, gt_pairs = _random_panoptic(rng, (24, 28), categories, things, 0.1, 0.25)
        pred_ids, _ = _perturbed(rng, gt_ids, gt_pairs, categories, things, fraction=0.3)
        pred_ids[rng.random(pred_ids.shape) < 0.05] = 0
        pred_segments = _segments_of(pred_ids)
        evaluator.update(gt_ids, gt_segments, pred_ids, pred_segments)
        _panopticapi_loop(gt_ids, gt_segments, pred_ids, pred_segments, stats)
    result = evaluator.compute()["per_category"]
    for c in categories:
        assert (result[c]["tp"], result[c]["fp"], result[c]["fn"]) == (stats[c]["tp"], stats[c]["fp"], stats[c]["fn"])
        denominator = stats[c]["tp"] + 0.5 * (stats[c]["fp"] + stats[c]["fn"])
        assert result[c]["pq"] == pytest.approx(stats[c]["iou"] / denominator, abs=1e-12)
    assert sum(stats[c]["tp"] for c in categories) > 0 and sum(stats[c]["fp"] for c in categories) > 0


def test_coco_panoptic_png_json_round_trip(tmp_path):
    """Write, then read back with PIL alone: R + 256 G + 256^2 B encodes the ids, `area` and
    `bbox` ([x, y, w, h], inclusive extents) are hand-computed; pq_compute on the files reproduces
    the hand-computed VOID case."""
    big_id = 3 * 65536 + 2 * 256 + 7  # uses all three channels
    segmentation = np.zeros((5, 6), np.int64)
    segmentation[1:3, 2:5] = big_id
    segmentation[4, :] = 300
    annotations = [{"image_id": 42, "segmentation": segmentation,
                    "segments_info": [{"id": big_id, "category_id": 1}, {"id": 300, "category_id": 3, "iscrowd": 1}]}]
    write_coco_panoptic(tmp_path / "gt.json", tmp_path / "gt", annotations, CATEGORIES)

    rgb = np.asarray(Image.open(tmp_path / "gt" / "42.png"))
    assert rgb.dtype == np.uint8 and tuple(rgb[1, 2]) == (7, 2, 3) and tuple(rgb[4, 0]) == (44, 1, 0)
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    data = json.loads((tmp_path / "gt.json").read_text())
    assert data["categories"] == CATEGORIES
    (written,) = data["annotations"]
    assert written["file_name"] == "42.png" and written["image_id"] == 42
    assert written["segments_info"] == [
        {"id": big_id, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [2, 1, 3, 2]},
        {"id": 300, "category_id": 3, "iscrowd": 1, "area": 6, "bbox": [0, 4, 6, 1]},
    ]
    loaded, categories = read_coco_panoptic(tmp_path / "gt.json", tmp_path / "gt")
    assert categories == CATEGORIES and len(loaded) == 1
    np.testing.assert_array_equal(loaded[0]["segmentation"], segmentation)
    np.testing.assert_array_equal(rgb2id(id2rgb(segmentation)), segmentation)

    for name, ids, segments in (("gt", VOID_GT, VOID_GT_SEGMENTS), ("pred", VOID_PRED, VOID_PRED_SEGMENTS)):
        write_coco_panoptic(tmp_path / f"{name}.json", tmp_path / name,
                            [{"image_id": 7, "segmentation": np.array(ids), "segments_info": segments}], CATEGORIES)
    _check_void_case(pq_compute(tmp_path / "gt.json", tmp_path / "pred.json", tmp_path / "gt", tmp_path / "pred"))


def test_panoptic_from_post_processing():
    ids, segments = panoptic_from_post_processing(
        {"segmentation": np.array([[1, 2], [0, 2]], np.int32),
         "segments_info": [{"id": 1, "label_id": 0, "was_fused": False, "score": 0.9},
                           {"id": 2, "label_id": 2, "was_fused": True, "score": 0.8}]},
        label_id_to_category_id=[1, 2, 3])
    np.testing.assert_array_equal(ids, [[1, 2], [0, 2]])
    assert segments == _segments((1, 1, 0), (2, 3, 0))
    ids, segments = panoptic_from_post_processing({"segmentation": np.full((2, 2), -1.0), "segments_info": []})
    assert (ids == 0).all() and segments == []


# ----------------------------------------------------------------------------------------------
# Mask AP
# ----------------------------------------------------------------------------------------------


def _square(shape, top, left, size):
    mask = np.zeros(shape, np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


def _instance_ground_truth():
    """Image 1 (128x128): two persons (cat 1), 20x20 (small, 400 px) and 40x40 (medium);
    image 2: one car (cat 2), 100x100 (large, 10000 px)."""
    shape = (128, 128)
    images = [
        {"id": 1, "masks": np.stack([_square(shape, 5, 5, 20), _square(shape, 60, 60, 40)]), "category_ids": [1, 1]},
        {"id": 2, "masks": _square(shape, 10, 20, 100)[None], "category_ids": [2]},
    ]
    return coco_instance_ground_truth(images, [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]), images


def test_mask_ap_perfect_predictions_score_one():
    """Every number is 1 except AR1: one detection per image and category finds 1 of the 2 persons
    of image 1, so AR1 = (1/2 + 1) / 2."""
    gt, images = _instance_ground_truth()
    predictions = {
        image["id"]: {"masks": image["masks"], "scores": np.linspace(0.9, 0.5, len(image["masks"])),
                      "category_ids": image["category_ids"]}
        for image in images
    }
    result = evaluate_instances(gt, predictions)
    assert list(result)[:12] == list(COCO_METRIC_NAMES)
    for name in COCO_METRIC_NAMES:
        assert result[name] == pytest.approx(0.75 if name == "AR1" else 1.0), name
    assert result["per_category"] == {1: pytest.approx(1.0), 2: pytest.approx(1.0)}


def test_mask_ap_one_missed_instance_hand_computed():
    """The 40x40 person is not predicted: person recall stops at 0.5 with precision 1, so 51 of the
    101 recall points have precision 1: AP_person = 51/101; car AP 1. AR100 = (0.5 + 1) / 2;
    APm (only the missed person is medium) = 0; APs = APl = 1."""
    gt, images = _instance_ground_truth()
    predictions = {1: [{"segmentation": images[0]["masks"][0], "score": 0.7, "category_id": 1}],
                   2: [{"mask": images[1]["masks"][0], "score": 0.6, "category_id": 2}]}
    result = evaluate_instances(gt, predictions)
    assert result["AP"] == pytest.approx((51 / 101 + 1) / 2)
    assert result["per_category"][1] == pytest.approx(51 / 101)
    assert result["AR100"] == pytest.approx(0.75)
    assert result["APm"] == 0 and result["APs"] == pytest.approx(1) and result["APl"] == pytest.approx(1)


def test_mask_ap_wrong_category_hand_computed():
    """The small person is predicted as a car with score 0.9, the car correctly with 0.8 and the
    40x40 person correctly with 0.5. car: FP then TP -> precision 1/2 at every recall: AP 0.5;
    person: recall 0.5 (51/101). AP = (51/101 + 0.5) / 2."""
    gt, images = _instance_ground_truth()
    masks = images[0]["masks"]
    predictions = {1: {"masks": masks, "scores": [0.9, 0.5], "category_ids": [2, 1]},
                   2: {"masks": images[1]["masks"], "scores": [0.8], "category_ids": [2]}}
    result = evaluate_instances(gt, predictions)
    assert result["per_category"] == {1: pytest.approx(51 / 101), 2: pytest.approx(0.5)}
    assert result["AP"] == pytest.approx((51 / 101 + 0.5) / 2)


def _random_instances(rng, shape, count):
    masks = np.zeros((count,) + shape, np.uint8)
    for k in range(count):
        top, left = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        masks[k, top:top + rng.integers(4, 40), left:left + rng.integers(4, 40)] = 1
    return masks


def test_mask_ap_matches_direct_pycocotools_and_input_forms_agree(tmp_path):
    """Oracle: COCOeval(iouType="segm") run directly on results encoded with
    pycocotools.mask.encode (no bbox) on 3 random images; binary masks, RLE with bytes counts, RLE
    with str counts (JSON) and uncompressed RLE give the same 12 numbers; a GT file = the GT dict."""
    rng = np.random.default_rng(3)
    shape = (60, 70)
    images = [{"id": i, "masks": _random_instances(rng, shape, 4), "category_ids": rng.integers(1, 4, 4)}
              for i in (3, 5, 8)]
    gt = coco_instance_ground_truth(images, [1, 2, 3])
    predictions = {}
    for image in images:
        masks = np.concatenate([image["masks"], _random_instances(rng, shape, 3)])
        jitter = np.roll(masks, shift=(rng.integers(-2, 3), rng.integers(-2, 3)), axis=(1, 2))
        predictions[image["id"]] = {"masks": jitter, "scores": rng.random(len(masks)),
                                    "category_ids": np.concatenate([image["category_ids"], rng.integers(1, 4, 3)])}

    direct_results = []
    for image_id, p in predictions.items():
        for mask, score, category in zip(p["masks"], p["scores"], p["category_ids"]):
            rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
            direct_results.append({"image_id": image_id, "category_id": int(category), "segmentation": rle,
                                   "score": float(score)})
    coco_gt = COCO()
    coco_gt.dataset = json.loads(json.dumps(gt))
    coco_gt.createIndex()
    coco_eval = COCOeval(coco_gt, coco_gt.loadRes(direct_results), iouType="segm")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    expected = dict(zip(COCO_METRIC_NAMES, coco_eval.stats))

    def rle_list(to_counts):
        out = {}
        for image_id, p in predictions.items():
            out[image_id] = []
            for mask, score, category in zip(p["masks"], p["scores"], p["category_ids"]):
                rle = mask_utils.encode(np.asfortranarray(mask[:, :, None]))[0]
                out[image_id].append({"segmentation": {"size": rle["size"], "counts": to_counts(rle, mask)},
                                      "score": score, "category_id": category})
        return out

    def uncompressed(rle, mask):
        flat = mask.T.reshape(-1)  # column-major runs, zeros first
        change = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
        return ([0] + runs) if flat[0] else runs

    (tmp_path / "gt.json").write_text(json.dumps(gt))
    forms = {
        "binary": (gt, predictions),
        "rle_bytes": (gt, rle_list(lambda rle, mask: rle["counts"])),
        "rle_str_gt_file": (tmp_path / "gt.json", rle_list(lambda rle, mask: rle["counts"].decode())),
        "rle_uncompressed": (gt, rle_list(uncompressed)),
    }
    for form, (ground_truth, preds) in forms.items():
        result = evaluate_instances(ground_truth, preds)
        for name in COCO_METRIC_NAMES:
            want = expected[name] if expected[name] >= 0 else float("nan")
            np.testing.assert_allclose(result[name], want, atol=1e-12, err_msg=f"{form} {name}")
    assert 0.05 < expected["AP"] < 0.95


def test_mask_ap_keeps_top_100_per_image_across_categories():
    """100 car false positives scored above a perfect person prediction push it out of the image's
    top 100 (pycocotools alone keeps 100 per category and would find it): person recall 0."""
    gt, images = _instance_ground_truth()
    shape = (128, 128)
    junk = [{"segmentation": _square(shape, 110, 110, 5), "score": 0.9, "category_id": 2} for _ in range(100)]
    hits = [{"segmentation": m, "score": 0.1, "category_id": 1} for m in images[0]["masks"]]
    evaluator = InstanceEvaluator(gt)
    evaluator.update(1, junk + hits)
    assert len(evaluator.results) == 100
    assert evaluator.compute()["per_category"][1] == 0
    evaluator = InstanceEvaluator(gt, max_detections_per_image=102)
    evaluator.update(1, junk + hits)
    assert evaluator.compute()["per_category"][1] == pytest.approx(1.0)


def test_mask_ap_empty_predictions_and_checks():
    gt, _ = _instance_ground_truth()
    result = InstanceEvaluator(gt).compute()  # pycocotools' loadRes cannot take []
    assert result["AP"] == 0 and result["AR100"] == 0
    evaluator = InstanceEvaluator(gt)
    with pytest.raises(ValueError):  # mask size differs from the image's
        evaluator.update(1, [{"segmentation": np.ones((10, 10)), "score": 1.0, "category_id": 1}])
    with pytest.raises(KeyError):
        evaluator.update(99, [])


def test_instances_from_post_processing():
    masks = np.stack([_square((8, 8), 0, 0, 3), _square((8, 8), 4, 4, 2)]).astype(np.float32)
    info = [{"id": 0, "label_id": 0, "was_fused": False, "score": 0.8},
            {"id": 1, "label_id": 1, "was_fused": False, "score": 0.3}]
    from_maps = instances_from_post_processing({"segmentation": masks, "segments_info": info}, {0: 1, 1: 2})
    assert [(p["category_id"], p["score"]) for p in from_maps] == [(1, 0.8), (2, 0.3)]
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8)[:, :, None]))[0] for m in masks]
    from_rle = instances_from_post_processing({"segmentation": rles, "segments_info": info})
    assert [p["category_id"] for p in from_rle] == [0, 1] and from_rle[1]["segmentation"] is rles[1]
    assert instances_from_post_processing({"segmentation": np.full((8, 8), -1.0), "segments_info": []}) == []
