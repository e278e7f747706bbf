"""The pixel decoder's convolutions (m2f_jax/modeling/conv.py) against torch: outputs and both
gradients (the weight gradient is hand-written), 1x1, 3x3 and 5x5, odd sizes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch

from m2f_jax.modeling.conv import Conv2d, conv2d_same


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv_and_gradients_match_torch(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(2, 9, 13, 5)).astype(np.float32)  # (B, H, W, Cin)
    kernel = rng.normal(size=(k, k, 5, 7)).astype(np.float32)  # (kh, kw, Cin, Cout)
    cotangent = rng.normal(size=(2, 9, 13, 7)).astype(np.float32)

    out, vjp = jax.vjp(conv2d_same, jnp.asarray(x), jnp.asarray(kernel))
    dx, dk = vjp(jnp.asarray(cotangent))

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    kt = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)  # (Cout, Cin, kh, kw)
    ref = torch.nn.functional.conv2d(xt, kt, padding=k // 2)
    ref.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)
    np.testing.assert_allclose(np.asarray(dk), kt.grad.numpy().transpose(2, 3, 1, 0), atol=1e-3)


def test_module_params_are_nn_conv_params():
    x = jnp.ones((1, 6, 6, 4))
    ours = Conv2d(8, (3, 3)).init(jax.random.PRNGKey(0), x)["params"]
    flax_conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)["params"]
    assert jax.tree_util.tree_map(jnp.shape, ours) == jax.tree_util.tree_map(jnp.shape, flax_conv)
    y = Conv2d(8, (3, 3)).apply({"params": flax_conv}, x)
    ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1))).apply({"params": flax_conv}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5)
