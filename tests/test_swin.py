"""Parity tests of m2f_jax.modeling.swin against transformers' SwinBackbone (the oracle).

The oracle runs as Mask2Former runs it: ``SwinBackbone(config)(pixel_values).feature_maps`` in
eval mode, fp32 (SwinBackbone.forward sets always_partition=True itself). Every torch parameter
gets Gaussian noise before the copy, so zero/one-initialised tensors (relative position tables,
biases, norms) also expose layout mistakes. Tolerance: atol 1e-4 in fp32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.swin import modeling_swin as hf_swin  # noqa: E402

from m2f_jax.config import SwinConfig  # noqa: E402
from m2f_jax.modeling.swin import (  # noqa: E402
    SwinBackbone,
    SwinLayer,
    SwinMLP,
    relative_position_index,
    shift_window_mask,
    window_attention,
    window_partition,
)

STAGES = ["stage1", "stage2", "stage3", "stage4"]
ATOL = 1e-4
TINY = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _hf_backbone(seed: int, noise_std: float = 0.05, **kwargs):
    torch.manual_seed(seed)
    hf_config = transformers.SwinConfig(out_features=STAGES, **kwargs)
    model = transformers.SwinBackbone(hf_config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise_std * torch.randn_like(p))
    return model


def _flax_config(hf_model) -> SwinConfig:
    return SwinConfig.from_dict(hf_model.config.to_dict())


def torch_swin_to_flax(hf_model) -> dict:
    """HF in-memory SwinBackbone state_dict -> nested Flax params.

    Generic rule: drop the leading ``swin.``, split on '.', glue a numeric component to the
    previous one as ``_N``; Linear weight -> kernel (transposed), Conv2d OIHW -> HWIO,
    LayerNorm weight -> scale. ``swin.layernorm`` is unused by the backbone and skipped.
    """
    params: dict = {}
    for key, tensor in hf_model.state_dict().items():
        if key.startswith("swin.layernorm."):
            continue
        module_name, leaf = key.rsplit(".", 1)
        module = hf_model.get_submodule(module_name)
        value = tensor.detach().cpu().numpy()
        if leaf == "weight" and isinstance(module, torch.nn.Linear):
            leaf, value = "kernel", value.T
        elif leaf == "weight" and isinstance(module, torch.nn.Conv2d):
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and isinstance(module, torch.nn.LayerNorm):
            leaf = "scale"
        path: list = []
        for part in key.removeprefix("swin.").rsplit(".", 1)[0].split("."):
            if part.isdigit():
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)
        node = params
        for part in path:
            node = node.setdefault(part, {})
        assert leaf not in node, key
        node[leaf] = jnp.asarray(value)
    return params


def _flat_shapes(tree) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): tuple(v.shape) for path, v in flat}


def _converted_params(hf_model, model, x_nhwc) -> dict:
    """Converts and checks that the converted tree is exactly the Flax model's tree."""
    params = torch_swin_to_flax(hf_model)
    expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), x_nhwc)["params"]
    assert _flat_shapes(params) == _flat_shapes(expected)
    return params


def _check_parity(hf_kwargs, batch: int, height: int, width: int, seed: int):
    hf_model = _hf_backbone(seed, **hf_kwargs)
    cfg = _flax_config(hf_model)
    model = SwinBackbone(cfg)
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, cfg.num_channels, height, width)).astype(np.float32)
    x = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    params = _converted_params(hf_model, model, x)

    with torch.no_grad():
        expected = hf_model(torch.from_numpy(pixels)).feature_maps
    got = jax.jit(model.apply)({"params": params}, x)

    assert len(got) == len(expected) == 4
    errors = []
    for stage, ref, out in zip(STAGES, expected, got):
        ref = ref.numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
        assert out.shape == ref.shape, (stage, out.shape, ref.shape)
        assert out.dtype == jnp.float32
        err = float(np.max(np.abs(np.asarray(out) - ref)))
        errors.append(err)
        np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0, err_msg=stage)
    return errors


# ---------------------------------------------------------------------------------------------
# static constants and the pure attention core
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_size", [7, 12])
def test_relative_position_index_matches_transformers_buffer(window_size):
    bias = hf_swin.SwinRelativePositionBias(num_heads=2, window_size=(window_size, window_size))
    expected = bias.relative_position_index.numpy().reshape(window_size**2, window_size**2)
    np.testing.assert_array_equal(relative_position_index(window_size), expected)


@pytest.mark.parametrize("window_size,height_pad,width_pad", [(7, 14, 21), (7, 7, 7), (12, 24, 36)])
def test_shift_window_mask_matches_transformers_get_attn_mask(window_size, height_pad, width_pad):
    config = transformers.SwinConfig(embed_dim=8, window_size=window_size)
    layer = hf_swin.SwinLayer(config, dim=8, input_resolution=(height_pad, width_pad), num_heads=1,
                              shift_size=window_size // 2)
    expected = layer.get_attn_mask(height_pad, width_pad, dtype=torch.float32, device="cpu").numpy()
    got = shift_window_mask(height_pad, width_pad, window_size, window_size // 2)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_window_partition_order_is_batch_then_row_major_windows():
    # Hand-made: a 4x4 map with window 2; window 1 is the top-right 2x2 block.
    x = np.arange(2 * 4 * 4).reshape(2, 4, 4, 1)
    windows = window_partition(x, 2)  # (2, 4, 4, 1)
    np.testing.assert_array_equal(windows[0, 1, :, 0], [2, 3, 6, 7])
    np.testing.assert_array_equal(windows[1, 2, :, 0], 16 + np.array([8, 9, 12, 13]))


def test_window_attention_matches_transformers_eager_attention_fp32_atol_1e5():
    """Oracle: transformers' eager_attention_forward with bias + broadcast shift mask."""
    rng = np.random.default_rng(0)
    b, nw, t, nh, hd = 2, 6, 49, 3, 8
    q, k, v = (rng.standard_normal((b, nw, t, nh, hd)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((nh, t, t)).astype(np.float32)
    mask = shift_window_mask(14, 21, 7, 3)  # (6, 49, 49)

    def heads_first(a):  # (B, nW, T, nh, hd) -> (B*nW, nh, T, hd), transformers' layout
        return torch.from_numpy(a.reshape(b * nw, t, nh, hd)).transpose(1, 2)

    combined = torch.from_numpy(bias)[None] + torch.from_numpy(mask)[None, :, None].expand(
        b, -1, -1, -1, -1).reshape(b * nw, 1, t, t)
    module = torch.nn.Module().eval()
    expected, _ = hf_swin.eager_attention_forward(
        module, heads_first(q), heads_first(k), heads_first(v), combined, scaling=hd**-0.5)
    expected = expected.numpy().reshape(b, nw, t, nh, hd)  # it returns (B*nW, T, nh, hd)

    got = jax.jit(window_attention)(q, k, v, bias, mask)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# whole backbone vs transformers
# ---------------------------------------------------------------------------------------------


def test_tiny_backbone_matches_transformers_fp32_atol_1e4():
    """embed 16, depths 1-1-1-1, window 7, 64x64, batch 2: stages 16, 8, 4, 2 (all < window)."""
    errors = _check_parity(TINY, batch=2, height=64, width=64, seed=0)
    print("tiny max abs errors per stage:", errors)


def test_shifted_odd_size_backbone_matches_transformers_fp32_atol_1e4():
    """70x45 (not multiples of 32), depths 2-2-2-2: shifted windows, patch-embed padding and
    odd-size patch merging (stages 18x12, 9x6, 5x3, 3x2)."""
    kwargs = dict(TINY, depths=[2, 2, 2, 2])
    errors = _check_parity(kwargs, batch=1, height=70, width=45, seed=1)
    print("70x45 max abs errors per stage:", errors)


def test_window12_backbone_matches_transformers_fp32_atol_1e4():
    """Swin-B/L window geometry (window 12, shift 6), 100x76: stages 25x19, 13x10, 7x5, 4x3,
    each padded up to a multiple of 12, shifted blocks in stages 1-2; qkv_bias=False as well."""
    kwargs = dict(embed_dim=16, depths=[2, 2, 1, 1], num_heads=[1, 2, 2, 4], window_size=12,
                  qkv_bias=False)
    errors = _check_parity(kwargs, batch=1, height=100, width=76, seed=2)
    print("window-12 max abs errors per stage:", errors)


# ---------------------------------------------------------------------------------------------
# training mode, jit (random params: these test mechanics, parity is above)
# ---------------------------------------------------------------------------------------------


def _random_params(model, *args, seed: int = 0) -> dict:
    """Random float32 params with the model's tree, without compiling model.init."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(seed)
    # Noise on everything, so zero-initialised tables and biases take part.
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


# rbg keys: the module is PRNG-agnostic (make_rng + bernoulli), and threefry's unrolled hash
# adds several seconds of CPU compile per train step, which this file cannot afford.
def _key(seed: int):
    return jax.random.key(seed, impl="rbg")


def test_backbone_train_mode_is_stochastic_and_deterministic_mode_ignores_rng():
    """drop_path_rate, hidden and attention dropout > 0: deterministic=False differs from
    deterministic=True and between two "dropout" rng keys (and repeats for the same key);
    deterministic=True gives identical outputs whatever rng key is passed."""
    cfg = SwinConfig(**dict(TINY, out_features=tuple(STAGES)), drop_path_rate=0.5,
                     hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)
    model = SwinBackbone(cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = {"params": _random_params(model, x)}
    apply = jax.jit(model.apply, static_argnames="deterministic")

    eval_a = apply(variables, x, deterministic=True, rngs={"dropout": _key(10)})
    eval_b = apply(variables, x, deterministic=True, rngs={"dropout": _key(11)})
    train_a = apply(variables, x, deterministic=False, rngs={"dropout": _key(10)})
    train_a2 = apply(variables, x, deterministic=False, rngs={"dropout": _key(10)})
    train_b = apply(variables, x, deterministic=False, rngs={"dropout": _key(11)})

    for ea, eb, ta, ta2, tb in zip(eval_a, eval_b, train_a, train_a2, train_b):
        np.testing.assert_array_equal(np.asarray(ea), np.asarray(eb))
        np.testing.assert_array_equal(np.asarray(ta), np.asarray(ta2))  # same key, same draw
        assert np.all(np.isfinite(np.asarray(ta)))
        assert not np.allclose(np.asarray(ta), np.asarray(ea))
        assert not np.allclose(np.asarray(ta), np.asarray(tb))


def _block(shift: int = 3, **rates):
    cfg = SwinConfig(**dict(TINY, **rates))
    block = SwinLayer(cfg, dim=16, num_heads=2, shift_size=shift,
                      drop_path_rate=cfg.drop_path_rate)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 9, 9, 16))  # 9x9 -> padded 14x14, 4 windows
    return block, _random_params(block, x), x


@pytest.mark.parametrize(
    "rates,stochastic",
    [
        (dict(drop_path_rate=0.5), True),
        (dict(hidden_dropout_prob=0.3), True),
        (dict(attention_probs_dropout_prob=0.3), True),
        (dict(), False),
    ],
    ids=["drop_path", "hidden_dropout", "attention_dropout", "all_zero"],
)
def test_block_each_dropout_source_acts_only_in_train_mode(rates, stochastic):
    """Each rate alone makes a block's train-mode output differ from eval mode; with all rates
    zero, train mode equals eval mode exactly."""
    rates = {"drop_path_rate": 0.0, **rates}
    block, params, x = _block(**rates)
    apply = jax.jit(block.apply, static_argnames="deterministic")
    eval_out = np.asarray(apply({"params": params}, x, deterministic=True))
    train_out = np.asarray(apply({"params": params}, x, deterministic=False,
                                 rngs={"dropout": _key(5)}))
    if stochastic:
        assert not np.allclose(train_out, eval_out)
    else:
        np.testing.assert_array_equal(train_out, eval_out)


def test_block_drop_path_drops_whole_samples_of_the_attention_branch_only():
    """HF quirk kept for parity: a dropped sample is x + MLP(LN(x)) exactly (the MLP branch is
    never dropped); a kept one differs. Hand-derived oracle from the block's own sub-layers."""
    block, params, x = _block(drop_path_rate=0.5)
    train_out = np.asarray(jax.jit(block.apply, static_argnames="deterministic")(
        {"params": params}, x, deterministic=False, rngs={"dropout": _key(7)}))

    normed = nn.LayerNorm(epsilon=1e-5).apply({"params": params["layernorm_after"]}, x)
    mlp = SwinMLP(block.config, 16).apply({"params": params["mlp"]}, normed)
    without_attention = np.asarray(x + mlp)

    dropped = [np.allclose(o, w, atol=1e-6, rtol=0) for o, w in zip(train_out, without_attention)]
    assert 0 < sum(dropped) < len(dropped), dropped  # fixed key: some dropped, some kept
    for o, w, d in zip(train_out, without_attention, dropped):
        if not d:
            assert np.max(np.abs(o - w)) > 1e-2


def test_backbone_jits_with_bf16_compute_and_float32_params():
    cfg = SwinConfig(**dict(TINY, out_features=tuple(STAGES)))
    model = SwinBackbone(cfg, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 45, 70, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes))
    params = _random_params(model, x)
    outs = jax.jit(model.apply)({"params": params}, x)
    assert [o.shape for o in outs] == [(1, 12, 18, 16), (1, 6, 9, 32), (1, 3, 5, 64), (1, 2, 3, 128)]
    assert all(o.dtype == jnp.bfloat16 for o in outs)
    assert all(np.all(np.isfinite(np.asarray(o, np.float32))) for o in outs)
