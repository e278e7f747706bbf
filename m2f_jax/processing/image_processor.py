"""Mask2Former preprocessing in NumPy + Pillow: resize, rescale, normalize, pad, and the
mask/class targets built from segmentation maps.

Parity target: transformers 5.24 ``Mask2FormerImageProcessorPil`` (the PIL backend), whose
resize goes through 8-bit PIL images. Layout convention: images are handled channels-last
(H, W, C) and returned NHWC; ``return_channels_first=True`` gives transformers' NCHW.

The output-size computation is a set of small pure functions (``resolve_size``,
``get_output_size`` ...) so post-processing can reuse them without a processor instance.
"""
from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}

# PIL resampling filters: NEAREST=0, LANCZOS=1, BILINEAR=2, BICUBIC=3, BOX=4, HAMMING=5.
PIL_NEAREST = 0
PIL_BILINEAR = 2
_PIL_FILTERS = (0, 1, 2, 3, 4, 5)

# The size dicts Mask2Former's resize understands, in the order it tries them.
_SIZE_FORMS = (
    ("shortest_edge", "longest_edge"),
    ("max_height", "max_width"),
    ("height", "width"),
)

# Every setting; each can be given at construction or as a keyword override to `preprocess`.
_DEFAULTS: Dict[str, Any] = {
    "do_resize": True,
    "size": DEFAULT_SIZE,
    "size_divisor": 32,
    "resample": PIL_BILINEAR,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": IMAGENET_DEFAULT_MEAN,
    "image_std": IMAGENET_DEFAULT_STD,
    "ignore_index": None,
    "do_reduce_labels": False,
    "num_labels": None,
    "pad_size": None,
    "do_convert_rgb": None,
}
# transformers 4 names still found in Hub preprocessor_config.json files.
_LEGACY_KEYS = ("max_size", "reduce_labels", "size_divisibility")


# ----------------------------------------------------------------------------------------------
# Output size: pure functions of (height, width) and the size settings.
# ----------------------------------------------------------------------------------------------


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__}).")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return int(value)


def resolve_size(size, max_size: Optional[int] = None) -> Dict[str, int]:
    """Normalizes `size` to one of the dicts Mask2Former's resize understands.

    * ``{"height": h, "width": w}``: exact output size (the Hub checkpoints' setting).
    * ``{"shortest_edge": s, "longest_edge": l}``: keep the aspect ratio.
    * ``{"max_height": h, "max_width": w}``: largest aspect-preserving size inside h x w.
    * ``(h, w)`` -> ``{"height": h, "width": w}``.
    * ``n`` with ``max_size`` -> ``{"shortest_edge": n, "longest_edge": max_size}``; an int
      without ``max_size`` is rejected (transformers 5 rejects it at preprocess time).
    ``max_size`` is ignored for complete dicts and tuples, as in transformers, but completes a
    lone ``{"shortest_edge": n}`` (transformers raises there).
    """
    if isinstance(size, (bool, np.bool_)):
        raise TypeError(f"size must be a dict, an (h, w) pair or an int, got {size!r}.")
    if isinstance(size, numbers.Integral):
        if max_size is None:
            raise ValueError(
                f"size={size} (an int) is ambiguous: pass max_size too (-> shortest_edge and "
                "longest_edge), or a dict such as {'shortest_edge': 800, 'longest_edge': 1333} "
                "or {'height': 384, 'width': 384}, or an (h, w) pair."
            )
        size = {"shortest_edge": size, "longest_edge": max_size}
    elif isinstance(size, (tuple, list)):
        if len(size) != 2:
            raise ValueError(f"A sequence size must be (height, width), got {size!r}.")
        size = {"height": size[0], "width": size[1]}
    elif isinstance(size, Mapping):
        size = {key: value for key, value in size.items() if value is not None}
        if set(size) == {"shortest_edge"} and max_size is not None:
            size["longest_edge"] = max_size
    else:
        raise TypeError(
            f"size must be a dict, an (h, w) pair or an int, got {type(size).__name__}."
        )
    for keys in _SIZE_FORMS:
        if set(size) == set(keys):
            return {key: _positive_int(size[key], f"size[{key!r}]") for key in keys}
    raise ValueError(
        "size must have the keys {'height', 'width'}, {'shortest_edge', 'longest_edge'} or "
        f"{{'max_height', 'max_width'}}; got {sorted(size)}."
    )


def get_size_with_aspect_ratio(
    image_size: Tuple[int, int], shortest_edge: int, longest_edge: Optional[int] = None
) -> Tuple[int, int]:
    """(height, width) with the short side at `shortest_edge`, unless that makes the long side
    exceed `longest_edge`. Integer truncation as in transformers: the long side is `int()`-ed,
    and a capped short side is `int(round())`-ed; the arithmetic order is kept for equal floats."""
    height, width = image_size
    raw_size = None
    if longest_edge is not None:
        min_original_size = float(min(height, width))
        max_original_size = float(max(height, width))
        if max_original_size / min_original_size * shortest_edge > longest_edge:
            raw_size = longest_edge * min_original_size / max_original_size
            shortest_edge = int(round(raw_size))
    if (height <= width and height == shortest_edge) or (
        width <= height and width == shortest_edge
    ):
        return height, width
    if width < height:
        new_width = shortest_edge
        new_height = int((raw_size if raw_size is not None else shortest_edge) * height / width)
    else:
        new_height = shortest_edge
        new_width = int((raw_size if raw_size is not None else shortest_edge) * width / height)
    return new_height, new_width


def get_size_for_max_height_width(
    image_size: Tuple[int, int], max_height: int, max_width: int
) -> Tuple[int, int]:
    """Largest aspect-preserving (height, width) inside max_height x max_width (upscales too)."""
    height, width = image_size
    scale = min(max_height / height, max_width / width)
    return int(height * scale), int(width * scale)


def round_up_to_multiple(image_size: Tuple[int, int], size_divisor: int) -> Tuple[int, int]:
    """Rounds each side UP to a multiple of `size_divisor` (0 or None: unchanged). The image is
    then stretched to this size, not padded: it changes the aspect ratio slightly."""
    if not size_divisor:
        return tuple(image_size)
    height, width = image_size
    return (
        int(math.ceil(height / size_divisor) * size_divisor),
        int(math.ceil(width / size_divisor) * size_divisor),
    )


def get_output_size(image_size: Tuple[int, int], size, size_divisor: int = 0) -> Tuple[int, int]:
    """The (height, width) an image of `image_size` is resized to: `size` (any form
    `resolve_size` accepts), then rounded up to a multiple of `size_divisor`."""
    size = resolve_size(size)
    if "shortest_edge" in size:
        new_size = get_size_with_aspect_ratio(
            image_size, size["shortest_edge"], size["longest_edge"]
        )
    elif "max_height" in size:
        new_size = get_size_for_max_height_width(
            image_size, size["max_height"], size["max_width"]
        )
    else:
        new_size = (size["height"], size["width"])
    return round_up_to_multiple(new_size, size_divisor)


def resolve_pad_size(pad_size) -> Optional[Tuple[int, int]]:
    """`pad_size` as (height, width): from {"height", "width"}, an (h, w) pair or None."""
    if pad_size is None:
        return None
    if isinstance(pad_size, Mapping):
        pad_size = {key: value for key, value in pad_size.items() if value is not None}
        if set(pad_size) != {"height", "width"}:
            raise ValueError(
                f"pad_size must have the keys 'height' and 'width', got {sorted(pad_size)}."
            )
        pad_size = (pad_size["height"], pad_size["width"])
    elif not isinstance(pad_size, (tuple, list)) or len(pad_size) != 2:
        raise TypeError(
            f"pad_size must be a {{'height', 'width'}} dict or an (h, w) pair, got {pad_size!r}."
        )
    height = _positive_int(pad_size[0], "pad_size height")
    return height, _positive_int(pad_size[1], "pad_size width")


# ----------------------------------------------------------------------------------------------
# Image conversion and pixel operations (channels-last).
# ----------------------------------------------------------------------------------------------


def _check_pixel_dtype(array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "uif":
        raise TypeError(
            f"{what} has unsupported dtype {array.dtype}; expected uint8, another integer "
            "type, or a float type (floats in [0, 1] or integer-valued in [0, 255])."
        )


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    """RGB (H, W, 3) uint8, compositing any transparency onto white (transformers'
    convert_to_rgb for PIL inputs)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.array(image)


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """RGB for a (H, W, C) array: grey is repeated, RGBA is blended onto white in the array's
    dtype (rounded for integers), as transformers' convert_to_rgb does for arrays."""
    num_channels = image.shape[-1]
    if num_channels == 1:
        return np.repeat(image, 3, axis=-1)
    if num_channels != 4:
        return image
    is_integer = np.issubdtype(image.dtype, np.integer)
    if not is_integer and (image.min() < 0.0 or image.max() > 1.0):
        raise ValueError(
            "A float RGBA image must be in [0, 1] to be converted to RGB, "
            f"got [{image.min()}, {image.max()}]."
        )
    white = 255 if is_integer else 1.0
    alpha = image[..., 3:4] / white
    composite = alpha * image[..., :3] + (1 - alpha) * white
    if is_integer:
        return np.round(composite).astype(image.dtype)
    return composite.astype(image.dtype)


def _data_format(input_data_format) -> Optional[str]:
    """transformers' ``input_data_format``: "channels_first" / "channels_last", or its
    ``ChannelDimension`` (whose value is that string)."""
    if input_data_format is None:
        return None
    name = getattr(input_data_format, "value", input_data_format)
    if name not in ("channels_first", "channels_last"):
        raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}.")
    return name


def to_channels_last(image, do_convert_rgb: Optional[bool] = False, input_data_format=None,
                     num_channels: Optional[int] = None) -> np.ndarray:
    """One input image as a (H, W, C) array, C in (1, 3, 4) or ``num_channels`` (the processor's
    ``image_mean`` length, e.g. 2 or 5 for a backbone with that many input channels), or 3 with
    `do_convert_rgb`; any C when ``input_data_format`` is given.

    Accepts a PIL image, or an array (anything `np.asarray` takes that has a `shape`) that is
    (H, W), (H, W, C) or (C, H, W). ``input_data_format`` ("channels_first" / "channels_last")
    names the channel axis; without it the last axis is the channel axis if it has one of the
    channel counts above, else the first one if it has (transformers tries the first axis first,
    which takes an RGB image 3 or 4 pixels high, or one pixel high, for channels-first).
    """
    data_format = _data_format(input_data_format)
    counts = (1, 3, 4) if num_channels in (None, 1, 3, 4) else (1, 3, 4, int(num_channels))
    if isinstance(image, Image.Image):
        array = _pil_to_rgb(image) if do_convert_rgb else np.array(image)
        if array.ndim == 2:
            array = array[..., None]
    elif _is_array_like(image):
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        elif array.ndim == 3:
            first = data_format == "channels_first" or (
                data_format is None and array.shape[-1] not in counts and array.shape[0] in counts)
            if first:
                array = np.moveaxis(array, 0, -1)
            elif data_format is None and array.shape[-1] not in counts:
                raise ValueError(
                    f"Cannot find the channel axis of an image of shape {array.shape}: "
                    f"expected (H, W, C) or (C, H, W) with C in {counts}, or input_data_format."
                )
        else:
            raise ValueError(
                "An image must be 2-D (H, W) or 3-D (H, W, C) / (C, H, W), got shape "
                f"{array.shape}; pass a batch as a list or a 4-D array."
            )
        if do_convert_rgb:
            _check_pixel_dtype(array, "An image")
            array = _array_to_rgb(array)
    else:
        raise TypeError(
            f"An image must be a PIL image or a numpy array, got {type(image).__name__}."
        )
    _check_pixel_dtype(array, "An image")
    if min(array.shape[:2]) < 1:
        raise ValueError(f"An image must have at least one pixel, got shape {array.shape}.")
    if data_format is None and array.shape[-1] not in counts:
        raise ValueError(
            f"An image must have {' or '.join(map(str, counts))} channels, got shape {array.shape}; "
            "do_convert_rgb=True converts other PIL modes to RGB."
        )
    return array


def _needs_uint8_rescale(image: np.ndarray) -> bool:
    """Whether `image` must be multiplied by 255 to become uint8 for PIL (transformers'
    rule): uint8 and integer-valued arrays in [0, 255] are cast as they are, other floats
    must lie in [0, 1] and are scaled."""
    if image.dtype == np.uint8:
        return False
    if np.allclose(image, image.astype(int)):
        if np.all(image >= 0) and np.all(image <= 255):
            return False
        raise ValueError(
            "An integer-valued image must be in [0, 255] to be resized through PIL, "
            f"got [{image.min()}, {image.max()}]."
        )
    if np.all(image >= 0) and np.all(image <= 1):
        return True
    raise ValueError(
        "A float image must be in [0, 1] (or integer-valued in [0, 255]) to be resized through "
        f"PIL, got [{image.min()}, {image.max()}]."
    )


def resize_image(
    image: np.ndarray, output_size: Tuple[int, int], resample: int = PIL_BILINEAR
) -> np.ndarray:
    """Resizes a (H, W, C) array to `output_size` (height, width) through an 8-bit PIL image,
    as transformers' PIL backend does: float images in [0, 1] are quantized (x*255 in float32,
    truncated to uint8) and come back as float32 in [0, 1]; others come back as uint8."""
    rescaled = _needs_uint8_rescale(image)
    if rescaled:
        pixels = (image.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
    else:
        pixels = image.astype(np.uint8)
    pil_image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    height, width = output_size
    resized = np.array(pil_image.resize((width, height), resample=resample))
    if resized.ndim == 2:
        resized = resized[..., None]
    if rescaled:
        resized = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return resized


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    """image * scale computed in float64, returned as float32 (transformers' order)."""
    return (image.astype(np.float64) * scale).astype(np.float32)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """(image - mean) / std over the last (channel) axis, in the image's float dtype (float32
    for integer images)."""
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    num_channels = image.shape[-1]
    stats = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        if isinstance(value, numbers.Real):
            value = [value] * num_channels
        if len(value) != num_channels:
            raise ValueError(
                f"{name} has {len(value)} values but the image has {num_channels} channel(s); pass "
                "do_convert_rgb=True for grey or RGBA images, or a matching image_mean/image_std."
            )
        stats.append(np.array(value, dtype=image.dtype))
    return (image - stats[0]) / stats[1]


# ----------------------------------------------------------------------------------------------
# Segmentation maps -> binary masks and class labels.
# ----------------------------------------------------------------------------------------------


def _to_2d_map(segmentation_map, index: int) -> np.ndarray:
    if isinstance(segmentation_map, Image.Image):
        array = np.array(segmentation_map)
    elif _is_array_like(segmentation_map):
        array = np.asarray(segmentation_map)
    else:
        raise TypeError(
            f"Segmentation map {index} must be a PIL image or a numpy array, "
            f"got {type(segmentation_map).__name__}."
        )
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(
            f"Segmentation map {index} must be 2-D (H, W) or (1, H, W), got shape {array.shape}."
        )
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"Segmentation map {index} has unsupported dtype {array.dtype}; expected integers."
        )
    if array.dtype.kind == "f" and not (
        np.all(np.isfinite(array)) and np.all(array == np.round(array))
    ):
        raise ValueError(
            f"Segmentation map {index} must hold integer label values, got non-integer floats."
        )
    return array


def resize_segmentation_map(
    segmentation_map: np.ndarray, output_size: Tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) label map through PIL.

    Maps with values in [0, 255] go through an 8-bit image and come back uint8, exactly like
    transformers (the dtype matters for `do_reduce_labels`). Other values, which transformers'
    PIL backend rejects, go through a 32-bit integer image and keep the map's dtype.
    """
    height, width = output_size
    if segmentation_map.min() >= 0 and segmentation_map.max() <= 255:
        pil_map = Image.fromarray(segmentation_map.astype(np.uint8))
        return np.array(pil_map.resize((width, height), resample=PIL_NEAREST))
    info = np.iinfo(np.int32)
    if segmentation_map.min() < info.min or segmentation_map.max() > info.max:
        raise ValueError("Segmentation map values must fit in int32 to be resized.")
    pil_map = Image.fromarray(segmentation_map.astype(np.int32))
    resized = np.array(pil_map.resize((width, height), resample=PIL_NEAREST))
    return resized.astype(segmentation_map.dtype)


def convert_segmentation_map_to_binary_masks(
    segmentation_map: np.ndarray,
    instance_id_to_semantic_id: Optional[Mapping[int, int]] = None,
    ignore_index: Optional[int] = None,
    do_reduce_labels: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """One float32 binary mask per distinct value of a (H, W) map, and its class.

    Returns masks (N, H, W) float32 and class labels (N,) int64, in ascending order of the map
    value; `ignore_index` gets no mask. With `do_reduce_labels` 0 becomes `ignore_index`,
    `ignore_index` stays `ignore_index`, and every other value v becomes v - 1, in the map's own
    dtype, before the values are collected; `instance_id_to_semantic_id` is then looked up with
    v + 1 and its class is decremented. Without a mapping the class is the map value itself.
    """
    if do_reduce_labels:
        if ignore_index is None:
            raise ValueError(
                "do_reduce_labels=True needs ignore_index (the label that 0 is mapped to)."
            )
        # Deliberate difference (README): transformers turns ignore_index pixels into class
        # ignore_index - 1 (255 -> 254); its other processors' label reduction (BEiT, SegFormer,
        # DPT) keeps them ignored, as here.
        ignored = (segmentation_map == 0) | (segmentation_map == ignore_index)
        segmentation_map = np.where(ignored, ignore_index, segmentation_map - 1)
    labels = np.unique(segmentation_map)
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
    masks = (segmentation_map[None] == labels[:, None, None]).astype(np.float32)  # (N, H, W)
    if instance_id_to_semantic_id is None:
        return masks, labels.astype(np.int64)
    classes = np.zeros(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        instance_id = int(label) + 1 if do_reduce_labels else int(label)
        if instance_id not in instance_id_to_semantic_id:
            raise ValueError(
                f"Instance id {instance_id} is in the segmentation map but not in "
                f"instance_id_to_semantic_id (which has {sorted(instance_id_to_semantic_id)})."
            )
        semantic_id = instance_id_to_semantic_id[instance_id]
        classes[i] = semantic_id - 1 if do_reduce_labels else semantic_id
    return masks, classes


# ----------------------------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------------------------


def _check_class_ids(classes: np.ndarray, num_labels: Optional[int], index: int) -> None:
    """Class ids must lie in [0, num_labels) (only >= 0 while num_labels is unknown); the
    ignore_index never reaches here (its pixels make no mask)."""
    bad = classes[(classes < 0) | (classes >= (num_labels if num_labels is not None else np.inf))]
    if bad.size:
        allowed = f"[0, num_labels={num_labels})" if num_labels is not None else ">= 0"
        raise ValueError(
            f"Segmentation map {index} has class ids {sorted(set(int(c) for c in bad))} outside "
            f"{allowed}; set ignore_index to the id of pixels to ignore, or check the label mapping."
        )


def _as_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def _as_optional_int(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {value!r}.")
    return int(value)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_stats(value, name: str):
    if _is_real(value):
        return float(value)
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        values = tuple(value)
        if values and all(_is_real(v) for v in values):
            return tuple(float(v) for v in values)
    raise TypeError(
        f"{name} must be a float or a sequence of floats (one per channel), got {value!r}."
    )


def _validated_settings(settings: Dict[str, Any]) -> Dict[str, Any]:
    """Type-checks and normalizes a complete settings dict (the keys of `_DEFAULTS`)."""
    out = dict(settings)
    for name in ("do_resize", "do_rescale", "do_normalize", "do_reduce_labels"):
        out[name] = _as_bool(out[name], name)
    if out["do_convert_rgb"] is not None:
        out["do_convert_rgb"] = _as_bool(out["do_convert_rgb"], "do_convert_rgb")
    out["size"] = resolve_size(out["size"])
    size_divisor = _as_optional_int(out["size_divisor"], "size_divisor") or 0
    if size_divisor < 0:
        raise ValueError(f"size_divisor must be >= 0 (0 disables it), got {size_divisor}.")
    out["size_divisor"] = size_divisor
    resample = out["resample"]
    if not (_is_real(resample) and isinstance(resample, numbers.Integral)) or (
        int(resample) not in _PIL_FILTERS
    ):
        raise ValueError(
            f"resample must be a PIL resampling filter (an int in 0..5), got {resample!r}."
        )
    out["resample"] = int(resample)
    factor = out["rescale_factor"]
    if not _is_real(factor):
        raise TypeError(f"rescale_factor must be a number, got {factor!r}.")
    out["rescale_factor"] = float(factor)
    out["image_mean"] = _as_stats(out["image_mean"], "image_mean")
    out["image_std"] = _as_stats(out["image_std"], "image_std")
    out["ignore_index"] = _as_optional_int(out["ignore_index"], "ignore_index")
    out["num_labels"] = _as_optional_int(out["num_labels"], "num_labels")
    pad_size = resolve_pad_size(out["pad_size"])
    out["pad_size"] = None if pad_size is None else {"height": pad_size[0], "width": pad_size[1]}
    return out


def _apply_legacy_names(values: Dict[str, Any]) -> Dict[str, Any]:
    """transformers 4 renames: the new name wins when both are given (its deprecate_kwarg)."""
    values = dict(values)
    for old, new in (("reduce_labels", "do_reduce_labels"), ("size_divisibility", "size_divisor")):
        legacy = values.pop(old, None)
        if values.get(new) is None and legacy is not None:
            values[new] = legacy
    return values


# ----------------------------------------------------------------------------------------------
# The processor.
# ----------------------------------------------------------------------------------------------


def _is_array_like(value) -> bool:
    """numpy arrays, and arrays of other libraries (jax, torch on CPU) that numpy can read."""
    return isinstance(value, np.ndarray) or (
        hasattr(value, "__array__") and hasattr(value, "shape")
    )


def _as_image_list(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list.")
        return list(images)
    if isinstance(images, Image.Image):
        return [images]
    if _is_array_like(images):
        array = np.asarray(images)
        if array.ndim == 4:
            return list(array)
        if array.ndim in (2, 3):
            return [array]
        raise ValueError(
            "images must be one image (2-D or 3-D), a 4-D batch or a list of images, "
            f"got shape {array.shape}."
        )
    raise TypeError(
        "images must be a PIL image, a numpy array or a list of them, "
        f"got {type(images).__name__}."
    )


def _as_map_list(segmentation_maps) -> list:
    if isinstance(segmentation_maps, (list, tuple)):
        return list(segmentation_maps)
    if isinstance(segmentation_maps, Image.Image):
        return [segmentation_maps]
    if _is_array_like(segmentation_maps):
        array = np.asarray(segmentation_maps)
        if array.ndim == 2:
            return [array]
        if array.ndim == 3:
            return list(array)
        raise ValueError(
            "segmentation_maps must be (H, W), a (B, H, W) batch or a list, "
            f"got shape {array.shape}."
        )
    raise TypeError(
        "segmentation_maps must be a PIL image, a numpy array or a list of them, "
        f"got {type(segmentation_maps).__name__}."
    )


class Mask2FormerImageProcessor:
    """Prepares images (and segmentation maps) for Mask2Former; NumPy + Pillow only.

    Every setting can be given here or as a keyword override to `preprocess` (an override of
    None keeps the configured value). Defaults are transformers':

    * ``do_resize=True``, ``size={"shortest_edge": 800, "longest_edge": 1333}`` (any form of
      `resolve_size`), ``size_divisor=32`` (rounds the resize size UP: a stretch, not padding;
      0 disables it), ``resample=2`` (PIL bilinear).
    * ``do_rescale=True``, ``rescale_factor=1/255``, ``do_normalize=True``, ImageNet
      ``image_mean``/``image_std``.
    * ``ignore_index=None`` (label that gets no mask, and the value `mask_labels` are padded
      with), ``do_reduce_labels=False``, ``num_labels=None`` (stored, unused),
      ``pad_size=None`` (pad to the batch max), ``do_convert_rgb=None`` (no conversion).

    Legacy transformers-4 arguments: ``max_size`` (-> ``size["longest_edge"]``),
    ``reduce_labels`` (-> ``do_reduce_labels``), ``size_divisibility`` (-> ``size_divisor``).
    """

    model_input_names = ("pixel_values", "pixel_mask")

    def __init__(
        self,
        do_resize: Optional[bool] = None,
        size: Union[Dict[str, int], Tuple[int, int], int, None] = None,
        size_divisor: Optional[int] = None,
        resample: Optional[int] = None,
        do_rescale: Optional[bool] = None,
        rescale_factor: Optional[float] = None,
        do_normalize: Optional[bool] = None,
        image_mean: Union[float, Sequence[float], None] = None,
        image_std: Union[float, Sequence[float], None] = None,
        ignore_index: Optional[int] = None,
        do_reduce_labels: Optional[bool] = None,
        num_labels: Optional[int] = None,
        pad_size: Union[Dict[str, int], Tuple[int, int], None] = None,
        do_convert_rgb: Optional[bool] = None,
        *,
        max_size: Optional[int] = None,
        reduce_labels: Optional[bool] = None,
        size_divisibility: Optional[int] = None,
    ):
        given = _apply_legacy_names(
            {
                "do_resize": do_resize,
                "size": size,
                "size_divisor": size_divisor,
                "resample": resample,
                "do_rescale": do_rescale,
                "rescale_factor": rescale_factor,
                "do_normalize": do_normalize,
                "image_mean": image_mean,
                "image_std": image_std,
                "ignore_index": ignore_index,
                "do_reduce_labels": do_reduce_labels,
                "num_labels": num_labels,
                "pad_size": pad_size,
                "do_convert_rgb": do_convert_rgb,
                "reduce_labels": reduce_labels,
                "size_divisibility": size_divisibility,
            }
        )
        if given["size"] is None:
            given["size"] = dict(DEFAULT_SIZE)
            if max_size is not None:
                given["size"]["longest_edge"] = max_size
        else:
            given["size"] = resolve_size(given["size"], max_size=max_size)
        settings = {
            name: default if given[name] is None else given[name]
            for name, default in _DEFAULTS.items()
        }
        for name, value in _validated_settings(settings).items():
            setattr(self, name, value)
        # Keys of a loaded preprocessor_config.json that we do not model, written back by to_dict.
        self.extra: Dict[str, Any] = {}

    # -- configuration in and out --------------------------------------------------------------

    def settings(self) -> Dict[str, Any]:
        """The current settings, one entry per `_DEFAULTS` key."""
        return {name: getattr(self, name) for name in _DEFAULTS}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides) -> "Mask2FormerImageProcessor":
        """From a preprocessor_config.json dict. Legacy keys are honoured as transformers 4 did
        (transformers 5 ignores `reduce_labels` and `size_divisibility`); unknown keys are kept
        in `extra` and written back by `to_dict`."""
        values = dict(config)
        values.update(overrides)
        # transformers 4's from_dict: a `size_divisibility` keyword replaces the file's divisor
        # (transformers 5 ignores the keyword; a deliberate difference, see the README).
        if overrides.get("size_divisibility") is not None:
            values["size_divisor"] = values.pop("size_divisibility")
        # transformers 4's from_dict moved `reduce_labels` over `do_reduce_labels` (the legacy
        # name wins here, unlike in its __init__ where the new name wins).
        if "reduce_labels" in values:
            values["do_reduce_labels"] = values.pop("reduce_labels")
        # transformers 4: an int `size` without `max_size` got a longest edge of 1333. The Hub's
        # checkpoints were written that way ("size": 384).
        if isinstance(values.get("size"), int) and values.get("max_size") is None:
            values["max_size"] = 1333
        known = {
            key: values.pop(key) for key in list(values) if key in _DEFAULTS or key in _LEGACY_KEYS
        }
        processor = cls(**known)
        # Private keys (transformers 5 may save `_max_size`) are dropped.
        processor.extra = {key: value for key, value in values.items() if not key.startswith("_")}
        return processor

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serializable dict that both this class and transformers can load."""
        out = dict(self.extra)
        for name, value in self.settings().items():
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[name] = value
        out["image_processor_type"] = "Mask2FormerImageProcessor"
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], **overrides
    ) -> "Mask2FormerImageProcessor":
        """From a folder holding preprocessor_config.json (or the path of that file)."""
        path = os.fspath(path)
        config_file = path if os.path.isfile(path) else os.path.join(path, PREPROCESSOR_CONFIG_NAME)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"No image processor config found at {config_file}.")
        from m2f_jax.config import read_json_object

        return cls.from_dict(read_json_object(config_file), **overrides)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Writes preprocessor_config.json into `save_directory` (created if needed); returns
        the file's path."""
        os.makedirs(save_directory, exist_ok=True)
        config_file = os.path.join(os.fspath(save_directory), PREPROCESSOR_CONFIG_NAME)
        with open(config_file, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return config_file

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    # -- preprocessing -------------------------------------------------------------------------

    def _call_settings(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        unknown = set(overrides) - set(_DEFAULTS) - {"reduce_labels", "size_divisibility"}
        if unknown:
            raise TypeError(
                f"Unknown preprocess argument(s) {sorted(unknown)}; the settings are "
                f"{sorted(_DEFAULTS)}."
            )
        overrides = _apply_legacy_names(overrides)
        settings = self.settings()
        settings.update({name: value for name, value in overrides.items() if value is not None})
        return _validated_settings(settings)

    @staticmethod
    def _pixel_table(image: np.ndarray, cfg) -> np.ndarray:
        if cfg["do_rescale"]:
            image = rescale(image, cfg["rescale_factor"])
        if cfg["do_normalize"]:
            image = normalize(image, cfg["image_mean"], cfg["image_std"])
        return image

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        instance_id_to_semantic_id: Union[Mapping, Sequence[Mapping], None] = None,
        return_channels_first: bool = False,
        input_data_format=None,
        return_tensors: Optional[str] = None,
        **overrides,
    ) -> Dict[str, Any]:
        """Resize, rescale, normalize and pad a batch, and build mask/class targets.

        Args:
            images: one image or a list of them (PIL, or arrays (H, W), (H, W, C) or (C, H, W);
                uint8, integer or float in [0, 1]), or a 4-D batch array.
            segmentation_maps: one (H, W) label map per image (PIL or integer arrays), the same
                size as its image, or a (B, H, W) array.
            instance_id_to_semantic_id: instance id -> class id, one dict for all maps or a list
                of dicts, one per map. Without it the map values are the class ids.
            return_channels_first: return `pixel_values` as (B, C, Hp, Wp) instead of NHWC.
            input_data_format: "channels_first" or "channels_last" (or transformers'
                `ChannelDimension`): the channel axis of array images; default: inferred
                (see :func:`to_channels_last`).
            return_tensors: None or "np" (NumPy arrays, the only kind returned; transformers'
                "pt" / "tf" are a ValueError: convert with ``jnp.asarray`` where needed).
            **overrides: any setting of the processor, for this call only.

        Returns:
            A dict with ``pixel_values`` float32 (B, Hp, Wp, C), ``pixel_mask`` int64
            (B, Hp, Wp) (1 on the image, 0 on padding) and, with maps, ``mask_labels`` (a list
            of float32 (N_i, Hp, Wp), padded with ignore_index as in transformers) and
            ``class_labels`` (a list of int64 (N_i,)).
        """
        if return_tensors not in (None, "np", "numpy"):
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns NumPy arrays "
                             "(return_tensors='np' or None).")
        cfg = self._call_settings(overrides)
        mean = cfg["image_mean"]
        num_channels = len(mean) if isinstance(mean, (list, tuple, np.ndarray)) else None
        image_list = [to_channels_last(im, cfg["do_convert_rgb"], input_data_format, num_channels)
                      for im in _as_image_list(images)]
        channel_counts = sorted({image.shape[-1] for image in image_list})
        if len(channel_counts) > 1:
            raise ValueError(
                "All images of a batch must have the same number of channels, "
                f"got {channel_counts}."
            )

        map_list = None
        if segmentation_maps is not None:
            map_list = [_to_2d_map(m, i) for i, m in enumerate(_as_map_list(segmentation_maps))]
            if len(map_list) != len(image_list):
                raise ValueError(
                    f"Got {len(image_list)} image(s) but {len(map_list)} segmentation map(s); "
                    "give one map per image."
                )
            for i, (image, seg_map) in enumerate(zip(image_list, map_list)):
                if seg_map.shape != image.shape[:2]:
                    raise ValueError(
                        f"Segmentation map {i} has size {seg_map.shape} but its image has size "
                        f"{image.shape[:2]}."
                    )
            id_maps = self._instance_maps(instance_id_to_semantic_id, len(map_list))
        elif instance_id_to_semantic_id is not None:
            raise ValueError("instance_id_to_semantic_id was given without segmentation_maps.")

        if cfg["do_resize"]:
            output_sizes = [
                get_output_size(im.shape[:2], cfg["size"], cfg["size_divisor"]) for im in image_list
            ]
            for index, (im, hw) in enumerate(zip(image_list, output_sizes)):
                if min(hw) < 1:  # PIL's own message would name neither the image nor the setting
                    raise ValueError(
                        f"image {index} of size {tuple(im.shape[:2])} resizes to {hw} with size={cfg['size']} "
                        f"and size_divisor={cfg['size_divisor']}: a side of 0 pixels. Use a larger size "
                        "or pass larger images.")
            image_list = [
                resize_image(im, hw, cfg["resample"]) for im, hw in zip(image_list, output_sizes)
            ]
            if map_list is not None:
                map_list = [resize_segmentation_map(m, hw) for m, hw in zip(map_list, output_sizes)]

        if cfg["pad_size"] is not None:
            padded_size = (cfg["pad_size"]["height"], cfg["pad_size"]["width"])
            for i, image in enumerate(image_list):
                if image.shape[0] > padded_size[0] or image.shape[1] > padded_size[1]:
                    raise ValueError(
                        f"pad_size {padded_size} is smaller than image {i}, which is "
                        f"{image.shape[:2]} after resizing."
                    )
        else:
            padded_size = (
                max(im.shape[0] for im in image_list),
                max(im.shape[1] for im in image_list),
            )

        batch_size, num_channels = len(image_list), image_list[0].shape[-1]
        padded_shape = (batch_size, *padded_size)
        pixel_values = np.zeros((*padded_shape, num_channels), np.float32)  # (B, Hp, Wp, C)
        pixel_mask = np.zeros(padded_shape, np.int64)  # (B, Hp, Wp)
        for i, image in enumerate(image_list):
            if image.dtype == np.uint8 and (cfg["do_rescale"] or cfg["do_normalize"]):
                # One table lookup instead of two float passes: the 256 values of each channel
                # go through exactly the same rescale/normalize arithmetic, so this is bit-equal.
                levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None], num_channels, axis=2)
                table = self._pixel_table(levels, cfg)[:, 0, :]  # (256, C)
                height, width = image.shape[:2]
                target = pixel_values[i, :height, :width]  # (H, W, C) view
                for c in range(num_channels):
                    target[..., c] = np.take(table[:, c], image[..., c])
            else:
                image = self._pixel_table(image, cfg)
                height, width = image.shape[:2]
                pixel_values[i, :height, :width] = image
            pixel_mask[i, :height, :width] = 1
        if return_channels_first:
            pixel_values = pixel_values.transpose(0, 3, 1, 2)  # (B, C, Hp, Wp)
            pixel_values = np.ascontiguousarray(pixel_values)
        encoded = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

        if map_list is not None:
            # HF quirk kept for parity: the masks' padding is ignore_index (e.g. 255.0), not 0.
            # transformers fails when ignore_index is None and padding is needed; we pad with 0.
            fill = 0.0 if cfg["ignore_index"] is None else float(cfg["ignore_index"])
            mask_labels, class_labels = [], []
            for index, (seg_map, id_map) in enumerate(zip(map_list, id_maps)):
                masks, classes = convert_segmentation_map_to_binary_masks(
                    seg_map,
                    id_map,
                    ignore_index=cfg["ignore_index"],
                    do_reduce_labels=cfg["do_reduce_labels"],
                )
                _check_class_ids(classes, cfg["num_labels"], index)
                if masks.shape[1:] != padded_size:
                    padded = np.full((len(masks), *padded_size), fill, np.float32)  # (N, Hp, Wp)
                    padded[:, : masks.shape[1], : masks.shape[2]] = masks
                    masks = padded
                mask_labels.append(masks)
                class_labels.append(classes)
            encoded["mask_labels"] = mask_labels
            encoded["class_labels"] = class_labels
        return encoded

    __call__ = preprocess

    def encode_inputs(
        self,
        pixel_values_list,
        segmentation_maps=None,
        instance_id_to_semantic_id=None,
        ignore_index: Optional[int] = None,
        do_reduce_labels: Optional[bool] = False,
        return_tensors: Optional[str] = None,
        input_data_format=None,
        pad_size: Optional[Dict[str, int]] = None,
        *,
        return_channels_first: bool = False,
    ) -> Dict[str, Any]:
        """transformers' ``encode_inputs`` (transformers 4's, with its parameters in its order; 5
        removed it): pads already processed images to the batch's largest size, or to
        ``pad_size``, with no resize, rescale or normalisation, and builds the mask and class
        targets, with :meth:`preprocess`'s outputs (NHWC unless ``return_channels_first``).
        ``ignore_index`` or ``do_reduce_labels`` None: the processor's; ``return_tensors`` as
        :meth:`preprocess`'s (None or "np")."""
        overrides = dict(do_resize=False, do_rescale=False, do_normalize=False,
                         do_reduce_labels=do_reduce_labels, ignore_index=ignore_index, pad_size=pad_size)
        return self.preprocess(pixel_values_list, segmentation_maps, instance_id_to_semantic_id,
                               return_channels_first, input_data_format, return_tensors, **overrides)

    # transformers' post-processing methods: the functions of m2f_jax.processing.post_processing
    # (imported here: they use jax, the processor does not).

    def post_process_semantic_segmentation(self, outputs, *args, **kwargs):
        """:func:`m2f_jax.processing.post_processing.post_process_semantic_segmentation`."""
        from m2f_jax.processing import post_processing

        return post_processing.post_process_semantic_segmentation(outputs, *args, **kwargs)

    def post_process_instance_segmentation(self, outputs, *args, **kwargs):
        """:func:`m2f_jax.processing.post_processing.post_process_instance_segmentation`."""
        from m2f_jax.processing import post_processing

        return post_processing.post_process_instance_segmentation(outputs, *args, **kwargs)

    def post_process_panoptic_segmentation(self, outputs, *args, **kwargs):
        """:func:`m2f_jax.processing.post_processing.post_process_panoptic_segmentation`."""
        from m2f_jax.processing import post_processing

        return post_processing.post_process_panoptic_segmentation(outputs, *args, **kwargs)

    @staticmethod
    def _instance_maps(instance_id_to_semantic_id, num_maps: int) -> List[Optional[Mapping]]:
        if instance_id_to_semantic_id is None or isinstance(instance_id_to_semantic_id, Mapping):
            return [instance_id_to_semantic_id] * num_maps
        if isinstance(instance_id_to_semantic_id, (list, tuple)):
            if len(instance_id_to_semantic_id) != num_maps:
                raise ValueError(
                    f"instance_id_to_semantic_id has {len(instance_id_to_semantic_id)} dicts for "
                    f"{num_maps} map(s)."
                )
            for item in instance_id_to_semantic_id:
                if item is not None and not isinstance(item, Mapping):
                    raise TypeError(
                        f"instance_id_to_semantic_id must hold dicts, got {type(item).__name__}."
                    )
            return list(instance_id_to_semantic_id)
        raise TypeError(
            "instance_id_to_semantic_id must be a dict or a list of dicts, "
            f"got {type(instance_id_to_semantic_id).__name__}."
        )
