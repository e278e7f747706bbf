"""m2f_jax.load: a local folder, a Hub repo id from the local Hugging Face cache, or a download."""
from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp

from m2f_jax.config import CONFIG_NAME, Mask2FormerConfig

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
)


class Mask2Former:
    """A loaded model: ``.config``, ``.module`` (Flax), ``.params``, ``.processor`` and a jitted
    ``__call__(pixel_values, pixel_mask=None, **flags)`` with NHWC ``pixel_values``."""

    def __init__(self, config: Mask2FormerConfig, params, dtype=jnp.float32, processor=None, path=None,
                 variant: Optional[str] = None, precision: Optional[str] = None):
        from m2f_jax.modeling import variants
        from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation, matmul_precision

        self.config = config
        self.dtype = dtype
        # the variant of the device the jitted forward runs on (JAX's default device)
        variant = variants.resolve(variant, jax.devices()[0].platform)
        matmul_precision(precision)  # a bad value fails here, not at the first call
        self.module = Mask2FormerForUniversalSegmentation(config, dtype=dtype, variant=variant, precision=precision)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.processor = processor
        self.path = path

    @functools.cached_property
    def _forward(self):
        def forward(params, pixel_values, output_hidden_states, output_attentions, output_auxiliary_logits):
            return self.module.apply(
                {"params": params},
                pixel_values,
                deterministic=True,
                output_hidden_states=output_hidden_states,
                output_attentions=output_attentions,
                output_auxiliary_logits=output_auxiliary_logits,
            )

        return jax.jit(forward, static_argnums=(2, 3, 4))

    def __call__(
        self,
        pixel_values,
        pixel_mask=None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_auxiliary_logits: Optional[bool] = None,
    ):
        from m2f_jax.modeling.mask2former import check_pixel_values

        check_pixel_values(pixel_values, self.config)  # before jit, for a readable error
        cfg = self.config
        return self._forward(
            self.params,
            jnp.asarray(pixel_values),
            bool(cfg.output_hidden_states if output_hidden_states is None else output_hidden_states),
            bool(cfg.output_attentions if output_attentions is None else output_attentions),
            bool(cfg.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits),
        )

    def __repr__(self):
        bb = self.config.backbone_config
        return (
            f"Mask2Former(swin embed_dim={bb.embed_dim} depths={list(bb.depths)}, "
            f"num_labels={self.config.num_labels}, num_queries={self.config.num_queries}, "
            f"dtype={jnp.dtype(self.dtype).name}, path={self.path!r})"
        )


def _hub_cache_dirs():
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        dirs.append(os.environ["HUGGINGFACE_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    dirs.append(os.path.join(hf_home, "hub"))
    return dirs


def _complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(folder, w)) for w in _WEIGHT_FILES
    )


def find_in_cache(repo_id: str, revision: Optional[str] = None):
    """The snapshot folder of ``repo_id`` in the local HF cache, or None. Also returns where it looked."""
    looked = []
    for cache in _hub_cache_dirs():
        repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
        looked.append(repo_dir)
        snapshots = os.path.join(repo_dir, "snapshots")
        if not os.path.isdir(snapshots):
            continue
        ref = os.path.join(repo_dir, "refs", revision or "main")
        candidates = []
        if os.path.isfile(ref):
            with open(ref) as f:
                candidates.append(os.path.join(snapshots, f.read().strip()))
        elif revision and os.path.isdir(os.path.join(snapshots, revision)):
            candidates.append(os.path.join(snapshots, revision))
        if not revision:
            others = [os.path.join(snapshots, d) for d in os.listdir(snapshots)]
            candidates += sorted(others, key=os.path.getmtime, reverse=True)
        for c in candidates:
            if _complete(c):
                return c, looked
    return None, looked


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ).lower() in ("1", "true", "yes")


def resolve(name_or_path: str, revision: Optional[str] = None) -> str:
    """A local folder holding config.json and weights for ``name_or_path``."""
    if os.path.isdir(name_or_path):
        if not _complete(name_or_path):
            raise FileNotFoundError(
                f"{name_or_path} is a folder but lacks config.json or weights (one of "
                f"{', '.join(_WEIGHT_FILES)})."
            )
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path} is a file; m2f_jax.load expects a checkpoint folder or a Hub id.")
    folder, looked = find_in_cache(name_or_path, revision)
    if folder:
        return folder
    reason = "HF_HUB_OFFLINE is set"
    if not _offline():
        try:
            import huggingface_hub
        except ImportError:
            reason = "huggingface_hub is not installed (pip install 'm2f-jax[hub]')"
        else:
            try:
                return huggingface_hub.snapshot_download(
                    name_or_path,
                    revision=revision,
                    allow_patterns=["*.json", "model.safetensors*", "pytorch_model.bin*"],
                )
            except Exception as e:  # network errors, unknown repo, gated repo...
                reason = f"downloading failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    raise FileNotFoundError(
        f"Cannot load {name_or_path!r}: it is not a local folder, it is not in the Hugging Face "
        f"cache (looked in: {', '.join(looked)}), and {reason}. Pass a local folder with "
        "config.json and model.safetensors, download the checkpoint where you have network "
        "access (huggingface-cli download <repo id>) and copy the cache here, or set HF_HOME / "
        "HF_HUB_CACHE to a cache that has it."
    )


def load(name_or_path: str, dtype=jnp.float32, revision: Optional[str] = None,
         variant: Optional[str] = None, precision: Optional[str] = None) -> Mask2Former:
    """Loads a Mask2Former checkpoint (HF layout, or a Flax folder written by ``convert``).

    ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    ``variant``: "xla" or "cpu" (``m2f_jax.modeling.variants``); default: the one for the
    platform of JAX's default device.
    ``precision``: the matmul/convolution precision, None (JAX's default), "default", "high" or
    "highest" (float32 on GPU and TPU; see README "Precision").
    """
    from convert.folders import is_flax_folder, load_flax_folder, load_hf_folder

    folder = resolve(name_or_path, revision)
    config, params = load_flax_folder(folder) if is_flax_folder(folder) else load_hf_folder(folder)
    processor = None
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

        processor = Mask2FormerImageProcessor.from_pretrained(folder)
    return Mask2Former(config, params, dtype=dtype, processor=processor, path=folder, variant=variant,
                       precision=precision)


def enable_compilation_cache(path: Optional[str] = None, min_compile_time_secs: float = 1.0) -> str:
    """Turns on JAX's persistent compilation cache, so that a new process loads the programs an
    earlier one compiled (every new input size compiles the model once) instead of compiling them
    again. Call it before the first compile. The directory: ``path``, else
    ``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/m2f_jax/jax`` (``~/.cache/m2f_jax/jax``).
    Programs that compiled in less than ``min_compile_time_secs`` are not stored. Returns the
    directory. The ``m2f-jax`` command calls it unless given ``--no-compilation-cache``."""
    if path is None:
        path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "m2f_jax", "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
