"""Where the training step's time goes: forward and forward + backward of each part of the model
(Swin backbone, pixel decoder, masked-attention decoder), m2f_jax vs transformers, same machine,
same run, same weights, train mode (dropout, drop-path, LayerDrop active).

    python benchmarks/bench_components.py            # Swin-T geometry, 384x384, batch 2

The loss of each part is a sum of squares of its outputs (a stand-in, so that the backward runs
through every output). m2f_jax maps each part over the examples with ``vmap``, as the train step
does; transformers runs the batch. Each part's inputs are the previous part's outputs, computed
once. m2f_jax's parts compile with ``train_compiler_options()``, as the train step does. Times are
the best of ``--repeats`` calls (compile excluded for JAX). Read the ratios: on a
shared CPU the seconds move by 20-30% between runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import _hf_model, jax_model  # noqa: E402
from bench_train import make_batch  # noqa: E402


def _best(fn, repeats):
    fn()  # warm-up (JAX: compiled before; torch: allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def jax_times(torch_model, images, repeats):
    import jax
    import jax.numpy as jnp

    from m2f_jax.modeling.decoder import TransformerModule
    from m2f_jax.modeling.pixel_decoder import PixelDecoder
    from m2f_jax.modeling.swin import SwinBackbone
    from m2f_jax.training.train_step import train_compiler_options

    module, params = jax_model(torch_model)
    cfg = module.config
    pixel = params["model"]["pixel_level_module"]
    key = jax.random.key(0)
    batch = images.shape[0]

    def per_example(part, p, *inputs, key):
        # part.apply on each example (a batch of 1), mapped over the batch as the train step does
        def one(k, *xs):
            xs = jax.tree_util.tree_map(lambda x: x[None], xs)  # each example as a batch of 1
            return part.apply({"params": p}, *xs, deterministic=False, rngs={"dropout": k})
        return jax.vmap(one)(jax.random.split(key, batch), *inputs)

    def sum_sq(tree):
        return sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)) * 1e-6

    swin = SwinBackbone(cfg.backbone_config)
    pixdec = PixelDecoder(cfg)
    tdec = TransformerModule(cfg)
    parts = {
        "swin": (swin, pixel["encoder"]),
        "pixel decoder": (pixdec, pixel["decoder"]),
        "transformer decoder": (tdec, params["model"]["transformer_module"]),
    }
    inputs = {"swin": (jnp.asarray(images),)}
    features = jax.jit(lambda p, x: per_example(swin, p, x, key=key))(pixel["encoder"], images)
    features = [f[:, 0] for f in features]
    inputs["pixel decoder"] = (features,)
    mask_features, multi_scale = jax.jit(lambda p, f: per_example(pixdec, p, f, key=key))(pixel["decoder"], features)
    inputs["transformer decoder"] = ([m[:, 0] for m in multi_scale], mask_features[:, 0])

    out = {}
    for name, (part, p) in parts.items():
        args = inputs[name]
        options = train_compiler_options()  # as the train step is compiled
        fwd = jax.jit(lambda p, *a, part=part: per_example(part, p, *a, key=key), compiler_options=options)
        grad = jax.jit(jax.grad(lambda p, *a, part=part: sum_sq(per_example(part, p, *a, key=key)),
                                argnums=tuple(range(len(args) + 1))), compiler_options=options)
        fwd_c = fwd.lower(p, *args).compile()
        grad_c = grad.lower(p, *args).compile()
        out[name] = (_best(lambda: jax.block_until_ready(fwd_c(p, *args)), repeats),
                     _best(lambda: jax.block_until_ready(grad_c(p, *args)), repeats))
    return out


def torch_times(model, images, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    model.train()
    pixel = model.model.pixel_level_module
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        features = pixel.encoder(x).feature_maps
        decoded = pixel.decoder(features)
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    feats = [leaf(f) for f in features]
    multi_scale = [leaf(f) for f in decoded.multi_scale_features]
    mask_features = leaf(decoded.mask_features)

    def sum_sq(tensors):
        return sum((t ** 2).sum() for t in tensors) * 1e-6

    def swin():
        return list(pixel.encoder(x).feature_maps)

    def pixdec():
        o = pixel.decoder(feats)
        return [o.mask_features, *o.multi_scale_features]

    def tdec():
        o = model.model.transformer_module(multi_scale, mask_features, output_hidden_states=True)
        return [*o.masks_queries_logits, *o.intermediate_hidden_states]

    out = {}
    for name, fn in (("swin", swin), ("pixel decoder", pixdec), ("transformer decoder", tdec)):
        def forward(fn=fn):
            with torch.no_grad():
                fn()

        def backward(fn=fn):
            model.zero_grad(set_to_none=True)
            sum_sq(fn()).backward()

        out[name] = (_best(forward, repeats), _best(backward, repeats))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    args = parser.parse_args()
    images = make_batch(args.batch, args.size, 1, 1)[0]
    model = _hf_model()  # SwinConfig's default drop_path_rate 0.1
    t = torch_times(model, images, args.repeats, args.threads)
    j = jax_times(model, images, args.repeats)
    print(f"\nMask2Former Swin-T parts, train mode, {args.size}x{args.size}, batch {args.batch}, "
          f"{os.cpu_count()} cores, best of {args.repeats}\n")
    print("| part | transformers fwd ms | m2f_jax fwd ms | fwd speed-up | transformers fwd+bwd ms "
          "| m2f_jax fwd+bwd ms | fwd+bwd speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in t:
        (tf, tg), (jf, jg) = t[name], j[name]
        print(f"| {name} | {tf * 1e3:.0f} | {jf * 1e3:.0f} | {tf / jf:.2f}x | {tg * 1e3:.0f} | {jg * 1e3:.0f} "
              f"| {tg / jg:.2f}x |")


if __name__ == "__main__":
    main()
