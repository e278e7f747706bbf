"""Swin Transformer backbone, exactly as transformers' ``SwinBackbone`` runs inside Mask2Former.

Layout is NHWC throughout: the token sequence (B, H*W, C) of transformers is kept as a
(B, H, W, C) map, which is the same row-major order, so nothing but the layout comments differ.

transformers' behaviours, kept so that its checkpoints give its outputs (several differ from the
original Swin code):
  * ``always_partition=True``: the window never shrinks and the shift never turns off, even when
    a stage is smaller than the window; the map is zero-padded up to a multiple of the window.
  * The window padding comes AFTER ``layernorm_before``, and padded tokens are not masked in
    attention: they are exact zeros, so their keys/values are just the q/k/v biases.
  * The shift mask is built on the padded grid and uses -100.0 (not -inf) between regions.
  * Drop-path is applied to the attention branch only, not to the MLP branch (original Swin
    applies it to both).
  * Patch merging concatenates (row0,col0), (row1,col0), (row0,col1), (row1,col1), after padding
    odd sizes at the bottom/right.
  * Feature maps are the stage outputs before patch merging, each through its own LayerNorm
    (``hidden_states_norms``); ``swin.layernorm`` is never used and has no parameters here.

Shape-dependent constants (relative position index, shift mask) are NumPy, computed at trace
time from static shapes: a new input size is a new compile.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2f_jax.config import SwinConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.activations import activation
from m2f_jax.modeling.dense import Dense

# transformers builds the embedding norm, the patch-merging norm and hidden_states_norms with
# nn.LayerNorm's default eps, not config.layer_norm_eps (the values coincide by default).
_TORCH_LAYER_NORM_EPS = 1e-5
# Added between tokens of different regions after the cyclic shift (transformers' value).
_SHIFT_MASK_VALUE = -100.0


# ---------------------------------------------------------------------------------------------
# Static (NumPy) constants
# ---------------------------------------------------------------------------------------------


def relative_position_index(window_size: int) -> np.ndarray:
    """Index into the ((2w-1)^2, heads) bias table for every pair of tokens in a window.

    Tokens are row-major inside the window; for i=(r_i, c_i), j=(r_j, c_j):
    ``idx[i, j] = (r_i - r_j + w - 1) * (2w - 1) + (c_i - c_j + w - 1)``.

    Returns:
      (w*w, w*w) int32.
    """
    rows, cols = np.meshgrid(np.arange(window_size), np.arange(window_size), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)  # (T,)
    d_row = rows[:, None] - rows[None, :] + window_size - 1  # (T, T) in [0, 2w-2]
    d_col = cols[:, None] - cols[None, :] + window_size - 1
    return (d_row * (2 * window_size - 1) + d_col).astype(np.int32)


def shift_window_mask(height_pad: int, width_pad: int, window_size: int, shift_size: int) -> np.ndarray:
    """Additive attention mask of shifted-window attention, on the padded (Hp, Wp) grid.

    After rolling by -shift, a window can hold tokens that were not neighbours; each position is
    labelled with one of 9 regions (3 per axis: ``[0, L-w)``, ``[L-w, L-s)``, ``[L-s, L)``) and
    attention between different regions gets -100.0.

    Returns:
      (nW, T, T) float32 with nW = (Hp/w)(Wp/w), windows row-major, T = w*w.
    """
    h = np.arange(height_pad)
    w = np.arange(width_pad)
    h_region = (h >= height_pad - window_size).astype(np.int32) + (h >= height_pad - shift_size)
    w_region = (w >= width_pad - window_size).astype(np.int32) + (w >= width_pad - shift_size)
    labels = h_region[:, None] * 3 + w_region[None, :]  # (Hp, Wp)
    labels = window_partition(labels[None, :, :, None], window_size)[0, :, :, 0]  # (nW, T)
    same_region = labels[:, :, None] == labels[:, None, :]  # (nW, T, T)
    return np.where(same_region, 0.0, _SHIFT_MASK_VALUE).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def window_partition(x, window_size: int):
    """(B, Hp, Wp, C) -> (B, nW, T, C): windows row-major, tokens row-major inside each window.

    Works on NumPy and JAX arrays. Hp and Wp must be multiples of ``window_size``.
    """
    b, hp, wp, c = x.shape
    nh, nw = hp // window_size, wp // window_size
    x = x.reshape(b, nh, window_size, nw, window_size, c)  # (B, nH, ws, nW, ws, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, nH, nW, ws, ws, C)
    return x.reshape(b, nh * nw, window_size * window_size, c)  # (B, nH*nW, T, C)


def window_reverse(windows, window_size: int, height_pad: int, width_pad: int):
    """Inverse of :func:`window_partition`: (B, nW, T, C) -> (B, Hp, Wp, C)."""
    b, _, _, c = windows.shape
    nh, nw = height_pad // window_size, width_pad // window_size
    x = windows.reshape(b, nh, nw, window_size, window_size, c)  # (B, nH, nW, ws, ws, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, nH, ws, nW, ws, C)
    return x.reshape(b, height_pad, width_pad, c)  # (B, Hp, Wp, C)


def window_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    relative_position_bias: jax.Array,
    shift_mask: Optional[jax.Array] = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Multi-head self-attention inside each window, with relative position bias.

    ``softmax(q k^T / sqrt(hd) + bias + mask) v``; the logits and softmax are float32 whatever
    the input dtype.

    Args:
      query, key, value: (B, nW, T, nh, hd).
      relative_position_bias: (nh, T, T), shared by all windows.
      shift_mask: optional (nW, T, T) additive mask, shared by the batch.
      dropout_rate: dropout on the attention probabilities; applied only if ``dropout_rng``.
      dropout_rng: PRNG key, or None for no dropout.
    Returns:
      (B, nW, T, nh, hd) in the dtype of ``value``.
    """
    head_dim = query.shape[-1]
    # Heads next to the windows first, so that every product below is a plain batched matmul over
    # (B, nW, nh): with the heads between the token and channel axes, XLA:CPU transposed inside
    # each product of the backward (Swin-T grad 1.95 -> 1.83 s at 384x384, batch 2).
    query, key, value = (jnp.swapaxes(t, 2, 3) for t in (query, key, value))  # (B, nW, nh, T, hd)
    scores = jnp.einsum("bwhqd,bwhkd->bwhqk", query, key)  # (B, nW, nh, T, T)
    scores = scores.astype(jnp.float32) * (head_dim**-0.5)
    scores = scores + relative_position_bias.astype(jnp.float32)  # broadcast over (B, nW)
    if shift_mask is not None:
        scores = scores + shift_mask.astype(jnp.float32)[:, None]  # (nW, 1, T, T) over B, nh
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.astype(value.dtype)
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", probs, value)  # (B, nW, nh, T, hd)
    return jnp.swapaxes(out, 2, 3)  # (B, nW, T, nh, hd)


def patch_merge_gather(x: jax.Array) -> jax.Array:
    """Pads odd H/W at the bottom/right and stacks each 2x2 neighbourhood on channels.

    (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C), channel blocks in transformers' order
    (row0,col0), (row1,col0), (row0,col1), (row1,col1), i.e. column-major in the 2x2 block.
    """
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))  # (B, 2h', 2w', C)
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = x.reshape(b, h2, 2, w2, 2, c)  # (B, h', row, w', col, C)
    x = x.transpose(0, 1, 3, 4, 2, 5)  # (B, h', w', col, row, C): col-major block order
    return x.reshape(b, h2, w2, 4 * c)  # (B, h', w', 4C)


def drop_path(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Stochastic depth: zeroes whole samples with probability ``rate``, rescales the rest."""
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(rng, keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    # In x's dtype, as a Python float rate is: an array rate (a scanned stage's) must not promote.
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# Modules (names mirror transformers' in-memory v5 names)
# ---------------------------------------------------------------------------------------------


def _dense_init(config: SwinConfig):
    # transformers' _init_weights: Linear/Conv weights N(0, initializer_range), biases zero.
    return nn.initializers.normal(stddev=config.initializer_range)


class SwinPatchEmbeddings(nn.Module):
    config: SwinConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        p = self.config.patch_size
        _, h, w, _ = pixel_values.shape
        # Zero padding in normalised pixel space, bottom/right only (transformers' maybe_pad).
        pixel_values = jnp.pad(
            pixel_values, ((0, 0), (0, (-h) % p), (0, (-w) % p), (0, 0))
        )  # (B, ceil(H/p)*p, ceil(W/p)*p, C_in)
        return nn.Conv(
            self.config.embed_dim,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=_dense_init(self.config),
            name="projection",
        )(pixel_values)  # (B, H1, W1, embed_dim)


class SwinEmbeddings(nn.Module):
    config: SwinConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        x = SwinPatchEmbeddings(self.config, self.dtype, name="patch_embeddings")(pixel_values)
        x = nn.LayerNorm(epsilon=_TORCH_LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        return nn.Dropout(self.config.hidden_dropout_prob)(x, deterministic=deterministic)


class SwinRelativePositionBias(nn.Module):
    num_heads: int
    window_size: int

    @nn.compact
    def __call__(self):
        ws = self.window_size
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.zeros,  # transformers initialises the table to zeros
            ((2 * ws - 1) ** 2, self.num_heads),
        )
        index = relative_position_index(ws).reshape(-1)  # (T*T,) static
        bias = table[index].reshape(ws * ws, ws * ws, self.num_heads)  # (T, T, nh)
        return bias.transpose(2, 0, 1)  # (nh, T, T)


class SwinAttention(nn.Module):
    config: SwinConfig
    dim: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, windows, shift_mask, deterministic: bool = True):
        # windows: (B, nW, T, C)
        b, nw, t, c = windows.shape
        head_dim = self.dim // self.num_heads
        dense = functools.partial(Dense, self.dim, dtype=self.dtype, kernel_init=_dense_init(self.config))
        qkv_shape = (b, nw, t, self.num_heads, head_dim)  # heads major in the channel axis
        bias_on = self.config.qkv_bias
        q = dense(use_bias=bias_on, name="q_proj")(windows).reshape(qkv_shape)  # (B, nW, T, nh, hd)
        k = dense(use_bias=bias_on, name="k_proj")(windows).reshape(qkv_shape)  # (B, nW, T, nh, hd)
        v = dense(use_bias=bias_on, name="v_proj")(windows).reshape(qkv_shape)  # (B, nW, T, nh, hd)
        bias = SwinRelativePositionBias(
            self.num_heads, self.config.window_size, name="relative_position_bias"
        )()  # (nh, T, T)
        rate = self.config.attention_probs_dropout_prob
        rng = None if deterministic or rate == 0.0 else self.make_rng("dropout")
        out = window_attention(q, k, v, bias, shift_mask, dropout_rate=rate, dropout_rng=rng)
        out = out.reshape(b, nw, t, c)  # (B, nW, T, C)
        return dense(name="o_proj")(out)


class SwinMLP(nn.Module):
    config: SwinConfig
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = _dense_init(self.config)
        hidden = int(self.config.mlp_ratio * self.dim)
        x = Dense(hidden, dtype=self.dtype, kernel_init=init, name="fc1")(x)  # (..., r*C)
        x = activation(self.config.hidden_act, "Swin hidden_act")(x)
        return Dense(self.dim, dtype=self.dtype, kernel_init=init, name="fc2")(x)  # (..., C)


class SwinLayer(nn.Module):
    """One Swin block: (shifted) window attention then MLP, both pre-norm residual."""

    config: SwinConfig
    dim: int
    num_heads: int
    shift_size: int
    drop_path_rate: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, drop_path_rate: Optional[jax.Array] = None):
        """``drop_path_rate``: this block's rate as an array, in place of the field (a scanned
        stage runs blocks of different rates through one program)."""
        # x: (B, H, W, C)
        cfg = self.config
        ws, shift = cfg.window_size, self.shift_size
        _, h, w, _ = x.shape
        eps = cfg.layer_norm_eps

        shortcut = x
        x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layernorm_before")(x)
        # Padding after the norm and unmasked, as in transformers (padded tokens are zeros).
        x = jnp.pad(x, ((0, 0), (0, (-h) % ws), (0, (-w) % ws), (0, 0)))  # (B, Hp, Wp, C)
        hp, wp = x.shape[1], x.shape[2]
        if shift > 0:
            x = jnp.roll(x, (-shift, -shift), axis=(1, 2))
            mask = jnp.asarray(shift_window_mask(hp, wp, ws, shift))  # (nW, T, T) static
        else:
            mask = None
        windows = window_partition(x, ws)  # (B, nW, T, C)
        attn = SwinAttention(cfg, self.dim, self.num_heads, self.dtype, name="attention")(
            windows, mask, deterministic
        )  # (B, nW, T, C)
        attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=deterministic)
        attn = window_reverse(attn, ws, hp, wp)  # (B, Hp, Wp, C)
        if shift > 0:
            attn = jnp.roll(attn, (shift, shift), axis=(1, 2))
        attn = attn[:, :h, :w]  # (B, H, W, C)
        # HF quirk kept for parity: drop-path on the attention branch only, not the MLP's.
        if drop_path_rate is None:
            drop_path_rate = self.drop_path_rate if self.drop_path_rate > 0.0 else None
        if drop_path_rate is not None and not deterministic:
            attn = drop_path(attn, drop_path_rate, self.make_rng("dropout"))
        x = shortcut + attn

        y = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layernorm_after")(x)
        y = SwinMLP(cfg, self.dim, self.dtype, name="mlp")(y)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return x + y


class SwinPatchMerging(nn.Module):
    dim: int
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x):
        x = patch_merge_gather(x)  # (B, ceil(H/2), ceil(W/2), 4C)
        x = nn.LayerNorm(epsilon=_TORCH_LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
        return Dense(
            2 * self.dim, use_bias=False, dtype=self.dtype, kernel_init=self.kernel_init, name="reduction"
        )(x)  # (B, ceil(H/2), ceil(W/2), 2C)


class SwinStage(nn.Module):
    config: SwinConfig
    dim: int
    depth: int
    num_heads: int
    drop_path_rates: Tuple[float, ...]
    downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """Returns (stage output before merging (B, H, W, C), input of the next stage or None)."""
        pairs = self.depth // 2
        scanned = 0
        if pairs > 1 and variants.scan_layers() and not self.is_initializing():
            x = self._scan_pairs(x, pairs, deterministic)
            scanned = 2 * pairs
        for i in range(scanned, self.depth):
            x = self._block(i, name=f"blocks_{i}")(x, deterministic)
        if not self.downsample:
            return x, None
        merged = SwinPatchMerging(
            self.dim, self.dtype, _dense_init(self.config), name="downsample"
        )(x)  # (B, ceil(H/2), ceil(W/2), 2C)
        return x, merged

    def _block(self, i: int, **kwargs) -> SwinLayer:
        return SwinLayer(
            self.config,
            self.dim,
            self.num_heads,
            shift_size=0 if i % 2 == 0 else self.config.window_size // 2,
            drop_path_rate=self.drop_path_rates[i],
            dtype=self.dtype,
            **kwargs,
        )

    def _scan_pairs(self, x, pairs: int, deterministic: bool):
        """Blocks 0 .. 2*pairs-1 as a scan over (regular, shifted) pairs of the unrolled params."""
        regular, shifted = self._block(0, parent=None), self._block(1, parent=None)
        params = self.variables["params"]
        rates = np.asarray(self.drop_path_rates[: 2 * pairs], np.float32).reshape(pairs, 2)
        keys = None if deterministic else jax.random.split(self.make_rng("dropout"), pairs)

        def pair(x, trip):
            p_regular, p_shifted, rate, key = trip
            rngs = [None, None] if key is None else [{"dropout": k} for k in jax.random.split(key)]
            x = regular.apply({"params": p_regular}, x, deterministic, rate[0], rngs=rngs[0])
            x = shifted.apply({"params": p_shifted}, x, deterministic, rate[1], rngs=rngs[1])
            return x, None

        trips = [
            (params[f"blocks_{2 * k}"], params[f"blocks_{2 * k + 1}"], rates[k], None if keys is None else keys[k])
            for k in range(pairs)
        ]
        x, _ = variants.scan_trips(pair, x, trips)
        return x


class SwinEncoder(nn.Module):
    config: SwinConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """x: (B, H1, W1, embed_dim). Returns the per-stage outputs before patch merging."""
        cfg = self.config
        total = sum(cfg.depths)
        # Linear stochastic-depth schedule over all blocks (transformers' dpr).
        rates = [cfg.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        outputs = []
        start = 0
        for s, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            stage_out, x = SwinStage(
                cfg,
                dim=int(cfg.embed_dim * 2**s),
                depth=depth,
                num_heads=heads,
                drop_path_rates=tuple(rates[start : start + depth]),
                downsample=s < cfg.num_layers - 1,
                dtype=self.dtype,
                name=f"layers_{s}",
            )(x, deterministic)  # stage_out (B, H_s, W_s, C_s); x (B, H_{s+1}, W_{s+1}, 2C_s)
            start += depth
            outputs.append(stage_out)
        return tuple(outputs)


class SwinHiddenStatesNorms(nn.Module):
    """One LayerNorm per output stage, named by the stage (``stage1`` ... or ``stem``)."""

    names: Tuple[str, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features):
        return tuple(
            nn.LayerNorm(epsilon=_TORCH_LAYER_NORM_EPS, dtype=self.dtype, name=name)(f)
            for name, f in zip(self.names, features)
        )


class SwinBackbone(nn.Module):
    """transformers' SwinBackbone as Mask2Former calls it (always_partition=True, feature maps
    taken before patch merging, normed by ``hidden_states_norms``).

    Input pixel_values (B, H, W, C) NHWC, any H and W. Returns one (B, H_s, W_s, C_s) map per
    entry of ``config.out_features``, in that order; with stage1..4, strides 4/8/16/32 relative to
    the input padded up to a multiple of the patch size: H_1 = ceil(H/4), H_{s+1} = ceil(H_s/2).
    Dropout and drop-path draw from the ``"dropout"`` rng collection when ``deterministic`` is
    False.
    """

    config: SwinConfig
    dtype: jnp.dtype = jnp.float32  # computation dtype; params stay float32

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True) -> tuple:
        cfg = self.config
        if cfg.use_absolute_embeddings:
            raise ValueError(
                "SwinConfig.use_absolute_embeddings=True is not supported (no Mask2Former "
                "checkpoint uses it, and it ties the model to one input size)."
            )
        embeddings = SwinEmbeddings(cfg, self.dtype, name="embeddings")(
            pixel_values, deterministic
        )  # (B, H1, W1, embed_dim)
        stage_outputs = SwinEncoder(cfg, self.dtype, name="encoder")(embeddings, deterministic)
        by_name = dict(zip(cfg.stage_names, (embeddings,) + stage_outputs))
        selected = [by_name[name] for name in cfg.out_features]
        return SwinHiddenStatesNorms(tuple(cfg.out_features), self.dtype, name="hidden_states_norms")(
            selected
        )
