"""``scan_layers`` (m2f_jax/modeling/variants.py): the repeated layers as scans over their stacked
parameters, or unrolled. Oracles: transformers' forward (fp32, 1e-4 absolute) for the scanned
model; the scanned and unrolled programs agree within fp32 1e-5 (outputs absolute, parameter
gradients relative to the largest gradient) and hold the same parameters. The config is tiny but
deep enough that every scan runs more than one trip: Swin stage 3 of depth 6 (3 pairs), 3
pixel-decoder encoder layers, 6 decoder layers (2 rounds of one layer per feature level)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON

pytest.importorskip("torch", reason=TORCH_REASON)

import m2f_jax
from m2f_jax.modeling import variants
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation
from tests.hf_models import TINY, compare_outputs, hf_config, noisy_model, run_hf, save

SIZE = (1, 64, 96, 3)
DEEP = dict(
    backbone=dict(TINY["backbone"], depths=[2, 2, 6, 2]),
    model=dict(TINY["model"], decoder_layers=7, encoder_layers=3),
    num_labels=TINY["num_labels"],
)


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory):
    torch_model = noisy_model(hf_config(DEEP["backbone"], DEEP["model"], DEEP["num_labels"]), seed=5)
    model = m2f_jax.load(save(torch_model, tmp_path_factory.mktemp("deep") / "ckpt"), variant="xla")
    x = np.random.default_rng(0).normal(size=SIZE).astype(np.float32)
    return model, torch_model, x


def _module(model, scan):
    return Mask2FormerForUniversalSegmentation(model.config, variant="xla", scan_layers=scan)


def _scans(module, params, x) -> int:
    jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x))(params, x)
    return sum(eqn.primitive.name == "scan" for _, eqn in variants.equations(jaxpr))


def test_scan_layers_default_on_for_xla_off_for_cpu_and_settings_win():
    assert variants.resolve_scan_layers(None, "xla") and not variants.resolve_scan_layers(None, "cpu")
    assert not variants.resolve_scan_layers(False, "xla") and variants.resolve_scan_layers(True, "cpu")
    with variants.use_scan_layers(True):
        assert variants.resolve_scan_layers(None, "xla") and not variants.resolve_scan_layers(False, "xla")


def test_scanned_model_matches_transformers_and_unrolled_fp32_1e5(deep_checkpoint):
    model, torch_model, x = deep_checkpoint
    flags = dict(output_hidden_states=True, output_attentions=True, output_auxiliary_logits=True)
    scanned, unrolled = _module(model, None), _module(model, False)
    # The "xla" variant's default program has the scans: Swin stage 3, the encoder, the decoder.
    assert _scans(scanned, model.params, x) == 3 and _scans(unrolled, model.params, x) == 0

    ours = jax.jit(lambda p, x: scanned.apply({"params": p}, x, **flags))(model.params, x)
    compare_outputs(ours, run_hf(torch_model, x), atol=1e-4)
    plain = jax.jit(lambda p, x: unrolled.apply({"params": p}, x, **flags))(model.params, x)
    pairs = list(zip(jax.tree.leaves(ours), jax.tree.leaves(plain), strict=True))
    # 5 last states, 4 + 3 maps, 7 decoder states, 6 attentions, 6 x 2 auxiliary logits
    assert len(pairs) == 37
    for a, b in pairs:
        assert a.shape == b.shape
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5


def test_scanned_parameter_gradients_equal_unrolled_fp32_1e5(deep_checkpoint):
    model, _, x = deep_checkpoint
    def grads(module):
        def loss(params):
            out = module.apply({"params": params}, x, output_auxiliary_logits=True)
            logits = [out.class_queries_logits, out.masks_queries_logits]
            logits += [a[k] for a in out.auxiliary_logits for k in ("class_queries_logits", "masks_queries_logits")]
            rng = np.random.default_rng(1)
            return sum(jnp.sum(a * rng.normal(size=a.shape).astype(np.float32)) for a in logits)
        return jax.jit(jax.grad(loss))(model.params)

    scanned, unrolled = grads(_module(model, True)), grads(_module(model, False))
    assert jax.tree.structure(scanned) == jax.tree.structure(unrolled) == jax.tree.structure(model.params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(unrolled))
    for path, a in jax.tree_util.tree_leaves_with_path(scanned):
        b = dict(jax.tree_util.tree_leaves_with_path(unrolled))[path]
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} > 1e-5 x {scale:.3g}"


def test_params_are_the_unrolled_layout_either_way(deep_checkpoint):
    model, _, x = deep_checkpoint
    shapes = [jax.eval_shape(lambda: _module(model, scan).init(jax.random.key(0), x)["params"])
              for scan in (True, False)]
    assert jax.tree.map(lambda a: a.shape, shapes[0]) == jax.tree.map(lambda a: a.shape, shapes[1])
    assert jax.tree.map(jnp.shape, model.params) == jax.tree.map(lambda a: a.shape, shapes[0])
    stage3 = shapes[0]["model"]["pixel_level_module"]["encoder"]["encoder"]["layers_2"]
    assert sorted(k for k in stage3 if k.startswith("blocks_")) == [f"blocks_{i}" for i in range(6)]
