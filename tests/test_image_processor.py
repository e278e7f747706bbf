"""Tests for m2f_jax.processing.image_processor.

Oracle: transformers 5.24 ``Mask2FormerImageProcessorPil`` (the PIL backend, return_tensors=None).
Tolerances: pixel_values atol 1e-5 after NCHW -> NHWC; pixel_mask, mask_labels and
class_labels identical (values, shapes and dtypes). Inputs are real photos from skimage.data
and random segmentation maps with fixed seeds; sizes are kept small so the file runs fast.
"""
import functools
import json
import logging
import warnings

import numpy as np
import pytest
from PIL import Image

from tests import TORCH_REASON

# transformers' Mask2FormerImageProcessorPil, the oracle here, requires torch
pytest.importorskip("torch", reason=TORCH_REASON)

import skimage.data as skimage_data  # noqa: E402
import transformers  # noqa: E402
from transformers import Mask2FormerImageProcessorPil  # noqa: E402
from transformers.image_transforms import get_size_with_aspect_ratio as hf_aspect  # noqa: E402
from transformers.image_utils import get_image_size_for_max_height_width as hf_max_hw  # noqa: E402

from m2f_jax.processing.image_processor import (  # noqa: E402
    Mask2FormerImageProcessor,
    convert_segmentation_map_to_binary_masks,
    get_output_size,
    get_size_for_max_height_width,
    get_size_with_aspect_ratio,
    resolve_size,
)

SMALL = {"shortest_edge": 64, "longest_edge": 128}
logging.getLogger("transformers").setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def _photo(name):
    return getattr(skimage_data, name)()


def astronaut():  # (512, 512, 3)
    return _photo("astronaut")


def coffee():  # (400, 600, 3)
    return _photo("coffee")


def chelsea():  # (300, 451, 3)
    return _photo("chelsea")


def camera():  # (512, 512) grey
    return _photo("camera")


def random_map(shape, num_values, seed, block=16, offset=0):
    """Blocky random label map (labels offset..offset+num_values-1), so regions survive a resize."""
    rng = np.random.default_rng(seed)
    h, w = shape[:2]
    coarse = rng.integers(0, num_values, size=(-(-h // block), -(-w // block))) + offset
    return np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w]


def run_hf(images, maps=None, instance_map=None, init=None, call=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = Mask2FormerImageProcessorPil(**(init or {}))
        return processor(images, maps, instance_id_to_semantic_id=instance_map, **(call or {}))


def run_ours(images, maps=None, instance_map=None, init=None, call=None, **kwargs):
    processor = Mask2FormerImageProcessor(**(init or {}))
    return processor(images, maps, instance_map, **(call or {}), **kwargs)


def assert_matches_hf(ours, theirs, channels_first=False):
    expected = np.stack(theirs["pixel_values"])  # (B, C, Hp, Wp)
    if not channels_first:
        expected = expected.transpose(0, 2, 3, 1)
    assert ours["pixel_values"].dtype == np.float32
    assert ours["pixel_values"].shape == expected.shape
    np.testing.assert_allclose(ours["pixel_values"], expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours["pixel_mask"], np.stack(theirs["pixel_mask"]), strict=True)
    assert ("mask_labels" in ours) == ("mask_labels" in theirs)
    if "mask_labels" in theirs:
        assert len(ours["mask_labels"]) == len(theirs["mask_labels"])
        for got, want in zip(ours["mask_labels"], theirs["mask_labels"]):
            np.testing.assert_array_equal(got, want, strict=True)
        for got, want in zip(ours["class_labels"], theirs["class_labels"]):
            np.testing.assert_array_equal(got, want, strict=True)


# ------------------------------------------------------------------------------------------
# Output size: pure functions.
# ------------------------------------------------------------------------------------------


def test_output_size_hand_computed_examples():
    # Values from the reference spec, computed by hand: 480x640 -> (800, 1066) -> (800, 1088).
    default = {"shortest_edge": 800, "longest_edge": 1333}
    assert get_output_size((480, 640), default, 32) == (800, 1088)
    assert get_output_size((40, 50), default, 32) == (800, 1024)
    assert get_output_size((480, 640), {"max_height": 500, "max_width": 500}, 32) == (384, 512)
    assert get_output_size((480, 640), {"max_height": 500, "max_width": 500}, 0) == (375, 500)
    assert get_output_size((480, 640), (384, 384), 32) == (384, 384)
    # Capped by longest_edge: 100x1000 with 800/1333 -> short side round(133.3) = 133.
    assert get_output_size((100, 1000), default) == (133, 1333)


def test_size_functions_match_transformers_helpers():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 3000, size=2))
        s = int(rng.integers(1, 1500))
        l_edge = int(rng.integers(s, 3000))
        assert get_size_with_aspect_ratio((h, w), s, l_edge) == tuple(hf_aspect((h, w), s, l_edge))
        mh, mw = (int(v) for v in rng.integers(1, 2000, size=2))
        assert get_size_for_max_height_width((h, w), mh, mw) == tuple(hf_max_hw((h, w), mh, mw))


def test_resolve_size_forms():
    assert resolve_size({"height": 3, "width": 4}) == {"height": 3, "width": 4}
    assert resolve_size((3, 4)) == {"height": 3, "width": 4}
    assert resolve_size(64, max_size=100) == {"shortest_edge": 64, "longest_edge": 100}
    assert resolve_size({"max_height": 5, "max_width": 6}) == {"max_height": 5, "max_width": 6}
    # Deliberate difference: max_size completes a lone shortest_edge (transformers raises later).
    completed = resolve_size({"shortest_edge": 64}, max_size=100)
    assert completed == {"shortest_edge": 64, "longest_edge": 100}
    # ...and is ignored for a complete dict, as in transformers.
    complete = resolve_size({"shortest_edge": 64, "longest_edge": 90}, max_size=100)
    assert complete["longest_edge"] == 90


# ------------------------------------------------------------------------------------------
# Parity with transformers' PIL processor.
# ------------------------------------------------------------------------------------------

SIZE_FORMS = [
    ({"size": SMALL}, "shortest_longest"),
    ({"size": {"shortest_edge": 100, "longest_edge": 120}}, "capped_by_longest_edge"),
    ({"size": {"height": 96, "width": 80}}, "height_width"),
    ({"size": {"max_height": 70, "max_width": 90}}, "max_height_width"),
    ({"size": (72, 88)}, "tuple"),
    ({"size": 64, "max_size": 100}, "int_and_max_size"),
]


@pytest.mark.parametrize("size_divisor", [32, 0, 7])
@pytest.mark.parametrize("size_init", [s for s, _ in SIZE_FORMS], ids=[i for _, i in SIZE_FORMS])
def test_size_forms_match_transformers_atol_1e5(size_init, size_divisor):
    images = [astronaut(), coffee(), chelsea()]  # three sizes: exercises padding too
    maps = [random_map(im.shape, 5, seed) for seed, im in enumerate(images)]
    init = dict(size_init, size_divisor=size_divisor, ignore_index=255)
    assert_matches_hf(run_ours(images, maps, init=init), run_hf(images, maps, init=init))


def test_default_settings_match_transformers_atol_1e5():
    image = chelsea()[:60, :90]  # default size: shortest 800 -> (800, 1200), kept small on input
    assert_matches_hf(run_ours(image), run_hf(image))


def test_do_resize_false_matches_transformers():
    images = [astronaut()[:50, :70], coffee()[100:140, 200:260]]
    maps = [random_map(im.shape, 4, seed, block=5) for seed, im in enumerate(images)]
    init = {"do_resize": False, "ignore_index": 255}
    ours = run_ours(images, maps, init=init)
    assert_matches_hf(ours, run_hf(images, maps, init=init))
    assert ours["pixel_values"].shape == (2, 50, 70, 3)  # no size_divisor stretch without resize


@pytest.mark.parametrize(
    "init",
    [
        # {"do_reduce_labels": True, "ignore_index": 255}: its 255 region differs deliberately,
        # test_reduce_labels_keeps_ignore_index_pixels_ignored below.
        # HF quirk: label 1 -> 0 collides with ignore_index 0 and is dropped.
        {"do_reduce_labels": True, "ignore_index": 0},
        # HF quirk: 0 -> -1 wraps to 255 in the uint8 map that the PIL resize returns.
        {"do_reduce_labels": True, "ignore_index": -1},
        {"do_reduce_labels": False, "ignore_index": 3},
        {"do_reduce_labels": False, "ignore_index": None},
    ],
    ids=["reduce_ignore0", "reduce_ignore_minus1", "ignore3", "no_ignore"],
)
def test_semantic_maps_match_transformers(init):
    images = [astronaut(), astronaut()[::-1]]  # same size: padding with ignore_index=None is fine
    maps = [random_map(im.shape, 6, seed) for seed, im in enumerate(images)]
    maps[1][:40] = 255  # a region already at 255
    ours = run_ours(images, maps, init=dict(init, size=SMALL))
    assert_matches_hf(ours, run_hf(images, maps, init=dict(init, size=SMALL)))


def test_reduce_labels_keeps_ignore_index_pixels_ignored():
    """Deliberate difference (README): with do_reduce_labels a map's ignore_index (255) pixels
    stay ignored, as transformers' BEiT / SegFormer / DPT label reduction (and Mask2Former's own,
    unused, ``reduce_label``) keep them; transformers' Mask2Former makes them class 254. Every
    other mask and class is transformers' (oracle: Mask2FormerImageProcessorPil)."""
    images = [astronaut(), astronaut()[::-1]]
    maps = [random_map(im.shape, 6, seed) for seed, im in enumerate(images)]
    maps[1][:40] = 255  # pixels marked "ignore" in the label map
    init = {"do_reduce_labels": True, "ignore_index": 255, "size": SMALL}
    ours, theirs = run_ours(images, maps, init=init), run_hf(images, maps, init=init)
    np.testing.assert_array_equal(ours["pixel_values"], np.stack(theirs["pixel_values"]).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ours["mask_labels"][0], theirs["mask_labels"][0], strict=True)
    np.testing.assert_array_equal(ours["class_labels"][0], theirs["class_labels"][0], strict=True)
    their_masks, their_classes = np.asarray(theirs["mask_labels"][1]), np.asarray(theirs["class_labels"][1])
    assert their_classes[-1] == 254  # transformers: 255 - 1
    np.testing.assert_array_equal(ours["mask_labels"][1], their_masks[:-1], strict=True)
    np.testing.assert_array_equal(ours["class_labels"][1], their_classes[:-1], strict=True)
    # the 255 region (resized: where transformers' class-254 mask is) is in no mask of ours
    ignored = their_masks[-1] == 1
    assert ignored[:5].all() and ignored.sum() > 0
    assert not ours["mask_labels"][1][:, ignored].any()
    # with num_labels set, the ignored pixels are no out-of-range class (was a ValueError)
    with_labels = run_ours(images, maps, init=dict(init, num_labels=6))
    np.testing.assert_array_equal(with_labels["class_labels"][1], their_classes[:-1], strict=True)


def test_reduce_labels_semantics_hand_computed():
    seg = np.array([[0, 1, 2], [3, 3, 0]])
    masks, classes = convert_segmentation_map_to_binary_masks(
        seg, ignore_index=255, do_reduce_labels=True
    )
    np.testing.assert_array_equal(classes, [0, 1, 2])  # 1, 2, 3 -> 0, 1, 2; 0 -> ignored
    np.testing.assert_array_equal(masks[2], [[0, 0, 0], [1, 1, 0]])
    # 255 (ignore_index) stays ignored, in uint8 maps (what the PIL resize returns) too
    for dtype in (np.uint8, np.int64):
        masks, classes = convert_segmentation_map_to_binary_masks(
            np.array([[0, 1, 255], [2, 255, 0]], dtype), ignore_index=255, do_reduce_labels=True
        )
        np.testing.assert_array_equal(classes, [0, 1])
        np.testing.assert_array_equal(masks, [[[0, 1, 0], [0, 0, 0]], [[0, 0, 0], [1, 0, 0]]])
    masks, classes = convert_segmentation_map_to_binary_masks(seg, {0: 7, 1: 7, 2: 3, 3: 9})
    np.testing.assert_array_equal(classes, [7, 7, 3, 9])
    assert masks.dtype == np.float32 and classes.dtype == np.int64


@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_instance_maps_with_instance_id_to_semantic_id_match_transformers(reduce, as_list):
    images = [coffee(), chelsea()]
    maps = [random_map(im.shape, 5, seed, block=24) for seed, im in enumerate(images)]
    mapping = {0: 7, 1: 7, 2: 3, 3: 9, 4: 1, 5: 2}
    inst = [mapping, {k: v + 1 for k, v in mapping.items()}] if as_list else mapping
    init = {"size": SMALL, "ignore_index": 255, "do_reduce_labels": reduce}
    ours = run_ours(images, maps, inst, init=init)
    assert_matches_hf(ours, run_hf(images, maps, inst, init=init))


def test_batch_of_different_sizes_pads_with_zero_and_masks_with_ignore_index():
    images = [astronaut(), coffee()]  # -> (64, 64) and (64, 96) -> padded to (64, 96)
    maps = [random_map(im.shape, 3, seed) for seed, im in enumerate(images)]
    init = {"size": SMALL, "ignore_index": 255}
    ours = run_ours(images, maps, init=init)
    assert_matches_hf(ours, run_hf(images, maps, init=init))
    assert ours["pixel_values"].shape == (2, 64, 96, 3)
    np.testing.assert_array_equal(ours["pixel_mask"][0, :, 64:], 0)
    np.testing.assert_array_equal(ours["pixel_values"][0, :, 64:], 0.0)
    # HF quirk kept: the masks' padding holds ignore_index, not 0.
    np.testing.assert_array_equal(ours["mask_labels"][0][:, :, 64:], 255.0)


def test_mask_padding_without_ignore_index_is_zero_where_transformers_fails():
    # Deliberate difference: transformers raises "Unsupported format: None" here.
    images = [astronaut(), coffee()]
    maps = [random_map(im.shape, 3, seed) for seed, im in enumerate(images)]
    with pytest.raises(ValueError):
        run_hf(images, maps, init={"size": SMALL})
    ours = run_ours(images, maps, init={"size": SMALL})
    np.testing.assert_array_equal(ours["mask_labels"][0][:, :, 64:], 0.0)
    reference = run_hf(images, maps, init={"size": SMALL, "ignore_index": 255})
    # The unpadded image's masks are the same.
    np.testing.assert_array_equal(ours["mask_labels"][1], reference["mask_labels"][1])


def test_pad_size_matches_transformers():
    images = [astronaut(), chelsea()]
    maps = [random_map(im.shape, 4, seed) for seed, im in enumerate(images)]
    init = {"size": SMALL, "ignore_index": 255, "pad_size": {"height": 100, "width": 130}}
    expected = run_hf(images, maps, init=init)
    assert_matches_hf(run_ours(images, maps, init=init), expected)
    # The same as a call-time override, given as an (h, w) pair.
    init = {"size": SMALL, "ignore_index": 255}
    call_time = run_ours(images, maps, init=init, call={"pad_size": (100, 130)})
    assert_matches_hf(call_time, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_input_in_0_1_matches_transformers(dtype):
    image = (chelsea().astype(np.float64) / 255).astype(dtype)
    # The second setting rescales the [0, 1] floats by 1/255 again, like transformers.
    for init in ({"size": SMALL, "do_rescale": False}, {"size": SMALL}):
        assert_matches_hf(run_ours(image, init=init), run_hf(image, init=init))
    # Quantized through uint8 for the PIL resize: float/255 gives the uint8 result.
    np.testing.assert_allclose(
        run_ours(image, init={"size": SMALL, "do_rescale": False})["pixel_values"],
        run_ours(chelsea(), init={"size": SMALL})["pixel_values"],
        rtol=0,
        atol=1e-5,
    )


def _rgba():
    rgb = coffee()[:200, :300]
    alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
    return np.concatenate([rgb, alpha[..., None]], axis=-1)  # (200, 300, 4)


@pytest.mark.parametrize("kind", ["pil", "uint8", "float"])
def test_rgba_with_do_convert_rgb_matches_transformers(kind):
    rgba = _rgba()
    image = {"pil": Image.fromarray(rgba), "uint8": rgba, "float": rgba / 255.0}[kind]
    init = {"size": SMALL, "do_convert_rgb": True, "do_rescale": kind != "float"}
    ours = run_ours(image, init=init)
    assert ours["pixel_values"].shape[-1] == 3
    assert_matches_hf(ours, run_hf(image, init=init))


def test_rgba_without_conversion_and_four_channel_stats_matches_transformers():
    init = {"size": SMALL, "image_mean": [0.5, 0.4, 0.3, 0.2], "image_std": [0.25] * 4}
    assert_matches_hf(run_ours(_rgba(), init=init), run_hf(_rgba(), init=init))


def test_grey_inputs_match_transformers():
    grey = camera()
    init = {"size": SMALL, "do_convert_rgb": True}
    expected = run_hf(Image.fromarray(grey), init=init)
    assert_matches_hf(run_ours(Image.fromarray(grey), init=init), expected)
    assert_matches_hf(run_ours(grey[..., None], init=init), run_hf(grey[..., None], init=init))
    # One channel kept, with scalar statistics.
    init = {"size": SMALL, "image_mean": 0.5, "image_std": 0.25}
    expected = run_hf(grey[..., None], init=init)
    assert_matches_hf(run_ours(grey[..., None], init=init), expected)
    # Deliberate extension: a 2-D array is a grey image (transformers rejects 2-D arrays).
    with pytest.raises(ValueError):
        run_hf(grey, init=init)
    assert_matches_hf(run_ours(grey, init=init), expected)


def test_chw_pil_and_batched_array_inputs_match_transformers():
    image = astronaut()
    init = {"size": SMALL}
    expected = run_hf(image, init=init)
    assert_matches_hf(run_ours(np.ascontiguousarray(image.transpose(2, 0, 1)), init=init), expected)
    assert_matches_hf(run_ours(Image.fromarray(image), init=init), expected)
    batch = np.stack([astronaut(), astronaut()[:, ::-1]])  # (2, H, W, 3)
    maps = np.stack([random_map(image.shape, 4, 0), random_map(image.shape, 4, 1)])  # (2, H, W)
    init = {"size": SMALL, "ignore_index": 255}
    assert_matches_hf(run_ours(batch, maps, init=init), run_hf(batch, maps, init=init))
    pil_maps = [Image.fromarray(m.astype(np.uint8)) for m in maps]
    assert_matches_hf(run_ours(list(batch), pil_maps, init=init), run_hf(batch, maps, init=init))


def test_return_channels_first_matches_transformers_layout():
    images = [astronaut(), coffee()]
    ours = run_ours(images, init={"size": SMALL}, return_channels_first=True)
    assert ours["pixel_values"].shape == (2, 3, 64, 96)
    assert_matches_hf(ours, run_hf(images, init={"size": SMALL}), channels_first=True)


def test_call_time_overrides_match_transformers():
    images = [chelsea(), coffee()]
    # labels 0, 2, 3, 4: none equal to ignore_index 1, whose pixels differ deliberately under
    # do_reduce_labels (test_reduce_labels_keeps_ignore_index_pixels_ignored)
    maps = [random_map(im.shape, 4, seed) for seed, im in enumerate(images)]
    maps = [np.where(m == 1, 4, m) for m in maps]
    call = {
        "size": {"height": 80, "width": 100},
        "size_divisor": 0,
        "resample": 3,  # bicubic
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.3, 0.4],
        "ignore_index": 1,
        "do_reduce_labels": True,
    }
    assert_matches_hf(run_ours(images, maps, call=call), run_hf(images, maps, call=call))
    call = {"size": SMALL, "resample": 0, "do_normalize": False, "rescale_factor": 0.5}
    assert_matches_hf(run_ours(images, call=call), run_hf(images, call=call))


def test_pixel_values_are_float32_even_without_rescale_or_normalize():
    # Deliberate difference: transformers returns the uint8 PIL output here.
    init = {"size": SMALL, "do_rescale": False, "do_normalize": False}
    ours = run_ours(chelsea(), init=init)
    theirs = run_hf(chelsea(), init=init)
    assert theirs["pixel_values"][0].dtype == np.uint8
    assert_matches_hf(ours, theirs)


def test_none_override_keeps_configured_value():
    processor = Mask2FormerImageProcessor(size=SMALL, ignore_index=255)
    image, seg = astronaut(), random_map(astronaut().shape, 3, 0)
    seg[:100] = 255
    out = processor(image, seg, ignore_index=None)
    assert 255 not in out["class_labels"][0]


def test_segmentation_map_values_above_255_are_resized():
    # Deliberate extension: transformers' PIL backend cannot resize maps with values > 255.
    # Oracle: transformers on the same map relabelled to 0..2 (order and regions preserved).
    image = coffee()
    relabelled = random_map(image.shape, 3, 0)
    big = np.array([0, 300, 70000])[relabelled]
    init = {"size": SMALL}
    with pytest.raises(ValueError):
        run_hf(image, big, init=init)
    ours = run_ours(image, big, init=init)
    theirs = run_hf(image, relabelled, init=init)
    for got, want in zip(ours["mask_labels"], theirs["mask_labels"]):
        np.testing.assert_array_equal(got, want)
    expected_classes = np.array([0, 300, 70000])[theirs["class_labels"][0]]
    np.testing.assert_array_equal(ours["class_labels"][0], expected_classes)


# ------------------------------------------------------------------------------------------
# Configuration: legacy keys, dicts, files.
# ------------------------------------------------------------------------------------------


def test_legacy_keys_give_transformers_4_values():
    legacy = {
        "reduce_labels": True,
        "size_divisibility": 16,
        "size": 64,
        "max_size": 100,
        "ignore_index": 255,
        "image_processor_type": "Mask2FormerImageProcessor",
        "processor_class": "Mask2FormerProcessor",
        "_max_size": 100,
    }
    ours = Mask2FormerImageProcessor.from_dict(legacy)
    assert ours.do_reduce_labels is True and ours.size_divisor == 16
    assert ours.size == {"shortest_edge": 64, "longest_edge": 100}
    modern = {
        "do_reduce_labels": True,
        "size_divisor": 16,
        "size": {"shortest_edge": 64, "longest_edge": 100},
        "ignore_index": 255,
    }
    images = [astronaut(), chelsea()]
    maps = [random_map(im.shape, 5, seed) for seed, im in enumerate(images)]
    assert_matches_hf(ours(images, maps), run_hf(images, maps, init=modern))
    saved = ours.to_dict()
    assert saved["processor_class"] == "Mask2FormerProcessor"
    assert saved["image_processor_type"] == "Mask2FormerImageProcessor"
    assert not {"reduce_labels", "size_divisibility", "max_size", "_max_size"} & set(saved)
    # max_size alone sets the default size's longest_edge.
    max_size_only = Mask2FormerImageProcessor.from_dict({"max_size": 512})
    assert max_size_only.size == {"shortest_edge": 800, "longest_edge": 512}


def test_legacy_and_new_name_precedence_follows_transformers_4():
    # transformers 4's from_dict moved reduce_labels over do_reduce_labels...
    both = {"reduce_labels": True, "do_reduce_labels": False}
    assert Mask2FormerImageProcessor.from_dict(both).do_reduce_labels
    # ...while its __init__ (deprecate_kwarg) kept the new name.
    assert not Mask2FormerImageProcessor(**both).do_reduce_labels
    both = {"size_divisibility": 16, "size_divisor": 8}
    assert Mask2FormerImageProcessor.from_dict(both).size_divisor == 8
    assert Mask2FormerImageProcessor(size_divisibility=16).size_divisor == 16


def test_save_pretrained_round_trip_and_transformers_loads_it(tmp_path):
    ours = Mask2FormerImageProcessor(
        size={"height": 96, "width": 80},
        size_divisor=0,
        ignore_index=255,
        do_reduce_labels=True,
        num_labels=150,
        image_mean=[0.5, 0.5, 0.5],
        resample=3,
        pad_size={"height": 100, "width": 100},
    )
    path = ours.save_pretrained(tmp_path)
    assert json.loads(open(path).read())["size"] == {"height": 96, "width": 80}
    loaded = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == ours.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = Mask2FormerImageProcessorPil.from_pretrained(str(tmp_path))
    images = [astronaut(), coffee()]
    maps = [random_map(im.shape, 4, seed) for seed, im in enumerate(images)]
    assert_matches_hf(loaded(images, maps), hf(images, segmentation_maps=maps))


def test_loads_a_config_saved_by_transformers(tmp_path):
    init = {
        "size": {"shortest_edge": 72, "longest_edge": 100},
        "ignore_index": 255,
        "do_convert_rgb": True,
        "pad_size": {"height": 112, "width": 128},
        "image_std": [0.3, 0.3, 0.3],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Mask2FormerImageProcessorPil(**init).save_pretrained(str(tmp_path))
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    images = [Image.fromarray(_rgba()), chelsea()]
    maps = [random_map((200, 300), 4, 0), random_map(chelsea().shape, 4, 1)]
    assert_matches_hf(ours(images, maps), run_hf(images, maps, init=init))


def test_from_pretrained_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Mask2FormerImageProcessor.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------


def _make(init=None):
    return lambda: Mask2FormerImageProcessor(**(init or {}))


def _run(*args, init=None, **kwargs):
    return lambda: Mask2FormerImageProcessor(**(init or {}))(*args, **kwargs)


IMG = np.zeros((40, 50, 3), np.uint8)
SEG = np.ones((40, 50), np.int64)
GREY = np.zeros((20, 20, 1), np.uint8)

ERROR_CASES = {
    "int_size_at_init": (_make({"size": 64}), ValueError, "max_size"),
    "int_size_at_call": (_run(IMG, size=64), ValueError, "max_size"),
    "bad_size_keys": (_make({"size": {"shortest_edge": 64}}), ValueError, "keys"),
    "image_1d": (_run(np.zeros(10, np.uint8)), ValueError, "shape"),
    "image_5d": (_run(np.zeros((1, 1, 4, 4, 3), np.uint8)), ValueError, "shape"),
    "image_4d_in_list": (_run([np.zeros((1, 4, 4, 3), np.uint8)]), ValueError, "2-D"),
    "bool_image": (_run(np.zeros((8, 8, 3), bool)), TypeError, "dtype"),
    "complex_image": (_run(np.zeros((8, 8, 3), complex)), TypeError, "dtype"),
    "two_channels": (_run(np.zeros((8, 9, 2), np.uint8)), ValueError, "channel"),
    "string_image": (_run("cat.png"), TypeError, "PIL"),
    "empty_list": (_run([]), ValueError, "empty"),
    "float_out_of_range": (_run(np.full((8, 8, 3), 1.5)), ValueError, r"\[0, 1\]"),
    "int_out_of_range": (_run(np.full((8, 8, 3), 300)), ValueError, "255"),
    "grey_with_rgb_mean": (_run(GREY), ValueError, "do_convert_rgb"),
    "mixed_channels": (_run([IMG, GREY]), ValueError, "channels"),
    "map_size_mismatch": (_run(IMG, SEG[:, :49], init={"ignore_index": 255}), ValueError, "size"),
    "map_count_mismatch": (_run([IMG, IMG], [SEG]), ValueError, "one map per image"),
    "map_with_channels": (_run(IMG, [np.zeros((40, 50, 3), int)]), ValueError, "2-D"),
    "map_float_values": (_run(IMG, np.full((40, 50), 0.5)), ValueError, "integer"),
    "map_strings": (_run(IMG, SEG.astype(str)), TypeError, "dtype"),
    "reduce_without_ignore": (
        _run(IMG, SEG, init={"do_reduce_labels": True}), ValueError, "ignore_index"
    ),
    "missing_instance_id": (_run(IMG, SEG, {0: 1}), ValueError, "Instance id 1"),
    "instance_list_length": (_run(IMG, SEG, [{1: 1}, {1: 1}]), ValueError, "dicts"),
    "instance_without_maps": (
        _run(IMG, instance_id_to_semantic_id={1: 1}), ValueError, "without segmentation_maps"
    ),
    "pad_size_too_small": (
        _run(IMG, init={"size": SMALL, "pad_size": (32, 32)}), ValueError, "pad_size"
    ),
    "pad_size_keys": (_make({"pad_size": {"h": 3}}), ValueError, "height"),
    "unknown_override": (_run(IMG, do_resise=False), TypeError, "do_resise"),
    "bad_resample": (_make({"resample": 9}), ValueError, "resample"),
    "bad_mean_type": (_make({"image_mean": "imagenet"}), TypeError, "image_mean"),
    "negative_divisor": (_make({"size_divisor": -1}), ValueError, "size_divisor"),
    # a (1, 2) image whose shortest edge goes to 1 has a 0-pixel side (transformers raises too)
    "resized_to_nothing": (
        _run(np.zeros((1, 2, 3), np.uint8), init={"size": {"shortest_edge": 1, "longest_edge": 1},
                                                  "size_divisor": 0}),
        ValueError, r"image 0 of size \(1, 2\) resizes to \(0, 1\) with size=",
    ),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_raises_clear_error(name):
    make_error, exc, match = ERROR_CASES[name]
    with pytest.raises(exc, match=match):
        make_error()
