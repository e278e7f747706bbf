"""The train switch: dropout, Swin drop-path and decoder LayerDrop are active with
deterministic=False and absent with deterministic=True."""
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation
from tests._fast_compile import FAST_CPU_COMPILE
from tests.hf_models import TINY, hf_config


def _model(dropout, drop_path_rate):
    hf = hf_config(dict(TINY["backbone"], drop_path_rate=drop_path_rate), dict(TINY["model"], dropout=dropout), 3)
    config = Mask2FormerConfig.from_dict(hf.to_dict())
    module = Mask2FormerForUniversalSegmentation(config)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32))
    # Random params from the shapes alone: compiling module.init costs more than the test.
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), shapes)
    return module, params, x


_JITTED = {}


def _run(module, params, x, deterministic, seed):
    # the module is kept with its program: a freed module's id can be reused by the next one
    key = (id(module), deterministic)
    # rbg keys: threefry's random bits compile several times slower on CPU; the modules take either.
    rng = jax.random.key(seed, impl="rbg")
    if key not in _JITTED:
        step = jax.jit(lambda p, x, rng: module.apply(
            {"params": p}, x, deterministic=deterministic, rngs={"dropout": rng}))
        # These tests compare runs of the same program with each other: compile it fast.
        _JITTED[key] = module, step.lower(params, x, rng).compile(compiler_options=FAST_CPU_COMPILE)
    out = _JITTED[key][1](params, x, rng)
    return np.asarray(out.masks_queries_logits), out


def test_dropout_and_drop_path_active_only_in_train_mode():
    module, params, x = _model(dropout=0.2, drop_path_rate=0.5)
    eval_a, _ = _run(module, params, x, True, 1)
    eval_b, _ = _run(module, params, x, True, 2)
    np.testing.assert_array_equal(eval_a, eval_b)  # the rng is ignored in eval mode
    train_a, _ = _run(module, params, x, False, 1)
    train_a2, _ = _run(module, params, x, False, 1)
    train_b, _ = _run(module, params, x, False, 2)
    np.testing.assert_array_equal(train_a, train_a2)  # same key, same draw
    assert np.max(np.abs(train_a - eval_a)) > 1e-3
    assert np.max(np.abs(train_a - train_b)) > 1e-3


def test_layerdrop_probability_one_skips_every_decoder_layer():
    # config.dropout doubles as the decoder LayerDrop probability (as in transformers); at 1.0
    # every layer is skipped, so the decoder output is the learned query features themselves.
    module, params, x = _model(dropout=1.0, drop_path_rate=0.0)
    _, out = _run(module, params, x, False, 0)
    queries = params["model"]["transformer_module"]["queries_features"]["embedding"]
    np.testing.assert_array_equal(np.asarray(out.transformer_decoder_last_hidden_state),
                                  np.broadcast_to(np.asarray(queries), (2,) + queries.shape))
