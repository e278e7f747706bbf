"""overlay / palette / color_for on a real photo (skimage's astronaut) with hand-made rectangles.

Oracles: the alpha blend computed here with NumPy, the input image itself for background pixels,
masks built here by slicing, and Pillow's own NEAREST resize for a size-mismatched map.
"""

import numpy as np
import pytest
from PIL import Image
from skimage import data

from m2f_jax.visualize import color_for, overlay, palette

ID2LABEL = {0: "person", 5: "airplane", 7: "truck"}
# Rectangles big enough that a label box centred in them stays inside them.
PERSON = (slice(40, 300), slice(150, 350))
PLANE = (slice(330, 500), slice(20, 220))


@pytest.fixture(scope="module")
def photo():
    return data.astronaut()  # (512, 512, 3) uint8


def _panoptic(shape=(512, 512)):
    seg = np.zeros(shape, np.int32)
    seg[PERSON] = 1
    seg[PLANE] = 2
    info = [
        {"id": 1, "label_id": 0, "was_fused": False, "score": 0.93},
        {"id": 2, "label_id": 5, "was_fused": False, "score": 0.71},
    ]
    return {"segmentation": seg, "segments_info": info}


def _rect_mask(rect, shape=(512, 512), shrink=0):
    mask = np.zeros(shape, bool)
    rows, cols = rect
    mask[rows.start + shrink:rows.stop - shrink, cols.start + shrink:cols.stop - shrink] = True
    return mask


def _blend(image, color, alpha):
    return np.rint(image.astype(np.float64) * (1 - alpha) + np.array(color, np.float64) * alpha)


def test_fill_is_alpha_blend_background_exact_outline_differs(photo):
    result = _panoptic()
    out = np.asarray(overlay(photo, result, ID2LABEL, alpha=0.5, show_labels=False))
    assert out.shape == photo.shape and out.dtype == np.uint8
    for rect, label_id in ((PERSON, 0), (PLANE, 5)):
        interior = _rect_mask(rect, shrink=3)
        expected = _blend(photo[interior], color_for(label_id), 0.5)
        assert np.abs(out[interior].astype(np.int64) - expected).max() <= 1
        # Top edge row of the rectangle, away from the corners: the outline.
        rows, cols = rect
        edge = out[rows.start, cols.start + 3:cols.stop - 3].astype(np.int64)
        fill = _blend(photo[rows.start, cols.start + 3:cols.stop - 3], color_for(label_id), 0.5)
        assert np.all(np.abs(edge - fill).sum(-1) > 10)
        assert edge.sum() < fill.sum()  # darker than the fill
    background = ~(_rect_mask(PERSON) | _rect_mask(PLANE))
    np.testing.assert_array_equal(out[background], photo[background])


def test_outline_off_fills_up_to_the_edge(photo):
    out = np.asarray(overlay(photo, _panoptic(), alpha=0.5, outline=False, show_labels=False))
    mask = _rect_mask(PERSON)
    assert np.abs(out[mask].astype(np.int64) - _blend(photo[mask], color_for(0), 0.5)).max() <= 1


def test_labels_drawn_on_colored_box_and_background_untouched(photo):
    out = np.asarray(overlay(photo, _panoptic(), ID2LABEL, alpha=0.5))
    for rect, label_id in ((PERSON, 0), (PLANE, 5)):
        rows, cols = rect
        centre_r, centre_c = (rows.start + rows.stop) // 2, (cols.start + cols.stop) // 2
        window = out[centre_r - 20:centre_r + 20, centre_c - 80:centre_c + 80]
        box_pixels = np.all(window == np.array(color_for(label_id), np.uint8), axis=-1)
        assert box_pixels.sum() > 100
        # Text strokes: dark or light pixels differing from the box, inside the same window.
        assert np.any(np.abs(window.astype(np.int64) - color_for(label_id)).sum(-1) > 200)
        # Rows far from the label keep the blend.
        far = _rect_mask(rect, shrink=3)
        far[centre_r - 40:centre_r + 40] = False
        assert np.abs(out[far].astype(np.int64) - _blend(photo[far], color_for(label_id), 0.5)).max() <= 1
    background = ~(_rect_mask(PERSON) | _rect_mask(PLANE))
    np.testing.assert_array_equal(out[background], photo[background])


def test_colors_differ_by_label_and_are_stable_across_calls(photo):
    out = np.asarray(overlay(photo, _panoptic(), alpha=1.0, outline=False, show_labels=False))
    person = out[PERSON][5, 5]
    plane = out[PLANE][5, 5]
    assert np.abs(person.astype(np.int64) - plane).sum() > 60
    # Another image and another map: the person class keeps its colour.
    other = np.full((64, 80, 3), 30, np.uint8)
    seg = np.zeros((64, 80), np.int32)
    seg[10:50, 20:60] = 9
    result = {"segmentation": seg, "segments_info": [{"id": 9, "label_id": 0, "score": 0.5}]}
    again = np.asarray(overlay(other, result, alpha=1.0, outline=False, show_labels=False))
    np.testing.assert_array_equal(again[30, 40], person)
    np.testing.assert_array_equal(person, color_for(0))


def test_alpha_zero_leaves_interiors_unchanged(photo):
    out = np.asarray(overlay(photo, _panoptic(), alpha=0.0, show_labels=False))
    interior = _rect_mask(PERSON, shrink=3) | _rect_mask(PLANE, shrink=3)
    np.testing.assert_array_equal(out[interior], photo[interior])


def test_instances_of_one_class_get_distinct_shades_and_float_map_with_minus_one(photo):
    seg = np.full((512, 512), -1.0, np.float32)  # instance convention: float32, -1 background
    seg[PERSON] = 0  # id 0 is a real instance here
    seg[PLANE] = 1
    info = [{"id": 0, "label_id": 3, "score": 0.9}, {"id": 1, "label_id": 3, "score": 0.8}]
    out = np.asarray(overlay(photo, {"segmentation": seg, "segments_info": info}, alpha=1.0,
                             outline=False, show_labels=False))
    first, second = out[PERSON][5, 5], out[PLANE][5, 5]
    assert tuple(first) == color_for(3, 0) and tuple(second) == color_for(3, 1)
    assert tuple(first) != tuple(second)
    base = np.array(color_for(3), np.int64)
    assert np.abs(first - base).max() <= 0.35 * 255 + 1 and np.abs(second - base).max() <= 0.35 * 255 + 1
    background = seg == -1
    np.testing.assert_array_equal(out[background], photo[background])


def test_ids_missing_from_segments_info_are_background(photo):
    result = _panoptic()
    result["segmentation"][0:30, 0:30] = 17  # no entry for id 17
    out = np.asarray(overlay(photo, result, show_labels=False))
    np.testing.assert_array_equal(out[0:30, 0:30], photo[0:30, 0:30])


def test_semantic_map_input_with_ignore_value(photo):
    semantic = np.full((512, 512), 255, np.int64)
    semantic[PERSON] = 0
    semantic[PLANE] = 12
    out = np.asarray(overlay(photo, semantic, ID2LABEL, alpha=0.4, ignore_index=255))
    for rect, class_id in ((PERSON, 0), (PLANE, 12)):
        far = _rect_mask(rect, shrink=3)
        rows = rect[0]
        centre_r = (rows.start + rows.stop) // 2
        far[centre_r - 40:centre_r + 40] = False
        assert np.abs(out[far].astype(np.int64) - _blend(photo[far], color_for(class_id), 0.4)).max() <= 1
    ignored = semantic == 255
    np.testing.assert_array_equal(out[ignored], photo[ignored])


def test_size_mismatched_map_is_resized_nearest(photo):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 3, (37, 53)).astype(np.uint8)  # non-integer scale factors
    out = np.asarray(overlay(photo, small, alpha=1.0, outline=False, show_labels=False))
    expected_map = np.asarray(Image.fromarray(small).resize((512, 512), Image.NEAREST))
    expected = palette(3)[expected_map]
    np.testing.assert_array_equal(out, expected)


def test_image_modes(photo):
    grey = photo[..., 0]
    out = overlay(grey, _panoptic(), show_labels=False)
    assert out.mode == "RGB"
    background = ~(_rect_mask(PERSON) | _rect_mask(PLANE))
    np.testing.assert_array_equal(np.asarray(out)[background], np.repeat(grey[..., None], 3, -1)[background])
    rgba = np.dstack([photo, np.full(photo.shape[:2], 200, np.uint8)])
    out = overlay(Image.fromarray(rgba), _panoptic())
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], 200)
    np.testing.assert_array_equal(np.asarray(out)[background][:, :3], photo[background])


def test_palette_matches_color_for_and_is_distinct():
    colors = palette(20)
    assert colors.shape == (20, 3) and colors.dtype == np.uint8
    assert [tuple(c) for c in colors] == [color_for(i) for i in range(20)]
    assert len({tuple(c) for c in colors}) == 20
    assert color_for(4, 7) == color_for(4, 7)


def _logits(shape=(64, 64)):
    """Two confident queries, class 2 on the top half and class 0 on the bottom half, and one
    "no object" query; mask logits at a quarter of `shape`, as the model gives them."""
    class_logits = np.full((1, 3, 5), -8.0, np.float32)
    class_logits[0, 0, 2] = class_logits[0, 1, 0] = class_logits[0, 2, 4] = 8.0
    masks = np.full((1, 3, shape[0] // 4, shape[1] // 4), -8.0, np.float32)
    masks[0, 0, : shape[0] // 8] = 8.0
    masks[0, 1, shape[0] // 8:] = 8.0
    return {"class_queries_logits": class_logits, "masks_queries_logits": masks}


def _expect_segments_drawn(image, out, seg_map, segments):
    """Every segment's pixels are the alpha-0.5 blend of its class colour (classes differ here,
    so no instance shades); every other pixel is the image's."""
    drawn = np.zeros(seg_map.shape, bool)
    for segment in segments:
        mask = seg_map == segment["id"]
        assert mask.any()
        expected = _blend(image[mask], color_for(segment["label_id"]), 0.5)
        assert np.abs(out[mask].astype(np.int64) - expected).max() <= 1
        drawn |= mask
    np.testing.assert_array_equal(out[~drawn], image[~drawn])


@pytest.mark.parametrize("task", ["panoptic", "instance", "semantic"])
def test_segment_results_with_their_segments_list_are_drawn(photo, task):
    """`m2f_jax.segment`'s dicts hold `segments`, not `segments_info`; they are drawn as the
    post-processing dicts are (oracle: the NumPy blend over the result's own id map)."""
    from m2f_jax import inference
    from m2f_jax.processing import post_processing

    image = np.ascontiguousarray(photo[::8, ::8])  # (64, 64, 3)
    geometry = {"target_sizes": [image.shape[:2]]}
    (result,) = inference._post_process(post_processing, task, _logits(), geometry, 0.5, 0.5, 0.8, None, False)
    result = inference._with_names(result, {0: "sky", 2: "tree"})
    assert "segments_info" not in result and sorted(s["label_id"] for s in result["segments"]) == [0, 2]
    out = np.asarray(overlay(image, result, alpha=0.5, outline=False, show_labels=False))
    _expect_segments_drawn(image, out, result["segmentation"], result["segments"])


def test_semantic_dict_with_scores_is_drawn_as_a_semantic_map(photo):
    """post_process_semantic_segmentation(..., return_segmentation_scores=True) gives a dict with
    `segmentation` and `segmentation_scores` only: each class present is one segment, as for the
    bare map; `ignore_index` still applies."""
    from m2f_jax.processing import post_processing

    image = np.ascontiguousarray(photo[::8, ::8])
    (result,) = post_processing.post_process_semantic_segmentation(
        _logits(), target_sizes=[image.shape[:2]], return_segmentation_scores=True)
    assert set(result) == {"segmentation", "segmentation_scores"}
    seg_map = np.asarray(result["segmentation"])
    classes = [{"id": c, "label_id": c} for c in (0, 2)]
    assert sorted(np.unique(seg_map).tolist()) == [0, 2]
    out = np.asarray(overlay(image, result, alpha=0.5, outline=False, show_labels=False))
    _expect_segments_drawn(image, out, seg_map, classes)
    np.testing.assert_array_equal(out, np.asarray(overlay(image, seg_map, alpha=0.5, outline=False,
                                                          show_labels=False)))
    out = np.asarray(overlay(image, result, alpha=0.5, outline=False, show_labels=False, ignore_index=2))
    _expect_segments_drawn(image, out, seg_map, classes[:1])


def test_errors(photo):
    with pytest.raises(ValueError, match="rank 2"):
        overlay(photo, np.zeros((2, 512, 512), np.int32))
    with pytest.raises(ValueError, match="rank 2"):
        overlay(photo, {"segmentation": np.zeros(512, np.int32), "segments_info": []})
    with pytest.raises(KeyError, match="'segmentation' and 'segments_info' .* or 'segments'"):
        overlay(photo, {"segments_info": []})
    with pytest.raises(KeyError, match="keys: \\['segments'\\]"):
        overlay(photo, {"segments": []})
    with pytest.raises(ValueError, match="each segments entry needs 'id' and 'label_id'"):
        overlay(photo, {"segmentation": np.zeros((512, 512), np.int32), "segments": [{"id": 1}]})
    with pytest.raises(TypeError, match="one image's result"):
        overlay(photo, [_panoptic()])
    with pytest.raises(ValueError, match="alpha"):
        overlay(photo, _panoptic(), alpha=1.5)
    with pytest.raises(TypeError, match="uint8"):
        overlay(photo.astype(np.float32), _panoptic())
    with pytest.raises(ValueError, match="non-negative"):
        color_for(-1)
