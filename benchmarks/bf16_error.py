"""bf16 inference error against fp32 (same weights, same inputs): Swin-T geometry, 133 labels,
noisy random weights, 384x384 (or --size). Parameters stay fp32; compute is bf16 except the
deformable sampling (fp32, as the original CUDA kernel) and softmaxes.

    python benchmarks/bf16_error.py [--size 384] [--batch 2]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()

    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from convert.folders import param_shapes
    from convert.mapping import hf_to_flax
    from m2f_jax.config import Mask2FormerConfig
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation
    from tests.hf_models import hf_config, noisy_model

    hf = noisy_model(hf_config(dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]), {}, 133))
    config = Mask2FormerConfig.from_dict(hf.config.to_dict())
    params = hf_to_flax({k: v.numpy() for k, v in hf.state_dict().items()}, param_shapes(config))
    x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    outs, times = {}, {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        module = Mask2FormerForUniversalSegmentation(config, dtype=dtype)
        f = jax.jit(lambda p, x: module.apply({"params": p}, x))
        jax.block_until_ready(f(params, x))
        t0 = time.perf_counter()
        outs[name] = jax.block_until_ready(f(params, x))
        times[name] = time.perf_counter() - t0
    a, b = outs["fp32"], outs["bf16"]
    masks_a = np.asarray(a.masks_queries_logits, np.float32)
    masks_b = np.asarray(b.masks_queries_logits, np.float32)
    prob_a = np.asarray(jax.nn.softmax(a.class_queries_logits.astype(jnp.float32)))
    prob_b = np.asarray(jax.nn.softmax(b.class_queries_logits.astype(jnp.float32)))
    print(f"Swin-T geometry, {args.batch}x{args.size}x{args.size}, device {jax.devices()[0].platform}")
    print(f"mask logits: max |fp32| {np.abs(masks_a).max():.2f}, max abs err {np.abs(masks_a - masks_b).max():.4f}, "
          f"mean abs err {np.abs(masks_a - masks_b).mean():.4f}")
    print(f"mask sign agreement (sigmoid>0.5): {100 * np.mean((masks_a > 0) == (masks_b > 0)):.2f}%")
    print(f"class probabilities: max abs err {np.abs(prob_a - prob_b).max():.4f}; "
          f"argmax agreement {100 * np.mean(prob_a.argmax(-1) == prob_b.argmax(-1)):.1f}%")
    print(f"forward: fp32 {times['fp32'] * 1e3:.0f} ms, bf16 {times['bf16'] * 1e3:.0f} ms (one run, after compile)")


if __name__ == "__main__":
    main()
