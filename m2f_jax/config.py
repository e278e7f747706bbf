"""Mask2FormerConfig and SwinConfig: the fields of transformers' configs that shape the forward
pass and the loss, same names and defaults; HF ``config.json`` in and out.

Keys we do not model (``transformers_version``, ``architectures``, legacy v4 keys such as
``backbone`` or ``use_timm_backbone``...) are kept in ``extra`` so that reading and writing a
``config.json`` is an exact round trip.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional, Tuple

CONFIG_NAME = "config.json"

# The activations m2f_jax.modeling.activations implements, by transformers' ACT2FN names, for
# Swin's `hidden_act` and the decoder's `activation_function`. Kept here, jax-free, so that
# validating a config imports no jax; the table of functions is built from this tuple.
ACTIVATION_NAMES = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")

# transformers' `attribute_map`: aliases accepted when reading.
_M2F_ALIASES = {"hidden_size": "hidden_dim", "num_hidden_layers": "decoder_layers"}


def _labels_from_json(id2label: Optional[dict]) -> Dict[int, str]:
    return {int(k): str(v) for k, v in (id2label or {}).items()}


def _written_fields(config):
    """Fields to_dict writes: all of them, except defaults absent from the file read."""
    out = []
    for f in dataclasses.fields(config):
        if f.name in ("extra", "source_keys", "num_labels"):  # num_labels: len(id2label), as HF
            continue
        if config.source_keys is not None and f.name not in config.source_keys:
            default = f.default if f.default is not dataclasses.MISSING else None
            if getattr(config, f.name) == default:
                continue
        out.append(f)
    return out


def read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError naming the file when it is not valid JSON or not
    an object (a config file's fields)."""
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object (the config's fields), got {type(values).__name__}.")
    return values


@dataclasses.dataclass
class SwinConfig:
    image_size: int = 224
    patch_size: int = 4
    num_channels: int = 3
    embed_dim: int = 96
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    hidden_act: str = "gelu"
    use_absolute_embeddings: bool = False
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    encoder_stride: int = 32
    out_features: Optional[Tuple[str, ...]] = None
    out_indices: Optional[Tuple[int, ...]] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # Keys of the dict this config was read from: to_dict() leaves out the defaults the file
    # did not have, so that reading and writing a config.json is an exact round trip.
    source_keys: Optional[frozenset] = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"SwinConfig: depths {self.depths} and num_heads {self.num_heads} must have the "
                "same length (one entry per stage)."
            )
        stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]
        # transformers' BackboneConfigMixin: out_features and out_indices define each other;
        # with neither given it keeps the last stage only.
        if self.out_features is None and self.out_indices is None:
            self.out_features = (stage_names[-1],)
        if self.out_features is None:
            self.out_features = tuple(stage_names[i] for i in self.out_indices)
        self.out_features = tuple(self.out_features)
        unknown = [f for f in self.out_features if f not in stage_names]
        if unknown:
            raise ValueError(f"SwinConfig: out_features {unknown} not in {stage_names}.")
        if self.out_indices is None:
            self.out_indices = tuple(stage_names.index(f) for f in self.out_features)
        self.out_indices = tuple(int(i) for i in self.out_indices)

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def hidden_size(self) -> int:
        return int(self.embed_dim * 2 ** (self.num_layers - 1))

    @property
    def stage_names(self):
        return ["stem"] + [f"stage{i}" for i in range(1, self.num_layers + 1)]

    @property
    def channels(self) -> Tuple[int, ...]:
        """Channels of each output feature map, in out_features order."""
        num_features = [self.embed_dim] + [self.embed_dim * 2**i for i in range(self.num_layers)]
        return tuple(num_features[i] for i in self.out_indices)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SwinConfig":
        d = dict(d)
        model_type = d.get("model_type", "swin")
        if model_type != "swin":
            raise ValueError(
                f"backbone_config has model_type={model_type!r}; m2f_jax supports the Swin "
                "backbone only (model_type='swin'), as every facebook/mask2former-swin-* "
                "checkpoint uses."
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        for k in ("depths", "num_heads", "out_features", "out_indices"):
            if kwargs.get(k) is not None:
                kwargs[k] = tuple(kwargs[k])
        return cls(**kwargs, extra=d, source_keys=frozenset(kwargs) | frozenset(d))

    def to_dict(self) -> Dict[str, Any]:
        out = dict(self.extra)
        for f in _written_fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        out["model_type"] = "swin"
        return out


def _default_backbone() -> SwinConfig:
    # transformers builds this when backbone_config is None (Swin-S depths, 4 output stages).
    return SwinConfig(
        depths=(2, 2, 18, 2),
        drop_path_rate=0.3,
        out_features=("stage1", "stage2", "stage3", "stage4"),
    )


@dataclasses.dataclass
class Mask2FormerConfig:
    backbone_config: Optional[SwinConfig] = None
    feature_size: int = 256
    mask_feature_size: int = 256
    hidden_dim: int = 256
    encoder_feedforward_dim: int = 1024
    activation_function: str = "relu"
    encoder_layers: int = 6
    decoder_layers: int = 10
    num_attention_heads: int = 8
    dropout: float = 0.0
    dim_feedforward: int = 2048
    pre_norm: bool = False
    enforce_input_projection: bool = False
    common_stride: int = 4
    ignore_value: int = 255
    num_queries: int = 100
    no_object_weight: float = 0.1
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    init_std: float = 0.02
    init_xavier_std: float = 1.0
    use_auxiliary_loss: bool = True
    feature_strides: Tuple[int, ...] = (4, 8, 16, 32)
    output_auxiliary_logits: Optional[bool] = None
    output_hidden_states: bool = False
    output_attentions: bool = False
    id2label: Optional[Dict[int, str]] = None
    label2id: Optional[Dict[str, int]] = None
    # transformers' keyword: without id2label, labels "LABEL_0".."LABEL_{n-1}" (default 2); after
    # construction always len(id2label)
    num_labels: Optional[int] = None
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    source_keys: Optional[frozenset] = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.backbone_config is None:
            self.backbone_config = _default_backbone()
        elif isinstance(self.backbone_config, dict):
            self.backbone_config = SwinConfig.from_dict(self.backbone_config)
        if self.num_labels is not None and (isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int)
                                            or self.num_labels < 1):
            raise ValueError(f"num_labels must be a positive int, got {self.num_labels!r}.")
        if self.id2label is None:
            self.id2label = {i: f"LABEL_{i}" for i in range(2 if self.num_labels is None else self.num_labels)}
        self.id2label = _labels_from_json(self.id2label)
        if self.num_labels is not None and self.num_labels != len(self.id2label):
            raise ValueError(
                f"num_labels={self.num_labels} but id2label has {len(self.id2label)} labels; pass one "
                "of them (num_labels alone names the labels LABEL_0, LABEL_1, ...)."
            )
        self.num_labels = len(self.id2label)
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
        self.feature_strides = tuple(int(s) for s in self.feature_strides)
        self.validate()

    @property
    def num_fpn_levels(self) -> int:
        import math

        return int(math.log2(min(self.feature_strides[-3:])) - math.log2(self.common_stride))

    def validate(self) -> None:
        bb = self.backbone_config
        if not isinstance(bb, SwinConfig):
            raise ValueError(f"backbone_config must be a SwinConfig, got {type(bb).__name__}.")
        if len(bb.out_features) != 4:
            raise ValueError(
                f"Mask2Former needs the backbone's four output stages; backbone_config has "
                f"out_features={list(bb.out_features)}. Pass out_features=['stage1', 'stage2', "
                "'stage3', 'stage4'] (transformers keeps only ['stage4'] when a backbone_config "
                "is given without out_features)."
            )
        if self.feature_size % 32:
            raise ValueError(
                f"feature_size={self.feature_size} must be divisible by 32 (GroupNorm(32, "
                "feature_size) in the pixel decoder)."
            )
        if self.hidden_dim % self.num_attention_heads:
            raise ValueError(
                f"hidden_dim={self.hidden_dim} must be divisible by num_attention_heads="
                f"{self.num_attention_heads}."
            )
        if self.feature_size % self.num_attention_heads:
            raise ValueError(
                f"feature_size={self.feature_size} must be divisible by num_attention_heads="
                f"{self.num_attention_heads} (multi-scale deformable attention heads)."
            )
        for name, heads, dim in zip(
            ("stage1", "stage2", "stage3", "stage4"),
            bb.num_heads,
            (bb.embed_dim * 2**i for i in range(4)),
        ):
            if dim % heads:
                raise ValueError(f"Swin {name}: dim {dim} not divisible by num_heads {heads}.")
        if self.decoder_layers < 1:
            raise ValueError(f"decoder_layers must be >= 1, got {self.decoder_layers}.")
        for option, name in (("activation_function", self.activation_function),
                             ("backbone_config.hidden_act", bb.hidden_act)):
            if name not in ACTIVATION_NAMES:
                raise ValueError(f"{option} {name!r} is not supported; use one of {sorted(ACTIVATION_NAMES)}.")

    # -- HF config.json ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Mask2FormerConfig":
        d = dict(d)
        model_type = d.get("model_type", "mask2former")
        if model_type != "mask2former":
            raise ValueError(f"config.json has model_type={model_type!r}, expected 'mask2former'.")
        for alias, name in _M2F_ALIASES.items():
            if alias in d and name not in d:
                d[name] = d.pop(alias)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "source_keys"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        if kwargs.get("backbone_config") is None:
            backbone = d.get("backbone")
            if backbone not in (None, "swin") and not str(backbone).startswith("microsoft/swin"):
                raise ValueError(
                    f"config.json names backbone={backbone!r}; m2f_jax supports Swin backbones only."
                )
        if "feature_strides" in kwargs:
            kwargs["feature_strides"] = tuple(kwargs["feature_strides"])
        return cls(**kwargs, extra=d, source_keys=frozenset(kwargs) | frozenset(d))

    def to_dict(self) -> Dict[str, Any]:
        out = dict(self.extra)
        for f in _written_fields(self):
            v = getattr(self, f.name)
            if f.name == "backbone_config":
                v = v.to_dict()
            elif f.name == "id2label":
                v = {str(k): lab for k, lab in v.items()}
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out["model_type"] = "mask2former"
        return out

    @classmethod
    def from_json_file(cls, path: str) -> "Mask2FormerConfig":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No config file at {path}.")
        return cls.from_dict(read_json_object(path))

    @classmethod
    def from_pretrained(cls, folder: str) -> "Mask2FormerConfig":
        return cls.from_json_file(os.path.join(folder, CONFIG_NAME))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            f.write(self.to_json_string())
