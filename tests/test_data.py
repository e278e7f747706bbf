"""Data side of training: the synthetic dataset in its three on-disk formats, the readers,
augmentation and the batch iterator.

Oracles: the drawn scene (``render_scene`` with the same seed) and analytic shapes, PNG id
decoding by hand, pycocotools' ``COCO.annToMask``, transformers' ``Mask2FormerImageProcessorPil``
(label-map -> masks conversion), and plain set arithmetic for sharding."""
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.ndimage

from m2f_jax.data import (
    BatchIterator,
    CocoInstanceDataset,
    CocoPanopticDataset,
    EvalTransform,
    SemanticDataset,
    TrainTransform,
    render_scene,
    write_dataset,
)
from tests import TORCH_REASON

SEED, NUM_TRAIN, NUM_VAL, SIZE = 3, 24, 6, (96, 128)
# pycocotools' decode calls np.array(..., copy=False) on its own type (NumPy 2 deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("synthetic"))
    write_dataset(folder, NUM_TRAIN, NUM_VAL, image_size=SIZE, seed=SEED)
    return folder


def _scene(index, split="train"):
    return render_scene(SEED, split, index, SIZE)


def _tree_digest(folder):
    digest = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            digest.update(os.path.relpath(os.path.join(dirpath, name), folder).encode())
            digest.update(open(os.path.join(dirpath, name), "rb").read())
    return digest.hexdigest()


# ---- synthetic dataset + readers ---------------------------------------------------------------


def test_write_dataset_is_deterministic_fast_and_has_the_three_layouts(root, tmp_path):
    start = time.perf_counter()
    write_dataset(str(tmp_path / "a"), 32, 8, image_size=(128, 128), seed=SEED)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, elapsed  # ~0.5 s on one idle core; generous for a shared machine
    write_dataset(str(tmp_path / "b"), 32, 8, image_size=(128, 128), seed=SEED)
    write_dataset(str(tmp_path / "c"), 32, 8, image_size=(128, 128), seed=SEED + 1)
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") != _tree_digest(tmp_path / "c")
    for path in ("labels.json", "images/training/synth_000000.jpg", "annotations/validation/synth_000005.png",
                 "panoptic_train.json", "panoptic_val/synth_000005.png", "instances_val.json",
                 "train/synth_000023.jpg"):
        assert os.path.exists(os.path.join(root, path)), path
    only_semantic = write_dataset(str(tmp_path / "s"), 2, 1, seed=0, formats=("semantic",))
    assert not os.path.exists(tmp_path / "s" / "panoptic_train.json")
    assert only_semantic["id2label"] == {0: "red_circle0", 1: "green_rectangle1", 2: "blue_triangle2",
                                         3: "lime_texture0", 4: "violet_texture1"}


def test_semantic_reader_gives_one_mask_per_present_class_of_the_drawn_scene(root):
    dataset = SemanticDataset(root, "training")
    assert len(dataset) == NUM_TRAIN and len(SemanticDataset(root, "val")) == NUM_VAL
    assert dataset.id2label == {0: "red_circle0", 1: "green_rectangle1", 2: "blue_triangle2",
                                3: "lime_texture0", 4: "violet_texture1"}
    saw_other = False
    for index in range(NUM_TRAIN):
        example, scene = dataset[index], _scene(index)
        assert example["image"].dtype == np.uint8 and example["image"].shape == (*SIZE, 3)
        assert example["masks"].dtype == bool and example["class_ids"].dtype == np.int64
        expected = sorted(set(np.unique(scene.label_map).tolist()) - {0})
        np.testing.assert_array_equal(example["class_ids"], np.asarray(expected) - 1)
        for mask, class_id in zip(example["masks"], example["class_ids"]):
            np.testing.assert_array_equal(mask, scene.label_map == class_id + 1)
        covered = example["masks"].any(0)
        np.testing.assert_array_equal(~covered, scene.label_map == 0)  # "other" is in no mask
        saw_other |= bool((~covered).any())
        # JPEG is lossy; the decoded image stays close to the drawn one.
        assert np.abs(example["image"].astype(int) - scene.image).mean() < 4
    assert saw_other


def test_semantic_reduce_labels_matches_transformers_processor(root):
    pytest.importorskip("torch", reason=TORCH_REASON)  # transformers' processor requires it
    from transformers import Mask2FormerImageProcessorPil

    processor = Mask2FormerImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False,
                                             do_reduce_labels=True, ignore_index=255)
    dataset = SemanticDataset(root, "training", reduce_labels=True, ignore_index=255)
    for index in range(4):
        example = dataset[index]
        label_map = dataset.read_label_map(index)
        theirs = processor(images=[example["image"]], segmentation_maps=[label_map], return_tensors="np")
        np.testing.assert_array_equal(example["class_ids"], theirs["class_labels"][0])
        np.testing.assert_array_equal(example["masks"], theirs["mask_labels"][0].astype(bool))
    # Without reduce_labels, 0 ("other") is a class of its own.
    raw = SemanticDataset(root, "training", reduce_labels=False, ignore_index=None)
    assert raw.id2label[0] == "other" and raw.id2label[1] == "red_circle0"
    label_map = raw.read_label_map(0)
    np.testing.assert_array_equal(raw[0]["class_ids"], np.unique(label_map))


def test_semantic_reduce_labels_keeps_ignore_index_pixels_ignored_as_our_processor(root):
    """The README's deliberate difference (transformers' processor makes 255 class 254): the
    reader and m2f_jax's processor agree, and the 255 pixels are in no mask."""
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

    dataset = SemanticDataset(root, "training", reduce_labels=True, ignore_index=255)
    label_map = dataset.read_label_map(0).copy()
    label_map[:10, :20] = 255
    dataset.read_label_map = lambda index: label_map
    example = dataset[0]
    ours = Mask2FormerImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, do_reduce_labels=True,
                                     ignore_index=255)(images=[example["image"]], segmentation_maps=[label_map])
    np.testing.assert_array_equal(example["class_ids"], ours["class_labels"][0])
    np.testing.assert_array_equal(example["masks"], ours["mask_labels"][0].astype(bool))
    assert 254 not in example["class_ids"] and not example["masks"][:, :10, :20].any()


def _decode_png_ids(path):
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def test_panoptic_png_ids_decode_to_the_json_segments_and_the_drawn_scene(root):
    dataset = CocoPanopticDataset(root, "train")
    data = json.load(open(os.path.join(root, "panoptic_train.json")))
    assert len(dataset) == len(data["annotations"]) == NUM_TRAIN
    assert dataset.is_thing.tolist() == [True, True, True, False, False]
    crowd_seen = 0
    for index, annotation in enumerate(data["annotations"]):
        ids = _decode_png_ids(os.path.join(root, "panoptic_train", annotation["file_name"]))
        segments = annotation["segments_info"]
        assert set(np.unique(ids).tolist()) - {0} == {s["id"] for s in segments}
        for segment in segments:
            mask = ids == segment["id"]
            assert mask.sum() == segment["area"]
            ys, xs = np.nonzero(mask)
            assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        scene = _scene(index)
        np.testing.assert_array_equal(ids == 0, scene.label_map == 0)  # void = "other"
        example = dataset[index]
        kept = [s for s in segments if not s["iscrowd"]]
        assert example["num_crowd"] == len(segments) - len(kept)
        crowd_seen += example["num_crowd"]
        np.testing.assert_array_equal(example["class_ids"], [s["category_id"] - 1 for s in kept])
        for mask, segment in zip(example["masks"], kept):
            np.testing.assert_array_equal(mask, ids == segment["id"])
            # Same contiguous labels as the semantic format.
            assert np.all(scene.label_map[mask] == segment["category_id"])
    assert crowd_seen > 0


def test_instance_masks_equal_pycocotools_annToMask_and_the_drawn_shapes(root):
    from pycocotools.coco import COCO

    dataset = CocoInstanceDataset(root, "train")
    coco = COCO(os.path.join(root, "instances_train.json"))
    kinds = {"polygon": 0, "rle": 0, "uncompressed": 0}
    for index in range(len(dataset)):
        info = dataset.images[index]
        example = dataset[index]
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[info["id"]]))
        kept = [a for a in annotations if not a["iscrowd"]]
        assert example["num_crowd"] == len(annotations) - len(kept)
        assert len(example["masks"]) == len(kept)
        for annotation in annotations:
            segmentation = annotation["segmentation"]
            kinds["polygon" if isinstance(segmentation, list) else
                  "uncompressed" if isinstance(segmentation["counts"], list) else "rle"] += 1
        for mask, class_id, annotation in zip(example["masks"], example["class_ids"], kept):
            np.testing.assert_array_equal(mask, coco.annToMask(annotation).astype(bool))
            assert class_id == annotation["category_id"] - 1
        scene = _scene(index)
        drawn = [s for s in scene.shapes if not s.iscrowd]
        for mask, shape in zip(example["masks"], drawn):
            np.testing.assert_array_equal(mask, shape.visible_mask)
            if np.array_equal(shape.visible_mask, shape.full_mask) and shape.kind == "circle":
                ys, xs = np.mgrid[:SIZE[0], :SIZE[1]] + 0.5
                analytic = np.hypot(xs - shape.center[0], ys - shape.center[1]) < shape.radius
                assert (mask & analytic).sum() / (mask | analytic).sum() > 0.85
    assert all(count > 0 for count in kinds.values()), kinds


def test_readers_give_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="expected the training image folder at"):
        SemanticDataset(str(tmp_path), "training")
    with pytest.raises(FileNotFoundError, match="expected the COCO panoptic annotation file at .*panoptic_val"):
        CocoPanopticDataset(root, "val", annotation_file=str(tmp_path / "panoptic_val.json"))
    with pytest.raises(FileNotFoundError, match="expected the panoptic PNG folder at"):
        CocoPanopticDataset(root, "val", panoptic_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="expected the COCO instances annotation file at"):
        CocoInstanceDataset(str(tmp_path), "train", image_dir=os.path.join(root, "train"))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        CocoInstanceDataset(root, "test")
    # A label map missing for one image.
    copy = tmp_path / "ade"
    write_dataset(str(copy), 2, 1, image_size=(32, 32), formats=("semantic",))
    os.remove(copy / "annotations" / "training" / "synth_000001.png")
    with pytest.raises(FileNotFoundError, match="expected the annotation PNG of an image at .*synth_000001"):
        SemanticDataset(str(copy), "training")
    os.remove(copy / "labels.json")
    with pytest.raises(FileNotFoundError, match="expected labels.json"):
        SemanticDataset(str(copy), "validation")
    assert SemanticDataset(str(copy), "validation", id2label={0: "a"}).id2label == {0: "a"}


# ---- augmentation ------------------------------------------------------------------------------


def _square_example():
    """A 60x80 image: grey background, a red square and a blue bar; masks for both."""
    image = np.full((60, 80, 3), 128, np.uint8)
    masks = np.zeros((2, 60, 80), bool)
    masks[0, 10:30, 5:25] = True
    masks[1, 40:50, 30:75] = True
    image[masks[0]] = (255, 0, 0)
    image[masks[1]] = (0, 0, 255)
    return {"image": image, "masks": masks, "class_ids": np.array([4, 7])}


def _denormalise(pixel_values):
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return (pixel_values * std + mean) * 255


def test_train_transform_static_shapes_and_masks_stay_on_their_colour():
    transform = TrainTransform(crop_size=(48, 64), min_scale=0.3, max_scale=2.0)
    colours = {4: (255, 0, 0), 7: (0, 0, 255)}
    dropped = checked = 0
    for seed in range(40):
        out = transform(_square_example(), np.random.default_rng(seed))
        assert out["pixel_values"].shape == (48, 64, 3) and out["pixel_values"].dtype == np.float32
        assert out["pixel_mask"].shape == (48, 64) and out["pixel_mask"].dtype == np.int32
        assert out["masks"].shape[1:] == (48, 64) and out["masks"].dtype == bool
        assert len(out["masks"]) == len(out["class_ids"])
        dropped += 2 - len(out["masks"])
        valid = out["pixel_mask"].astype(bool)
        ys, xs = np.nonzero(valid)  # the image is one top-left rectangle, padding after it
        assert valid[: ys.max() + 1, : xs.max() + 1].all()
        np.testing.assert_array_equal(out["pixel_values"][~valid], 0)
        pixels = _denormalise(out["pixel_values"])
        for mask, class_id in zip(out["masks"], out["class_ids"]):
            assert mask.any() and not (mask & ~valid).any()
            # Bilinear blends about one pixel at the edges; inside, the mask has its colour.
            interior = scipy.ndimage.binary_erosion(mask, iterations=2)
            if interior.any():
                checked += 1
                inside = pixels[interior]
                np.testing.assert_allclose(inside, np.broadcast_to(colours[int(class_id)], inside.shape), atol=3)
    assert dropped > 0  # some crops lose a shape, and it is dropped, not kept empty
    assert checked > 20
    a = transform(_square_example(), np.random.default_rng(7))
    b = transform(_square_example(), np.random.default_rng(7))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_flip_mirrors_image_and_masks_together():
    example = _square_example()
    for seed in range(5):
        plain = TrainTransform(64, 0.5, 1.5, flip_prob=0.0)(example, np.random.default_rng(seed))
        flipped = TrainTransform(64, 0.5, 1.5, flip_prob=1.0)(example, np.random.default_rng(seed))
        h, w = plain["pixel_mask"].sum(0).max(), plain["pixel_mask"].sum(1).max()
        np.testing.assert_array_equal(flipped["pixel_mask"], plain["pixel_mask"])
        np.testing.assert_array_equal(flipped["pixel_values"][:h, :w], plain["pixel_values"][:h, :w][:, ::-1])
        np.testing.assert_array_equal(flipped["masks"][:, :h, :w], plain["masks"][:, :h, :w][:, :, ::-1])


def test_large_scale_jitter_scale_range_and_resize_crop_equal_full_resize_then_crop():
    from PIL import Image

    from m2f_jax.data.augment import resize_and_crop

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    masks = rng.uniform(size=(3, 30, 50)) < 0.5
    full = np.asarray(Image.fromarray(image).resize((90, 54), Image.BILINEAR))
    pixels, cropped = resize_and_crop(image, masks, (54, 90), (10, 20), (32, 40))
    np.testing.assert_array_equal(pixels, full[10:42, 20:60])
    full_masks = np.stack([np.asarray(Image.fromarray(m).resize((90, 54), Image.NEAREST)) for m in masks])
    np.testing.assert_array_equal(cropped, full_masks[:, 10:42, 20:60])
    # The valid area follows the scale: 0.1 .. 2.0 of the crop (aspect kept, 60x80 image).
    transform = TrainTransform(crop_size=100)
    widths = [transform(_square_example(), np.random.default_rng(s))["pixel_mask"][0].sum() for s in range(60)]
    assert min(widths) <= 30 and max(widths) == 100


def test_eval_transform_fits_and_pads():
    out = EvalTransform(40)(_square_example())
    assert out["pixel_values"].shape == (40, 40, 3)
    np.testing.assert_array_equal(out["pixel_mask"].sum(0).max(), 30)  # 60x80 -> 30x40
    np.testing.assert_array_equal(out["masks"][0, 5:15, 3:12], True)


# ---- batch iterator ----------------------------------------------------------------------------


class _Toy:
    """Tiny in-memory dataset: example i has i % 5 + 1 masks; its image encodes i."""

    def __init__(self, size=10):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        image = np.full((16, 16, 3), index, np.uint8)
        count = index % 5 + 1
        masks = np.zeros((count, 16, 16), bool)
        for k in range(count):
            masks[k, k * 3:k * 3 + 2] = True
        return {"image": image, "masks": masks, "class_ids": np.arange(count) + index}


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batches_have_static_shapes_and_dtypes(root):
    dataset = CocoPanopticDataset(root, "train")
    with BatchIterator(dataset, 4, TrainTransform(64), max_masks=8, seed=0, num_workers=2) as iterator:
        for batch in _take(iterator, 7):  # crosses an epoch (6 batches)
            assert batch["pixel_values"].shape == (4, 64, 64, 3) and batch["pixel_values"].dtype == np.float32
            assert batch["pixel_mask"].shape == (4, 64, 64) and batch["pixel_mask"].dtype == np.int32
            assert batch["mask_labels"].shape == (4, 8, 64, 64) and batch["mask_labels"].dtype == np.uint8
            assert batch["class_labels"].shape == (4, 8) and batch["class_labels"].dtype == np.int32
            assert batch["label_valid"].shape == (4, 8) and batch["label_valid"].dtype == bool
            assert np.all(batch["mask_labels"].sum((2, 3))[~batch["label_valid"]] == 0)
            assert np.all(batch["mask_labels"].sum((2, 3))[batch["label_valid"]] > 0)
        assert iterator.get_state()["epoch"] == 1 and json.loads(json.dumps(iterator.get_state())) == iterator.get_state()


def _strip_targets_of_first_train_example(folder):
    """Takes every target of train example 0 away in the three formats: a COCO image without
    annotations, a panoptic PNG whose segments are not listed, an ADE map that is all "other"."""
    label_path = os.path.join(folder, "annotations", "training", "synth_000000.png")
    from PIL import Image

    Image.fromarray(np.zeros_like(np.asarray(Image.open(label_path)))).save(label_path)
    with open(os.path.join(folder, "panoptic_train.json")) as f:
        panoptic = json.load(f)
    first = panoptic["images"][0]["id"]
    for annotation in panoptic["annotations"]:
        if annotation["image_id"] == first:
            annotation["segments_info"] = []
    with open(os.path.join(folder, "panoptic_train.json"), "w") as f:
        json.dump(panoptic, f)
    with open(os.path.join(folder, "instances_train.json")) as f:
        instances = json.load(f)
    first = instances["images"][0]["id"]
    instances["annotations"] = [a for a in instances["annotations"] if a["image_id"] != first]
    with open(os.path.join(folder, "instances_train.json"), "w") as f:
        json.dump(instances, f)


@pytest.mark.parametrize("fmt", ["semantic", "panoptic", "instance"])
def test_an_example_without_targets_is_a_row_without_valid_slots(fmt, tmp_path):
    """As transformers trains such an image (every query matched to nothing: "no object"; the loss
    of a batch with such rows is checked against transformers in test_criterion.py)."""
    from m2f_jax.data.datasets import open_dataset

    write_dataset(str(tmp_path), num_train=4, num_val=1, image_size=(32, 40), seed=1)
    _strip_targets_of_first_train_example(str(tmp_path))
    dataset = open_dataset(str(tmp_path), fmt, "train")
    assert dataset[0]["masks"].shape == (0, 32, 40)
    for transform in (TrainTransform(32), EvalTransform(32)):
        out = transform(dataset[0], np.random.default_rng(0))
        assert out["masks"].shape == (0, 32, 32) and out["class_ids"].shape == (0,)
    with BatchIterator(dataset, 4, TrainTransform(32), max_masks=4, shuffle=False, num_workers=0) as iterator:
        batch = next(iterator)
    assert list(batch["example_index"]) == [0, 1, 2, 3]
    assert not batch["label_valid"][0].any() and not batch["mask_labels"][0].any()
    assert batch["label_valid"][1:].any()


def test_same_seed_gives_identical_batches_whatever_num_workers(root):
    dataset = CocoInstanceDataset(root, "train")
    transform = TrainTransform(48)
    runs = []
    for workers, prefetch in ((0, 1), (2, 3)):
        with BatchIterator(dataset, 5, transform, max_masks=6, seed=11, num_workers=workers,
                           prefetch=prefetch) as it:
            runs.append(_take(it, 6))  # 4 batches per epoch: crosses into epoch 1
    _assert_same_batches(runs[0], runs[1])
    with BatchIterator(dataset, 5, transform, max_masks=6, seed=12, num_workers=0) as other:
        assert not np.array_equal(next(other)["pixel_values"], runs[0][0]["pixel_values"])
    # Epochs are reshuffled.
    assert set(runs[0][4]["example_index"]) != set(runs[0][0]["example_index"])


def test_process_shares_laid_end_to_end_are_the_one_process_global_batches():
    dataset = _Toy(11)
    identity = lambda example, rng: EvalTransform(16)(example)  # noqa: E731 (cloudpickled to the worker)
    for drop_remainder in (True, False):
        settings = dict(batch_size=4, transform=identity, max_masks=5, seed=4, drop_remainder=drop_remainder,
                        num_epochs=1)
        with BatchIterator(dataset, num_workers=0, **settings) as it:
            whole = list(it)
        shares = []
        for process_index in range(2):
            with BatchIterator(dataset, process_index=process_index, process_count=2,
                               num_workers=1 - process_index, **settings) as it:
                shares.append(list(it))
        assert len(whole) == len(shares[0]) == len(shares[1]) == (2 if drop_remainder else 3)  # lockstep
        joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*shares)]
        _assert_same_batches(joined, whole)
        indices = np.concatenate([b["example_index"] for b in whole])
        valid = np.concatenate([b["example_valid"] for b in whole])
        assert np.all(valid == (indices >= 0))
        for b in whole:  # the image encodes its index: examples really are those indices
            real = b["example_index"] >= 0
            red = _denormalise(b["pixel_values"][real, 0, 0])[:, 0]
            np.testing.assert_allclose(red, b["example_index"][real], atol=1e-3)
            assert np.all(b["pixel_values"][~real] == 0) and not b["label_valid"][~real].any()
        real = indices[indices >= 0]
        assert len(set(real.tolist())) == len(real)  # no example twice in an epoch
        if drop_remainder:
            assert len(real) == 8  # two global batches of 4
        else:
            assert set(real.tolist()) == set(range(11)) and (indices < 0).sum() == 1


def test_resume_from_state_gives_exactly_the_next_batches(root):
    dataset = SemanticDataset(root, "training")
    transform = TrainTransform(48)
    settings = dict(batch_size=4, transform=transform, max_masks=5, seed=2)
    with BatchIterator(dataset, num_workers=2, prefetch=3, **settings) as uninterrupted:
        before = _take(uninterrupted, 5)
        state = json.loads(json.dumps(uninterrupted.get_state()))
        after = _take(uninterrupted, 4)  # crosses into epoch 1 (6 batches per epoch)
    # the state does not depend on the worker count: resume in the caller's thread
    with BatchIterator(dataset, state=state, num_workers=0, **settings) as resumed:
        _assert_same_batches(_take(resumed, 4), after)
        resumed.set_state({"epoch": 0, "batch": 0})  # set_state() on an iterator that has run
        _assert_same_batches(_take(resumed, 5), before)
    with pytest.raises(ValueError, match="cannot resume: the state has seed=2"):
        BatchIterator(dataset, **{**settings, "seed": 3}, state=state)


def test_max_masks_keeps_the_first_masks_and_flags_the_slots():
    dataset = _Toy(10)
    transform = EvalTransform(16)
    with pytest.warns(UserWarning, match="more than max_masks=3"):
        with BatchIterator(dataset, 5, transform, max_masks=3, shuffle=False, num_workers=0) as it:
            batch = next(it)
    for row, index in enumerate(batch["example_index"]):
        expected = transform(dataset[index])
        count = min(len(expected["class_ids"]), 3)
        assert batch["label_valid"][row].tolist() == [True] * count + [False] * (3 - count)
        np.testing.assert_array_equal(batch["class_labels"][row, :count], expected["class_ids"][:count])
        np.testing.assert_array_equal(batch["mask_labels"][row, :count], expected["masks"][:count])
        np.testing.assert_array_equal(batch["mask_labels"][row, count:], 0)


def test_iterator_errors_are_clear():
    with pytest.raises(ValueError, match="gives no global batch of 16"):
        BatchIterator(_Toy(10), 16, EvalTransform(16), max_masks=2, process_count=2)
    with pytest.raises(ValueError, match="global batch size 3 does not divide over 2 processes"):
        BatchIterator(_Toy(10), 3, EvalTransform(16), max_masks=2, process_count=2)
    with pytest.raises(ValueError, match="process_index < process_count"):
        BatchIterator(_Toy(10), 2, EvalTransform(16), max_masks=2, process_index=2, process_count=2)

    def broken(example, rng):
        raise RuntimeError("bad example")

    with BatchIterator(_Toy(10), 2, broken, max_masks=2, num_workers=2) as it:
        with pytest.raises(RuntimeError, match="bad example"):
            next(it)


_WORKERS_SCRIPT = """
import multiprocessing, sys
from m2f_jax.data import BatchIterator, CocoPanopticDataset, TrainTransform

class Unreadable:  # the dataset with its example 5 unreadable
    def __init__(self, dataset): self.dataset = dataset
    def __len__(self): return len(self.dataset)
    def __getitem__(self, i):
        if i == 5: raise OSError("example 5 is unreadable")
        return self.dataset[i]

if __name__ == "__main__":
    dataset = CocoPanopticDataset(sys.argv[1], "train")
    with BatchIterator(dataset, 4, TrainTransform(64), max_masks=8, num_workers=2) as it:
        next(it)  # the workers have more examples in flight
        workers = multiprocessing.active_children()
    print("exit codes", [w.exitcode for w in workers])
    with BatchIterator(Unreadable(dataset), 4, TrainTransform(64), max_masks=8, shuffle=False, num_workers=1) as it:
        next(it)  # examples 0-3
        try:
            next(it)
        except OSError as e:
            print("raised", e)
"""


def test_workers_exit_when_stopped_and_an_error_leaves_no_shared_memory(root):
    """Stopped with examples in flight, grain's worker processes end on their own (exit status 0;
    grain kills one that has not ended after 25 s); an example that cannot be read is raised in this
    process, with nothing left behind in shared memory (Python's resource tracker would warn at
    exit)."""
    r = subprocess.run([sys.executable, "-c", _WORKERS_SCRIPT, root], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.splitlines() == ["exit codes [0, 0]", "raised example 5 is unreadable"], r.stdout + r.stderr
    assert "leaked" not in r.stderr, r.stderr[-3000:]


_KILLED_SCRIPT = """
import multiprocessing, sys, time
from m2f_jax.data import BatchIterator, CocoPanopticDataset, TrainTransform

if __name__ == "__main__":
    it = BatchIterator(CocoPanopticDataset(sys.argv[1], "train"), 4, TrainTransform(64), max_masks=8, num_workers=2)
    next(it)
    print(*[w.pid for w in multiprocessing.active_children() if "resource_tracker" not in w.name], flush=True)
    time.sleep(600)
"""


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_their_process_is_killed(root):
    """SIGKILL (no handler runs, no close()) of a process iterating with 2 workers: both workers
    end within 5 s instead of outliving it."""
    process = subprocess.Popen([sys.executable, "-c", _KILLED_SCRIPT, root], stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        workers = [int(pid) for pid in process.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"workers {left} outlived their killed process"
