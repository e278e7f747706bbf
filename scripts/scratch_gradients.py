"""The gradient of a Swin-T Mask2Former trained from scratch, on the first batch `m2f-jax train`
would give it, m2f_jax next to transformers (each with its own random initialisation).

Large-scale jitter shrinks an image down to 0.1x and pads the crop with zeros. With the zero
biases of a fresh Swin, every patch of the padding embeds to an all-zero token, the blocks keep it
zero, and each LayerNorm of a zero token multiplies the gradient flowing through it by
1/sqrt(eps) ~ 316. By the patch embedding the gradient reaches ~1e34 and its float32 global norm
overflows, in both frameworks. Clipping then zeroes the update (as torch's clip_grad_norm_ does)
and ``m2f-jax train`` prints a warning. Run on CPU in ~3 minutes:

    python scripts/scratch_gradients.py            # 384x384 crops, batch 2, 5 synthetic classes
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_batch(root: str, crop: int, batch_size: int, seed: int):
    """The first training batch of ``m2f-jax train --crop crop --batch-size batch_size``."""
    from m2f_jax.data.augment import TrainTransform
    from m2f_jax.data.pipeline import BatchIterator
    from m2f_jax.data.datasets import open_dataset
    from m2f_jax.training.train_step import BATCH_KEYS

    dataset = open_dataset(root, "semantic", "train")
    with BatchIterator(dataset, batch_size, TrainTransform(crop_size=crop), max_masks=32, seed=seed,
                       num_workers=1) as batches:
        batch = next(batches)
    return {k: np.asarray(batch[k]) for k in BATCH_KEYS}, {int(k): v for k, v in dataset.id2label.items()}


def jax_gradients(batch, id2label, seed: int):
    """{name: gradient} of the train-step loss for the "swin-t" preset's fresh initialisation."""
    import jax

    from m2f_jax.modeling.criterion import LossConfig
    from m2f_jax.training.run import initial_model
    from m2f_jax.training.train_step import global_batch_losses

    config, module, params = initial_model("swin-t", id2label, seed)
    loss_config = LossConfig.from_config(config)
    key = jax.random.fold_in(jax.random.key(seed), 0)  # the train step's key of step 0

    def loss(p, b):
        losses = global_batch_losses(module, loss_config, p, b, key)
        return sum(v for name, v in losses.items() if name.startswith("loss"))

    grads = jax.jit(jax.grad(loss))(params, batch)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(g)
            for path, g in jax.tree_util.tree_leaves_with_path(grads)}, config


def torch_gradients(batch, config, seed: int):
    """{name: gradient} of transformers' loss for its own fresh initialisation of ``config``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(
        transformers.Mask2FormerConfig.from_dict(config.to_dict())
    ).train()
    valid = batch["label_valid"]
    out = model(
        pixel_values=torch.from_numpy(batch["pixel_values"].transpose(0, 3, 1, 2).copy()),
        mask_labels=[torch.from_numpy(m[v]) for m, v in zip(batch["mask_labels"], valid)],
        class_labels=[torch.from_numpy(c[v]).long() for c, v in zip(batch["class_labels"], valid)],
    )
    out.loss.backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def report(name: str, grads) -> None:
    """The largest gradients and the global norm, in float32 (as the train step computes it) and
    in float64."""
    with np.errstate(over="ignore"):  # the overflow is the point
        norm32 = np.sqrt(sum(np.sum(np.square(g, dtype=np.float32), dtype=np.float32) for g in grads.values()))
    norm64 = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in grads.values()))
    print(f"{name}: global norm float32 {norm32:.3g}, float64 {norm64:.3g}")
    for path, g in sorted(grads.items(), key=lambda kv: -float(np.abs(kv[1]).max()))[:4]:
        print(f"  max |grad| {float(np.abs(g).max()):.3g}  {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from m2f_jax.data.synthetic import write_dataset

    with tempfile.TemporaryDirectory() as root:
        write_dataset(root, num_train=8, num_val=2, image_size=(args.crop, args.crop), formats=("semantic",))
        batch, id2label = first_batch(root, args.crop, args.batch_size, args.seed)
    padding = float(np.mean(np.all(batch["pixel_values"] == 0, axis=-1)))
    print(f"batch {batch['pixel_values'].shape}, zero (padded) pixels {padding:.1%}")
    grads, config = jax_gradients(batch, id2label, args.seed)
    report("m2f_jax", grads)
    report("transformers", torch_gradients(batch, config, args.seed))


if __name__ == "__main__":
    main()
