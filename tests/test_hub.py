"""m2f_jax.load: local folders, the Hugging Face cache layout, offline errors, input checks."""
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import m2f_jax
from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

from tests.hf_models import run_hf


def _fake_cache(root, repo_id, folder):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo / "snapshots" / sha


def test_load_from_hf_cache_honours_hf_hub_cache(tiny_checkpoint, tmp_path, monkeypatch):
    folder, torch_model = tiny_checkpoint
    snapshot = _fake_cache(tmp_path / "hub", "facebook/mask2former-test-tiny", folder)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = m2f_jax.load("facebook/mask2former-test-tiny")
    assert model.path == str(snapshot)
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(model(x).class_queries_logits), run_hf(torch_model, x).class_queries_logits.numpy(), atol=1e-4
    )


def test_load_from_hf_home(tiny_checkpoint, tmp_path, monkeypatch):
    folder, _ = tiny_checkpoint
    _fake_cache(tmp_path / "home" / "hub", "org/model", folder)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert m2f_jax.load("org/model").config.num_queries == 10


def test_unknown_model_offline_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        m2f_jax.load("facebook/mask2former-swin-tiny-coco-panoptic")
    text = str(err.value)
    assert "models--facebook--mask2former-swin-tiny-coco-panoptic" in text
    assert "HF_HUB_OFFLINE" in text and "local folder" in text


def test_folder_without_weights_is_a_clear_error(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="lacks config.json or weights"):
        m2f_jax.load(str(tmp_path))


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((64, 64, 3), np.float32, "NHWC"),
        ((1, 3, 64, 64), np.float32, "channels-first"),
        ((1, 64, 64, 4), np.float32, "NHWC"),
        ((1, 64, 64, 3), np.uint8, "dtype"),
    ],
)
def test_bad_pixel_values_raise_value_error_naming_nhwc(tiny_checkpoint, shape, dtype, message):
    model = m2f_jax.load(tiny_checkpoint[0])
    with pytest.raises(ValueError, match=message):
        model(np.zeros(shape, dtype))


def test_flax_folder_loads_the_same_model(tiny_checkpoint, tmp_path):
    from convert import hf_folder_to_flax

    folder, _ = tiny_checkpoint
    hf_folder_to_flax(folder, str(tmp_path / "flax"))
    a, b = m2f_jax.load(folder), m2f_jax.load(str(tmp_path / "flax"))
    x = np.random.default_rng(1).normal(size=(1, 64, 64, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(a(x).masks_queries_logits), np.asarray(b(x).masks_queries_logits))


def test_bf16_inference_stays_close_to_fp32(tiny_checkpoint):
    """bf16 compute with fp32 parameters: the error against fp32 is bounded (measured numbers
    for the Swin-T geometry are in benchmarks/ and the README)."""
    folder, _ = tiny_checkpoint
    fp32, bf16 = m2f_jax.load(folder), m2f_jax.load(folder, dtype=jnp.bfloat16)
    assert jax_dtype(bf16.params) == {"float32"}
    x = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32)
    a, b = fp32(x), bf16(x)
    assert b.masks_queries_logits.dtype == jnp.bfloat16
    prob_a = jax_softmax(a.class_queries_logits)
    prob_b = jax_softmax(b.class_queries_logits.astype(jnp.float32))
    assert float(jnp.max(jnp.abs(prob_a - prob_b))) < 0.05
    scale = float(jnp.max(jnp.abs(a.masks_queries_logits)))
    assert float(jnp.max(jnp.abs(a.masks_queries_logits - b.masks_queries_logits.astype(jnp.float32)))) < 0.1 * scale


def jax_dtype(tree):
    import jax

    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}


def jax_softmax(x):
    import jax

    return jax.nn.softmax(x, axis=-1)
