"""A synthetic segmentation dataset written in the real on-disk formats, for tests and smoke runs.

Each image is one or two textured "stuff" regions (smooth-noise textures, one muted colour family
per stuff class), sometimes an unlabelled grey patch, and a few flat-coloured "thing" shapes
(circle, rectangle, triangle; one colour family per thing class) that may occlude each other.
The same scene is written as:

* ADE20K-style semantic segmentation (``SemanticDataset``)::

    images/{training,validation}/synth_000000.jpg
    annotations/{training,validation}/synth_000000.png   # uint8, 0 = other/ignore, class c -> c + 1

* COCO panoptic (``CocoPanopticDataset``): ``panoptic_{train,val}.json`` and PNGs
  ``panoptic_{train,val}/synth_000000.png`` (segment id = R + 256 G + 256^2 B, 0 = void), images
  in ``{train,val}/``.
* COCO instances (``CocoInstanceDataset``): ``instances_{train,val}.json`` (thing categories
  only). A fully visible shape is stored as its polygon, an occluded one as compressed RLE, and
  a crowd annotation (about one image in five has one) as uncompressed RLE, as in COCO.

plus ``labels.json`` (``categories`` and the contiguous ``id2label``). Class c (0-based, things
first, then stuff) has COCO category id c + 1 and semantic value c + 1, so the contiguous labels
are the same in the three formats. Masks are the *visible* parts of the shapes; every kept
instance has at least ``MIN_AREA`` visible pixels.

Deterministic for a seed: image i of a split is drawn from ``default_rng([seed, split, i])``
(:func:`render_scene` redraws it, which the tests use as the oracle of the drawn shapes).
Shapes are rasterised by pycocotools from their polygons, so a polygon annotation decodes to
exactly the drawn mask.
"""
from __future__ import annotations

import colorsys
import dataclasses
import io
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
MAX_STUFF_CLASSES = 8
SPLITS = {"train": ("training", 0), "val": ("validation", 1)}  # COCO name -> (ADE20K name, seed key)
FORMATS = ("semantic", "panoptic", "instance")
MIN_AREA = 16
CROWD_PROBABILITY = 0.2
OTHER_PROBABILITY = 0.5


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError as error:  # pragma: no cover - pycocotools is a test dependency
        raise ImportError("the synthetic COCO annotations need pycocotools: pip install pycocotools") from error
    return mask_utils


@dataclasses.dataclass
class Shape:
    """One drawn thing: its class, geometry and the pycocotools rasterisation of its polygon."""

    class_id: int
    kind: str  # one of SHAPES
    center: Tuple[float, float]  # (x, y) in pixels
    radius: float  # circle radius; half-size scale for the other shapes
    angle: float  # radians
    polygon: List[float]  # [x0, y0, x1, y1, ...] as written to the JSON
    full_mask: np.ndarray  # (H, W) bool, before occlusion
    visible_mask: np.ndarray  # (H, W) bool
    iscrowd: bool = False


@dataclasses.dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8, before JPEG encoding
    label_map: np.ndarray  # (H, W) uint8 semantic values: 0 = other, class c -> c + 1
    shapes: List[Shape]
    stuff_classes: List[int]  # present stuff classes (0-based class ids)


def categories(num_thing_classes: int = 3, num_stuff_classes: int = 2) -> List[dict]:
    """COCO-style categories: things first (id 1..T), then stuff; ``color`` is the family's RGB."""
    if not 1 <= num_thing_classes:
        raise ValueError(f"num_thing_classes must be >= 1, got {num_thing_classes}.")
    if not 1 <= num_stuff_classes <= MAX_STUFF_CLASSES:
        raise ValueError(f"num_stuff_classes must be in [1, {MAX_STUFF_CLASSES}], got {num_stuff_classes}.")
    result = []
    for k in range(num_thing_classes):
        kind = SHAPES[k % len(SHAPES)]
        name = f"{_hue_name(_thing_hue(k, num_thing_classes))}_{kind}{k}"
        result.append({"id": k + 1, "name": name, "supercategory": "shape", "isthing": 1,
                       "color": _rgb(_thing_hue(k, num_thing_classes), 0.9, 0.95)})
    for s in range(num_stuff_classes):
        name = f"{_hue_name(_stuff_hue(s, num_stuff_classes))}_texture{s}"
        result.append({"id": num_thing_classes + s + 1, "name": name, "supercategory": "stuff",
                       "isthing": 0, "color": _rgb(_stuff_hue(s, num_stuff_classes), 0.4, 0.5)})
    return result


def _thing_hue(k: int, num_thing_classes: int) -> float:
    return k / num_thing_classes


def _stuff_hue(s: int, num_stuff_classes: int) -> float:
    return (s + 0.5) / num_stuff_classes


def _hue_name(hue: float) -> str:
    names = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet",
             "purple", "magenta")
    return names[int(round(hue * len(names))) % len(names)]


def _rgb(hue: float, saturation: float, value: float) -> List[int]:
    return [int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value)]


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """(H, W) float32 noise, roughly unit scale, smooth at ~1/cells of the image."""
    coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def _polygon(kind: str, center, radius: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """(V, 2) vertices (x, y)."""
    if kind == "circle":
        theta = angle + np.linspace(0, 2 * np.pi, 32, endpoint=False)
        offsets = radius * np.stack([np.cos(theta), np.sin(theta)], -1)
    elif kind == "rectangle":
        half = radius * rng.uniform(0.6, 1.3, size=2) / np.sqrt(2)
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        offsets = corners @ rotation.T
    elif kind == "triangle":
        theta = angle + 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.3, 0.3, size=3)
        offsets = radius * rng.uniform(0.85, 1.15, size=(3, 1)) * np.stack([np.cos(theta), np.sin(theta)], -1)
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.round(np.asarray(center) + offsets, 2)


def _rasterise(polygon_flat: List[float], height: int, width: int) -> np.ndarray:
    mask_utils = _mask_utils()
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon_flat], height, width))
    return mask_utils.decode(rle).astype(bool)


def render_scene(seed: int, split: str, index: int, image_size: Tuple[int, int] = (128, 128),
                 num_thing_classes: int = 3, num_stuff_classes: int = 2, max_shapes: int = 5) -> Scene:
    """Draws image ``index`` of ``split`` ("train" or "val"); what :func:`write_dataset` writes."""
    height, width = image_size
    rng = np.random.default_rng([seed, SPLITS[split][1], index])

    # Stuff: one or two classes split by a wavy horizontal boundary.
    num_stuff_here = min(num_stuff_classes, int(rng.integers(1, 3)))
    stuff = [int(s) for s in rng.choice(num_stuff_classes, size=num_stuff_here, replace=False)]
    ys, xs = np.mgrid[:height, :width]
    region = np.zeros((height, width), np.int64)
    if num_stuff_here == 2:
        boundary = height * rng.uniform(0.3, 0.7) + height * rng.uniform(0.03, 0.12) * np.sin(
            2 * np.pi * rng.uniform(0.5, 2.0) * xs / width + rng.uniform(0, 2 * np.pi))
        region = (ys >= boundary).astype(np.int64)
    label_map = (num_thing_classes + 1 + np.asarray(stuff)[region]).astype(np.uint8)
    image = np.empty((height, width, 3), np.float32)
    for r, s in enumerate(stuff):
        base = np.asarray(_rgb(_stuff_hue(s, num_stuff_classes) + rng.uniform(-0.03, 0.03),
                               rng.uniform(0.3, 0.5), rng.uniform(0.4, 0.6)), np.float32)
        texture = _smooth_noise(rng, height, width, int(rng.integers(3, 9)))
        where = region == r
        image[where] = base + 25.0 * texture[where][:, None]

    # An unlabelled patch ("other": semantic 0, panoptic void).
    if rng.uniform() < OTHER_PROBABILITY:
        h, w = (rng.uniform(0.15, 0.35, size=2) * (height, width)).astype(int) + 1
        y0, x0 = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        grey = 128 + 40 * rng.normal(size=(h, w)).astype(np.float32)
        image[y0:y0 + h, x0:x0 + w] = grey[..., None]
        label_map[y0:y0 + h, x0:x0 + w] = 0

    # Things, drawn in order (later ones occlude earlier ones); a candidate is rejected when it
    # is too small or would leave an earlier shape with fewer than MIN_AREA visible pixels.
    instance_map = np.zeros((height, width), np.int64)  # 0 = no thing, j + 1 = shapes[j]
    shapes: List[Shape] = []
    target = int(rng.integers(1, max_shapes + 1))
    for _ in range(3 * target):
        if len(shapes) == target:
            break
        class_id = int(rng.integers(num_thing_classes))
        kind = SHAPES[class_id % len(SHAPES)]
        radius = float(rng.uniform(0.08, 0.2) * min(height, width))
        reach = radius * 1.2
        center = (float(rng.uniform(reach, max(reach, width - reach))),
                  float(rng.uniform(reach, max(reach, height - reach))))
        angle = float(rng.uniform(0, 2 * np.pi))
        polygon = [float(v) for v in _polygon(kind, center, radius, angle, rng).reshape(-1)]
        mask = _rasterise(polygon, height, width)
        if mask.sum() < MIN_AREA:
            continue
        remaining = np.bincount(instance_map[~mask], minlength=len(shapes) + 1)[1:]
        if len(shapes) and remaining.min() < MIN_AREA:
            continue
        instance_map[mask] = len(shapes) + 1
        shapes.append(Shape(class_id, kind, center, radius, angle, polygon, mask, mask))
    colours = np.zeros((len(shapes) + 1, 3), np.float32)
    for j, shape in enumerate(shapes):
        shape.visible_mask = instance_map == j + 1
        colours[j + 1] = _rgb(_thing_hue(shape.class_id, num_thing_classes) + rng.uniform(-0.02, 0.02),
                              rng.uniform(0.8, 1.0), rng.uniform(0.85, 1.0))
        label_map[shape.visible_mask] = shape.class_id + 1
    if shapes and rng.uniform() < CROWD_PROBABILITY:
        shapes[int(rng.integers(len(shapes)))].iscrowd = True
    things = instance_map > 0
    image[things] = colours[instance_map[things]]
    image += rng.normal(0, 3.0, size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    present_stuff = [s for s in stuff if np.any(label_map == num_thing_classes + 1 + s)]
    return Scene(image, label_map, shapes, present_stuff)


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _bbox(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _segment_ids(rng: np.random.Generator, count: int) -> List[int]:
    while True:
        ids = rng.integers(1, 256 ** 3, size=count)
        if len(set(ids.tolist())) == count:
            return [int(i) for i in ids]


def write_dataset(root: str, num_train: int = 32, num_val: int = 8, image_size: Tuple[int, int] = (128, 128),
                  num_thing_classes: int = 3, num_stuff_classes: int = 2, seed: int = 0,
                  formats: Sequence[str] = FORMATS, max_shapes: int = 5) -> Dict:
    """Writes the synthetic dataset under ``root`` (layout in the module docstring).

    Returns ``{"root", "id2label", "categories", "num_examples": {"train": n, "val": n}}``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {FORMATS}.")
    cats = categories(num_thing_classes, num_stuff_classes)
    id2label = {c["id"] - 1: c["name"] for c in cats}
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "labels.json"), "w") as f:
        json.dump({"categories": cats, "id2label": {str(k): v for k, v in id2label.items()}}, f, indent=1)
    mask_utils = _mask_utils() if "instance" in formats else None
    for split, count in (("train", num_train), ("val", num_val)):
        ade_split = SPLITS[split][0]
        folders = []
        if "semantic" in formats:
            folders += [os.path.join(root, "images", ade_split), os.path.join(root, "annotations", ade_split)]
        if "panoptic" in formats or "instance" in formats:
            folders.append(os.path.join(root, split))
        if "panoptic" in formats:
            folders.append(os.path.join(root, f"panoptic_{split}"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
        images, panoptic_annotations, instance_annotations = [], [], []
        for index in range(count):
            scene = render_scene(seed, split, index, image_size, num_thing_classes, num_stuff_classes,
                                 max_shapes)
            stem = f"synth_{index:06d}"
            buffer = io.BytesIO()
            Image.fromarray(scene.image).save(buffer, format="JPEG", quality=95, subsampling=0)
            jpeg = buffer.getvalue()
            image_id = index + 1
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": image_size[0],
                           "width": image_size[1]})
            if "semantic" in formats:
                _write(os.path.join(root, "images", ade_split, f"{stem}.jpg"), jpeg)
                _write(os.path.join(root, "annotations", ade_split, f"{stem}.png"),
                       _encode_png(scene.label_map))
            if "panoptic" in formats or "instance" in formats:
                _write(os.path.join(root, split, f"{stem}.jpg"), jpeg)
            if "panoptic" in formats:
                panoptic_annotations.append(_panoptic_annotation(root, split, stem, image_id, scene,
                                                                 num_thing_classes, seed, index))
            if "instance" in formats:
                for shape in scene.shapes:
                    instance_annotations.append(_instance_annotation(
                        mask_utils, shape, image_id, len(instance_annotations) + 1))
        if "panoptic" in formats:
            with open(os.path.join(root, f"panoptic_{split}.json"), "w") as f:
                json.dump({"images": images, "annotations": panoptic_annotations, "categories": cats}, f)
        if "instance" in formats:
            with open(os.path.join(root, f"instances_{split}.json"), "w") as f:
                json.dump({"images": images, "annotations": instance_annotations,
                           "categories": [c for c in cats if c["isthing"]]}, f)
    return {"root": root, "id2label": id2label, "categories": cats,
            "num_examples": {"train": num_train, "val": num_val}}


def _panoptic_annotation(root, split, stem, image_id, scene: Scene, num_thing_classes, seed, index) -> dict:
    segments = [(shape.visible_mask, shape.class_id + 1, int(shape.iscrowd)) for shape in scene.shapes]
    for s in scene.stuff_classes:
        category_id = num_thing_classes + 1 + s
        segments.append((scene.label_map == category_id, category_id, 0))
    ids = _segment_ids(np.random.default_rng([seed, SPLITS[split][1], index, 1]), len(segments))
    id_map = np.zeros(scene.label_map.shape, np.int64)
    segments_info = []
    for segment_id, (mask, category_id, iscrowd) in zip(ids, segments):
        id_map[mask] = segment_id
        segments_info.append({"id": segment_id, "category_id": int(category_id), "iscrowd": iscrowd,
                              "area": int(mask.sum()), "bbox": _bbox(mask)})
    rgb = np.stack([id_map % 256, id_map // 256 % 256, id_map // 256 ** 2], -1).astype(np.uint8)
    _write(os.path.join(root, f"panoptic_{split}", f"{stem}.png"), _encode_png(rgb))
    return {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}


def _instance_annotation(mask_utils, shape: Shape, image_id: int, annotation_id: int) -> dict:
    visible = shape.visible_mask
    rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
    if shape.iscrowd:
        segmentation = _uncompressed_rle(visible)
    elif np.array_equal(visible, shape.full_mask):
        segmentation = [shape.polygon]
    else:
        segmentation = {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}
    return {"id": annotation_id, "image_id": image_id, "category_id": shape.class_id + 1,
            "segmentation": segmentation, "area": int(visible.sum()),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": int(shape.iscrowd)}
