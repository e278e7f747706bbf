"""Trains the embedded default model (m2f_jax/assets/default_model) and picks the example images
(m2f_jax/assets/examples): the "tiny" preset from scratch on this project's synthetic COCO-panoptic
dataset, then exported in the HF layout with a 96x96 preprocessor config.

The shipped model was made in two runs (the second continues from the first's export):

    python scripts/train_default_model.py --steps 300 --lr 3e-4
    python scripts/train_default_model.py --steps 400 --lr 1e-4 --init /tmp/m2f_default/run_tiny/hf
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 96


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--work", default="/tmp/m2f_default")
    parser.add_argument("--init", default="tiny", help="preset, or a checkpoint to continue from")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    from m2f_jax.data.synthetic import write_dataset
    from m2f_jax.processing.image_processor import Mask2FormerImageProcessor
    from m2f_jax.training.run import TrainArgs, train

    data = os.path.join(args.work, "data")
    if not os.path.isdir(data):
        write_dataset(data, num_train=256, num_val=16, image_size=(SIZE, SIZE), seed=0, formats=("panoptic",))
    summary = train(TrainArgs(
        data=data, format="panoptic", init=args.init, steps=args.steps, batch_size=8, crop=SIZE, lr=args.lr,
        out=os.path.join(args.work, f"run_{args.init.replace('/', '_')}"), min_scale=0.5, max_scale=1.5, clip_norm=1.0,
        backbone_multiplier=1.0, save_every=100, num_workers=1,
    ))
    print(summary)
    target = os.path.join(ROOT, "m2f_jax", "assets", "default_model")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(summary["export"], target)
    Mask2FormerImageProcessor(size={"height": SIZE, "width": SIZE}, size_divisor=0, ignore_index=255).save_pretrained(target)
    examples = os.path.join(ROOT, "m2f_jax", "assets", "examples")
    os.makedirs(examples, exist_ok=True)
    val_images = sorted(os.listdir(os.path.join(data, "val")))[:3]
    for name in val_images:
        shutil.copy(os.path.join(data, "val", name), os.path.join(examples, name))
    print("wrote", target, "and", examples)


if __name__ == "__main__":
    main()
