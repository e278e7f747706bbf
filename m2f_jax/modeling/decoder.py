"""Masked-attention transformer decoder (cross -> self -> FFN) and the mask predictor.

Decoder states are batch-first (B, Q, C) here; transformers runs sequence-first (Q, B, C). Memory
levels are used round-robin 1/32, 1/16, 1/8. Attention masks come from the previous prediction,
bilinearly resized (no antialiasing) to the next level: a query may attend where sigmoid >= 0.5;
a query whose mask is empty everywhere attends everywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.activations import ACTIVATIONS
from m2f_jax.modeling.conv import Conv2d
from m2f_jax.modeling.dense import Dense
from m2f_jax.modeling.pixel_decoder import NUM_FEATURE_LEVELS, layer_norm, sine_position_embedding


def dot_product_attention(q, k, v, mask=None, dropout=None, deterministic=True):
    """q (B, nh, Lq, hd) already scaled, k/v (B, nh, Lk, hd); mask True = blocked, broadcastable
    to (B, nh, Lq, Lk). Returns (out (B, nh, Lq, hd), probs (B, nh, Lq, Lk)); softmax in fp32."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32)  # (B, nh, Lq, Lk)
    if mask is not None:
        scores = jnp.where(mask, jnp.finfo(jnp.float32).min, scores)
    probs = jax.nn.softmax(scores, axis=-1)
    attn = probs.astype(v.dtype)
    if dropout is not None:
        attn = dropout(attn, deterministic=deterministic)
    return jnp.einsum("bhqk,bhkd->bhqd", attn, v), probs


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (``Mask2FormerAttention`` and
    the split ``nn.MultiheadAttention``). Positions are added to queries and keys, never values."""

    embed_dim: int
    num_heads: int
    dropout: float = 0.0
    out_name: str = "out_proj"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value, mask=None, deterministic=True):
        b, lq, c = query.shape
        nh, hd = self.num_heads, c // self.num_heads

        def heads(x):  # (B, L, C) -> (B, nh, L, hd)
            return x.reshape(b, x.shape[1], nh, hd).transpose(0, 2, 1, 3)

        q = Dense(c, dtype=self.dtype, name="q_proj")(query) * (hd**-0.5)
        k = Dense(c, dtype=self.dtype, name="k_proj")(key)
        v = Dense(c, dtype=self.dtype, name="v_proj")(value)
        out, probs = dot_product_attention(
            heads(q), heads(k), heads(v), mask, nn.Dropout(self.dropout), deterministic
        )  # (B, nh, Lq, hd)
        out = out.transpose(0, 2, 1, 3).reshape(b, lq, c)  # (B, Lq, C), heads major
        return Dense(c, dtype=self.dtype, name=self.out_name)(out), probs


class DecoderLayer(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, query_pos, memory, memory_pos, attn_mask, deterministic):
        # hidden, query_pos: (B, Q, C); memory, memory_pos: (B, HW, C); attn_mask: (B, 1, Q, HW)
        cfg = self.config
        c, nh = cfg.hidden_dim, cfg.num_attention_heads
        dropout = nn.Dropout(cfg.dropout)
        act = ACTIVATIONS[cfg.activation_function]  # names checked by Mask2FormerConfig.validate
        cross_ln = layer_norm("cross_attn_layer_norm", self.dtype)
        self_ln = layer_norm("self_attn_layer_norm", self.dtype)
        final_ln = layer_norm("final_layer_norm", self.dtype)
        cross_attn = Attention(c, nh, cfg.dropout, dtype=self.dtype, name="cross_attn")
        self_attn = Attention(c, nh, cfg.dropout, dtype=self.dtype, name="self_attn")
        fc1 = Dense(cfg.dim_feedforward, dtype=self.dtype, name="fc1")
        fc2 = Dense(c, dtype=self.dtype, name="fc2")

        def ffn(x):
            return fc2(dropout(act(fc1(x)), deterministic=deterministic))

        if cfg.pre_norm:
            x = cross_ln(hidden)
            out, _ = cross_attn(x + query_pos, memory + memory_pos, memory, attn_mask, deterministic)
            hidden = hidden + dropout(out, deterministic=deterministic)
            x = self_ln(hidden)
            out, self_probs = self_attn(x + query_pos, x + query_pos, x, None, deterministic)
            hidden = hidden + dropout(out, deterministic=deterministic)
            hidden = hidden + dropout(ffn(final_ln(hidden)), deterministic=deterministic)
        else:
            out, _ = cross_attn(hidden + query_pos, memory + memory_pos, memory, attn_mask, deterministic)
            hidden = cross_ln(hidden + dropout(out, deterministic=deterministic))
            out, self_probs = self_attn(hidden + query_pos, hidden + query_pos, hidden, None, deterministic)
            hidden = self_ln(hidden + dropout(out, deterministic=deterministic))
            hidden = final_ln(hidden + dropout(ffn(hidden), deterministic=deterministic))
        return hidden, self_probs


class MaskPredictor(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, mask_features, target_size):
        # queries: (B, Q, C) layer-normed; mask_features: (B, H1, W1, C_m)
        cfg = self.config
        e = queries
        for i, dim in enumerate((cfg.hidden_dim, cfg.hidden_dim, cfg.mask_feature_size)):
            e = Dense(dim, dtype=self.dtype, name=f"mask_embedder_{i}_0")(e)
            if i < 2:
                e = nn.relu(e)
        masks = jnp.einsum("bqc,bhwc->bqhw", e, mask_features)  # (B, Q, H1, W1)
        b, q = masks.shape[:2]
        small = jax.image.resize(
            masks.astype(jnp.float32), (b, q) + tuple(target_size), method="linear", antialias=False
        )  # (B, Q, H_t, W_t)
        # sigmoid(x) < 0.5 as transformers tests it (not x < 0: they differ within rounding of 0).
        blocked = jax.nn.sigmoid(small) < 0.5
        blocked = jax.lax.stop_gradient(blocked.reshape(b, 1, q, -1))  # (B, 1, Q, H_t W_t), shared by heads
        return masks, blocked


def decoder_step(layer, norm, predictor, hidden, blocked, memory, memory_pos, target_size, mask_features,
                 layerdrop_rate: float = 0.0, layerdrop_key=None):
    """One decoder layer and the prediction after it. ``layer(hidden, memory, memory_pos,
    blocked)``, ``norm`` and ``predictor`` are the bound modules or their params applied.
    Returns (hidden, blocked for the next layer, (self-attention probs, normed hidden, mask))."""
    # A query blocked from every key attends everywhere instead.
    all_blocked = jnp.all(blocked, axis=-1, keepdims=True)  # (B, 1, Q, 1)
    blocked = jnp.logical_and(blocked, jnp.logical_not(all_blocked))
    new_hidden, probs = layer(hidden, memory, memory_pos, blocked)
    if layerdrop_key is not None and layerdrop_rate > 0:
        # LayerDrop with probability config.dropout. Differs from transformers, which drops
        # the prediction of a skipped layer too (and then mis-sizes the next mask): here
        # the layer is an identity and every prediction is kept, so shapes stay static.
        skip = jax.random.uniform(layerdrop_key, ()) < layerdrop_rate
        new_hidden = jnp.where(skip, hidden, new_hidden)
    y = norm(new_hidden)
    mask, blocked = predictor(y, mask_features, target_size)
    return new_hidden, blocked, (probs, y, mask)


class MaskedAttentionDecoder(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden, query_pos, memories, memory_pos, size_list, mask_features, deterministic):
        cfg = self.config
        decoder_norm = layer_norm("layernorm", self.dtype)
        predictor = MaskPredictor(cfg, self.dtype, name="mask_predictor")

        y = decoder_norm(hidden)
        mask, blocked = predictor(y, mask_features, size_list[0])
        intermediate, masks, history, attentions = [y], [mask], [], []
        num_layers = cfg.decoder_layers - 1
        rounds = num_layers // NUM_FEATURE_LEVELS
        start = 0
        if rounds > 1 and variants.scan_layers() and not self.is_initializing():
            hidden, blocked, per_layer = self._scan_rounds(
                rounds, decoder_norm, predictor, hidden, blocked, query_pos, memories, memory_pos, size_list,
                mask_features, deterministic,
            )
            for before, (probs, y, mask) in per_layer:
                history.append(before)
                attentions.append(probs)
                intermediate.append(y)
                masks.append(mask)
            start = rounds * NUM_FEATURE_LEVELS
        for idx in range(start, num_layers):
            history.append(hidden)
            level = idx % NUM_FEATURE_LEVELS
            layer = DecoderLayer(cfg, self.dtype, name=f"layers_{idx}")
            layerdrop = not deterministic and cfg.dropout > 0
            hidden, blocked, (probs, y, mask) = decoder_step(
                lambda h, m, mp, b: layer(h, query_pos, m, mp, b, deterministic),
                decoder_norm, predictor, hidden, blocked, memories[level], memory_pos[level],
                size_list[(idx + 1) % NUM_FEATURE_LEVELS], mask_features,
                cfg.dropout, self.make_rng("dropout") if layerdrop else None,
            )
            attentions.append(probs)
            intermediate.append(y)
            masks.append(mask)
        history.append(hidden)
        return hidden, intermediate, masks, history, attentions

    def _scan_rounds(self, rounds, decoder_norm, predictor, hidden, blocked, query_pos, memories, memory_pos,
                     size_list, mask_features, deterministic):
        """Layers 0 .. rounds*L-1 as a scan over rounds of one layer per feature level (L levels,
        so every trip reads the same levels in the same order); the levels' memories, the norm and
        the mask predictor are loop invariants. Returns (hidden, blocked, per layer (hidden before
        it, (probs, normed hidden, mask)))."""
        cfg = self.config
        params = self.variables["params"]
        layer = DecoderLayer(cfg, self.dtype, parent=None)
        norm_params, predictor_params = params["layernorm"], params["mask_predictor"]
        norm, predict = decoder_norm.clone(parent=None), predictor.clone(parent=None)
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), rounds)

        def round_(carry, trip):
            hidden, blocked = carry
            layer_params, key = trip
            layer_keys = [None] * NUM_FEATURE_LEVELS if key is None else jax.random.split(key, NUM_FEATURE_LEVELS)
            outputs = []
            for level in range(NUM_FEATURE_LEVELS):
                dropout_key, layerdrop_key = (None, None) if key is None else jax.random.split(layer_keys[level])

                def apply_layer(h, m, mp, b, p=layer_params[level], k=dropout_key):
                    return layer.apply({"params": p}, h, query_pos, m, mp, b, deterministic,
                                       rngs=None if k is None else {"dropout": k})

                before = hidden
                hidden, blocked, out = decoder_step(
                    apply_layer,
                    lambda y: norm.apply({"params": norm_params}, y),
                    lambda y, f, size: predict.apply({"params": predictor_params}, y, f, size),
                    hidden, blocked, memories[level], memory_pos[level],
                    size_list[(level + 1) % NUM_FEATURE_LEVELS], mask_features, cfg.dropout, layerdrop_key,
                )
                outputs.append((before, out))
            return (hidden, blocked), outputs

        trips = [
            ([params[f"layers_{r * NUM_FEATURE_LEVELS + level}"] for level in range(NUM_FEATURE_LEVELS)],
             None if keys is None else keys[r])
            for r in range(rounds)
        ]
        (hidden, blocked), stacked = variants.scan_trips(round_, (hidden, blocked), trips)
        per_layer = [layer_out for trip in variants.unstack(stacked, rounds) for layer_out in trip]
        return hidden, blocked, per_layer


class TransformerModule(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, multi_scale_features: Sequence[jax.Array], mask_features, deterministic=True):
        # multi_scale_features: [1/32, 1/16, 1/8] (B, H_l, W_l, C_d); mask_features (B, H1, W1, C_m)
        cfg = self.config
        c = cfg.hidden_dim
        b = mask_features.shape[0]
        level_embed = nn.Embed(NUM_FEATURE_LEVELS, c, dtype=self.dtype, name="level_embed").embedding
        project = cfg.feature_size != c or cfg.enforce_input_projection

        memories, memory_pos, size_list = [], [], []
        for i, x in enumerate(multi_scale_features):
            _, h, w, _ = x.shape
            size_list.append((h, w))
            pos = sine_position_embedding(h, w, c // 2).reshape(1, h * w, c)  # (1, HW, C)
            memory_pos.append(jnp.asarray(pos, self.dtype))
            if project:
                x = Conv2d(c, (1, 1), dtype=self.dtype, name=f"input_projections_{i}")(x)
            memories.append(x.reshape(b, h * w, c) + level_embed[i].astype(self.dtype))  # (B, HW, C)

        query_pos = nn.Embed(cfg.num_queries, c, dtype=self.dtype, name="queries_embedder").embedding
        queries = nn.Embed(cfg.num_queries, c, dtype=self.dtype, name="queries_features").embedding
        query_pos = jnp.broadcast_to(query_pos.astype(self.dtype), (b, cfg.num_queries, c))  # (B, Q, C)
        hidden = jnp.broadcast_to(queries.astype(self.dtype), (b, cfg.num_queries, c))  # (B, Q, C)

        return MaskedAttentionDecoder(cfg, self.dtype, name="decoder")(
            hidden, query_pos, memories, memory_pos, size_list, mask_features, deterministic
        )
