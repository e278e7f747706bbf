"""m2f_jax.segment end to end, against transformers' own pipeline on the same checkpoint
(oracle: Mask2FormerImageProcessorPil -> Mask2FormerForUniversalSegmentation -> its
post-processing at the original size)."""
import numpy as np
import pytest
import skimage.data
from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch
import transformers
from PIL import Image

import m2f_jax
from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

PROCESSOR = dict(size={"height": 64, "width": 64}, size_divisor=0, ignore_index=255)


@pytest.fixture(scope="module")
def model_and_oracle(tiny_checkpoint, tmp_path_factory):
    folder, torch_model = tiny_checkpoint
    # A copy of the checkpoint with a processor config, as Hub checkpoints have.
    import shutil

    copy = tmp_path_factory.mktemp("with_processor") / "ckpt"
    shutil.copytree(folder, copy)
    Mask2FormerImageProcessor(**PROCESSOR).save_pretrained(str(copy))
    hf_processor = transformers.Mask2FormerImageProcessorPil(**PROCESSOR)
    return m2f_jax.load(str(copy)), torch_model, hf_processor


def _images():
    return [skimage.data.astronaut()[::4, ::4], skimage.data.coffee()[::5, ::5], skimage.data.chelsea()[::3, ::3]]


def _hf_semantic(torch_model, hf_processor, image):
    inputs = hf_processor(images=Image.fromarray(image), return_tensors="pt")
    with torch.no_grad():
        out = torch_model(pixel_values=inputs["pixel_values"])
    return hf_processor.post_process_semantic_segmentation(out, target_sizes=[image.shape[:2]])[0].numpy()


def test_semantic_maps_match_transformers_pipeline(model_and_oracle):
    model, torch_model, hf_processor = model_and_oracle
    images = _images()
    results = m2f_jax.segment(model, images, task="semantic")
    for image, result in zip(images, results):
        expected = _hf_semantic(torch_model, hf_processor, image)
        assert result["segmentation"].shape == image.shape[:2]
        # identical up to pixels where two classes' scores tie within float error
        assert np.mean(result["segmentation"] == expected) > 0.999


def test_batching_never_changes_an_answer(model_and_oracle, tmp_path):
    model = model_and_oracle[0]
    images = _images() + [_images()[0]]
    path = tmp_path / "img.png"
    Image.fromarray(images[1]).save(path)
    together = m2f_jax.segment(model, images[:3] + [str(path)], task="instance", threshold=0.0, batch_size=2)
    for image, result in zip(images[:3] + [images[1]], together):
        alone = m2f_jax.segment(model, image, task="instance", threshold=0.0)[0]
        assert alone["segments"]
        np.testing.assert_array_equal(alone["segmentation"], result["segmentation"])
        # the same segments; scores may differ in the last digit (XLA sums in another order at
        # another batch size)
        strip = lambda segs: [{k: v for k, v in s.items() if k != "score"} for s in segs]
        assert strip(alone["segments"]) == strip(result["segments"])
        np.testing.assert_allclose([s["score"] for s in alone["segments"]],
                                   [s["score"] for s in result["segments"]], atol=1e-5)


def test_segments_carry_label_names_and_areas(model_and_oracle):
    model = model_and_oracle[0]
    image = _images()[0]
    for task in ("panoptic", "instance", "semantic"):
        result = m2f_jax.segment(model, image, task=task, threshold=0.0, overlap_mask_area_threshold=0.0)[0]
        seg = result["segmentation"]
        assert seg.dtype == np.int32 and seg.shape == image.shape[:2]
        if task != "panoptic":  # random weights: every query may predict "no object"
            assert result["segments"], task
        for s in result["segments"]:
            assert s["label"] == model.config.id2label[s["label_id"]]
            assert s["area"] == int(np.sum(seg == s["id"]))


def test_bad_task_and_missing_file_are_clear_errors(model_and_oracle):
    model = model_and_oracle[0]
    with pytest.raises(ValueError, match="task must be one of"):
        m2f_jax.segment(model, _images()[0], task="depth")
    with pytest.raises(FileNotFoundError, match="No image file"):
        m2f_jax.segment(model, "/no/such/image.png")
