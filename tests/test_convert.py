"""Conversion HF <-> Flax: strictness, both weight-name layouts, .bin files, the CLI."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

import torch

from convert import ConversionError, flax_to_hf, hf_to_flax, read_state_dict
from convert.folders import load_hf_folder, param_shapes
from m2f_jax.config import Mask2FormerConfig


def test_hub_layout_and_in_memory_layout_give_identical_params(tiny_checkpoint):
    folder, torch_model = tiny_checkpoint
    config, from_disk = load_hf_folder(folder)
    in_memory = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    assert any(".attention.q_proj." in k for k in in_memory)  # really the other layout
    assert any(".attention.self.query." in k for k in read_state_dict(folder))
    from_memory = hf_to_flax(in_memory, param_shapes(config))
    leaves_a = dict(_flat(from_disk))
    leaves_b = dict(_flat(from_memory))
    assert leaves_a.keys() == leaves_b.keys()
    for k in leaves_a:
        np.testing.assert_array_equal(leaves_a[k], leaves_b[k], err_msg=str(k))


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_flax_to_hf_reproduces_the_saved_state_dict(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    _, params = load_hf_folder(folder)
    saved = read_state_dict(folder)
    back = flax_to_hf(params)
    expected = {k for k in saved if "criterion" not in k and "swin.layernorm" not in k}
    assert set(back) == expected
    for k in expected:
        np.testing.assert_array_equal(back[k], saved[k], err_msg=k)


def test_errors_list_every_missing_unexpected_and_misshaped_key(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    config = Mask2FormerConfig.from_pretrained(folder)
    state = dict(read_state_dict(folder))
    del state["class_predictor.bias"]
    del state["model.transformer_module.decoder.layers.0.fc1.weight"]
    state["model.extra_thing.weight"] = np.zeros(3, np.float32)
    state["model.transformer_module.queries_features.weight"] = np.zeros((11, 64), np.float32)
    with pytest.raises(ConversionError) as err:
        hf_to_flax(state, param_shapes(config))
    text = str(err.value)
    assert "Missing (3)" in text  # the two deleted + the mis-shaped one that could not be filled
    assert "class_predictor.bias" in text
    assert "model.transformer_module.decoder.layers.0.fc1.weight" in text
    assert "Unexpected (1)" in text and "model.extra_thing.weight" in text
    assert "Wrong shape (1)" in text and "(11, 64)" in text


def test_checkpoint_for_another_config_is_rejected(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    config = Mask2FormerConfig.from_pretrained(folder)
    other = Mask2FormerConfig.from_dict(dict(config.to_dict(), num_queries=12))
    with pytest.raises(ConversionError, match="queries_features"):
        hf_to_flax(read_state_dict(folder), param_shapes(other))


def test_pytorch_model_bin_is_read_with_torch(tiny_checkpoint, tmp_path):
    folder, torch_model = tiny_checkpoint
    torch_model.save_pretrained(str(tmp_path), safe_serialization=False) if _supports_bin() else None
    if not os.path.isfile(tmp_path / "pytorch_model.bin"):
        torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
        (tmp_path / "config.json").write_text(open(f"{folder}/config.json").read())
    _, from_bin = load_hf_folder(str(tmp_path))
    _, from_safetensors = load_hf_folder(folder)
    a, b = dict(_flat(from_bin)), dict(_flat(from_safetensors))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _supports_bin():
    import inspect

    import transformers

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        read_state_dict(str(tmp_path))


def test_cli_converts_both_ways(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "convert", *a], capture_output=True, text=True, env=env)
    r = run(folder, str(tmp_path / "flax"))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "flax" / "flax_model.msgpack")
    r = run(str(tmp_path / "flax"), str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    saved, back = read_state_dict(folder), read_state_dict(str(tmp_path / "hf"))
    for k in saved:
        if "swin.layernorm" not in k:
            np.testing.assert_array_equal(saved[k], back[k], err_msg=k)
    r = run(str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert r.returncode == 2 and "no config.json" in r.stderr and "Traceback" not in r.stderr
