"""Tests for m2f_jax.processing.post_processing (with its mask_resize and post_kernels) and
m2f_jax.processing.rle.

Oracle: transformers 5.24 ``Mask2FormerImageProcessorPil.post_process_*`` on the same logits
(wrapped as torch tensors), pycocotools for COCO RLE, and transformers' RLE helpers. For
`intermediate_size` the oracle is transformers with its hard-coded (384, 384) resize swapped for
the requested size; for fractional `valid_sizes` it is torch `F.interpolate` with an explicit
`scale_factor`. Tolerances: float scores atol 1e-5; label / id maps and binary masks identical
(a semantic pixel may differ only where the oracle's top two class scores are within 1e-5).

Two kinds of logits: random (scores spread out: the dense code paths) and "model-like" (a few
confident object queries whose masks tile the image, the rest null-class queries: the paths that
prune queries and classes). The deliberate differences from transformers are tested explicitly.
"""
import contextlib
import logging
import math
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pycocotools.mask as coco_mask
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch
import torch.nn.functional as F
from transformers import Mask2FormerImageProcessorPil
from transformers.models.mask2former import image_processing_pil_mask2former as hf_module

from m2f_jax.processing import mask_resize, post_kernels
from m2f_jax.processing import post_processing as pp
from m2f_jax.processing.rle import binary_mask_to_rle, convert_segmentation_to_rle, mask_to_coco_rle

logging.getLogger("transformers").setLevel(logging.ERROR)
# pycocotools 2.x calls np.array(copy=False) on its own objects under NumPy 2
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn.t accept a copy keyword")
HF = Mask2FormerImageProcessorPil()
ATOL = 1e-5
# output sizes used throughout: both round up to the same 64x96 kernel bucket, so the jitted
# kernels compile once for the whole file (compiles dominate its run time)
TARGETS = [(50, 70), (60, 90)]


# ----------------------------------------------------------------------------------------------
# Inputs and comparison helpers
# ----------------------------------------------------------------------------------------------


def random_logits(seed, batch=2, queries=10, classes=6, size=(24, 24), scale=3.0):
    rng = np.random.default_rng(seed)
    class_logits = (rng.normal(size=(batch, queries, classes + 1)) * scale).astype(np.float32)
    mask_logits = (rng.normal(size=(batch, queries) + tuple(size)) * scale).astype(np.float32)
    return class_logits, mask_logits


def model_like_logits(seed, object_labels, queries=12, classes=20, size=(24, 24), class_boost=7.0):
    """Object query j (j < len(labels)) predicts object_labels[i][j] confidently and its mask is
    positive on its Voronoi cell among the objects; the other queries predict the null class with
    random disk masks. `object_labels` holds one list per image (same length)."""
    rng = np.random.default_rng(seed)
    batch, num_objects = len(object_labels), len(object_labels[0])
    height, width = size
    class_logits = rng.normal(size=(batch, queries, classes + 1)).astype(np.float32)
    mask_logits = np.zeros((batch, queries, height, width), np.float32)
    rows, cols = np.mgrid[0:height, 0:width]
    for image in range(batch):
        centers = rng.uniform(0, 1, size=(queries, 2)) * (height, width)
        distance = np.hypot(rows - centers[:, :1, None], cols - centers[:, 1:, None])  # (Q, h, w)
        objects = distance[:num_objects]
        nearest_two = np.sort(objects, axis=0)[:2]
        for query in range(queries):
            if query < num_objects:
                class_logits[image, query, object_labels[image][query]] += class_boost + rng.uniform(0, 2)
                other = np.where(objects[query] == nearest_two[0], nearest_two[1], nearest_two[0])
                logits = np.clip(3.0 * (other - objects[query]), -12, 12)
            else:
                class_logits[image, query, classes] += 9.0 + rng.uniform(0, 2)
                radius = rng.uniform(2, 8)
                logits = 4.0 * (radius - distance[query]) / radius
            mask_logits[image, query] = logits + rng.normal(scale=0.3, size=size)
    return class_logits, mask_logits


def hf_outputs(class_logits, mask_logits):
    return SimpleNamespace(
        class_queries_logits=torch.from_numpy(np.ascontiguousarray(class_logits)),
        masks_queries_logits=torch.from_numpy(np.ascontiguousarray(mask_logits)),
    )


def our_outputs(class_logits, mask_logits):
    return {"class_queries_logits": class_logits, "masks_queries_logits": mask_logits}


@contextlib.contextmanager
def hf_intermediate_size(size):
    """transformers with its hard-coded 384x384 resize replaced by `size` (None: no resize)."""
    original = torch.nn.functional.interpolate

    def interpolate(input, size=None, **kwargs):  # noqa: A002 (torch's argument name)
        if size == (384, 384):
            if requested is None:
                return input
            size = requested
        return original(input, size=size, **kwargs)

    requested = size
    torch.nn.functional.interpolate = interpolate
    try:
        yield
    finally:
        torch.nn.functional.interpolate = original


def assert_semantic_equal(ours, theirs_scores):
    """Identical class maps, except where the oracle's best two scores tie within 1e-5."""
    theirs_scores = np.asarray(theirs_scores)
    theirs = theirs_scores.argmax(axis=0)
    assert ours.shape == theirs.shape and ours.dtype == np.int64
    mismatch = ours != theirs
    if mismatch.any():
        top_two = np.sort(theirs_scores[:, mismatch], axis=0)[-2:]
        assert np.all(top_two[1] - top_two[0] < ATOL), "a class differs away from a near-tie"
        assert mismatch.mean() < 1e-3


def match_instances(ours_info, theirs_info):
    """Pair our instances with transformers' (same label, score within 1e-5); order-independent."""
    assert len(ours_info) == len(theirs_info)
    unused = list(range(len(ours_info)))
    pairs = []
    for j, theirs in enumerate(theirs_info):
        candidates = [
            i
            for i in unused
            if ours_info[i]["label_id"] == theirs["label_id"] and abs(ours_info[i]["score"] - theirs["score"]) <= ATOL
        ]
        assert candidates, f"no match for {theirs}"
        pairs.append((candidates[0], j))
        unused.remove(candidates[0])
    return pairs


def assert_panoptic_equal(ours, theirs):
    assert ours["segments_info"] == [
        {**info, "score": pytest.approx(info["score"], abs=ATOL)} for info in theirs["segments_info"]
    ]
    theirs_map = theirs["segmentation"].numpy()
    assert ours["segmentation"].dtype == theirs_map.dtype
    np.testing.assert_array_equal(ours["segmentation"], theirs_map)


# ----------------------------------------------------------------------------------------------
# Semantic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_sizes", [None, TARGETS])
def test_semantic_random_logits_matches_transformers(target_sizes):
    class_logits, mask_logits = random_logits(0)
    theirs = HF.post_process_semantic_segmentation(
        hf_outputs(class_logits, mask_logits), target_sizes=target_sizes, return_segmentation_scores=True
    )
    ours = pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits), target_sizes=target_sizes)
    for our_map, their in zip(ours, theirs):
        assert_semantic_equal(our_map, their.segmentation_scores)


def test_semantic_scores_match_transformers_atol_1e5():
    class_logits, mask_logits = random_logits(1)
    target_sizes = TARGETS
    theirs = HF.post_process_semantic_segmentation(
        hf_outputs(class_logits, mask_logits), target_sizes=target_sizes, return_segmentation_scores=True
    )
    ours = pp.post_process_semantic_segmentation(
        our_outputs(class_logits, mask_logits), target_sizes=target_sizes, return_segmentation_scores=True
    )
    for our, their in zip(ours, theirs):
        assert isinstance(our, pp.SemanticSegmentationOutput)
        np.testing.assert_allclose(our.segmentation_scores, their.segmentation_scores.numpy(), atol=ATOL, rtol=0)
        assert our["segmentation_scores"].dtype == np.float32
        assert_semantic_equal(our.segmentation, their.segmentation_scores)


@pytest.mark.parametrize("target_sizes", [None, TARGETS, [(300, 500), (17, 9)]])
def test_semantic_pruned_path_matches_transformers(target_sizes, monkeypatch):
    """Model-like logits take the two-phase argmax (bounds, then exact scores where undecided)."""
    class_logits, mask_logits = model_like_logits(2, [[0, 3, 5, 7, 11], [1, 1, 2, 19, 4]])
    dense_calls = []
    original_dense = post_kernels._semantic_dense
    monkeypatch.setattr(post_kernels, "_semantic_dense", lambda *a: dense_calls.append(1) or original_dense(*a))
    theirs = HF.post_process_semantic_segmentation(
        hf_outputs(class_logits, mask_logits), target_sizes=target_sizes, return_segmentation_scores=True
    )
    ours = pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits), target_sizes=target_sizes)
    assert not dense_calls, "expected the two-phase path"
    for our_map, their in zip(ours, theirs):
        assert_semantic_equal(our_map, their.segmentation_scores)


def test_semantic_pruned_path_falls_back_when_bounds_are_loose(monkeypatch):
    """With every query counted as slack, phase 1 decides nothing: the dense path must run."""
    class_logits, mask_logits = model_like_logits(3, [[0, 3, 5], [2, 4, 6]])
    monkeypatch.setattr(post_kernels, "_SIGNIFICANT_QUERY_WEIGHT", 0.999)  # nearly no significant query
    ours = pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits), target_sizes=TARGETS)
    theirs = HF.post_process_semantic_segmentation(
        hf_outputs(class_logits, mask_logits), target_sizes=TARGETS, return_segmentation_scores=True
    )
    for our_map, their in zip(ours, theirs):
        assert_semantic_equal(our_map, their.segmentation_scores)


# ----------------------------------------------------------------------------------------------
# Instance
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold, target_sizes", [(0.1, TARGETS), (0.4, None), (0.3, [(300, 500), (17, 9)])])
def test_instance_binary_maps_match_transformers(threshold, target_sizes):
    """Random logits: masks overlap, so compare the per-instance binary maps, order-independently."""
    class_logits, mask_logits = random_logits(4)
    kwargs = dict(threshold=threshold, target_sizes=target_sizes, return_binary_maps=True)
    theirs = HF.post_process_instance_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)
    ours = pp.post_process_instance_segmentation(our_outputs(class_logits, mask_logits), **kwargs)
    for our, their in zip(ours, theirs):
        assert their["segments_info"], "test needs detections"
        for i, j in match_instances(our["segments_info"], their["segments_info"]):
            np.testing.assert_array_equal(our["segmentation"][i], their["segmentation"][j].numpy())
        assert our["segmentation"].dtype == np.float32
        assert [info["id"] for info in our["segments_info"]] == list(range(len(our["segments_info"])))
        assert all(info["was_fused"] is False for info in our["segments_info"])


@pytest.mark.parametrize("target_sizes", [None, TARGETS])
def test_instance_map_matches_transformers_up_to_renaming(target_sizes):
    """Model-like logits: instances barely overlap, so the id maps agree up to renaming the ids,
    except on overlaps, whose winner depends on the visiting order (ours must be one of them)."""
    class_logits, mask_logits = model_like_logits(5, [[0, 3, 5, 7], [1, 2, 2, 9]])
    kwargs = dict(threshold=0.5, target_sizes=target_sizes)
    theirs = HF.post_process_instance_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)
    their_masks = HF.post_process_instance_segmentation(
        hf_outputs(class_logits, mask_logits), return_binary_maps=True, **kwargs
    )
    ours = pp.post_process_instance_segmentation(our_outputs(class_logits, mask_logits), **kwargs)
    for i, (our, their, masks) in enumerate(zip(ours, theirs, their_masks)):
        assert len(their["segments_info"]) >= 3
        pairs = match_instances(our["segments_info"], their["segments_info"])
        our_to_their = {our["segments_info"][i]["id"]: their["segments_info"][j]["id"] for i, j in pairs}
        renamed = np.vectorize(lambda v: our_to_their.get(int(v), -1), otypes=[np.float32])(our["segmentation"])
        covering = masks["segmentation"].numpy().astype(bool)  # (N, H, W), N in transformers' id order
        single = covering.sum(axis=0) <= 1
        assert single.mean() > 0.9
        np.testing.assert_array_equal(renamed[single], their["segmentation"].numpy()[single])
        for y, x in zip(*np.nonzero(~single)):
            assert covering[int(renamed[y, x]), y, x]
        assert our["segmentation"].dtype == np.float32
        assert our["segmentation"].shape == (target_sizes[i] if target_sizes else (384, 384))


def test_instance_coco_rle_is_pycocotools_rle_of_each_instance():
    class_logits, mask_logits = random_logits(6)
    target_sizes = TARGETS
    masks = pp.post_process_instance_segmentation(
        our_outputs(class_logits, mask_logits), threshold=0.2, target_sizes=target_sizes, return_binary_maps=True
    )
    rles = pp.post_process_instance_segmentation(
        our_outputs(class_logits, mask_logits), threshold=0.2, target_sizes=target_sizes, return_coco_annotation=True
    )
    for with_masks, with_rles, size in zip(masks, rles, target_sizes):
        assert with_rles["segments_info"] == with_masks["segments_info"]
        assert len(with_rles["segmentation"]) == len(with_rles["segments_info"]) > 0
        for rle, mask in zip(with_rles["segmentation"], with_masks["segmentation"]):
            assert rle["size"] == list(size)
            np.testing.assert_array_equal(coco_mask.decode(rle), mask.astype(np.uint8))
            assert rle == coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_instance_no_detection_and_flags():
    class_logits, mask_logits = random_logits(7)
    outputs = our_outputs(class_logits, mask_logits)
    for kwargs in ({}, {"return_binary_maps": True}):  # transformers returns the -1 map in both cases
        ours = pp.post_process_instance_segmentation(outputs, threshold=1.5, target_sizes=TARGETS, **kwargs)
        theirs = HF.post_process_instance_segmentation(
            hf_outputs(class_logits, mask_logits), threshold=1.5, target_sizes=TARGETS, **kwargs
        )
        for our, their in zip(ours, theirs):
            assert our["segments_info"] == their["segments_info"] == []
            np.testing.assert_array_equal(our["segmentation"], their["segmentation"].numpy())
            assert our["segmentation"].dtype == np.float32
    assert pp.post_process_instance_segmentation(outputs, threshold=1.5, return_coco_annotation=True)[0] == {
        "segmentation": [],
        "segments_info": [],
    }
    with pytest.raises(ValueError, match="both"):
        pp.post_process_instance_segmentation(outputs, return_coco_annotation=True, return_binary_maps=True)


# ----------------------------------------------------------------------------------------------
# Panoptic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold, mask_threshold, overlap, target_sizes",
    [
        (0.5, 0.5, 0.8, None),
        (0.8, 0.5, 0.8, TARGETS),
        (0.3, 0.3, 0.5, TARGETS),
        (0.5, 0.7, 0.95, [(300, 500), (17, 9)]),
    ],
)
def test_panoptic_matches_transformers(threshold, mask_threshold, overlap, target_sizes):
    class_logits, mask_logits = model_like_logits(8, [[0, 3, 5, 7, 11, 2], [1, 2, 9, 4, 4, 6]])
    kwargs = dict(
        threshold=threshold,
        mask_threshold=mask_threshold,
        overlap_mask_area_threshold=overlap,
        target_sizes=target_sizes,
        label_ids_to_fuse={5, 9},  # each fused label appears once: no id collision in transformers
    )
    theirs = HF.post_process_panoptic_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)
    ours = pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), **kwargs)
    for our, their in zip(ours, theirs):
        assert_panoptic_equal(our, their)
    assert any(len(their["segments_info"]) >= 3 for their in theirs)


def test_panoptic_tiled_path_is_taken(monkeypatch):
    """Model-like logits: most output tiles are decided by bounds, the dense resize never runs,
    and the result is transformers'. (Random logits, next test, take the dense path.)"""
    class_logits, mask_logits = model_like_logits(21, [[0, 3, 5, 7, 11, 2, 9, 4], [1, 2, 9, 4, 6, 8, 10, 12]])
    kwargs = dict(target_sizes=[(300, 500), (300, 500)])
    dense_calls = []
    original_dense = post_kernels._panoptic_dense
    monkeypatch.setattr(post_kernels, "_panoptic_dense", lambda *a: dense_calls.append(1) or original_dense(*a))
    ours = pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), **kwargs)
    assert not dense_calls
    theirs = HF.post_process_panoptic_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)
    for our, their in zip(ours, theirs):
        assert_panoptic_equal(our, their)
        assert len(their["segments_info"]) >= 5


def test_panoptic_random_logits_matches_transformers():
    class_logits, mask_logits = random_logits(9, queries=8, classes=3, scale=4.0)
    kwargs = dict(threshold=0.3, overlap_mask_area_threshold=0.3, target_sizes=TARGETS)
    theirs = HF.post_process_panoptic_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)
    ours = pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), **kwargs)
    for our, their in zip(ours, theirs):
        assert_panoptic_equal(our, their)
    assert sum(len(their["segments_info"]) for their in theirs) >= 2


@pytest.mark.parametrize("target_sizes", [None, TARGETS])
def test_panoptic_no_detection_is_float_minus_one_like_transformers(target_sizes):
    class_logits, mask_logits = model_like_logits(10, [[1, 2], [3, 4]])
    theirs = HF.post_process_panoptic_segmentation(
        hf_outputs(class_logits, mask_logits), threshold=0.9999, target_sizes=target_sizes
    )
    ours = pp.post_process_panoptic_segmentation(
        our_outputs(class_logits, mask_logits), threshold=0.9999, target_sizes=target_sizes
    )
    for our, their in zip(ours, theirs):
        assert our["segments_info"] == their["segments_info"] == []
        assert our["segmentation"].dtype == np.float32
        np.testing.assert_array_equal(our["segmentation"], their["segmentation"].numpy())


def test_panoptic_tied_duplicate_queries_first_wins_like_transformers():
    class_logits, mask_logits = model_like_logits(11, [[0, 1, 2], [3, 4, 5]])
    class_logits[:, 3], mask_logits[:, 3] = class_logits[:, 0], mask_logits[:, 0]  # exact ties with query 0
    theirs = HF.post_process_panoptic_segmentation(hf_outputs(class_logits, mask_logits), target_sizes=TARGETS)
    ours = pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), target_sizes=TARGETS)
    for our, their in zip(ours, theirs):
        assert_panoptic_equal(our, their)


def _fused_case(labels, fuse, seed=12):
    class_logits, mask_logits = model_like_logits(seed, [labels], queries=8)
    kwargs = dict(label_ids_to_fuse=fuse, target_sizes=TARGETS[:1])
    their = HF.post_process_panoptic_segmentation(hf_outputs(class_logits, mask_logits), **kwargs)[0]
    our = pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), **kwargs)[0]
    assert len(their["segments_info"]) == len(labels), "every object query should make a segment"
    return our, their


def test_panoptic_fusing_without_collision_is_identical():
    our, their = _fused_case([3, 1, 2, 0], fuse={3, 0})  # fused labels appear once each
    assert [info["was_fused"] for info in their["segments_info"]] == [True, False, False, True]
    assert_panoptic_equal(our, their)


def test_panoptic_repeated_fused_label_one_entry_with_max_score():
    our, their = _fused_case([0, 0, 1], fuse={0})  # transformers: ids [1, 1, 2], no collision
    assert [info["id"] for info in their["segments_info"]] == [1, 1, 2]
    np.testing.assert_array_equal(our["segmentation"], their["segmentation"].numpy())
    fused_scores = [info["score"] for info in their["segments_info"][:2]]
    assert our["segments_info"] == [
        {"id": 1, "label_id": 0, "was_fused": True, "score": pytest.approx(max(fused_scores), abs=ATOL)},
        {**their["segments_info"][2], "score": pytest.approx(their["segments_info"][2]["score"], abs=ATOL)},
    ]


def test_panoptic_ids_unique_where_transformers_collides():
    """Labels [0 (fused), 1, 0, 2]: transformers gives ids [1, 2, 1, 2] (label 2 reuses id 2)."""
    our, their = _fused_case([0, 1, 0, 2], fuse={0})
    assert [info["id"] for info in their["segments_info"]] == [1, 2, 1, 2]
    our_ids = [info["id"] for info in our["segments_info"]]
    assert our_ids == [1, 2, 3] and len(set(our_ids)) == len(our_ids)
    assert [info["label_id"] for info in our["segments_info"]] == [0, 1, 2]
    # every segment has exactly transformers' pixels: our id -> transformers id is a renaming that
    # merges only what transformers merged (our 3 -> its colliding 2)
    their_map, our_map = their["segmentation"].numpy(), our["segmentation"]
    np.testing.assert_array_equal(np.select([our_map == 3], [2], our_map), their_map)
    for segment_id in our_ids:  # the colliding segments (labels 1 and 2) both keep their pixels
        assert np.any(our_map == segment_id)


# ----------------------------------------------------------------------------------------------
# intermediate_size, valid_sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("intermediate_size", [(200, 160), None])
def test_intermediate_size_matches_transformers_with_that_size(intermediate_size):
    class_logits, mask_logits = model_like_logits(13, [[0, 3, 5, 7], [1, 2, 9, 4]])
    target_sizes = TARGETS
    theirs_out, ours_out = hf_outputs(class_logits, mask_logits), our_outputs(class_logits, mask_logits)
    kwargs = dict(target_sizes=target_sizes, intermediate_size=intermediate_size)
    with hf_intermediate_size(intermediate_size):
        their_sem = HF.post_process_semantic_segmentation(
            theirs_out, target_sizes=target_sizes, return_segmentation_scores=True
        )
        their_pan = HF.post_process_panoptic_segmentation(theirs_out, target_sizes=target_sizes)
        their_sem_native = HF.post_process_semantic_segmentation(theirs_out, return_segmentation_scores=True)
    for our, their in zip(pp.post_process_semantic_segmentation(ours_out, **kwargs), their_sem):
        assert_semantic_equal(our, their.segmentation_scores)
    for our, their in zip(pp.post_process_panoptic_segmentation(ours_out, **kwargs), their_pan):
        assert_panoptic_equal(our, their)
    if intermediate_size is None:  # without target sizes the maps stay at the mask size
        native = pp.post_process_semantic_segmentation(ours_out, intermediate_size=None)
        for our, their in zip(native, their_sem_native):
            assert our.shape == mask_logits.shape[2:]
            assert_semantic_equal(our, their.segmentation_scores)


def _pad(mask_logits, canvas, fill_seed=99):
    """Mask logits placed top-left on a larger canvas filled with unrelated logits."""
    rng = np.random.default_rng(fill_seed)
    padded = (rng.normal(size=mask_logits.shape[:2] + canvas) * 5).astype(np.float32)
    padded[..., : mask_logits.shape[2], : mask_logits.shape[3]] = mask_logits
    return padded


def test_valid_sizes_equal_running_on_the_unpadded_logits():
    """Image 0 has 20x24 logits (an 80x96 input), image 1 has 28x16 (112x64); the batch was padded
    to 32x32 logits (a 128x128 input). Cropping each to its valid region must give what each image
    gives alone (oracle: transformers on the unpadded logits)."""
    alone = [model_like_logits(14, [[0, 3, 5]], size=(20, 24)), model_like_logits(15, [[1, 2, 7]], size=(28, 16))]
    class_logits = np.concatenate([c for c, _ in alone])
    batch = our_outputs(class_logits, np.concatenate([_pad(m, (32, 32)) for _, m in alone]))
    kwargs = dict(valid_sizes=[(80, 96), (112, 64)], target_sizes=TARGETS)  # padded_size: 4 x 32
    semantic = pp.post_process_semantic_segmentation(batch, **kwargs)
    panoptic = pp.post_process_panoptic_segmentation(batch, **kwargs)
    instance = pp.post_process_instance_segmentation(batch, return_binary_maps=True, **kwargs)
    for i, (single_class, single_mask) in enumerate(alone):
        single, target = hf_outputs(single_class, single_mask), dict(target_sizes=TARGETS[i : i + 1])
        their_sem = HF.post_process_semantic_segmentation(single, return_segmentation_scores=True, **target)[0]
        assert_semantic_equal(semantic[i], their_sem.segmentation_scores)
        their_pan = HF.post_process_panoptic_segmentation(single, **target)[0]
        assert_panoptic_equal(panoptic[i], their_pan)
        assert their_pan["segments_info"]
        their_ins = HF.post_process_instance_segmentation(single, return_binary_maps=True, **target)[0]
        for j, k in match_instances(instance[i]["segments_info"], their_ins["segments_info"]):
            np.testing.assert_array_equal(instance[i]["segmentation"][j], their_ins["segmentation"][k].numpy())
        # without valid_sizes the padding leaks into the result
        leaked = pp.post_process_semantic_segmentation(batch, target_sizes=TARGETS)[i]
        assert np.any(leaked != their_sem.segmentation.numpy())


def test_fractional_valid_size_resamples_the_exact_region():
    """A valid height of 86 input pixels is 21.5 logit rows: rows 0..21 are read, with the scale
    21.5 / out (oracle: torch F.interpolate with that scale_factor)."""
    class_logits, mask_logits = random_logits(16, batch=1, size=(32, 32))
    valid_h, valid_w, padded = 86, 128, (128, 128)
    extent_h, extent_w = valid_h * 32 / padded[0], valid_w * 32 / padded[1]
    out = (100, 120)
    ours = pp.post_process_semantic_segmentation(
        our_outputs(class_logits, mask_logits),
        return_segmentation_scores=True,
        intermediate_size=out,
        valid_sizes=[(valid_h, valid_w)],
        padded_size=padded,
    )[0]
    crop = torch.from_numpy(mask_logits[..., : math.ceil(extent_h), : math.ceil(extent_w)])
    resized = F.interpolate(
        crop,
        scale_factor=(out[0] / extent_h, out[1] / extent_w),
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )[..., : out[0], : out[1]]
    probs = torch.from_numpy(class_logits).softmax(-1)[..., :-1]
    expected = torch.einsum("bqc,bqhw->bchw", probs, resized.sigmoid())[0].numpy()
    np.testing.assert_allclose(ours.segmentation_scores, expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# Inputs, errors, RLE
# ----------------------------------------------------------------------------------------------


def test_accepts_attributes_dicts_jax_and_torch():
    class_logits, mask_logits = random_logits(17)
    reference = pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits))
    for outputs in (
        hf_outputs(class_logits, mask_logits),
        SimpleNamespace(class_queries_logits=jnp.asarray(class_logits), masks_queries_logits=jnp.asarray(mask_logits)),
    ):
        for ours, expected in zip(pp.post_process_semantic_segmentation(outputs), reference):
            np.testing.assert_array_equal(ours, expected)


def test_bad_inputs_raise_value_error():
    class_logits, mask_logits = random_logits(18)
    with pytest.raises(ValueError, match="batch, num_queries, height, width"):
        pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits[0]))
    with pytest.raises(ValueError, match="num_labels"):
        pp.post_process_panoptic_segmentation(our_outputs(class_logits[0], mask_logits))
    with pytest.raises(ValueError, match="expected 2"):
        pp.post_process_instance_segmentation(our_outputs(class_logits, mask_logits), target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="expected 2"):
        pp.post_process_panoptic_segmentation(our_outputs(class_logits, mask_logits), valid_sizes=[(10, 10)] * 3)
    with pytest.raises(ValueError, match="missing"):
        pp.post_process_semantic_segmentation({"class_queries_logits": class_logits})
    with pytest.raises(ValueError, match="agree"):
        pp.post_process_semantic_segmentation(our_outputs(class_logits[:1], mask_logits))
    with pytest.raises(ValueError, match="exceeds"):
        pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits), valid_sizes=[(200, 10)] * 2)
    with pytest.raises(ValueError, match="positive"):
        pp.post_process_semantic_segmentation(our_outputs(class_logits, mask_logits), target_sizes=[(0, 10)] * 2)


def test_interpolation_matches_torch():
    """Bilinear: same taps and order of operations as PyTorch (results agree to the last bit in
    most cases, within 2 ulp always); nearest: identical source indices."""
    x = torch.from_numpy(np.random.default_rng(19).normal(size=(1, 3, 24, 37)).astype(np.float32) * 4)
    for size in [(96, 96), (480, 640), (17, 50), (24, 37)]:
        expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False).numpy()
        taps = (mask_resize.linear_taps(24, size[0]), mask_resize.linear_taps(37, size[1]))
        np.testing.assert_allclose(np.asarray(mask_resize.resize_hw(x.numpy(), taps)), expected, rtol=3e-7, atol=3e-6)
        nearest = F.interpolate(x, size=size, mode="nearest").numpy()
        rows, cols = mask_resize.nearest_indices(24, size[0]), mask_resize.nearest_indices(37, size[1])
        np.testing.assert_array_equal(x.numpy()[..., rows, :][..., cols], nearest)


def test_rle_helpers_match_transformers_and_pycocotools():
    rng = np.random.default_rng(20)
    mask = np.zeros((20, 50), np.uint8)
    mask[0, 20:] = 1
    mask[1, :15] = 1
    assert binary_mask_to_rle(mask)[:2] == [21, 45]  # transformers' documented example
    for shape, density in [((20, 50), 0.5), ((1, 7), 0.9), ((33, 17), 0.05), ((8, 8), 0.0), ((5, 6), 1.0)]:
        mask = (rng.random(shape) < density).astype(np.uint8)
        assert binary_mask_to_rle(mask) == list(hf_module.binary_mask_to_rle(torch.from_numpy(mask)))
        assert mask_to_coco_rle(mask) == coco_mask.encode(np.asfortranarray(mask))
        np.testing.assert_array_equal(coco_mask.decode(mask_to_coco_rle(mask)), mask)
    segmentation = rng.integers(-1, 4, size=(12, 9)).astype(np.float32)
    theirs = hf_module.convert_segmentation_to_rle(torch.from_numpy(segmentation))
    assert convert_segmentation_to_rle(segmentation) == [list(r) for r in theirs]
    big = np.zeros((480, 640), np.uint8)
    big[100:400, 50:600] = 1  # long runs: multi-group counts in the compressed string
    assert mask_to_coco_rle(big) == coco_mask.encode(np.asfortranarray(big))
