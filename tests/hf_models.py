"""Random-weight transformers Mask2Former checkpoints for parity tests (no Hub access).
The configs need transformers only; the models need torch (imported where they are built)."""
from __future__ import annotations

import numpy as np
import transformers

TINY = dict(
    backbone=dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7),
    model=dict(
        hidden_dim=64, feature_size=64, mask_feature_size=64, num_attention_heads=4,
        encoder_feedforward_dim=16, dim_feedforward=32, num_queries=10, decoder_layers=2,
        encoder_layers=2,
    ),
    num_labels=4,
)


def hf_config(backbone: dict, model: dict, num_labels: int) -> transformers.Mask2FormerConfig:
    bb = transformers.SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **backbone)
    id2label = {i: f"class_{i}" for i in range(num_labels)}
    return transformers.Mask2FormerConfig(
        backbone_config=bb, id2label=id2label, label2id={v: k for k, v in id2label.items()}, **model
    )


def noisy_model(config, seed: int = 0, std: float = 0.05):
    """A transformers model in eval mode whose every weight has Gaussian noise added, so that
    layers transformers initialises to zeros or constants also reveal a wrong layout."""
    import torch

    torch.manual_seed(seed)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def save(model, folder) -> str:
    model.save_pretrained(str(folder))
    return str(folder)


def run_hf(model, pixel_values_nhwc: np.ndarray):
    import torch

    with torch.no_grad():
        return model(
            torch.from_numpy(np.ascontiguousarray(pixel_values_nhwc.transpose(0, 3, 1, 2))),
            output_hidden_states=True,
            output_attentions=True,
            output_auxiliary_logits=True,
        )


def nchw_to_nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def compare_outputs(ours, theirs, atol: float) -> dict:
    """Max abs error of every output field, hidden states and auxiliary logits included; asserts."""
    pairs = {
        "class_queries_logits": (ours.class_queries_logits, theirs.class_queries_logits.numpy()),
        "masks_queries_logits": (ours.masks_queries_logits, theirs.masks_queries_logits.numpy()),
        "encoder_last_hidden_state": (ours.encoder_last_hidden_state, nchw_to_nhwc(theirs.encoder_last_hidden_state)),
        "pixel_decoder_last_hidden_state": (
            ours.pixel_decoder_last_hidden_state, nchw_to_nhwc(theirs.pixel_decoder_last_hidden_state)),
        "transformer_decoder_last_hidden_state": (
            ours.transformer_decoder_last_hidden_state, theirs.transformer_decoder_last_hidden_state.numpy()),
    }
    for i, (a, b) in enumerate(zip(ours.encoder_hidden_states, theirs.encoder_hidden_states, strict=True)):
        pairs[f"encoder_hidden_states[{i}]"] = (a, nchw_to_nhwc(b))
    for i, (a, b) in enumerate(zip(ours.pixel_decoder_hidden_states, theirs.pixel_decoder_hidden_states, strict=True)):
        pairs[f"pixel_decoder_hidden_states[{i}]"] = (a, nchw_to_nhwc(b))
    for i, (a, b) in enumerate(
        zip(ours.transformer_decoder_hidden_states, theirs.transformer_decoder_hidden_states, strict=True)
    ):
        pairs[f"transformer_decoder_hidden_states[{i}]"] = (a, b.numpy().transpose(1, 0, 2))  # (Q,B,C) -> (B,Q,C)
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions, strict=True)):
        pairs[f"attentions[{i}]"] = (a, b.numpy())
    for i, (a, b) in enumerate(zip(ours.auxiliary_logits, theirs.auxiliary_logits, strict=True)):
        for k in ("class_queries_logits", "masks_queries_logits"):
            pairs[f"auxiliary_logits[{i}].{k}"] = (a[k], b[k].numpy())
    errors = {}
    for name, (a, b) in pairs.items():
        a = np.asarray(a)
        assert a.shape == b.shape, f"{name}: shape {a.shape} vs transformers {b.shape}"
        errors[name] = float(np.max(np.abs(a - b)))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= atol, f"{worst}: max abs error {errors[worst]:.3g} > {atol} ({errors})"
    return errors


def points_from_torch_draws(
    draws,
    batch_size: int,
    num_levels: int,
    config,
) -> list:
    """transformers' recorded ``torch.rand`` outputs, in call order -> the ``given_points`` of
    ``m2f_jax.modeling.criterion.mask2former_loss`` (a ``LossConfig`` or model config), so that a
    parity test replays transformers' random points exactly.

    Per level transformers draws ``batch_size`` x (1, P, 2) for the matcher, then (R, Ps, 2) and,
    when P - k > 0, (R, P - k, 2) for the mask losses.
    """
    from m2f_jax.modeling.criterion import LossConfig

    cfg = config if isinstance(config, LossConfig) else LossConfig.from_config(config)
    per_level = batch_size + (2 if cfg.num_random_points > 0 else 1)
    if len(draws) != per_level * num_levels:
        raise ValueError(
            f"expected {per_level} draws per level x {num_levels} levels = "
            f"{per_level * num_levels}, got {len(draws)}."
        )
    out = []
    for level in range(num_levels):
        level_draws = draws[level * per_level : (level + 1) * per_level]
        chunk = [np.asarray(d, np.float32) for d in level_draws]
        entry = {
            "matcher": np.concatenate(chunk[:batch_size], axis=0),
            "oversampled": chunk[batch_size],
        }
        if cfg.num_random_points > 0:
            entry["random"] = chunk[batch_size + 1]
        out.append(entry)
    return out
