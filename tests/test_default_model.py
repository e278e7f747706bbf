"""The embedded default model (trained by scripts/train_default_model.py on the synthetic
dataset) segments the embedded example images correctly: their known shapes (regenerated from the
synthetic dataset's seed, the oracle) are found with the right label."""
import os

import numpy as np
import pytest

import m2f_jax
from m2f_jax.cli import DEFAULT_MODEL, EXAMPLES, _default_images
from m2f_jax.data.datasets import CocoPanopticDataset
from m2f_jax.data.synthetic import write_dataset

# Measured with the shipped model: 10 of 16 (0.625); see the README ("Embedded default model").
MIN_MATCHED_FRACTION = 0.55


@pytest.mark.skipif(not os.path.isdir(DEFAULT_MODEL), reason="no embedded default model in this checkout")
def test_default_model_finds_the_known_shapes_of_the_example_images(tmp_path):
    images = _default_images()
    assert len(images) == 3
    write_dataset(str(tmp_path), num_train=1, num_val=len(images), image_size=(96, 96), seed=0, formats=("panoptic",))
    truth = CocoPanopticDataset(str(tmp_path), "val")
    model = m2f_jax.load(DEFAULT_MODEL)
    results = m2f_jax.segment(model, images, task="panoptic")
    matched = total = 0
    for i, result in enumerate(results):
        example = truth[i]
        assert os.path.basename(images[i]) == example["file_name"]
        seg = result["segmentation"]
        for mask, label in zip(example["masks"], example["class_ids"]):
            total += 1
            ious = [np.sum(mask & (seg == s["id"])) / np.sum(mask | (seg == s["id"]))
                    for s in result["segments"] if s["label_id"] == label]
            matched += bool(ious) and max(ious) > 0.5
    print(f"matched {matched}/{total} ground-truth segments at IoU > 0.5 with the right label")
    assert matched / total >= MIN_MATCHED_FRACTION
