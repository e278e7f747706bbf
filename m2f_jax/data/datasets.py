"""Readers for the three segmentation formats Mask2Former trains on, as indexable datasets.

Every dataset has ``len``, ``__getitem__(i)`` and ``id2label`` (contiguous label -> name), and
returns an example dict::

    {"image": (H, W, 3) uint8, "masks": (N, H, W) bool, "class_ids": (N,) int64,
     "image_id": ..., "file_name": str}

* :class:`SemanticDataset`: ADE20K layout (``images/<split>/*.jpg|png`` and
  ``annotations/<split>/<same stem>.png``). One mask per class present in the label map, as
  transformers' ``convert_segmentation_map_to_binary_masks``: with ``reduce_labels`` value 0
  ("other") becomes ``ignore_index`` and v becomes v - 1; ``ignore_index`` pixels are in no mask.
* :class:`CocoPanopticDataset`: ``panoptic_<split>.json`` + PNGs of segment ids
  (R + 256 G + 256^2 B). One mask per segment.
* :class:`CocoInstanceDataset`: ``instances_<split>.json``, polygons / RLE decoded by pycocotools.
  One mask per annotation (masks of overlapping instances may overlap).

COCO category ids are mapped to contiguous labels in ascending id order (as detectron2 does);
``category_ids[label]`` gives the id back.

Crowd: COCO annotations / panoptic segments with ``iscrowd=1`` are skipped, as detectron2's
Mask2Former dataset mappers do. Their pixels belong to no mask, so for the loss they are
background of every query; ``example["num_crowd"]`` says how many were skipped.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Accepted split names -> (ADE20K folder name, COCO file suffix).
_SPLITS = {"training": ("training", "train"), "train": ("training", "train"),
           "validation": ("validation", "val"), "val": ("validation", "val")}


def _split(split: str, layout: int) -> str:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(_SPLITS)}.")
    return _SPLITS[split][layout]


class DataError(ValueError):
    """A dataset file that cannot be read or does not hold what its format says (the message
    names it)."""


def _require(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"expected {what} at {path}")
    return path


def read_rgb(path: str) -> np.ndarray:
    """(H, W, 3) uint8; grey, palette and RGBA images are converted as PIL's convert("RGB")."""
    return np.asarray(read_image(path).convert("RGB"))


def read_image(path: str) -> Image.Image:
    """The decoded image at ``path``; DataError naming it when it is not a readable image."""
    try:
        with Image.open(_require(path, "an image")) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError) as e:  # PIL: unidentified, truncated or broken files
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e


def _load_json(path: str, what: str) -> dict:
    with open(_require(path, what)) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} ({what}) is not valid JSON: {e}") from e


def _contiguous(categories: List[dict]) -> tuple:
    ids = sorted(int(c["id"]) for c in categories)
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in categories}
    return ids, {i: label for label, i in enumerate(ids)}, {label: names[i] for label, i in enumerate(ids)}


class SemanticDataset:
    """ADE20K-layout semantic segmentation.

    ``id2label``: the argument, else ``root/labels.json`` (its ``categories``: on-disk value
    ``id`` is label ``id - 1`` with ``reduce_labels``, ``id`` without).
    """

    def __init__(self, root: str, split: str = "training", reduce_labels: bool = True,
                 ignore_index: Optional[int] = 255, id2label: Optional[Mapping[int, str]] = None):
        if reduce_labels and ignore_index is None:
            raise ValueError("reduce_labels=True needs an ignore_index for the label-0 pixels.")
        self.root, self.split = root, _split(split, 0)
        self.reduce_labels, self.ignore_index = reduce_labels, ignore_index
        image_dir = _require(os.path.join(root, "images", self.split), f"the {self.split} image folder")
        label_dir = _require(os.path.join(root, "annotations", self.split),
                             f"the {self.split} annotation folder")
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        self.image_paths = [os.path.join(image_dir, f) for f in names]
        self.label_paths = [os.path.join(label_dir, os.path.splitext(f)[0] + ".png") for f in names]
        if not self.image_paths:
            raise FileNotFoundError(f"expected {IMAGE_EXTENSIONS} images at {image_dir}, found none")
        for path in self.label_paths:
            _require(path, "the annotation PNG of an image")
        if id2label is None:
            labels = _load_json(os.path.join(root, "labels.json"), "labels.json (or pass id2label=)")
            offset = 1 if reduce_labels else 0
            id2label = {int(c["id"]) - offset: c["name"] for c in labels["categories"]}
            if not reduce_labels:
                id2label.setdefault(0, "other")
        self.id2label = {int(k): v for k, v in id2label.items()}

    def __len__(self) -> int:
        return len(self.image_paths)

    def read_label_map(self, index: int) -> np.ndarray:
        """The raw (H, W) label map as stored (palette PNGs give their indices)."""
        return np.asarray(read_image(self.label_paths[index]))

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        image = read_rgb(self.image_paths[index])
        label_map = self.read_label_map(index).astype(np.int64)
        if label_map.ndim != 2 or label_map.shape != image.shape[:2]:
            raise DataError(f"label map {self.label_paths[index]} has shape {label_map.shape}, "
                             f"expected {image.shape[:2]} (one channel, the image's size)")
        if self.reduce_labels:
            # ignore_index pixels stay ignored, as the processor's label reduction keeps them
            label_map = np.where((label_map == 0) | (label_map == self.ignore_index), self.ignore_index,
                                 label_map - 1)
        class_ids = np.unique(label_map)
        if self.ignore_index is not None:
            class_ids = class_ids[class_ids != self.ignore_index]
        masks = label_map[None] == class_ids[:, None, None]  # (N, H, W)
        return {"image": image, "masks": masks, "class_ids": class_ids.astype(np.int64),
                "image_id": index, "file_name": self.image_paths[index], "num_crowd": 0}


class _CocoBase:
    kind = ""

    def __init__(self, root: str, split: str, image_dir: Optional[str], annotation_file: Optional[str]):
        self.root, self.split = root, _split(split, 1)
        self.image_dir = _require(image_dir or os.path.join(root, self.split), f"the {self.split} image folder")
        annotation_file = annotation_file or os.path.join(root, f"{self.kind}_{self.split}.json")
        self.annotation_file = annotation_file
        self.data = _load_json(annotation_file, f"the COCO {self.kind} annotation file")
        for key in ("images", "annotations", "categories"):
            if key not in self.data:
                raise DataError(f"{annotation_file} has no {key!r} list; is it a COCO {self.kind} file?")
        self.category_ids, self.category_to_label, self.id2label = _contiguous(self.data["categories"])

    def _image(self, info: dict) -> np.ndarray:
        return read_rgb(os.path.join(self.image_dir, info["file_name"]))

    def _labels(self, category_ids: List[int]) -> np.ndarray:
        try:
            return np.asarray([self.category_to_label[int(c)] for c in category_ids], np.int64)
        except KeyError as error:
            raise DataError(f"{self.annotation_file}: category_id {error.args[0]} "
                             "is not in 'categories'") from None


class CocoPanopticDataset(_CocoBase):
    """COCO panoptic. Defaults: ``root/panoptic_<split>.json``, PNGs in ``root/panoptic_<split>/``,
    images in ``root/<split>/`` (for real COCO pass e.g. ``image_dir=".../train2017"``,
    ``annotation_file=".../annotations/panoptic_train2017.json"``,
    ``panoptic_dir=".../annotations/panoptic_train2017"``). ``isthing`` per label: ``is_thing``."""

    kind = "panoptic"

    def __init__(self, root: str, split: str = "train", image_dir: Optional[str] = None,
                 annotation_file: Optional[str] = None, panoptic_dir: Optional[str] = None):
        super().__init__(root, split, image_dir, annotation_file)
        self.panoptic_dir = _require(panoptic_dir or os.path.join(root, f"panoptic_{self.split}"),
                                     "the panoptic PNG folder")
        images = {info["id"]: info for info in self.data["images"]}
        self.annotations = sorted(self.data["annotations"], key=lambda a: a["image_id"])
        self.images = [images[a["image_id"]] for a in self.annotations]
        things = {int(c["id"]): bool(c.get("isthing", 1)) for c in self.data["categories"]}
        self.is_thing = np.asarray([things[i] for i in self.category_ids])

    def __len__(self) -> int:
        return len(self.annotations)

    def read_segment_ids(self, index: int) -> np.ndarray:
        """(H, W) int64 segment ids decoded from the PNG: R + 256 G + 256^2 B (0 = void)."""
        path = os.path.join(self.panoptic_dir, self.annotations[index]["file_name"])
        rgb = read_rgb(path).astype(np.int64)
        return rgb[..., 0] + 256 * rgb[..., 1] + 256 ** 2 * rgb[..., 2]

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        image = self._image(self.images[index])
        segment_ids = self.read_segment_ids(index)
        if segment_ids.shape != image.shape[:2]:
            raise DataError(f"panoptic PNG of {self.images[index]['file_name']} has size {segment_ids.shape}, "
                             f"the image {image.shape[:2]}")
        segments = [s for s in self.annotations[index]["segments_info"] if not s.get("iscrowd", 0)]
        ids = np.asarray([s["id"] for s in segments], np.int64)
        masks = segment_ids[None] == ids[:, None, None]  # (N, H, W)
        return {"image": image, "masks": masks, "class_ids": self._labels([s["category_id"] for s in segments]),
                "image_id": self.images[index]["id"], "file_name": self.images[index]["file_name"],
                "num_crowd": len(self.annotations[index]["segments_info"]) - len(segments)}


class CocoInstanceDataset(_CocoBase):
    """COCO instances. Defaults: ``root/instances_<split>.json``, images in ``root/<split>/``.
    Every image of the file is an example, also those without annotations (N = 0)."""

    kind = "instances"

    def __init__(self, root: str, split: str = "train", image_dir: Optional[str] = None,
                 annotation_file: Optional[str] = None):
        try:
            from pycocotools import mask as mask_utils
        except ImportError as error:  # pragma: no cover
            raise ImportError("CocoInstanceDataset decodes masks with pycocotools: "
                              "pip install pycocotools") from error
        self._mask_utils = mask_utils
        super().__init__(root, split, image_dir, annotation_file)
        self.images = sorted(self.data["images"], key=lambda info: info["id"])
        self.annotations: Dict[int, List[dict]] = {info["id"]: [] for info in self.images}
        for annotation in self.data["annotations"]:
            self.annotations[annotation["image_id"]].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, segmentation, height: int, width: int) -> np.ndarray:
        """(H, W) bool from a polygon list, uncompressed RLE or compressed RLE (COCO.annToMask)."""
        mask_utils = self._mask_utils
        if isinstance(segmentation, list):  # polygons: one object may have several parts
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(bool)

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        info = self.images[index]
        image = self._image(info)
        height, width = image.shape[:2]
        annotations = [a for a in self.annotations[info["id"]] if not a.get("iscrowd", 0)]
        masks = np.zeros((len(annotations), height, width), bool)
        for i, annotation in enumerate(annotations):
            masks[i] = self.decode(annotation["segmentation"], height, width)
        class_ids = self._labels([a["category_id"] for a in annotations])
        return {"image": image, "masks": masks, "class_ids": class_ids,
                "image_id": info["id"], "file_name": info["file_name"],
                "num_crowd": len(self.annotations[info["id"]]) - len(annotations)}


FORMATS = ("semantic", "panoptic", "instance")


def open_dataset(root: str, fmt: str, split: str):
    """The dataset of ``fmt`` (one of FORMATS) at ``root``, split ``split``."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}.")
    if fmt == "semantic":
        return SemanticDataset(root, split)
    if fmt == "panoptic":
        return CocoPanopticDataset(root, split)
    return CocoInstanceDataset(root, split)


def semantic_target(masks: np.ndarray, class_ids: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Binary masks + classes -> one label map; pixels in no mask are ignore_index."""
    target = np.full(masks.shape[1:], ignore_index, np.int64)
    for m, c in zip(masks, class_ids):
        target[m] = c
    return target
