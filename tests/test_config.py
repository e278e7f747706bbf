"""Config: HF config.json in and out (oracle: transformers' own config files)."""
import json

import pytest
import transformers

from m2f_jax.config import ACTIVATION_NAMES, Mask2FormerConfig, SwinConfig
from tests import TORCH_REASON


def test_config_json_round_trip_is_exact(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint
    original = json.load(open(f"{folder}/config.json"))
    config = Mask2FormerConfig.from_pretrained(folder)
    assert config.to_dict() == original
    config.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "config.json")) == original


def test_fields_and_defaults_match_transformers():
    # transformers' default backbone config needs torch
    pytest.importorskip("torch", reason=TORCH_REASON)
    ours, theirs = Mask2FormerConfig(), transformers.Mask2FormerConfig()
    for name in ("feature_size", "mask_feature_size", "hidden_dim", "encoder_feedforward_dim",
                 "activation_function", "encoder_layers", "decoder_layers", "num_attention_heads",
                 "dropout", "dim_feedforward", "pre_norm", "enforce_input_projection", "common_stride",
                 "ignore_value", "num_queries", "no_object_weight", "class_weight", "mask_weight",
                 "dice_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                 "use_auxiliary_loss", "output_auxiliary_logits", "num_labels"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert list(ours.feature_strides) == list(theirs.feature_strides)
    bb, hbb = ours.backbone_config, theirs.backbone_config
    for name in ("embed_dim", "num_heads", "window_size", "mlp_ratio", "drop_path_rate", "hidden_act",
                 "layer_norm_eps", "patch_size", "qkv_bias"):
        assert getattr(bb, name) == getattr(hbb, name), name
    assert list(bb.depths) == list(hbb.depths) and list(bb.out_features) == list(hbb.out_features)
    assert list(bb.channels) == list(transformers.SwinBackbone(hbb).num_features[1:])


def test_reads_transformers_written_config_with_aliases_and_legacy_keys():
    d = transformers.Mask2FormerConfig(num_labels=7).to_dict()
    d["num_hidden_layers"] = d.pop("decoder_layers")
    d["use_timm_backbone"] = False  # v4 key: kept, not interpreted
    config = Mask2FormerConfig.from_dict(d)
    assert config.decoder_layers == 10 and config.num_labels == 7
    assert config.to_dict()["use_timm_backbone"] is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature_size=48), "divisible by 32"),
        (dict(hidden_dim=100, num_attention_heads=8), "divisible by num_attention_heads"),
        (dict(backbone_config=dict(model_type="resnet")), "Swin backbone only"),
        (dict(backbone_config=dict(model_type="swin", embed_dim=32)), "four output stages"),
    ],
)
def test_invalid_configs_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Mask2FormerConfig(**kwargs)


_FOUR_STAGES = dict(model_type="swin", out_features=["stage1", "stage2", "stage3", "stage4"])


@pytest.mark.parametrize("name", ACTIVATION_NAMES)
def test_config_accepts_every_activation_the_model_implements(name):
    """One tuple of names for validation and the table (gelu_pytorch_tanh was rejected by
    validate though the table had it); each is a name transformers' configs accept too."""
    from m2f_jax.modeling.activations import ACTIVATIONS, activation

    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)
    config = Mask2FormerConfig(activation_function=name, backbone_config=dict(_FOUR_STAGES, hidden_act=name))
    assert config.activation_function == config.backbone_config.hidden_act == name
    assert activation(name, "hidden_act") is ACTIVATIONS[name]
    theirs = transformers.Mask2FormerConfig(activation_function=name,
                                            backbone_config=transformers.SwinConfig(hidden_act=name))
    assert theirs.activation_function == theirs.backbone_config.hidden_act == name


def test_activations_match_transformers_act2fn_fp32_atol_1e6():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    import numpy as np
    from transformers.activations import ACT2FN

    from m2f_jax.modeling.activations import ACTIVATIONS

    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    for name in ACTIVATION_NAMES:
        expected = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](x)), expected, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("field", ["activation_function", "hidden_act"])
def test_unsupported_activation_names_the_option_and_the_supported_names(field):
    kwargs = {"backbone_config": dict(_FOUR_STAGES, hidden_act="mish")} if field == "hidden_act" else {
        "activation_function": "mish", "backbone_config": dict(_FOUR_STAGES)}
    option = "backbone_config.hidden_act" if field == "hidden_act" else field
    with pytest.raises(ValueError, match=rf"{option} 'mish' is not supported; use one of \['gelu', "
                                         r"'gelu_new', 'gelu_pytorch_tanh', 'relu', 'silu', 'swish'\]"):
        Mask2FormerConfig(**kwargs)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mask2FormerConfig.from_pretrained(str(tmp_path))


def test_swin_out_features_follow_transformers():
    ours = SwinConfig(out_indices=(2, 4))
    theirs = transformers.SwinConfig(out_indices=[2, 4])
    assert list(ours.out_features) == list(theirs.out_features)
