"""Whole-model parity with transformers (oracle: Mask2FormerForUniversalSegmentation, PyTorch,
eval mode, fp32): every output field, hidden states, attentions and auxiliary logits within
1e-4 absolute. Each test saves a noisy random-weight transformers model with save_pretrained and
loads it through m2f_jax.load."""
import numpy as np
import pytest

import m2f_jax
from tests import TORCH_REASON  # noqa: E402

pytest.importorskip("torch", reason=TORCH_REASON)

from tests.hf_models import TINY, compare_outputs, hf_config, noisy_model, run_hf, save

ATOL = 1e-4


def _pixels(b, h, w, seed=0):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _check(tmp_path, backbone, model_kw, num_labels, b, h, w, seed=0):
    torch_model = noisy_model(hf_config(backbone, model_kw, num_labels), seed=seed)
    model = m2f_jax.load(save(torch_model, tmp_path / "ckpt"))
    x = _pixels(b, h, w, seed)
    ours = model(x, output_hidden_states=True, output_attentions=True, output_auxiliary_logits=True)
    return compare_outputs(ours, run_hf(torch_model, x), ATOL)


def test_tiny_config_matches_transformers_fp32_atol_1e4(tmp_path):
    # transformers' own model-test configuration, at its 256x256 input... reduced to 128x128.
    _check(tmp_path, TINY["backbone"], TINY["model"], TINY["num_labels"], b=2, h=128, w=128)


def test_non_square_not_multiple_of_32_matches_transformers_fp32_atol_1e4(tmp_path):
    backbone = dict(TINY["backbone"], depths=[2, 2, 2, 2])
    model_kw = dict(TINY["model"], decoder_layers=4)
    _check(tmp_path, backbone, model_kw, 3, b=1, h=90, w=141, seed=1)


def test_pre_norm_and_input_projection_match_transformers_fp32_atol_1e4(tmp_path):
    # feature_size != hidden_dim forces the transformer-module input projections.
    model_kw = dict(TINY["model"], pre_norm=True, feature_size=32, hidden_dim=48,
                    num_attention_heads=4, decoder_layers=3)
    _check(tmp_path, TINY["backbone"], model_kw, 5, b=2, h=96, w=64, seed=2)


def test_enforce_input_projection_matches_transformers_fp32_atol_1e4(tmp_path):
    model_kw = dict(TINY["model"], enforce_input_projection=True, activation_function="gelu")
    _check(tmp_path, TINY["backbone"], model_kw, 2, b=1, h=64, w=96, seed=3)


def test_window_12_geometry_matches_transformers_fp32_atol_1e4(tmp_path):
    backbone = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8], window_size=12)
    _check(tmp_path, backbone, TINY["model"], 3, b=1, h=192, w=160, seed=4)


def test_swin_tiny_sized_model_384_matches_transformers_fp32_atol_1e4(tmp_path):
    # The realistic geometry: Swin-T backbone, default decoder (9 layers, 100 queries), COCO
    # panoptic's 133 labels, the Hub processors' 384x384 input.
    backbone = dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
    errors = _check(tmp_path, backbone, {}, 133, b=1, h=384, w=384, seed=5)
    assert len([k for k in errors if k.startswith("auxiliary_logits")]) == 2 * 9


def test_round_trip_flax_to_hf_folder_loads_in_transformers_with_same_outputs(tmp_path):
    """Oracle: transformers loading the folder we write; no missing or unexpected keys."""
    import transformers

    from convert import save_hf_folder

    torch_model = noisy_model(hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"]), seed=7)
    model = m2f_jax.load(save(torch_model, tmp_path / "src"))
    save_hf_folder(model.params, model.config, str(tmp_path / "out"))
    reloaded, info = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(
        str(tmp_path / "out"), output_loading_info=True
    )
    assert not any(info.values()), info
    x = _pixels(1, 64, 96, seed=7)
    ours = model(x, output_hidden_states=True, output_attentions=True, output_auxiliary_logits=True)
    compare_outputs(ours, run_hf(reloaded.eval(), x), ATOL)
    # and the weights themselves are bit-identical after the round trip, but for the final Swin
    # LayerNorm, which Mask2Former never uses and m2f_jax does not keep (written as ones/zeros).
    before, after = torch_model.state_dict(), reloaded.state_dict()
    assert sorted(before) == sorted(after)
    for k in before:
        if "swin.layernorm" not in k:
            assert np.array_equal(before[k].numpy(), after[k].numpy()), k
