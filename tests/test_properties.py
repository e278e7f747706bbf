"""Property tests (hypothesis): the image processor and the three post-processing functions against
transformers on drawn inputs.

Oracle: transformers 5.24 ``Mask2FormerImageProcessorPil`` (processor and ``post_process_*``), on the
same inputs. Processor draws: 1-2 images of 1 to 2000 pixels a side (portrait, wide, square), 1, 3 or
4 channels, uint8 / uint16 / int64 / float32 / float64 arrays, PIL images and 2-D grey arrays; every
resize form, size_divisor, resample filter, rescale / normalize switches, and segmentation maps with
ignore_index, do_reduce_labels, instance maps and num_labels. Tolerances as tests/test_image_processor.py:
pixel_values atol 1e-5, everything else identical. Post-processing draws: 1-2 images, 1 to 20 queries
and labels, random or model-like logits, targets of 1 to 1024 a side or none, transformers' (384, 384)
intermediate resize or none; maps identical except at pixels where transformers' top two scores, or a score and its
threshold, are within 1e-5 (those pixels are counted and printed). A draw whose outcome turns on a
whole-query decision within 1e-5 (a query's score at its threshold, a segment's area ratio that those
pixels can move across its threshold) is counted and only checked for shape and type.

A draw that meets a deliberate difference (README, "Deliberate differences from transformers")
asserts the documented behaviour instead of transformers' result; each is counted.

Settings: ``derandomize=True`` and no example database (the same draws in every run and in CI).
The strategies build only valid cases and make the same choices in every draw, so none is
rejected (counted: `rejected`); the statistics print with ``-s`` / ``-rA``. Sizes that decide
compiles (query and label counts, mask logit sizes, target size buckets of 32) come from small
pools, so the jitted kernels compile a few times per test rather than once per draw.
"""
import collections
import contextlib
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as coco_mask
import pytest

from tests import TORCH_REASON

pytest.importorskip("torch", reason=TORCH_REASON)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from m2f_jax.processing import post_processing as pp  # noqa: E402
from tests.test_image_processor import assert_matches_hf, run_hf, run_ours  # noqa: E402
from tests.test_post_processing import (  # noqa: E402
    HF,
    hf_intermediate_size,
    hf_outputs,
    model_like_logits,
    our_outputs,
)

ATOL = 1e-5
PROCESSOR_DRAWS = 100
POST_DRAWS = 40


def _settings(max_examples):
    return settings(
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=max_examples,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _report(name, stats, seconds):
    stats["rejected"] = stats["generated"] - stats["draws"]
    print(f"\n{name}: {seconds:.1f} s ({time.process_time():.0f} s CPU so far); " + ", ".join(f"{key}={value}" for key, value in sorted(stats.items())))


def _assert_counts(stats, wanted):
    assert stats["draws"] >= wanted
    assert stats["rejected"] < 0.1 * stats["generated"]


# ----------------------------------------------------------------------------------------------
# Image processor
# ----------------------------------------------------------------------------------------------


@dataclass
class ProcessorCase:
    sizes: list  # (height, width) per image
    channels: int
    kind: str  # uint8, uint16, int64, float32, float64, pil, grey2d
    init: dict
    maps: dict | None  # label values, block size, map type, instance map
    seed: int


_MAX_PIXELS = 250_000


@st.composite
def _image_sizes(draw):
    """(height, width), each 1 to 2000, portrait or wide; the short side is capped so that an image
    has at most ~250k pixels (time)."""
    long_side, other = draw(st.integers(1, 2000)), draw(st.integers(1, 2000))
    short_side = 1 + (other - 1) % min(long_side, _MAX_PIXELS // long_side)  # one choice, any range
    return (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)


# Every draw makes the same choices in the same order, used or not: hypothesis' mutations then
# replay whole draws instead of overrunning them (an overrun draw is an invalid, rejected example).


@st.composite
def processor_cases(draw, stats):
    stats["generated"] += 1  # minus the draws that reach the test: the rejected ones
    batch = draw(st.integers(1, 2))
    sizes = [draw(_image_sizes()) for _ in range(2)][:batch]
    channels = draw(st.sampled_from([3, 1, 4]))
    kind = draw(st.sampled_from(["uint8", "float32", "uint16", "pil", "int64", "float64", "grey2d"]))
    channels = 1 if kind == "grey2d" else channels
    short_edge = draw(st.integers(1, 512))
    size_forms = {
        "shortest_longest": {"shortest_edge": short_edge, "longest_edge": draw(st.integers(short_edge, 1024))},
        "max_height_width": {"max_height": draw(st.integers(1, 1024)), "max_width": draw(st.integers(1, 1024))},
        "height_width": {"height": draw(st.integers(1, 512)), "width": draw(st.integers(1, 512))},
        "tuple": (draw(st.integers(1, 512)), draw(st.integers(1, 512))),
    }
    resize = draw(st.sampled_from([*size_forms, "none", "default"]))
    init = {}
    if resize == "none":
        init["do_resize"] = False
    elif resize != "default":
        init["size"] = size_forms[resize]
    init["size_divisor"] = draw(st.sampled_from([32, 0, 1, 7, 64]))
    init["resample"] = draw(st.integers(0, 5))
    init["do_rescale"] = draw(st.booleans())
    init["do_normalize"] = draw(st.booleans())
    convert_rgb = draw(st.booleans())
    if channels != 3 and convert_rgb:
        init["do_convert_rgb"] = True
    elif channels == 1:
        init["image_mean"], init["image_std"] = 0.5, 0.25
    elif channels == 4:
        init["image_mean"], init["image_std"] = [0.5, 0.4, 0.3, 0.2], [0.25, 0.2, 0.3, 0.35]
    with_maps, reduce = draw(st.booleans()), draw(st.booleans())
    ignore = draw(st.sampled_from([None, 255, 0, 3]))
    ignore = 255 if reduce and ignore is None else ignore  # do_reduce_labels needs one
    num_labels = draw(st.sampled_from([None, draw(st.integers(1, 300))]))
    values = list(dict.fromkeys(draw(st.integers(0, 255)) for _ in range(6)))
    values = values[: draw(st.integers(1, 6))]
    if draw(st.booleans()) and ignore is not None and ignore not in values:
        values.append(ignore)  # pixels marked "ignore" in the map
    classes = [[draw(st.integers(0, 30)) for _ in range(7)] for _ in range(2)]
    instance = [dict(zip(values, image_classes)) for image_classes in classes]
    instance = draw(st.sampled_from([None, instance[:1], instance[:batch]]))
    maps = {
        "values": values,
        "block": draw(st.integers(1, 128)),
        "type": draw(st.sampled_from(["int64", "uint8", "pil"])),
        "instance": instance,
    }
    if with_maps:
        init.update(ignore_index=ignore, do_reduce_labels=reduce)
        if num_labels is not None:
            init["num_labels"] = num_labels
    return ProcessorCase(sizes, channels, kind, init, maps if with_maps else None, draw(st.integers(0, 2**32 - 1)))


def _image(rng, size, channels, kind):
    shape = (*size, channels)
    if kind in ("float32", "float64"):
        return rng.random(shape).astype(kind)
    pixels = rng.integers(0, 256, shape)
    if kind == "pil":
        return Image.fromarray(pixels.astype(np.uint8)[..., 0] if channels == 1 else pixels.astype(np.uint8))
    if kind == "grey2d":
        return pixels[..., 0].astype(np.uint8)
    return pixels.astype(kind)


def _segmentation_map(rng, size, spec):
    block = spec["block"]
    coarse = rng.choice(np.array(spec["values"]), size=(-(-size[0] // block), -(-size[1] // block)))
    seg = np.kron(coarse, np.ones((block, block), dtype=np.int64))[: size[0], : size[1]]
    if spec["type"] == "pil":
        return Image.fromarray(seg.astype(np.uint8))
    return seg.astype(spec["type"])


def _as_array(seg):
    return np.array(seg).astype(np.int64)


def _hf_images(images, case):
    """transformers' input: 2-D grey arrays (which it rejects, a deliberate difference) as
    (H, W, 1); arrays with their channel axis named (it takes an RGB array 1, 3 or 4 pixels high
    for channels-first, a deliberate difference)."""
    if case.kind == "grey2d":
        images = [image[..., None] for image in images]
    call = {} if case.kind == "pil" else {"input_data_format": "channels_last"}
    return images, call


def _padding_needed(theirs_no_maps):
    """Whether some image of the batch is smaller than the padded size (from its pixel_mask)."""
    masks = [np.asarray(mask) for mask in theirs_no_maps["pixel_mask"]]
    return any(not mask.all() for mask in masks)


def _hf_per_image_padded_with_zero(images, maps, instance, init, call):
    """transformers' targets image by image (its batch call fails: no ignore_index to pad with),
    padded with 0 to the batch size: the documented result (a deliberate difference)."""
    batch = run_hf(images, init=init, call=call)
    height, width = np.asarray(batch["pixel_mask"][0]).shape
    mask_labels, class_labels = [], []
    for i, (image, seg) in enumerate(zip(images, maps)):
        inst = instance[i] if isinstance(instance, list) else instance
        single = run_hf([image], [seg], inst, init=init, call=call)
        masks = single["mask_labels"][0]
        padded = np.zeros((masks.shape[0], height, width), np.float32)
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        mask_labels.append(padded)
        class_labels.append(single["class_labels"][0])
    return dict(batch, mask_labels=mask_labels, class_labels=class_labels)


def _check_processor_case(case, stats):
    stats["draws"] += 1
    stats[f"kind_{case.kind}"] += 1
    stats[f"channels_{case.channels}"] += 1
    if max(max(size) for size in case.sizes) > 1000:
        stats["side_over_1000"] += 1
    if any(h > w for h, w in case.sizes) and any(h < w for h, w in case.sizes):
        stats["batch_portrait_and_wide"] += 1
    rng = np.random.default_rng(case.seed)
    images = [_image(rng, size, case.channels, case.kind) for size in case.sizes]
    hf_images, call = _hf_images(images, case)
    init = case.init
    try:
        theirs_no_maps = run_hf(hf_images, init=init, call=call)
    except ValueError:
        # transformers rejects these settings for these sizes (seen: a side resized to 0 pixels)
        stats["both_reject_zero_size"] += 1
        with pytest.raises(ValueError):
            run_ours(images, init=init)
        return
    if case.maps is None:
        assert_matches_hf(run_ours(images, init=init), theirs_no_maps)
        return
    spec = case.maps
    maps = [_segmentation_map(rng, size, spec) for size in case.sizes]
    instance = spec["instance"]
    if instance is not None and len(instance) == 1:
        instance = instance[0]
    hf_maps = maps
    ignore = init["ignore_index"]
    if init["do_reduce_labels"] and ignore and any(ignore in _as_array(m) for m in maps):
        # deliberate difference: with do_reduce_labels, ignore_index pixels stay ignored
        # (transformers makes them class ignore_index - 1); oracle: transformers with those
        # pixels set to 0, which it ignores
        stats["reduce_keeps_ignore_index_pixels_ignored"] += 1
        hf_maps = [np.where(_as_array(m) == ignore, 0, _as_array(m)) for m in maps]
    if init["ignore_index"] is None and _padding_needed(theirs_no_maps):
        stats["mask_padding_without_ignore_index"] += 1
        with pytest.raises(ValueError):
            run_hf(hf_images, hf_maps, instance, init=init, call=call)
        theirs = _hf_per_image_padded_with_zero(hf_images, hf_maps, instance, init, call)
    else:
        theirs = run_hf(hf_images, hf_maps, instance, init=init, call=call)
    num_labels = init.get("num_labels")
    bad = [c for c in np.concatenate(theirs["class_labels"]) if c < 0 or (num_labels is not None and c >= num_labels)]
    if bad:
        # deliberate difference: class ids outside [0, num_labels) are an error
        stats["class_ids_out_of_range_error"] += 1
        with pytest.raises(ValueError, match="outside"):
            run_ours(images, maps, instance, init=init)
        return
    stats["with_maps_compared"] += 1
    assert_matches_hf(run_ours(images, maps, instance, init=init), theirs)


def test_image_processor_matches_transformers_on_drawn_inputs_atol_1e5():
    stats = collections.Counter()
    start = time.perf_counter()

    @_settings(PROCESSOR_DRAWS)
    @given(processor_cases(stats))
    def run(case):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check_processor_case(case, stats)

    run()
    _report("processor", stats, time.perf_counter() - start)
    _assert_counts(stats, PROCESSOR_DRAWS)


# ----------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------

MASK_SIZES = [(1, 1), (6, 9), (32, 32)]
QUERY_COUNTS = [1, 3, 12, 20]
LABEL_COUNTS = [1, 2, 7, 20]
# target (height, width): buckets of 32 (kernel output sizes are rounded up to one), minus 0..31
TARGET_BUCKETS = [(1, 1), (1, 32), (32, 4), (32, 32)]
# transformers' (384, 384), or none (configurable: a deliberate difference)
INTERMEDIATE_SIZES = [(384, 384), None]


@dataclass
class LogitsCase:
    class_logits: np.ndarray  # (B, Q, K+1)
    mask_logits: np.ndarray  # (B, Q, h, w)
    target_sizes: list | None
    intermediate: tuple | None
    options: dict

    @property
    def outputs(self):
        return our_outputs(self.class_logits, self.mask_logits)

    @property
    def hf(self):
        return hf_outputs(self.class_logits, self.mask_logits)


@st.composite
def logits_cases(draw, options, stats):
    stats["generated"] += 1
    batch = draw(st.integers(1, 2))
    queries, classes = draw(st.sampled_from(QUERY_COUNTS)), draw(st.sampled_from(LABEL_COUNTS))
    size = draw(st.sampled_from(MASK_SIZES))
    seed = draw(st.integers(0, 2**32 - 1))
    model_like = draw(st.booleans()) and queries >= 2  # model-like logits need two objects
    scale = draw(st.sampled_from([0.5, 3.0, 8.0]))
    objects = 2 + draw(st.integers(0, 18)) % max(1, queries - 1)  # 2..queries
    labels = [[draw(st.integers(0, 19)) % classes for _ in range(20)][:objects] for _ in range(2)][:batch]
    if model_like:
        class_logits, mask_logits = model_like_logits(seed, labels, queries=queries, classes=classes, size=size)
    else:
        rng = np.random.default_rng(seed)
        class_logits = (rng.normal(size=(batch, queries, classes + 1)) * scale).astype(np.float32)
        mask_logits = (rng.normal(size=(batch, queries, *size)) * scale).astype(np.float32)
    with_targets = draw(st.sampled_from([True, True, False]))
    targets = []
    for _ in range(2):
        buckets, offsets = draw(st.sampled_from(TARGET_BUCKETS)), (draw(st.integers(0, 31)), draw(st.integers(0, 31)))
        targets.append((buckets[0] * 32 - offsets[0], buckets[1] * 32 - offsets[1]))
    target_sizes = targets[:batch] if with_targets else None
    intermediate = draw(st.sampled_from(INTERMEDIATE_SIZES))
    return LogitsCase(class_logits, mask_logits, target_sizes, intermediate, draw(options(classes)))


@contextlib.contextmanager
def _oracle_intermediate(case):
    if case.intermediate == (384, 384):
        yield
    else:
        with hf_intermediate_size(case.intermediate):
            yield


def _intermediate_logits(case, image):
    """transformers' first resize of one image's mask logits (Q, H, W), torch."""
    logits = torch.from_numpy(case.mask_logits[image : image + 1])
    if case.intermediate is None:
        return logits[0]
    return F.interpolate(logits, size=case.intermediate, mode="bilinear", align_corners=False)[0]


def _run_post(test_name, options, check, stats):
    start = time.perf_counter()

    @_settings(POST_DRAWS)
    @given(logits_cases(options, stats))
    def run(case):
        stats["draws"] += 1
        stats["batch_images"] += len(case.class_logits)
        stats["with_target_sizes"] += case.target_sizes is not None
        stats[f"intermediate_{case.intermediate}"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(case, stats)

    run()
    _report(test_name, stats, time.perf_counter() - start)
    _assert_counts(stats, POST_DRAWS)


# Semantic ---------------------------------------------------------------------------------------


def _top_two_gap(scores):
    """Per pixel: best minus second-best score over axis 0 (inf with a single channel)."""
    if scores.shape[0] < 2:
        return np.full(scores.shape[1:], np.inf, scores.dtype)
    top_two = np.partition(scores, scores.shape[0] - 2, axis=0)[-2:]
    return top_two[1] - top_two[0]


def _check_semantic(case, stats):
    with_scores = case.options["with_scores"]
    with _oracle_intermediate(case):
        theirs = HF.post_process_semantic_segmentation(
            case.hf, target_sizes=case.target_sizes, return_segmentation_scores=True
        )
    ours = pp.post_process_semantic_segmentation(
        case.outputs,
        target_sizes=case.target_sizes,
        return_segmentation_scores=with_scores,
        intermediate_size=case.intermediate,
    )
    for our, their in zip(ours, theirs):
        scores = their.segmentation_scores.numpy()
        if with_scores:
            np.testing.assert_allclose(our.segmentation_scores, scores, rtol=0, atol=ATOL)
            our = our.segmentation
        assert our.dtype == np.int64 and our.shape == scores.shape[1:]
        near_tie = _top_two_gap(scores) < ATOL
        stats["pixels"] += near_tie.size
        stats["near_tie_pixels"] += int(near_tie.sum())
        mismatch = our != scores.argmax(axis=0)
        assert not np.any(mismatch & ~near_tie), "a class differs away from a near-tie"
        stats["near_tie_pixels_differing"] += int(mismatch.sum())


def _semantic_options(classes):
    return st.fixed_dictionaries({"with_scores": st.sampled_from([False, False, False, True])})


def test_semantic_post_processing_matches_transformers_on_drawn_logits():
    _run_post("semantic", _semantic_options, _check_semantic, collections.Counter())


# Instance ---------------------------------------------------------------------------------------


def _instance_options(classes):
    return st.fixed_dictionaries(
        {
            "threshold": st.floats(0.0, 0.95),
            "mode": st.sampled_from(["binary", "map", "coco"]),
        }
    )


def _hf_binary_masks(case, image, target):
    """Each query's binary mask at the output size, and where its resized logit is within 1e-5 of 0
    (transformers: logit > 0 at the intermediate size, then legacy nearest to the target)."""
    logits = _intermediate_logits(case, image)  # (Q, H, W)
    masks = (logits > 0).float()
    near_queries = torch.nonzero((logits.abs() < ATOL).flatten(1).any(1)).flatten()
    near_zero = (logits[near_queries].abs() < ATOL).float()  # (N, H, W), N: queries with any
    if target is not None:
        masks = F.interpolate(masks[None], size=target, mode="nearest")[0]
        if len(near_queries):
            near_zero = F.interpolate(near_zero[None], size=target, mode="nearest")[0]
    return masks.numpy().astype(bool), dict(zip(near_queries.tolist(), near_zero.numpy().astype(bool)))


def _topk_boundary_tie(class_logits, threshold):
    """Whether transformers' top-Q (query, class) pairs can differ from ours by a near-tie at the
    Q-th place among pairs that can pass the threshold."""
    queries = class_logits.shape[0]
    probs = torch.from_numpy(class_logits).softmax(-1)[:, :-1].flatten().numpy()
    if probs.size <= queries:
        return False
    ranked = np.sort(probs)[::-1]
    return bool(ranked[queries - 1] - ranked[queries] < ATOL and ranked[queries - 1] >= threshold - ATOL)


def _match(ours_info, theirs_info, allow_unmatched, same_mask=None):
    """(ours index, theirs index) pairs with the same label and scores within 1e-5 (several
    candidates: the one with the same mask, then the closest score); unmatched instances only
    where `allow_unmatched(info)`."""
    pairs, unused = [], list(range(len(ours_info)))
    for j, their in enumerate(theirs_info):
        candidates = [
            i
            for i in unused
            if ours_info[i]["label_id"] == their["label_id"] and abs(ours_info[i]["score"] - their["score"]) <= ATOL
        ]
        if candidates:
            best = min(
                candidates,
                key=lambda i: (same_mask is not None and not same_mask(i, j), abs(ours_info[i]["score"] - their["score"])),
            )
            pairs.append((best, j))
            unused.remove(best)
        else:
            assert allow_unmatched(their), f"transformers' instance {their} has no match"
    for i in unused:
        assert allow_unmatched(ours_info[i]), f"our instance {ours_info[i]} is not transformers'"
    return pairs


def _check_instance(case, stats):
    threshold, mode = case.options["threshold"], case.options["mode"]
    stats[f"mode_{mode}"] += 1
    kwargs = dict(threshold=threshold, target_sizes=case.target_sizes)
    hf_kwargs = dict(kwargs)
    if case.target_sizes is None and case.intermediate != (384, 384):
        # transformers' instance map is (384, 384) without target sizes, whatever the first resize
        # gave: target the intermediate size itself (its nearest resize is then a copy)
        size = case.intermediate or case.mask_logits.shape[2:]
        hf_kwargs["target_sizes"] = [tuple(size)] * len(case.class_logits)
    with _oracle_intermediate(case):
        theirs = HF.post_process_instance_segmentation(case.hf, return_binary_maps=True, **hf_kwargs)
    flags = {"binary": {"return_binary_maps": True}, "coco": {"return_coco_annotation": True}, "map": {}}[mode]
    ours = pp.post_process_instance_segmentation(case.outputs, intermediate_size=case.intermediate, **kwargs, **flags)
    for image, (our, their) in enumerate(zip(ours, theirs)):
        target = None if hf_kwargs["target_sizes"] is None else hf_kwargs["target_sizes"][image]
        query_masks, near_zero = _hf_binary_masks(case, image, target)
        output_size = query_masks.shape[1:]
        boundary_tie = _topk_boundary_tie(case.class_logits[image], threshold)
        stats["topk_boundary_ties"] += boundary_tie

        def ambiguous(info):
            return boundary_tie or abs(info["score"] - threshold) < ATOL + 1e-6  # scores are rounded to 1e-6

        their_masks = their["segmentation"].numpy().astype(bool) if their["segments_info"] else np.zeros((0, *output_size), bool)
        assert [info["id"] for info in our["segments_info"]] == list(range(len(our["segments_info"])))
        near = np.any(list(near_zero.values()), axis=0) if near_zero else np.zeros(output_size, bool)
        if mode == "binary" and our["segments_info"]:
            our_masks = our["segmentation"]
            assert our_masks.dtype == np.float32 and our_masks.shape[1:] == output_size
            our_masks = our_masks.astype(bool)
        elif mode == "coco":
            # deliberate difference: one pycocotools RLE per instance
            stats["coco_rle_draws"] += 1
            assert len(our["segmentation"]) == len(our["segments_info"])
            decoded = [coco_mask.decode(rle).astype(bool) for rle in our["segmentation"]]
            our_masks = np.array(decoded).reshape(-1, *output_size)
        else:
            our_masks = None
        if our_masks is not None:

            def same_mask(i, j):
                return not np.any((our_masks[i] != their_masks[j]) & ~near)

        else:  # the id map: instance i's visible pixels lie in transformers' mask j

            def same_mask(i, j):
                return not np.any((our["segmentation"] == i) & ~their_masks[j] & ~near)

        pairs = _match(our["segments_info"], their["segments_info"], ambiguous, same_mask)
        stats["instances"] += len(their["segments_info"])
        stats["instances_unmatched_at_near_ties"] += len(their["segments_info"]) - len(pairs)
        for i, j in pairs:
            # transformers' instance j came from a query whose binary mask is exactly its mask
            sources = [q for q, zero in near_zero.items() if np.array_equal(query_masks[q], their_masks[j])]
            allowed = np.any([near_zero[q] for q in sources], axis=0) if sources else np.zeros(output_size, bool)
            stats["near_zero_mask_pixels"] += int(allowed.sum())
            if our_masks is not None:
                differ = our_masks[i] != their_masks[j]
                assert not np.any(differ & ~allowed), "an instance mask differs away from a near-zero logit"
                stats["near_zero_mask_pixels_differing"] += int(differ.sum())
        if mode == "map":
            _check_instance_map(our, their, their_masks, pairs, near, output_size, stats)


def _check_instance_map(our, their, their_masks, pairs, near, output_size, stats):
    """Id maps agree up to renaming (deliberate difference: our visiting order); where
    instances overlap ours shows one of the overlapping instances."""
    segmentation = our["segmentation"]
    assert segmentation.dtype == np.float32 and segmentation.shape == output_size
    expected = np.full(output_size, -1, np.float32)  # transformers paints its masks in id order
    for j, mask in enumerate(their_masks):
        expected[mask] = j
    if len(pairs) != len(their["segments_info"]) or len(pairs) != len(our["segments_info"]):
        stats["maps_skipped_unmatched_near_tie"] += 1
        return
    rename = np.full(len(our["segments_info"]) + 1, -1, np.float32)  # index id + 1; -1 stays -1
    for i, j in pairs:
        rename[our["segments_info"][i]["id"] + 1] = their["segments_info"][j]["id"]
    renamed = rename[segmentation.astype(np.int64) + 1]
    single = their_masks.sum(axis=0) <= 1
    assert np.array_equal(renamed[single & ~near], expected[single & ~near])
    overlap = ~single & ~near
    rows, cols = np.nonzero(overlap)
    shown = renamed[rows, cols].astype(np.int64)
    assert np.all(shown >= 0) and np.all(their_masks[shown, rows, cols])
    stats["overlap_pixels"] += int(overlap.sum())


def test_instance_post_processing_matches_transformers_on_drawn_logits():
    _run_post("instance", _instance_options, _check_instance, collections.Counter())


# Panoptic ---------------------------------------------------------------------------------------


@st.composite
def _panoptic_options(draw, classes):
    fused = [draw(st.integers(0, 19)) % classes for _ in range(3)][: draw(st.integers(0, 3))]
    return {
        "threshold": draw(st.floats(0.0, 0.95)),
        "mask_threshold": draw(st.floats(0.05, 0.95)),
        "overlap": draw(st.floats(0.0, 0.99)),
        "fuse": set(fused),
    }


def _expected_segments(their_info):
    """transformers' segments under the deliberate difference (unique ids; one entry per fused label,
    score = max), and for each of our ids the id transformers gave its pixels."""
    expected, fused, their_id_of = [], {}, {0: 0}
    for info in their_info:
        if info["was_fused"] and info["label_id"] in fused:
            entry = fused[info["label_id"]]
            entry["score"] = max(entry["score"], info["score"])
        else:
            entry = dict(info, id=len(expected) + 1)
            expected.append(entry)
            if info["was_fused"]:
                fused[info["label_id"]] = entry
        their_id_of[entry["id"]] = info["id"]
    return expected, their_id_of


def _panoptic_ties(case, image, mask_threshold, overlap):
    """From transformers' score-weighted probabilities of the kept queries: near-tie pixels, and
    whether a query decision (kept or not, segment or not) lies within 1e-5 of its threshold."""
    probs = torch.from_numpy(case.class_logits[image]).softmax(-1)
    scores, labels = probs.max(-1)
    num_labels = case.class_logits.shape[-1] - 1
    real = labels != num_labels
    threshold = case.options["threshold"]
    decision_tie = bool(torch.any(real & ((scores - threshold).abs() < ATOL)))
    top_two = torch.topk(probs, 2, dim=-1).values
    decision_tie |= bool(torch.any((top_two[:, 0] - top_two[:, 1]) < ATOL))  # label argmax
    kept = real & (scores > threshold)
    if not kept.any():
        return None, decision_tie
    weighted = _intermediate_logits(case, image)[kept].sigmoid()
    target = None if case.target_sizes is None else case.target_sizes[image]
    if target is not None:
        weighted = F.interpolate(weighted[None], size=target, mode="bilinear", align_corners=False)[0]
    weighted = (weighted * scores[kept].view(-1, 1, 1)).numpy()  # (N, H, W)
    best = weighted.max(axis=0)
    near_best = weighted > best - ATOL  # (N, H, W): queries that may own the pixel
    tie = near_best.sum(axis=0) > 1
    owner = weighted.argmax(axis=0)
    for k in range(weighted.shape[0]):
        owned_min = int(np.sum((owner == k) & ~tie))
        owned_max = int(np.sum(near_best[k]))
        area_min = int(np.sum(weighted[k] >= mask_threshold + ATOL))
        area_max = int(np.sum(weighted[k] > mask_threshold - ATOL))

        def exists(owned, area):
            return owned > 0 and area > 0 and float(np.float32(owned) / np.float32(area)) > overlap

        outcomes = {exists(o, a) for o in {owned_min, owned_max} for a in {area_min, area_max}}
        decision_tie |= len(outcomes) > 1
    return tie, decision_tie


def _check_panoptic(case, stats):
    options = case.options
    kwargs = dict(
        threshold=options["threshold"],
        mask_threshold=options["mask_threshold"],
        overlap_mask_area_threshold=options["overlap"],
        label_ids_to_fuse=options["fuse"],
        target_sizes=case.target_sizes,
    )
    with _oracle_intermediate(case):
        theirs = HF.post_process_panoptic_segmentation(case.hf, **kwargs)
    ours = pp.post_process_panoptic_segmentation(case.outputs, intermediate_size=case.intermediate, **kwargs)
    for image, (our, their) in enumerate(zip(ours, theirs)):
        their_map = their["segmentation"].numpy()
        assert our["segmentation"].shape == their_map.shape
        tie, decision_tie = _panoptic_ties(case, image, options["mask_threshold"], options["overlap"])
        if decision_tie:
            stats["images_with_query_decision_within_1e5"] += 1
            assert our["segmentation"].dtype in (np.int32, np.float32)
            continue
        stats["images_compared"] += 1
        if tie is None:  # no kept query: transformers' float -1 map, kept for parity
            stats["images_without_kept_query"] += 1
            assert our["segments_info"] == their["segments_info"] == []
            assert our["segmentation"].dtype == their_map.dtype == np.float32
            np.testing.assert_array_equal(our["segmentation"], their_map)
            continue
        expected, their_id_of = _expected_segments(their["segments_info"])
        if expected != their["segments_info"]:
            stats["images_with_fused_id_difference"] += 1
        assert our["segments_info"] == [{**e, "score": pytest.approx(e["score"], abs=ATOL)} for e in expected]
        assert our["segmentation"].dtype == their_map.dtype == np.int32
        lookup = np.zeros(len(expected) + 1, np.int32)
        for our_id, their_id in their_id_of.items():
            lookup[our_id] = their_id
        differ = lookup[our["segmentation"]] != their_map
        stats["pixels"] += tie.size
        stats["near_tie_pixels"] += int(tie.sum())
        assert not np.any(differ & ~tie), "a segment differs away from a near-tie"
        stats["near_tie_pixels_differing"] += int(differ.sum())
        stats["segments"] += len(expected)


def test_panoptic_post_processing_matches_transformers_on_drawn_logits():
    _run_post("panoptic", _panoptic_options, _check_panoptic, collections.Counter())
