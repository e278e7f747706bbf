"""Pixel decoder: input projections, deformable encoder over 3 levels, FPN to stride 4, mask features.

Feature maps are NHWC. The level order everywhere is l=0: 1/32, l=1: 1/16, l=2: 1/8 (coarse to
fine), as in transformers. Position embeddings and reference points are NumPy constants computed
from the static shapes at trace time.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.conv import Conv2d
from m2f_jax.modeling.dense import Dense
from m2f_jax.modeling.deformable import MultiscaleDeformableAttention

NUM_FEATURE_LEVELS = 3  # hard-coded in transformers and the original Mask2Former
LN_EPS = 1e-5


def layer_norm(name: str, dtype) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; the one-pass form loses ~1e-5 on large means.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


def group_norm(name: str, dtype) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=LN_EPS, dtype=dtype, use_fast_variance=False, name=name)


def sine_position_embedding(height: int, width: int, num_pos_feats: int) -> np.ndarray:
    """DETR sine embedding with normalize=True, scale=2*pi, temperature 10000.

    Returns (H, W, 2 * num_pos_feats): channels [0, F) encode y, [F, 2F) encode x, each as
    [sin(p/d0), cos(p/d0), sin(p/d1), cos(p/d1), ...].
    """
    scale, eps = np.float32(2 * math.pi), np.float32(1e-6)
    y_embed = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, 1)  # (H, W)
    x_embed = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, 0)  # (H, W)
    y_embed = y_embed / (np.float32(height) + eps) * scale
    x_embed = x_embed / (np.float32(width) + eps) * scale
    dim_t = np.arange(num_pos_feats, dtype=np.float32)
    dim_t = np.float32(10000) ** (2 * np.floor(dim_t / 2) / np.float32(num_pos_feats))  # (F,)
    pos_x = x_embed[..., None] / dim_t  # (H, W, F)
    pos_y = y_embed[..., None] / dim_t
    pos_x = np.stack([np.sin(pos_x[..., 0::2]), np.cos(pos_x[..., 1::2])], axis=3).reshape(height, width, -1)
    pos_y = np.stack([np.sin(pos_y[..., 0::2]), np.cos(pos_y[..., 1::2])], axis=3).reshape(height, width, -1)
    return np.concatenate([pos_y, pos_x], axis=-1).astype(np.float32)  # (H, W, 2F)


def reference_points(spatial_shapes: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Centre of each cell, normalised to [0, 1], as (x, y); (S, L, 2), the same for every level
    because valid_ratios are all 1 (transformers ignores pixel_mask)."""
    points = []
    for h, w in spatial_shapes:
        ref_y, ref_x = np.meshgrid(
            np.linspace(0.5, h - 0.5, h, dtype=np.float32),
            np.linspace(0.5, w - 0.5, w, dtype=np.float32),
            indexing="ij",
        )
        points.append(np.stack([ref_x.reshape(-1) / w, ref_y.reshape(-1) / h], -1))  # (HW, 2)
    ref = np.concatenate(points, 0)  # (S, 2)
    return np.repeat(ref[:, None, :], len(spatial_shapes), axis=1).astype(np.float32)  # (S, L, 2)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """F.interpolate(mode="bilinear", align_corners=False) without antialiasing, NHWC."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="linear", antialias=False)


class PixelDecoderEncoderLayer(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic):
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout)
        residual = hidden_states
        attn_out, attn_weights = MultiscaleDeformableAttention(
            embed_dim=cfg.feature_size,
            num_heads=cfg.num_attention_heads,
            n_levels=NUM_FEATURE_LEVELS,
            n_points=4,
            dtype=self.dtype,
            name="self_attn",
        )(hidden_states, position_embeddings, ref_points, spatial_shapes)
        hidden_states = residual + dropout(attn_out, deterministic=deterministic)
        hidden_states = layer_norm("self_attn_layer_norm", self.dtype)(hidden_states)

        residual = hidden_states
        # The pixel-decoder FFN is ReLU whatever config.activation_function says.
        ffn = nn.relu(Dense(cfg.encoder_feedforward_dim, dtype=self.dtype, name="fc1")(hidden_states))
        ffn = dropout(ffn, deterministic=deterministic)
        ffn = Dense(cfg.feature_size, dtype=self.dtype, name="fc2")(ffn)
        hidden_states = residual + dropout(ffn, deterministic=deterministic)
        hidden_states = layer_norm("final_layer_norm", self.dtype)(hidden_states)
        if not deterministic:
            # transformers clamps non-finite activations in training.
            big = jnp.finfo(hidden_states.dtype).max - 1000
            hidden_states = jnp.where(
                jnp.isfinite(hidden_states), hidden_states, jnp.clip(hidden_states, -big, big)
            )
        return hidden_states, attn_weights


class PixelDecoderEncoder(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic):
        num_layers = self.config.encoder_layers
        if num_layers > 1 and variants.scan_layers() and not self.is_initializing():
            return self._scan_layers(hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic)
        for i in range(num_layers):
            hidden_states, _ = PixelDecoderEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(
                hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic
            )
        return hidden_states

    def _scan_layers(self, hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic):
        """All layers as one scan over their unrolled params; positions and reference points are
        loop invariants."""
        num_layers = self.config.encoder_layers
        layer = PixelDecoderEncoderLayer(self.config, self.dtype, parent=None)
        params = self.variables["params"]
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), num_layers)

        def step(hidden_states, trip):
            p, key = trip
            hidden_states, _ = layer.apply(
                {"params": p}, hidden_states, position_embeddings, ref_points, spatial_shapes, deterministic,
                rngs=None if key is None else {"dropout": key},
            )
            return hidden_states, None

        trips = [(params[f"layers_{i}"], None if keys is None else keys[i]) for i in range(num_layers)]
        hidden_states, _ = variants.scan_trips(step, hidden_states, trips)
        return hidden_states


class PixelDecoder(nn.Module):
    """Returns (mask_features (B, H/4, W/4, C_m), multi_scale_features [1/32, 1/16, 1/8] NHWC)."""

    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array], deterministic: bool = True):
        cfg = self.config
        c_d = cfg.feature_size
        b = features[0].shape[0]
        levels = list(features[::-1][:NUM_FEATURE_LEVELS])  # [F4 (1/32), F3, F2]

        level_embed = self.param(
            "level_embed", nn.initializers.normal(1.0), (NUM_FEATURE_LEVELS, c_d), jnp.float32
        )
        embeds, positions, spatial_shapes = [], [], []
        for level, x in enumerate(levels):
            _, h, w, _ = x.shape
            x = Conv2d(c_d, (1, 1), dtype=self.dtype, name=f"input_projections_{level}_0")(x)
            x = group_norm(f"input_projections_{level}_1", self.dtype)(x)  # (B, H_l, W_l, C_d)
            embeds.append(x.reshape(b, h * w, c_d))
            pos = sine_position_embedding(h, w, c_d // 2).reshape(h * w, c_d)  # (H_l W_l, C_d)
            positions.append(pos + level_embed[level])
            spatial_shapes.append((h, w))
        spatial_shapes = tuple(spatial_shapes)

        hidden_states = jnp.concatenate(embeds, axis=1)  # (B, S, C_d)
        position_embeddings = jnp.concatenate(positions, axis=0)[None].astype(self.dtype)  # (1, S, C_d)
        position_embeddings = jnp.broadcast_to(position_embeddings, hidden_states.shape)
        ref = jnp.asarray(reference_points(spatial_shapes))[None]  # (1, S, L, 2)
        ref = jnp.broadcast_to(ref, (b,) + ref.shape[1:])  # (B, S, L, 2)

        hidden_states = PixelDecoderEncoder(cfg, self.dtype, name="encoder")(
            hidden_states, position_embeddings, ref, spatial_shapes, deterministic
        )

        outputs, start = [], 0
        for h, w in spatial_shapes:
            outputs.append(hidden_states[:, start : start + h * w].reshape(b, h, w, c_d))  # (B, H_l, W_l, C_d)
            start += h * w

        # FPN levels below 1/8, coarse to fine; adapter_{k+1}/layer_{k+1} serve features[k].
        for k in reversed(range(cfg.num_fpn_levels)):
            lateral = Conv2d(c_d, (1, 1), use_bias=False, dtype=self.dtype, name=f"adapter_{k + 1}_0")(features[k])
            lateral = group_norm(f"adapter_{k + 1}_1", self.dtype)(lateral)  # (B, H_k, W_k, C_d)
            # Bilinear, although transformers' comment says nearest.
            y = lateral + resize_bilinear(outputs[-1], lateral.shape[1], lateral.shape[2])
            y = Conv2d(c_d, (3, 3), use_bias=False, dtype=self.dtype, name=f"layer_{k + 1}_0")(y)
            y = nn.relu(group_norm(f"layer_{k + 1}_1", self.dtype)(y))
            outputs.append(y)

        mask_features = Conv2d(cfg.mask_feature_size, (1, 1), dtype=self.dtype, name="mask_projection")(outputs[-1])
        return mask_features, tuple(outputs[:NUM_FEATURE_LEVELS])
