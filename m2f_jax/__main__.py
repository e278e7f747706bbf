"""`python -m m2f_jax` / `m2f-jax`: the command line (m2f_jax.cli). `smoke` runs a random-weights
forward of the Swin-T geometry on a synthetic image and prints shapes and timing."""
from __future__ import annotations

import sys
import time


def smoke(size: int = 384, repeats: int = 3) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2f_jax.config import Mask2FormerConfig, SwinConfig
    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    config = Mask2FormerConfig(
        backbone_config=SwinConfig(depths=(2, 2, 6, 2), out_features=("stage1", "stage2", "stage3", "stage4")),
        id2label={i: f"class_{i}" for i in range(133)},
    )
    module = Mask2FormerForUniversalSegmentation(config)
    # A synthetic "photo": smooth gradients and a disc, normalised like the processor does.
    yy, xx = np.mgrid[0 : size, 0 : size] / size
    image = np.stack([xx, yy, ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1).astype(float)], -1)
    pixels = ((image - 0.45) / 0.25)[None].astype(np.float32)  # (1, H, W, 3)
    params = jax.jit(module.init)(jax.random.PRNGKey(0), pixels)["params"]
    forward = jax.jit(lambda p, x: module.apply({"params": p}, x))
    t0 = time.perf_counter()
    out = jax.block_until_ready(forward(params, pixels))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(forward(params, pixels))
        times.append(time.perf_counter() - t0)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"Mask2Former Swin-T geometry, random weights, {n / 1e6:.1f}M parameters, device {jax.devices()[0]}")
    print(f"input                 {pixels.shape} (NHWC)")
    print(f"class_queries_logits  {out.class_queries_logits.shape}")
    print(f"masks_queries_logits  {out.masks_queries_logits.shape}")
    print(f"first call (compile)  {compile_s:.2f} s")
    print(f"forward, median       {1e3 * float(np.median(times)):.1f} ms over {repeats} runs")
    return 0


def main(argv=None) -> int:
    from m2f_jax.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
