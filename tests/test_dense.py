"""The model's Linear layer (m2f_jax/modeling/dense.py, hand-written backward) against torch's
``F.linear`` autograd, and against ``flax.linen.Dense`` for parameters, outputs and dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch

from m2f_jax.modeling.dense import Dense, linear, linear_no_bias


def _torch_linear(x, kernel, bias, cotangent):
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(kernel.T.copy(), requires_grad=True)  # torch's (out, in)
    bt = torch.tensor(bias, requires_grad=True) if bias is not None else None
    out = torch.nn.functional.linear(xt, wt, bt)
    out.backward(torch.tensor(cotangent))
    grads = [xt.grad.numpy(), wt.grad.numpy().T] + ([bt.grad.numpy()] if bias is not None else [])
    return out.detach().numpy(), grads


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 24), (2, 5, 7, 24)])
def test_linear_and_gradients_match_torch_atol_1e4(use_bias, shape):
    rng = np.random.default_rng(len(shape) + use_bias)
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(24, 40)).astype(np.float32)  # (in, out)
    bias = rng.normal(size=(40,)).astype(np.float32) if use_bias else None
    cotangent = rng.normal(size=shape[:-1] + (40,)).astype(np.float32)

    args = (x, kernel, bias) if use_bias else (x, kernel)
    out, vjp = jax.vjp(linear if use_bias else linear_no_bias, *map(jnp.asarray, args))
    grads = vjp(jnp.asarray(cotangent))

    ref, ref_grads = _torch_linear(x, kernel, bias, cotangent)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)
    assert len(grads) == len(ref_grads)
    for ours, theirs in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-5)


def test_gradients_under_vmap_sum_over_the_mapped_axis_like_torch_on_the_stacked_batch():
    # the train step maps the model over examples: the kernel's cotangent sums over them
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 11, 16)).astype(np.float32)  # (examples, tokens, in)
    kernel = rng.normal(size=(16, 8)).astype(np.float32)
    bias = rng.normal(size=(8,)).astype(np.float32)
    cotangent = rng.normal(size=(3, 11, 8)).astype(np.float32)

    def loss(x, kernel, bias):
        out = jax.vmap(linear, in_axes=(0, None, None))(x, kernel, bias)
        return jnp.sum(out * cotangent)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias))
    _, ref_grads = _torch_linear(x, kernel, bias, cotangent)
    for ours, theirs in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_module_has_nn_dense_params_outputs_and_dtypes(dtype, use_bias):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 12))
    ours = Dense(5, use_bias=use_bias, dtype=dtype)
    flax_dense = nn.Dense(5, use_bias=use_bias, dtype=dtype)
    params = ours.init(jax.random.PRNGKey(0), x)["params"]
    ref_params = flax_dense.init(jax.random.PRNGKey(0), x)["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype), ref_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # same initialisers
    y = ours.apply({"params": ref_params}, x)
    ref = flax_dense.apply({"params": ref_params}, x)
    assert y.dtype == ref.dtype
    tol = 1e-5 if dtype is None else 2e-2
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=tol)

    # gradients in the params' dtype (float32) whatever the compute dtype, as nn.Dense's
    grad = jax.grad(lambda p: jnp.sum(ours.apply({"params": p}, x).astype(jnp.float32) ** 2))(ref_params)
    ref_grad = jax.grad(lambda p: jnp.sum(flax_dense.apply({"params": p}, x).astype(jnp.float32) ** 2))(ref_params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 if dtype is None else 0.1, rtol=1e-2)
