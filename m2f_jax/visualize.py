"""Draw a segmentation result over its image: coloured segments, outlines and class labels.

NumPy + Pillow only (no jax), so results can be rendered anywhere:

    results = post_process_panoptic_segmentation(outputs, target_sizes=[image.size[::-1]])
    overlay(image, results[0], id2label=config.id2label).save("panoptic.png")

Colours come from a fixed palette indexed by `label_id`, so a class has the same colour in every
image. Where several segments of one class appear in the same image (instances), each gets a
lighter or darker shade of that colour, chosen from its segment id (deterministic).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["color_for", "overlay", "palette"]

# Hues step by the golden ratio so that consecutive label ids land far apart on the colour wheel;
# saturation and value cycle on top so labels whose hues come close still differ.
_GOLDEN = 0.6180339887498949
_HUE_OFFSET = 0.13
_SATURATIONS = np.array([0.80, 0.60, 0.95])
_VALUES = np.array([0.95, 0.80])
_MAX_SHADE = 0.35  # how far an instance shade may move towards white or black
_OUTLINE_DARKEN = 0.45


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    sector = np.floor(hue * 6.0).astype(np.int64) % 6
    frac = hue * 6.0 - np.floor(hue * 6.0)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * frac)
    t = value * (1.0 - saturation * (1.0 - frac))
    choices = [
        np.stack([value, t, p], -1),
        np.stack([q, value, p], -1),
        np.stack([p, value, t], -1),
        np.stack([p, q, value], -1),
        np.stack([t, p, value], -1),
        np.stack([value, p, q], -1),
    ]
    rgb = np.zeros(hue.shape + (3,))
    for index, choice in enumerate(choices):
        rgb = np.where((sector == index)[..., None], choice, rgb)
    return rgb


def _palette_colors(label_ids: np.ndarray) -> np.ndarray:
    hue = (_HUE_OFFSET + label_ids * _GOLDEN) % 1.0
    saturation = _SATURATIONS[label_ids % len(_SATURATIONS)]
    value = _VALUES[(label_ids // len(_SATURATIONS)) % len(_VALUES)]
    return np.rint(_hsv_to_rgb(hue, saturation, value) * 255.0).astype(np.uint8)  # (N, 3)


def palette(n: int) -> np.ndarray:
    """The first `n` palette colours as an (n, 3) uint8 array; row i is the colour of label_id i."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"palette(n) needs a non-negative int, got {n!r}")
    return _palette_colors(np.arange(int(n), dtype=np.int64))


def color_for(label_id: int, segment_id: int | None = None) -> tuple[int, int, int]:
    """RGB colour of a class (`palette` row `label_id`), or with `segment_id` that class's shade
    for one instance: the class colour moved towards white or black by up to 35%, by an amount
    that depends only on the segment id."""
    if not isinstance(label_id, (int, np.integer)) or isinstance(label_id, bool) or label_id < 0:
        raise ValueError(f"label_id must be a non-negative int, got {label_id!r}")
    base = _palette_colors(np.array([int(label_id)], dtype=np.int64))[0].astype(np.float64)
    if segment_id is None:
        return tuple(int(c) for c in base)
    if not isinstance(segment_id, (int, np.integer)) or isinstance(segment_id, bool):
        raise ValueError(f"segment_id must be an int or None, got {segment_id!r}")
    # Golden-ratio steps again: consecutive segment ids get well-separated shades in [-1, 1].
    shade = 2.0 * ((0.5 + int(segment_id) * _GOLDEN) % 1.0) - 1.0
    target = 255.0 if shade > 0 else 0.0
    shaded = base + (target - base) * _MAX_SHADE * abs(shade)
    return tuple(int(c) for c in np.rint(shaded))


def _image_array(image) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, 3) uint8 RGB and the (H, W) alpha channel, or None when the image has none."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA"))
            return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
        return np.asarray(image.convert("RGB")), None
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"an image array must be uint8 (H, W[, C]), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1), None
    if array.shape[-1] == 4:
        return np.ascontiguousarray(array[..., :3]), np.ascontiguousarray(array[..., 3])
    return array, None


def _integer_map(segmentation) -> np.ndarray:
    seg_map = np.asarray(segmentation)
    if seg_map.dtype == object:
        raise TypeError(
            "the segmentation must be one (H, W) array of ids; got a list of objects (pass one "
            "image's result, e.g. results[0], and not the RLE output of return_coco_annotation)"
        )
    if seg_map.ndim != 2:
        raise ValueError(
            f"the segmentation map must have rank 2 (H, W), got shape {seg_map.shape} (pass one "
            "image's result; the (N, H, W) masks of return_binary_maps are not supported)"
        )
    if seg_map.dtype == bool:
        return seg_map.astype(np.int64)
    if np.issubdtype(seg_map.dtype, np.floating):
        # Instance maps come as float32 with -1 background (a transformers quirk kept for parity).
        if not np.all(np.isfinite(seg_map)) or np.any(seg_map != np.round(seg_map)):
            raise ValueError("a float segmentation map must hold whole numbers only")
    elif not np.issubdtype(seg_map.dtype, np.integer):
        raise TypeError(f"the segmentation map must hold integer ids, got dtype {seg_map.dtype}")
    return seg_map.astype(np.int64)


def _resize_nearest(seg_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize sampling each output pixel's centre (the map is ids, never interpolated)."""
    in_h, in_w = seg_map.shape
    if (in_h, in_w) == (height, width):
        return seg_map
    rows = np.minimum(((np.arange(height) + 0.5) * in_h / height).astype(np.int64), in_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * in_w / width).astype(np.int64), in_w - 1)
    return seg_map[rows[:, None], cols[None, :]]


def _label_name(label_id: int, id2label) -> str:
    if id2label:
        for key in (label_id, str(label_id)):
            if key in id2label:
                return str(id2label[key])
    return str(label_id)


def _semantic_segments(seg_map: np.ndarray, ignore_index) -> list[dict]:
    present = np.unique(seg_map)
    # Class ids are never negative, so negative values can only mean "no class" (ignored too).
    present = present[present >= 0]
    if ignore_index is not None:
        present = present[present != ignore_index]
    return [{"id": int(c), "label_id": int(c), "label": None, "score": None} for c in present]


def _segments(result, ignore_index) -> tuple[np.ndarray, list[dict]]:
    """The id map and one {"id", "label_id", "label", "score"} per segment to draw.

    A semantic map becomes one segment per class present, its id the class id."""
    if isinstance(result, Mapping):
        if "segmentation" not in result:
            raise KeyError(
                "the result has no 'segmentation' key (expected one image's result: a dict with "
                "'segmentation' and 'segments_info' (post-processing) or 'segments' "
                f"(m2f_jax.segment), or a semantic (H, W) map); keys: {sorted(map(str, result))}"
            )
        seg_map = _integer_map(result["segmentation"])
        # post_process_* name the list `segments_info`, m2f_jax.segment names it `segments`.
        key = next((k for k in ("segments_info", "segments") if k in result), None)
        if key is None:
            # e.g. post_process_semantic_segmentation(..., return_segmentation_scores=True)
            return seg_map, _semantic_segments(seg_map, ignore_index)
        segments = []
        for info in result[key] or []:
            if not isinstance(info, Mapping) or "id" not in info or "label_id" not in info:
                raise ValueError(f"each {key} entry needs 'id' and 'label_id', got {info!r}")
            segments.append({
                "id": int(info["id"]),
                "label_id": int(info["label_id"]),
                "label": info.get("label"),
                "score": info.get("score"),
            })
        return seg_map, segments
    if isinstance(result, (list, tuple)) and result and isinstance(result[0], Mapping):
        raise TypeError("pass one image's result (e.g. results[0]), not the list for the batch")
    seg_map = _integer_map(result)
    return seg_map, _semantic_segments(seg_map, ignore_index)


def _shift_reduce(index_map: np.ndarray, radius: int, reduce) -> np.ndarray:
    """Separable max/min filter over a (2r+1)^2 window, edges replicated (the image border is not
    a segment boundary)."""
    out = index_map
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        length = out.shape[axis]
        result = out
        for offset in range(2 * radius + 1):
            result = reduce(result, np.take(padded, np.arange(offset, offset + length), axis=axis))
        out = result
    return out


def _boundary(index_map: np.ndarray, radius: int) -> np.ndarray:
    """Segment pixels within `radius` (Chebyshev) of a pixel of another segment or background."""
    neighbour_max = _shift_reduce(index_map, radius, np.maximum)
    neighbour_min = _shift_reduce(index_map, radius, np.minimum)
    return (index_map >= 0) & ((neighbour_max != index_map) | (neighbour_min != index_map))


def _label_anchors(index_map: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment: area, and the (row, col) of its pixel closest to its centroid (inside the mask
    even for a ring or a split segment)."""
    flat = index_map.reshape(-1)
    inside = np.flatnonzero(flat >= 0)
    owner = flat[inside]
    rows, cols = np.divmod(inside, index_map.shape[1])
    area = np.bincount(owner, minlength=count).astype(np.float64)
    safe_area = np.maximum(area, 1.0)
    centre_row = np.bincount(owner, weights=rows, minlength=count) / safe_area
    centre_col = np.bincount(owner, weights=cols, minlength=count) / safe_area
    distance = (rows - centre_row[owner]) ** 2 + (cols - centre_col[owner]) ** 2
    order = np.lexsort((distance, owner))  # by segment, nearest first
    first = np.searchsorted(owner[order], np.arange(count))
    first = np.minimum(first, max(len(order) - 1, 0))
    anchor_row = rows[order][first] if len(order) else np.zeros(count, np.int64)
    anchor_col = cols[order][first] if len(order) else np.zeros(count, np.int64)
    return area, anchor_row, anchor_col


def _load_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default()


def _text_color(background) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance >= 140 else (255, 255, 255)


def overlay(
    image,
    result,
    id2label=None,
    alpha: float = 0.5,
    outline: bool = True,
    show_labels: bool = True,
    font_size: int | None = None,
    *,
    ignore_index: int | None = None,
) -> Image.Image:
    """Draw a segmentation result over `image` and return the new PIL image.

    Args:
        image: PIL image (any mode) or uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
            The output is RGB, or RGBA with the input's alpha channel kept unchanged.
        result: one image's result, a dict with `segmentation` (H, W) ids and its segments
            ({"id", "label_id", "score"[, "label"]} each) under `segments_info` (post-processing)
            or `segments` (`m2f_jax.segment`); pixels whose id has no entry (0 panoptic, -1
            instance) are background. A dict with `segmentation` and neither list (e.g. with
            `segmentation_scores`), or a bare (H, W) array, is a semantic map of class ids: each
            class present is one segment without a score. A map of another size than the image
            is resized to it with nearest-neighbour sampling (pixel centres).
        id2label: label names by label id (int or str keys, e.g. `config.id2label`); an entry's
            own "label" wins; without either the label id is shown.
        alpha: segment colour weight in the fill, `image * (1 - alpha) + colour * alpha`.
        outline: draw each segment's boundary pixels (1 px, 2 px from 768 px on the short side)
            opaque, in a darker shade of its colour; drawn on the segment's own pixels only.
        show_labels: draw "name score" (e.g. "person 0.93") on a box filled with the segment's
            colour, centred on the segment pixel nearest its centroid and kept inside the image.
            Smaller segments' labels are drawn last, so on top.
        font_size: label text height in pixels; default scales with the image (short side / 32,
            10 to 40 px). Pillow < 10.1 ignores it (fixed bitmap font).
        ignore_index: for a semantic map, a class id to treat as background (negative values
            always are).

    Background pixels are returned exactly as the image's, except under label boxes.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb, alpha_channel = _image_array(image)
    height, width = rgb.shape[:2]
    seg_map, segments = _segments(result, ignore_index)
    seg_map = _resize_nearest(seg_map, height, width)

    # Index map: -1 background, else the segment's position in `segments`.
    index_map = np.full((height, width), -1, dtype=np.int64)
    if segments:
        ids = np.array([s["id"] for s in segments], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"segments_info has repeated ids: {ids.tolist()}")
        order = np.argsort(ids)
        position = np.clip(np.searchsorted(ids[order], seg_map), 0, len(ids) - 1)
        known = ids[order][position] == seg_map
        index_map = np.where(known, order[position], -1)

    # One class colour for a lone segment of its class; instance shades only where a class repeats.
    label_counts: dict[int, int] = {}
    for segment in segments:
        label_counts[segment["label_id"]] = label_counts.get(segment["label_id"], 0) + 1
    colors = np.array(
        [
            color_for(s["label_id"], s["id"] if label_counts[s["label_id"]] > 1 else None)
            for s in segments
        ],
        dtype=np.float64,
    ).reshape(-1, 3)  # (S, 3)

    out = rgb.copy()
    inside = index_map >= 0
    if segments:
        fill = rgb[inside].astype(np.float64) * (1.0 - alpha) + colors[index_map[inside]] * alpha
        out[inside] = np.clip(np.rint(fill), 0, 255).astype(np.uint8)
        if outline:
            radius = 2 if min(height, width) >= 768 else 1
            edge = _boundary(index_map, radius)
            dark = np.rint(colors * _OUTLINE_DARKEN).astype(np.uint8)
            out[edge] = dark[index_map[edge]]

    canvas = Image.fromarray(out)
    if show_labels and segments:
        size = font_size if font_size is not None else int(np.clip(round(min(height, width) / 32), 10, 40))
        font = _load_font(int(size))
        draw = ImageDraw.Draw(canvas)
        area, anchor_row, anchor_col = _label_anchors(index_map, len(segments))
        pad = max(1, int(size) // 5)
        for index in np.argsort(-area, kind="stable"):
            if area[index] == 0:
                continue
            segment = segments[index]
            name = segment["label"] or _label_name(segment["label_id"], id2label)
            text = name if segment["score"] is None else f"{name} {float(segment['score']):.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            box_w = right - left + 2 * pad
            box_h = bottom - top + 2 * pad
            x0 = int(np.clip(anchor_col[index] - box_w // 2, 0, max(width - box_w, 0)))
            y0 = int(np.clip(anchor_row[index] - box_h // 2, 0, max(height - box_h, 0)))
            box_color = tuple(int(c) for c in colors[index])
            draw.rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], fill=box_color)
            draw.text((x0 + pad - left, y0 + pad - top), text, fill=_text_color(box_color), font=font)

    if alpha_channel is not None:
        canvas.putalpha(Image.fromarray(alpha_channel))
    return canvas
