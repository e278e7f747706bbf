"""The gather-based sampler and multi-scale deformable attention against torch (oracle:
torch.nn.functional.grid_sample, bilinear, zeros padding, align_corners=False; and transformers'
pure-PyTorch multi_scale_deformable_attention), fp32 atol 1e-5."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch
import torch.nn.functional as F

from m2f_jax.modeling import variants
from m2f_jax.modeling.deformable import multi_scale_deformable_attention, sample_maps, sample_points

VARIANTS = pytest.mark.parametrize("variant", variants.VARIANTS)


def _torch_sample(features_nhwc, points):
    x = torch.from_numpy(features_nhwc.transpose(0, 3, 1, 2).copy())  # (N, C, H, W)
    grid = torch.from_numpy(2 * points - 1)[:, :, None, :]  # (N, P, 1, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0].numpy().transpose(0, 2, 1)  # (N, P, C)


def test_sample_points_matches_grid_sample_in_and_out_of_range_atol_1e5():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(3, 5, 7, 4)).astype(np.float32)
    points = rng.uniform(-0.3, 1.3, size=(3, 200, 2)).astype(np.float32)
    # Borders and exact pixel centres/corners: x in {0, 1, 1.02, 1.5}, y likewise.
    edge = np.array([[0, 0], [1, 1], [1.02, 0.5], [0.5, 1.02], [1.5, 0.5], [-0.5, 0.2],
                     [0.5 / 7, 0.5 / 5], [1 - 0.5 / 7, 1 - 0.5 / 5], [-0.2 / 7, 0.5]], np.float32)
    points[:, : len(edge)] = edge
    ours = np.asarray(sample_points(jnp.asarray(features), jnp.asarray(points)))
    np.testing.assert_allclose(ours, _torch_sample(features, points), atol=1e-5)
    # Far outside reads exactly zero (no clamped pixel leaks in).
    far = np.array([[[-3.0, 0.5], [0.5, 4.0], [2.0, 2.0]]], np.float32).repeat(3, 0)
    assert np.all(np.asarray(sample_points(jnp.asarray(features), jnp.asarray(far))) == 0)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 9, 130)])  # one window block, and three
def test_sample_maps_matches_grid_sample_values_and_gradients(shape):
    """The "xla" variant's sampler of single-channel maps (one 128-lane table row per sample)
    against grid_sample, in and far out of range, across window-block boundaries."""
    rng = np.random.default_rng(5)
    maps = rng.normal(size=shape).astype(np.float32)
    points = rng.uniform(-0.3, 1.3, size=(shape[0], 300, 2)).astype(np.float32)
    points[0, :5] = [[0, 0], [1, 1], [-3.0, 0.5], [0.5, 4.0], [62.5 / shape[2], 0.5]]
    ours, vjp = jax.vjp(sample_maps, jnp.asarray(maps), jnp.asarray(points))
    expected = _torch_sample(maps[..., None], points)[..., 0]  # (N, P)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
    cotangent = rng.normal(size=expected.shape).astype(np.float32)
    g_maps, g_pts = vjp(jnp.asarray(cotangent))
    tf = torch.from_numpy(maps[:, None].copy()).requires_grad_()
    tp = torch.from_numpy(points.copy()).requires_grad_()
    out = F.grid_sample(tf, (2 * tp - 1)[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=False)
    out[:, 0, :, 0].backward(torch.from_numpy(cotangent))
    np.testing.assert_allclose(np.asarray(g_maps), tf.grad.numpy()[:, 0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_pts), tp.grad.numpy(), atol=1e-3, rtol=1e-4)


def test_sample_points_gradients_match_torch_and_are_finite():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    points = rng.uniform(-0.1, 1.1, size=(2, 50, 2)).astype(np.float32)
    g_feat, g_pts = jax.grad(lambda f, p: jnp.sum(sample_points(f, p) ** 2), argnums=(0, 1))(
        jnp.asarray(features), jnp.asarray(points)
    )
    tf = torch.from_numpy(features.transpose(0, 3, 1, 2).copy()).requires_grad_()
    tp = torch.from_numpy(points.copy()).requires_grad_()
    out = F.grid_sample(tf, (2 * tp - 1)[:, :, None], mode="bilinear", padding_mode="zeros", align_corners=False)
    (out**2).sum().backward()
    assert np.all(np.isfinite(np.asarray(g_pts)))
    np.testing.assert_allclose(np.asarray(g_feat), tf.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_pts), tp.grad.numpy(), atol=1e-3, rtol=1e-4)


def _msda_inputs(rng, shapes, b, nh, hd, sq, npts, margin):
    """Random value (B, S, nh, hd), locations (B, Sq, nh, L, P, 2) in [-margin, 1 + margin] (some
    outside every level) and unnormalised attention weights (B, Sq, nh, L, P)."""
    s = sum(h * w for h, w in shapes)
    value = rng.normal(size=(b, s, nh, hd)).astype(np.float32)
    loc = rng.uniform(-margin, 1 + margin, size=(b, sq, nh, len(shapes), npts, 2)).astype(np.float32)
    attn = rng.uniform(size=(b, sq, nh, len(shapes), npts)).astype(np.float32)
    return value, loc, attn


@VARIANTS
def test_multi_scale_deformable_attention_matches_transformers_atol_1e5(variant):
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention as hf_msda,
    )

    rng = np.random.default_rng(2)
    shapes = ((3, 5), (6, 10), (12, 19))
    value, loc, attn = _msda_inputs(rng, shapes, b=2, nh=4, hd=8, sq=17, npts=4, margin=0.2)
    attn /= attn.sum(axis=(-1, -2), keepdims=True)
    with variants.use(variant):
        ours = multi_scale_deformable_attention(jnp.asarray(value), shapes, jnp.asarray(loc), jnp.asarray(attn))
    theirs = hf_msda(torch.from_numpy(value), list(shapes), torch.from_numpy(loc), torch.from_numpy(attn))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)


@VARIANTS
def test_multi_scale_deformable_attention_gradients_match_transformers(variant):
    """The "cpu" variant's hand-written backward (custom_vjp) and the "xla" variant's autodiff
    against torch autograd through transformers' function, for value, sampling locations (in and
    out of range) and attention weights."""
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention as hf_msda,
    )

    rng = np.random.default_rng(3)
    shapes = ((3, 4), (5, 7), (9, 11))
    value, loc, attn = _msda_inputs(rng, shapes, b=2, nh=3, hd=5, sq=13, npts=2, margin=0.3)
    cotangent = rng.normal(size=(2, 13, 3 * 5)).astype(np.float32)

    with variants.use(variant):
        _, vjp = jax.vjp(lambda v, l, a: multi_scale_deformable_attention(v, shapes, l, a),
                         jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn))
        d_value, d_loc, d_attn = vjp(jnp.asarray(cotangent))

    tv, tl, ta = (torch.from_numpy(x.copy()).requires_grad_() for x in (value, loc, attn))
    hf_msda(tv, list(shapes), tl, ta).backward(torch.from_numpy(cotangent))
    np.testing.assert_allclose(np.asarray(d_value), tv.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_attn), ta.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(d_loc), tl.grad.numpy(), atol=1e-4, rtol=1e-5)


@VARIANTS
def test_multi_scale_deformable_attention_under_vmap_matches_transformers_per_example(variant):
    """vmap folds the mapped axis into the batch axis (custom_vmap) in the forward and in the
    backward; one argument is unmapped (shared by all examples), which the rule broadcasts."""
    from transformers.models.mask2former.modeling_mask2former import (
        multi_scale_deformable_attention as hf_msda,
    )

    rng = np.random.default_rng(4)
    shapes = ((2, 3), (4, 5))
    value, loc, _ = _msda_inputs(rng, shapes, b=3, nh=2, hd=4, sq=7, npts=3, margin=0.2)
    value, loc = value[:, None], loc[:, None]  # 3 examples of batch 1
    _, _, attn = _msda_inputs(rng, shapes, b=1, nh=2, hd=4, sq=7, npts=3, margin=0.2)  # shared
    cotangent = rng.normal(size=(3, 1, 7, 2 * 4)).astype(np.float32)

    def value_and_grads(v, l, a, ct):
        out, vjp = jax.vjp(lambda v, l, a: multi_scale_deformable_attention(v, shapes, l, a), v, l, a)
        return (out,) + vjp(ct)

    with variants.use(variant):
        outs = jax.jit(jax.vmap(value_and_grads, in_axes=(0, 0, None, 0)))(
            jnp.asarray(value), jnp.asarray(loc), jnp.asarray(attn), jnp.asarray(cotangent))
    for e in range(3):
        tv, tl, ta = (torch.from_numpy(x.copy()).requires_grad_() for x in (value[e], loc[e], attn))
        out = hf_msda(tv, list(shapes), tl, ta)
        out.backward(torch.from_numpy(cotangent[e]))
        np.testing.assert_allclose(np.asarray(outs[0][e]), out.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(outs[1][e]), tv.grad.numpy(), atol=1e-5)
        np.testing.assert_allclose(np.asarray(outs[2][e]), tl.grad.numpy(), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(outs[3][e]), ta.grad.numpy(), atol=1e-5)


def test_multi_scale_deformable_attention_rejects_inconsistent_shapes():
    import pytest

    value = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(ValueError, match="do not add up"):
        multi_scale_deformable_attention(value, ((2, 2), (2, 2), (1, 1)), jnp.zeros((1, 3, 2, 3, 4, 2)),
                                         jnp.zeros((1, 3, 2, 3, 4)))


def _gather_scatter_dtypes(jaxpr) -> list:
    """Operand dtypes of every gather / scatter-add in ``jaxpr`` and all its sub-jaxprs (scan
    bodies, custom_vjp / custom_vmap calls, pjit)."""
    return [(eqn.primitive.name, str(eqn.invars[0].aval.dtype)) for _, eqn in variants.equations(jaxpr)
            if eqn.primitive.name in ("gather", "scatter-add", "scatter_add")]


@VARIANTS
def test_bf16_layer_samples_and_backpropagates_in_float32(variant):
    """Under bf16 compute the layer's bilinear sampling stays float32, forward and backward (as
    the original CUDA kernel), while its output is bf16. Oracle: the dtypes in the traced
    program, which must contain the attention's gathers and scatter-adds: all float32 on the
    "cpu" variant; on the "xla" variant the forward gathers the bf16 value rows (upcast after the
    gather, which is exact) and every scatter-add accumulates float32."""
    from m2f_jax.modeling.deformable import MultiscaleDeformableAttention

    shapes = ((4, 4), (2, 2))
    s = sum(h * w for h, w in shapes)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(1, s, 16)), jnp.bfloat16)
    ref = jnp.asarray(rng.uniform(size=(1, s, 2, 2)), jnp.float32)
    layer = MultiscaleDeformableAttention(embed_dim=16, num_heads=2, n_levels=2, n_points=2, dtype=jnp.bfloat16)
    params = layer.init(jax.random.key(0), hidden, hidden, ref, shapes)

    def loss(p):
        out, _ = layer.apply(p, hidden, hidden, ref, shapes)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    with variants.use(variant):
        out, _ = layer.apply(params, hidden, hidden, ref, shapes)
        found = _gather_scatter_dtypes(jax.make_jaxpr(jax.grad(loss))(params))
    assert out.dtype == jnp.bfloat16
    assert {name for name, _ in found} >= {"gather", "scatter-add"}, found
    if variant == "cpu":
        assert {dtype for _, dtype in found} == {"float32"}, found
    else:
        assert {dtype for name, dtype in found if name != "gather"} == {"float32"}, found
