"""m2f_jax.load: a local folder, a Hub repo id from the local Hugging Face cache, or a download."""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple

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
    """A model ready to call: ``.config``, ``.module`` (Flax linen), ``.params``, ``.processor`` and
    a jitted ``__call__(pixel_values, pixel_mask=None, **flags)`` with NHWC ``pixel_values``.

    As transformers' Flax models: ``Mask2Former.from_pretrained(folder or Hub id)`` (=
    ``m2f_jax.load``), ``save_pretrained(folder)`` (a folder transformers loads), and
    ``Mask2Former(config)`` for random weights (``seed``). ``m2f_jax.Mask2FormerForUniversalSegmentation``
    is this class; the linen module is ``m2f_jax.modeling.mask2former.Mask2FormerForUniversalSegmentation``.
    """

    @staticmethod
    def _make_module(config, dtype, variant, precision, scan_layers=None):
        from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

        return Mask2FormerForUniversalSegmentation(config, dtype=dtype, variant=variant, precision=precision,
                                                   scan_layers=scan_layers)

    @staticmethod
    def _checkpoint_params(params):
        """The part of a universal-segmentation checkpoint's params this model holds."""
        return params

    def __init__(self, config: Mask2FormerConfig, params=None, dtype=jnp.float32, processor=None, path=None,
                 variant: Optional[str] = None, precision: Optional[str] = None, seed: int = 0,
                 scan_layers: Optional[bool] = None):
        from m2f_jax.modeling import mask2former, variants

        if not isinstance(config, Mask2FormerConfig):
            raise TypeError(f"config must be a m2f_jax.Mask2FormerConfig, got {type(config).__name__}.")
        self.config = config
        self.dtype = dtype
        # the variant of the device the jitted forward runs on (JAX's default device)
        variant = variants.resolve(variant, jax.devices()[0].platform)
        mask2former.matmul_precision(precision)  # a bad value fails here, not at the first call
        self.module = self._make_module(config, dtype, variant, precision, scan_layers)
        if params is None:
            params = self._random_params(seed)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.processor = processor
        self.path = path

    def _random_params(self, seed: int):
        pixels = jnp.zeros((1, 64, 64, self.config.backbone_config.num_channels), jnp.float32)
        return jax.jit(self.module.init)(jax.random.key(seed), pixels)["params"]

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=jnp.float32, revision: Optional[str] = None,
                        variant: Optional[str] = None, precision: Optional[str] = None,
                        scan_layers: Optional[bool] = None):
        """Loads a checkpoint folder or Hub id (see ``m2f_jax.load``)."""
        from convert.folders import is_flax_folder, load_flax_folder, load_hf_folder

        folder = resolve(name_or_path, revision)
        config, params = load_flax_folder(folder) if is_flax_folder(folder) else load_hf_folder(folder)
        processor = None
        if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
            from m2f_jax.processing.image_processor import Mask2FormerImageProcessor

            processor = Mask2FormerImageProcessor.from_pretrained(folder)
        return cls(config, cls._checkpoint_params(params), dtype=dtype, processor=processor, path=folder, variant=variant,
                   precision=precision, scan_layers=scan_layers)

    def save_pretrained(self, save_directory: str) -> str:
        """Writes config.json, model.safetensors (transformers' layout: its
        ``Mask2FormerForUniversalSegmentation.from_pretrained`` loads it) and, when the model has
        one, preprocessor_config.json. Returns the folder."""
        from convert.folders import save_hf_folder

        os.makedirs(save_directory, exist_ok=True)
        save_hf_folder(jax.device_get(self.params), self.config, save_directory)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        return save_directory

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
        mask_labels=None,
        class_labels=None,
        key=None,
        given_points=None,
    ):
        """The forward (eval mode). With ``mask_labels`` (per image an (N_i, H, W) array of binary
        masks at the input size) and ``class_labels`` (per image (N_i,) ids), as transformers:
        the output's ``loss`` is the weighted training loss (auxiliary levels included when
        ``config.use_auxiliary_loss``), from a separate jitted program, so the plain forward is
        unchanged. Its random points come from ``key`` (default ``jax.random.key(0)``) or from
        ``given_points`` (``m2f_jax.modeling.criterion``'s format, e.g. transformers' draws
        replayed)."""
        from m2f_jax.modeling.mask2former import check_pixel_values

        check_pixel_values(pixel_values, self.config)  # before jit, for a readable error
        cfg = self.config
        flags = _flags(cfg, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                       output_auxiliary_logits=output_auxiliary_logits)
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("the loss needs both mask_labels and class_labels (one was given).")
        if mask_labels is None:
            return self._forward(self.params, jnp.asarray(pixel_values), *flags)
        targets = _padded_targets(mask_labels, class_labels, pixel_values.shape[0], self.config.num_labels)
        if given_points is None:
            draws = {"key": jax.random.key(0) if key is None else key}
        else:
            draws = {"given_points": given_points}
        return self._loss_forward(self.params, jnp.asarray(pixel_values), *targets, draws, *flags)

    @functools.cached_property
    def _loss_forward(self):
        from m2f_jax.modeling.criterion import LossConfig, mask2former_loss

        loss_config = LossConfig.from_config(self.config)
        use_aux = bool(self.config.use_auxiliary_loss)

        def forward(params, pixel_values, masks, classes, valid, draws, output_hidden_states, output_attentions,
                    output_auxiliary_logits):
            out = self.module.apply({"params": params}, pixel_values, deterministic=True,
                                    output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                    output_auxiliary_logits=True)
            losses = mask2former_loss(out.class_queries_logits, out.masks_queries_logits, masks, classes, valid,
                                      config=loss_config, auxiliary_logits=out.auxiliary_logits if use_aux else None,
                                      **draws)
            return out.replace(loss=losses["loss"],
                               auxiliary_logits=out.auxiliary_logits if output_auxiliary_logits else None)

        return jax.jit(forward, static_argnums=(6, 7, 8))

    def sharded_call(self, pixel_values, mesh):
        """The forward with the batch split over ``mesh``'s one axis (its size must divide the
        batch) and the parameters replicated on it (once per mesh and weights: assigning
        ``model.params`` replicates the new ones at the next call); outputs are sharded alike."""
        from jax.sharding import NamedSharding, PartitionSpec

        from m2f_jax.modeling.mask2former import check_pixel_values

        check_pixel_values(pixel_values, self.config)
        (axis,) = mesh.axis_names
        if pixel_values.shape[0] % mesh.shape[axis]:
            raise ValueError(f"the batch ({pixel_values.shape[0]}) must divide over the mesh's "
                             f"{mesh.shape[axis]} devices.")
        batch = jax.device_put(jnp.asarray(pixel_values), NamedSharding(mesh, PartitionSpec(axis)))
        return self._forward(self._replicated_params(mesh), batch, False, False, False)

    def _replicated_params(self, mesh):
        """``self.params`` replicated on ``mesh``, made once per mesh and weights. A copy is reused
        only while every leaf of ``self.params`` is the very array it was made from, so assigning
        ``model.params`` (as training's validation does) or replacing a leaf in place costs one
        replication at the next call, and a copy made from buffers that have since been donated
        (a train step's state) is never read."""
        from jax.sharding import NamedSharding, PartitionSpec

        leaves = jax.tree_util.tree_leaves(self.params)
        sources, kept = self.__dict__.get("_replicated", ((), {}))
        if len(sources) != len(leaves) or any(a is not b for a, b in zip(sources, leaves)):
            kept = {}  # other weights: their copies go now, on every mesh
            self._replicated = (leaves, kept)
        if mesh not in kept:
            kept[mesh] = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        return kept[mesh]

    def __repr__(self):
        bb = self.config.backbone_config
        return (
            f"Mask2Former(swin embed_dim={bb.embed_dim} depths={list(bb.depths)}, "
            f"num_labels={self.config.num_labels}, num_queries={self.config.num_queries}, "
            f"dtype={jnp.dtype(self.dtype).name}, path={self.path!r})"
        )


def _flags(config, **given) -> Tuple[bool, ...]:
    """The output flags in the order given, each the argument or, when None, the config's."""
    return tuple(bool(getattr(config, name) if value is None else value) for name, value in given.items())


def _padded_targets(mask_labels, class_labels, batch_size: int, num_labels: int):
    """transformers' per-image label lists -> (B, M, H, W) float32 masks, (B, M) int32 classes and
    (B, M) valid flags, M the largest count rounded up to a power of two (few programs)."""
    import numpy as np

    if len(mask_labels) != batch_size or len(class_labels) != batch_size:
        raise ValueError(f"mask_labels and class_labels need one entry per image ({batch_size}); got "
                         f"{len(mask_labels)} and {len(class_labels)}.")
    masks = [np.asarray(m, np.float32) for m in mask_labels]
    classes = [np.asarray(c).reshape(-1) for c in class_labels]
    shapes = {m.shape[1:] for m in masks if m.ndim == 3}
    if any(m.ndim != 3 for m in masks) or len(shapes) > 1:
        raise ValueError(f"mask_labels must be (N_i, H, W) arrays of one size; got shapes {[m.shape for m in masks]}.")
    for i, (m, c) in enumerate(zip(masks, classes)):
        if len(m) != len(c):
            raise ValueError(f"image {i}: {len(m)} masks but {len(c)} class labels.")
        if c.size and (c.min() < 0 or c.max() >= num_labels):
            raise ValueError(f"image {i}: class_labels must be in [0, {num_labels}); got {sorted(set(c.tolist()))}.")
    slots = 1
    while slots < max(len(c) for c in classes):
        slots *= 2
    (height, width), = shapes
    out_masks = np.zeros((batch_size, slots, height, width), np.float32)
    out_classes = np.zeros((batch_size, slots), np.int32)
    valid = np.zeros((batch_size, slots), bool)
    for i, (m, c) in enumerate(zip(masks, classes)):
        out_masks[i, : len(m)], out_classes[i, : len(c)], valid[i, : len(c)] = m, c, True
    return out_masks, out_classes, valid


class Mask2FormerModel(Mask2Former):
    """transformers' ``Mask2FormerModel``: the backbone, pixel decoder and transformer decoder
    without the class head; its call returns ``Mask2FormerModelOutput`` (transformers' fields,
    NHWC maps). ``from_pretrained`` takes a universal-segmentation checkpoint and keeps its
    ``model`` weights, as transformers does."""

    @staticmethod
    def _make_module(config, dtype, variant, precision, scan_layers=None):
        from m2f_jax.modeling.mask2former import Mask2FormerModel as BareModule

        return BareModule(config, dtype=dtype, variant=variant, precision=precision, scan_layers=scan_layers)

    @staticmethod
    def _checkpoint_params(params):
        return params["model"]  # the bare model of a universal checkpoint, as transformers

    @functools.cached_property
    def _forward(self):
        from m2f_jax.modeling.mask2former import model_output

        def forward(params, pixel_values, output_hidden_states, output_attentions):
            outputs = self.module.apply({"params": params}, pixel_values.astype(self.dtype), True)
            return model_output(outputs, output_hidden_states, output_attentions)

        return jax.jit(forward, static_argnums=(2, 3))

    def __call__(self, pixel_values, pixel_mask=None, output_hidden_states: Optional[bool] = None,
                 output_attentions: Optional[bool] = None):
        from m2f_jax.modeling.mask2former import check_pixel_values

        check_pixel_values(pixel_values, self.config)
        flags = _flags(self.config, output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        return self._forward(self.params, jnp.asarray(pixel_values), *flags)

    def sharded_call(self, pixel_values, mesh):
        raise NotImplementedError("sharded_call is for the universal-segmentation model.")

    def save_pretrained(self, save_directory: str) -> str:
        raise NotImplementedError("save_pretrained writes universal-segmentation checkpoints; the bare "
                                  "model has no class predictor to write.")


# transformers' names: the universal-segmentation model is the class ``load`` returns
Mask2FormerForUniversalSegmentation = Mask2Former


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
         variant: Optional[str] = None, precision: Optional[str] = None,
         scan_layers: Optional[bool] = None) -> Mask2Former:
    """Loads a Mask2Former checkpoint (HF layout, or a Flax folder written by ``convert``).

    ``dtype`` is the computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    ``variant``: "xla" or "cpu" (``m2f_jax.modeling.variants``); default: the one for the
    platform of JAX's default device.
    ``precision``: the matmul/convolution precision, None (JAX's default), "default", "high" or
    "highest" (float32 on GPU and TPU; see README "Precision").
    ``scan_layers``: the repeated layers as scans (True) or unrolled (False); the same outputs and
    parameters. Default: on for the "xla" variant, off for "cpu" (``m2f_jax.modeling.variants``).
    """
    return Mask2Former.from_pretrained(name_or_path, dtype=dtype, revision=revision, variant=variant,
                                       precision=precision, scan_layers=scan_layers)


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
