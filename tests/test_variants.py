"""The two variants of the model (m2f_jax/modeling/variants.py): "xla" (GPU/TPU default: stock
layers, JAX's autodiff) and "cpu" (hand-written backward passes). Oracles: transformers'
forward (fp32, 1e-4 absolute) and torch autograd through it (every parameter gradient leaf within
1e-3 of its largest absolute value; the directional derivative from ``jax.jvp``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch

import m2f_jax
from convert.folders import param_shapes
from convert.mapping import hf_to_flax
from m2f_jax.modeling import variants
from tests.hf_models import compare_outputs, run_hf

SIZE = (1, 64, 96)  # batch, height, width: small enough for a whole-model gradient per variant


def test_platforms_pick_variants_and_overrides_win():
    assert variants.for_platform("cpu") == "cpu"
    assert variants.for_platform("gpu") == variants.for_platform("tpu") == "xla"
    assert variants.resolve(None, "tpu") == "xla"
    with variants.use("xla"):
        assert variants.current() == "xla" and variants.resolve(None, "cpu") == "xla"
        assert variants.resolve("cpu", "tpu") == "cpu"  # an explicit variant wins
    assert variants.platform_of(jax.devices()) == "cpu"
    assert variants.platform_of(jax.sharding.Mesh(np.array(jax.devices()), ("d",))) == "cpu"
    with pytest.raises(ValueError, match="variant must be one of"):
        variants.use("cuda").__enter__()


def _inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=SIZE + (3,)).astype(np.float32)
    return x, rng


def _scalar_weights(ours, rng):
    """Fixed random weights of every logit (final and auxiliary): the test's scalar loss."""
    shapes = [ours.class_queries_logits.shape, ours.masks_queries_logits.shape]
    for level in ours.auxiliary_logits:
        shapes += [level["class_queries_logits"].shape, level["masks_queries_logits"].shape]
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _logits(out):
    arrays = [out.class_queries_logits, out.masks_queries_logits]
    for level in out.auxiliary_logits:
        arrays += [level["class_queries_logits"], level["masks_queries_logits"]]
    return arrays


def _torch_gradients(torch_model, x, weights, config):
    """Gradients of sum(w * logits) w.r.t. every transformers parameter, as a Flax param tree
    (the converter's layout rules are linear, so they map gradients as they map weights)."""
    torch_model.zero_grad()
    out = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), output_auxiliary_logits=True)
    arrays = [out.class_queries_logits, out.masks_queries_logits]
    for level in out.auxiliary_logits:
        arrays += [level["class_queries_logits"], level["masks_queries_logits"]]
    sum(torch.sum(a * torch.from_numpy(w)) for a, w in zip(arrays, weights)).backward()
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy()
        for name, p in torch_model.named_parameters()
    }
    return hf_to_flax(grads, param_shapes(config))


@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_forward_and_parameter_gradients_match_transformers(tiny_checkpoint, variant):
    folder, torch_model = tiny_checkpoint
    model = m2f_jax.load(folder, variant=variant)
    assert model.module.variant == variant
    x, rng = _inputs()
    ours = model(x, output_hidden_states=True, output_attentions=True, output_auxiliary_logits=True)
    compare_outputs(ours, run_hf(torch_model, x), atol=1e-4)

    weights = _scalar_weights(ours, rng)

    def loss(params):
        out = model.module.apply({"params": params}, jnp.asarray(x), output_auxiliary_logits=True)
        return sum(jnp.sum(a * w) for a, w in zip(_logits(out), weights))

    grads = jax.jit(jax.grad(loss))(model.params)
    expected = _torch_gradients(torch_model, x, weights, model.config)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
    # Leaves whose exact gradient is zero (the attention key biases: softmax ignores them) hold
    # float32 cancellation noise in both frameworks, whose size follows the compiler's summation
    # order; they are compared at 1e-4 of the model's largest gradient.
    floor = 1e-4 * max(float(np.max(np.abs(g))) for g in flat_expected.values())
    checked = 0
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        want = np.asarray(flat_expected[path])
        scale = max(float(np.max(np.abs(want))), floor)
        err = float(np.max(np.abs(np.asarray(g) - want)))
        assert err <= 1e-3 * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > 1e-3 x {scale:.3g}"
        checked += 1
    assert checked == len(flat_expected)


def test_jvp_through_the_whole_model_matches_torch_directional_derivative(tiny_checkpoint):
    """jax.jvp on the default accelerator program ("xla"): the directional derivative of the
    scalar loss along a random parameter direction equals <torch gradient, direction>."""
    folder, torch_model = tiny_checkpoint
    model = m2f_jax.load(folder, variant="xla")
    x, rng = _inputs()
    weights = _scalar_weights(model(x, output_auxiliary_logits=True), rng)

    def loss(params):
        out = model.module.apply({"params": params}, jnp.asarray(x), output_auxiliary_logits=True)
        return sum(jnp.sum(a * w) for a, w in zip(_logits(out), weights))

    direction = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), model.params
    )
    _, derivative = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(model.params, direction)
    expected = _torch_gradients(torch_model, x, weights, model.config)
    products = jax.tree_util.tree_map(lambda g, t: np.asarray(g, np.float64) * np.asarray(t), expected, direction)
    terms = np.concatenate([np.ravel(p) for p in jax.tree_util.tree_leaves(products)])
    assert abs(float(derivative) - terms.sum()) <= 1e-4 * np.abs(terms).sum()
