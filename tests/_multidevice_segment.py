"""Run by tests/test_segment.py in a subprocess with 4 virtual CPU devices (XLA_FLAGS must be set
before jax starts): ``python tests/_multidevice_segment.py CHECKPOINT OUT.npz`` segments five
photos for each task on all 4 devices (batches of 4) and on the first device alone, and writes
each map and its segment scores to OUT.npz as ``{task}/{devices}/{i}`` and ``.../scores``. Then it
assigns other weights to ``model.params`` and segments again (``changed/{devices}/{i}``, semantic),
and writes the logits of one ``sharded_call`` with them (``sharded/logits``, and the number of
devices holding them, ``sharded/devices``) beside the one-device forward's (``single/logits``)."""
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402

import m2f_jax  # noqa: E402
from m2f_jax.processing.image_processor import Mask2FormerImageProcessor  # noqa: E402


def main(checkpoint: str, out: str) -> None:
    model = m2f_jax.load(checkpoint)
    processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64}, size_divisor=0)
    images = [skimage.data.astronaut()[::4, ::4], skimage.data.coffee()[::5, ::5], skimage.data.chelsea()[::3, ::3],
              skimage.data.rocket()[::6, ::6], skimage.data.coins()[::4, ::4]]
    arrays = {"num_devices": np.array(len(jax.devices()))}
    for task in ("panoptic", "instance", "semantic"):
        for devices in (jax.devices(), jax.devices()[:1]):
            results = m2f_jax.segment(model, images, task=task, threshold=0.0, processor=processor,
                                      batch_size=4, devices=devices)
            for i, result in enumerate(results):
                arrays[f"{task}/{len(devices)}/{i}"] = result["segmentation"]
                arrays[f"{task}/{len(devices)}/{i}/scores"] = np.array([s["score"] for s in result["segments"]])
    # other weights, as training's validation assigns them: the 4-device call must not reuse the
    # copy it replicated from the first ones
    noise = jax.random.normal(jax.random.key(1), (len(jax.tree_util.tree_leaves(model.params)),))
    model.params = jax.tree_util.tree_map(lambda x, n: x + 0.05 * n * np.std(np.asarray(x)), model.params,
                                          jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(model.params),
                                                                       list(noise)))
    for devices in (jax.devices(), jax.devices()[:1]):
        results = m2f_jax.segment(model, images, task="semantic", processor=processor, batch_size=4, devices=devices)
        for i, result in enumerate(results):
            arrays[f"changed/{len(devices)}/{i}"] = result["segmentation"]
    pixels = processor(images[:4], return_tensors="np")["pixel_values"]
    sharded = model.sharded_call(pixels, jax.sharding.Mesh(np.array(jax.devices()), ("data",)))
    arrays["sharded/devices"] = np.array(len(sharded.class_queries_logits.sharding.device_set))
    arrays["sharded/logits"] = np.asarray(sharded.class_queries_logits)
    arrays["single/logits"] = np.asarray(model(pixels).class_queries_logits)
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
