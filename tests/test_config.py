"""Config: HF config.json in and out (oracle: transformers' own config files)."""
import json

import pytest
import transformers

from m2f_jax.config import Mask2FormerConfig, SwinConfig
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


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Mask2FormerConfig.from_pretrained(str(tmp_path))


def test_swin_out_features_follow_transformers():
    ours = SwinConfig(out_indices=(2, 4))
    theirs = transformers.SwinConfig(out_indices=[2, 4])
    assert list(ours.out_features) == list(theirs.out_features)
