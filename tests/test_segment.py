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


# ----------------------------------------------------------------------------------------------
# Size buckets, streaming with errors, several devices, instance evaluation
# ----------------------------------------------------------------------------------------------

SHORTEST_EDGE = dict(size={"shortest_edge": 64, "longest_edge": 112}, size_divisor=32)
BUCKETS = [(64, 64), (64, 128), (128, 64)]


def test_bucket_sizes_follow_the_processor_settings():
    from m2f_jax.inference import bucket_sizes

    hub = Mask2FormerImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}, size_divisor=32)
    # short side <= 800, long side <= 1344 (1333 rounded up to 32): long sides 800, 1088 (1072
    # rounded up), 1344
    assert bucket_sizes(hub) == [(800, 800), (800, 1088), (1088, 800), (800, 1344), (1344, 800)]
    assert bucket_sizes(Mask2FormerImageProcessor(**SHORTEST_EDGE), steps=2) == BUCKETS
    assert bucket_sizes(Mask2FormerImageProcessor(size={"height": 384, "width": 384})) == [(384, 384)]
    with pytest.raises(ValueError, match="do_resize"):
        bucket_sizes(Mask2FormerImageProcessor(do_resize=False))
    # every processed size of the Hub's setting fits one bucket (the processor's own size rule)
    from m2f_jax.processing.image_processor import get_output_size

    rng = np.random.default_rng(0)
    assert hub.preprocess(np.zeros((300, 451, 3), np.uint8))["pixel_values"].shape[1:3] == (800, 1216)
    for h, w in rng.integers(1, 5000, (2000, 2)):
        out = get_output_size((int(h), int(w)), hub.size, hub.size_divisor)
        assert any(b[0] >= out[0] and b[1] >= out[1] for b in bucket_sizes(hub)), (h, w, out)


def test_buckets_equal_transformers_on_the_padded_input_cropped(model_and_oracle):
    """Oracle: transformers' processor, the torch model on the image padded with zeros (bottom,
    right) to its bucket, its mask logits cropped to the image's region, transformers'
    post-processing."""
    import types

    model, torch_model, _ = model_and_oracle
    processor = Mask2FormerImageProcessor(**SHORTEST_EDGE)
    hf_processor = transformers.Mask2FormerImageProcessorPil(**SHORTEST_EDGE)
    images = _images()  # processed to 64x64 (no padding), 64x96 and 64x96 (both padded to 64x128)
    model._forward._clear_cache()
    results = m2f_jax.segment(model, images, task="semantic", processor=processor, buckets=BUCKETS)
    assert model._forward._cache_size() == 2  # one program per bucket used, not per size
    padded_any = False
    for image, result in zip(images, results):
        pixels = hf_processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
        h, w = pixels.shape[-2:]
        bucket = min((b for b in BUCKETS if b[0] >= h and b[1] >= w), key=lambda b: b[0] * b[1])
        padded_any |= bucket != (h, w)
        padded = torch.nn.functional.pad(pixels, (0, bucket[1] - w, 0, bucket[0] - h))
        with torch.no_grad():
            out = torch_model(pixel_values=padded)
        cropped = types.SimpleNamespace(class_queries_logits=out.class_queries_logits,
                                        masks_queries_logits=out.masks_queries_logits[..., : h // 4, : w // 4])
        expected = hf_processor.post_process_semantic_segmentation(cropped, target_sizes=[image.shape[:2]])[0]
        assert np.mean(result["segmentation"] == expected.numpy()) > 0.999
    assert padded_any


def test_stream_goes_on_past_bad_images_and_segment_names_them(model_and_oracle, tmp_path):
    model = model_and_oracle[0]
    images = _images()
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    inputs = [images[0], str(bad), np.zeros((0, 5, 3), np.uint8), images[1], str(tmp_path / "missing.png")]
    out = dict(m2f_jax.iter_segment(model, inputs, task="semantic", errors="yield"))
    assert sorted(out) == [0, 1, 2, 3, 4]
    for i in (1, 2, 4):
        assert isinstance(out[i], ValueError) and out[i].index == i
    assert "bad.png" in str(out[1]) and "missing.png" in str(out[4]) and "(0, 5, 3)" in str(out[2])
    for i, image in ((0, images[0]), (3, images[1])):
        alone = m2f_jax.segment(model, image, task="semantic")[0]
        np.testing.assert_array_equal(out[i]["segmentation"], alone["segmentation"])
    with pytest.raises(ValueError, match="bad.png"):
        m2f_jax.segment(model, inputs[:2], task="semantic")


def test_several_devices_give_the_one_device_results(tiny_checkpoint, tmp_path):
    """4 virtual CPU devices in a subprocess (XLA_FLAGS before jax starts): batches of 4 split
    over them (5 images: the last batch padded with copies) against one device; then, after other
    weights are assigned to ``model.params``, the same again (the replicated copy follows the
    weights) and one ``sharded_call``'s logits, spread over all four devices, against one device's
    (fp32, atol 1e-5)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_multidevice_segment.py")
    out = tmp_path / "segment.npz"
    r = subprocess.run([sys.executable, script, str(tiny_checkpoint[0]), str(out)], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    assert int(got["num_devices"]) == 4
    for task in ("panoptic", "instance", "semantic"):
        for i in range(5):
            np.testing.assert_array_equal(got[f"{task}/4/{i}"], got[f"{task}/1/{i}"])
            np.testing.assert_allclose(got[f"{task}/4/{i}/scores"], got[f"{task}/1/{i}/scores"], atol=1e-5)
    for i in range(5):
        np.testing.assert_array_equal(got[f"changed/4/{i}"], got[f"changed/1/{i}"])
    # the new weights do change the maps, so stale weights on 4 devices could not pass
    assert any((got[f"changed/1/{i}"] != got[f"semantic/1/{i}"]).any() for i in range(5))
    assert int(got["sharded/devices"]) == 4
    np.testing.assert_allclose(got["sharded/logits"], got["single/logits"], atol=1e-5)


def test_instance_evaluation_scores_every_query_as_pycocotools(model_and_oracle):
    """m2f_jax.evaluation.run.evaluate(task="instance") against pycocotools' COCOeval on
    transformers' instance post-processing with no threshold (every query's best pairs, full
    masks). Ground truth: some of transformers' own predicted masks with their labels (so AP is
    neither 0 nor 1) and one box per image."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from m2f_jax.evaluation.run import evaluate

    model, torch_model, hf_processor = model_and_oracle
    images = _images()
    dataset, gt_anns, results = [], [], []
    for i, image in enumerate(images):
        inputs = hf_processor(images=Image.fromarray(image), return_tensors="pt")
        with torch.no_grad():
            out = torch_model(pixel_values=inputs["pixel_values"])
        pred = hf_processor.post_process_instance_segmentation(out, threshold=0.0, return_binary_maps=True,
                                                              target_sizes=[image.shape[:2]])[0]
        masks = pred["segmentation"].numpy() > 0
        for mask, s in zip(masks, pred["segments_info"]):
            results.append({"image_id": i, "category_id": s["label_id"] + 1, "score": s["score"],
                            "segmentation": mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))})
        box = np.zeros(image.shape[:2], bool)
        box[5:30, 10:40] = True
        gt_masks = [masks[k] for k in range(0, len(masks), 3)] + [box]
        gt_labels = [pred["segments_info"][k]["label_id"] for k in range(0, len(masks), 3)] + [0]
        dataset.append({"image": image, "masks": np.stack(gt_masks), "class_ids": np.array(gt_labels)})
        for mask, label in zip(gt_masks, gt_labels):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            gt_anns.append({"id": len(gt_anns) + 1, "image_id": i, "category_id": label + 1, "iscrowd": 0,
                            "segmentation": rle, "area": float(mask_utils.area(rle))})
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": im.shape[0], "width": im.shape[1]} for i, im in enumerate(images)],
                    "annotations": gt_anns,
                    "categories": [{"id": c + 1} for c in range(model.config.num_labels)]}
    coco.createIndex()
    coco_eval = COCOeval(coco, coco.loadRes(results), iouType="segm")
    coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
    metrics = evaluate(model, dataset, task="instance", progress=False, batch_size=2)
    assert 0.05 < metrics["AP"] < 0.95
    for name, expected in zip(("AP", "AP50", "AP75", "AR1", "AR10", "AR100"), coco_eval.stats[[0, 1, 2, 6, 7, 8]]):
        assert abs(metrics[name] - expected) < 2e-3, (name, metrics[name], expected)
