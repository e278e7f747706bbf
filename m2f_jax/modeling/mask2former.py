"""The whole model: Swin backbone -> pixel decoder -> masked-attention decoder -> heads.

Images are NHWC float arrays, (B, H, W, 3), normalised as the processor does. Feature maps in the
output are NHWC and decoder states batch-first (B, Q, C); transformers returns NCHW and (Q, B, C).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from m2f_jax.config import Mask2FormerConfig
from m2f_jax.modeling import variants
from m2f_jax.modeling.dense import Dense
from m2f_jax.modeling.decoder import TransformerModule
from m2f_jax.modeling.pixel_decoder import PixelDecoder
from m2f_jax.modeling.swin import SwinBackbone


@flax.struct.dataclass
class Mask2FormerOutput:
    """transformers' ``Mask2FormerForUniversalSegmentationOutput`` field names (no ``loss``)."""

    class_queries_logits: jax.Array  # (B, Q, K+1), last column = no object
    masks_queries_logits: jax.Array  # (B, Q, ceil(H/4), ceil(W/4))
    encoder_last_hidden_state: jax.Array  # (B, H/32, W/32, C_4)
    pixel_decoder_last_hidden_state: jax.Array  # (B, H/4, W/4, C_m) = mask features
    transformer_decoder_last_hidden_state: jax.Array  # (B, Q, C), not layer-normed
    auxiliary_logits: Optional[List[Dict[str, jax.Array]]] = None  # decoder_layers - 1 dicts
    encoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # 4 NHWC maps, 1/4 .. 1/32
    pixel_decoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # 3 NHWC maps, 1/32 .. 1/8
    transformer_decoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # decoder_layers x (B, Q, C)
    attentions: Optional[Tuple[jax.Array, ...]] = None  # decoder self-attention, (B, nh, Q, Q) each
    loss: Optional[jax.Array] = None  # () weighted training loss, when labels were given

    def __getitem__(self, key):
        return getattr(self, key)


@flax.struct.dataclass
class Mask2FormerModelOutput:
    """transformers' ``Mask2FormerModelOutput`` fields (the bare model), NHWC maps, batch-first
    decoder states."""

    encoder_last_hidden_state: jax.Array  # (B, H/32, W/32, C_4)
    pixel_decoder_last_hidden_state: jax.Array  # (B, H/4, W/4, C_m) = mask features
    transformer_decoder_last_hidden_state: jax.Array  # (B, Q, C), not layer-normed
    masks_queries_logits: Tuple[jax.Array, ...] = ()  # decoder_layers x (B, Q, H/4, W/4)
    encoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # 4 NHWC maps, 1/4 .. 1/32
    pixel_decoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # 3 NHWC maps, 1/32 .. 1/8
    transformer_decoder_hidden_states: Optional[Tuple[jax.Array, ...]] = None  # decoder_layers x (B, Q, C)
    transformer_decoder_intermediate_states: Optional[Tuple[jax.Array, ...]] = None  # layer-normed, (B, Q, C)
    attentions: Optional[Tuple[jax.Array, ...]] = None  # decoder self-attention, (B, nh, Q, Q) each

    def __getitem__(self, key):
        return getattr(self, key)


def model_output(outputs, output_hidden_states: bool, output_attentions: bool) -> Mask2FormerModelOutput:
    """The bare ``Mask2FormerModel``'s tuple as transformers' ``Mask2FormerModelOutput``."""
    features, mask_features, multi_scale, (hidden, intermediate, masks, history, attentions) = outputs
    return Mask2FormerModelOutput(
        encoder_last_hidden_state=features[-1],
        pixel_decoder_last_hidden_state=mask_features,
        transformer_decoder_last_hidden_state=hidden,
        masks_queries_logits=tuple(masks),
        encoder_hidden_states=tuple(features) if output_hidden_states else None,
        pixel_decoder_hidden_states=tuple(multi_scale) if output_hidden_states else None,
        transformer_decoder_hidden_states=tuple(history) if output_hidden_states else None,
        transformer_decoder_intermediate_states=tuple(intermediate) if output_hidden_states else None,
        attentions=tuple(attentions) if output_attentions else None,
    )


def check_pixel_values(pixel_values, config: Mask2FormerConfig) -> None:
    channels = config.backbone_config.num_channels
    expected = f"(batch, height, width, {channels}) NHWC float"
    if getattr(pixel_values, "ndim", None) != 4:
        raise ValueError(
            f"pixel_values must be {expected}; got shape {getattr(pixel_values, 'shape', None)}."
        )
    if pixel_values.shape[-1] != channels:
        hint = " (looks channels-first: transpose to NHWC)" if pixel_values.shape[1] == channels else ""
        raise ValueError(f"pixel_values must be {expected}; got shape {tuple(pixel_values.shape)}{hint}.")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(
            f"pixel_values must be {expected}, normalised as the processor does; got dtype "
            f"{pixel_values.dtype}."
        )
    if min(pixel_values.shape[:3]) < 1:
        raise ValueError(f"pixel_values must be {expected} with non-zero sizes; got {pixel_values.shape}.")


class PixelLevelModule(nn.Module):
    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values, deterministic=True):
        features = SwinBackbone(self.config.backbone_config, self.dtype, name="encoder")(
            pixel_values, deterministic=deterministic
        )
        mask_features, multi_scale = PixelDecoder(self.config, self.dtype, name="decoder")(
            features, deterministic=deterministic
        )
        return tuple(features), mask_features, multi_scale


class Mask2FormerModel(nn.Module):
    """transformers' bare ``Mask2FormerModel`` (no class head); ``variant``, ``precision`` and
    ``scan_layers`` as in :class:`Mask2FormerForUniversalSegmentation` (None inside it: the
    enclosing model's)."""

    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32
    variant: Optional[str] = None
    precision: Optional[str] = None
    scan_layers: Optional[bool] = None

    def __call__(self, pixel_values, deterministic: bool = True):
        with backend_settings(self.variant, self.precision, self.scan_layers):
            return self._forward(pixel_values, deterministic)

    @nn.compact
    def _forward(self, pixel_values, deterministic=True):
        features, mask_features, multi_scale = PixelLevelModule(
            self.config, self.dtype, name="pixel_level_module"
        )(pixel_values, deterministic)
        decoder_out = TransformerModule(self.config, self.dtype, name="transformer_module")(
            multi_scale, mask_features, deterministic
        )
        return features, mask_features, multi_scale, decoder_out


PRECISIONS = (None, "default", "high", "highest")


def matmul_precision(precision: Optional[str]):
    """A context in which every matmul and convolution traced gets ``precision``
    (``jax.default_matmul_precision``, read when a function is traced); None: no change."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
    return contextlib.nullcontext() if precision is None else jax.default_matmul_precision(precision)


@contextlib.contextmanager
def backend_settings(variant: Optional[str], precision: Optional[str], scan_layers: Optional[bool]):
    """The variant, matmul precision and layer scanning a model's fields (or, None, the enclosing
    ones) give, for the program traced inside."""
    variant = variants.resolve(variant)
    with variants.use(variant), matmul_precision(precision):
        with variants.use_scan_layers(variants.resolve_scan_layers(scan_layers, variant)):
            yield


class Mask2FormerForUniversalSegmentation(nn.Module):
    """Call with ``pixel_values`` (B, H, W, 3). ``pixel_mask`` is accepted and ignored, as in
    transformers (padded pixels are processed as image content).

    ``variant``: "xla" or "cpu" (``m2f_jax.modeling.variants``); None: the one ``variants.use``
    set, else the one for JAX's default backend. The parameters are the same for both.

    ``precision``: the matmul and convolution precision of the traced program (:data:`PRECISIONS`):
    None keeps JAX's (``jax.default_matmul_precision``, default "default"). For float32 inputs
    "default" is one bfloat16 pass on TPU and TF32 on GPU, "high" three bfloat16 passes on TPU,
    "highest" float32; XLA:CPU computes float32 at every setting.

    ``scan_layers``: the repeated layers as scans over their stacked parameters, each trip
    rematerialised with a named policy (``m2f_jax.modeling.variants``), or unrolled (False): the
    same outputs and the same (unrolled) parameters. None: the one ``variants.use_scan_layers``
    set, else on for the "xla" variant, off for "cpu".
    """

    config: Mask2FormerConfig
    dtype: jnp.dtype = jnp.float32
    variant: Optional[str] = None
    precision: Optional[str] = None
    scan_layers: Optional[bool] = None

    # Spelled out rather than (*args, **kwargs) so that inspect.signature, as transformers'
    # test_forward_signature reads it, shows pixel_values first and the keywords users pass.
    def __call__(
        self,
        pixel_values,
        pixel_mask=None,
        deterministic: bool = True,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_auxiliary_logits: Optional[bool] = None,
    ) -> Mask2FormerOutput:
        with backend_settings(self.variant, self.precision, self.scan_layers):
            return self._forward(
                pixel_values,
                pixel_mask,
                deterministic=deterministic,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                output_auxiliary_logits=output_auxiliary_logits,
            )

    @nn.compact
    def _forward(
        self,
        pixel_values,
        pixel_mask=None,
        deterministic: bool = True,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_auxiliary_logits: Optional[bool] = None,
    ) -> Mask2FormerOutput:
        cfg = self.config
        check_pixel_values(pixel_values, cfg)
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        if output_attentions is None:
            output_attentions = cfg.output_attentions
        if output_auxiliary_logits is None:
            output_auxiliary_logits = bool(cfg.output_auxiliary_logits)

        pixel_values = pixel_values.astype(self.dtype)
        features, mask_features, multi_scale, (hidden, intermediate, masks, history, attentions) = (
            Mask2FormerModel(cfg, self.dtype, name="model")(pixel_values, deterministic)
        )
        class_predictor = Dense(cfg.num_labels + 1, dtype=self.dtype, name="class_predictor")
        class_logits = [class_predictor(y) for y in intermediate]  # decoder_layers x (B, Q, K+1)

        aux = None
        if output_auxiliary_logits:
            aux = [
                {"masks_queries_logits": m, "class_queries_logits": c}
                for m, c in zip(masks[:-1], class_logits[:-1])
            ]
        return Mask2FormerOutput(
            class_queries_logits=class_logits[-1],
            masks_queries_logits=masks[-1],
            encoder_last_hidden_state=features[-1],
            pixel_decoder_last_hidden_state=mask_features,
            transformer_decoder_last_hidden_state=hidden,
            auxiliary_logits=aux,
            encoder_hidden_states=tuple(features) if output_hidden_states else None,
            pixel_decoder_hidden_states=tuple(multi_scale) if output_hidden_states else None,
            transformer_decoder_hidden_states=tuple(history) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
