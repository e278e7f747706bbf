"""Whole folders: an HF folder (config.json + model.safetensors / pytorch_model.bin) and a Flax
folder (config.json + flax_model.msgpack), each readable and writable."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Tuple

import numpy as np

from convert.checkpoint import read_state_dict, write_state_dict
from convert.mapping import flax_to_hf, hf_to_flax
from m2f_jax.config import CONFIG_NAME, Mask2FormerConfig

FLAX_WEIGHTS = "flax_model.msgpack"
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def param_shapes(config: Mask2FormerConfig):
    """The Flax params tree of a config, as ShapeDtypeStructs (nothing is computed)."""
    import jax
    import jax.numpy as jnp

    from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation

    module = Mask2FormerForUniversalSegmentation(config)
    dummy = jax.ShapeDtypeStruct((1, 64, 64, config.backbone_config.num_channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)
    return variables["params"]


def load_hf_folder(folder: str) -> Tuple[Mask2FormerConfig, dict]:
    """config.json + HF weights -> (config, Flax params as numpy float32)."""
    config = Mask2FormerConfig.from_pretrained(folder)
    params = hf_to_flax(read_state_dict(folder), param_shapes(config))
    return config, params


def save_hf_folder(params, config: Mask2FormerConfig, folder: str) -> None:
    """Writes config.json + model.safetensors that transformers'
    ``Mask2FormerForUniversalSegmentation.from_pretrained`` loads with no missing keys."""
    state = flax_to_hf(params)
    # Buffers and unused weights transformers keeps in its state dict.
    state["criterion.empty_weight"] = np.array(
        [1.0] * config.num_labels + [config.no_object_weight], np.float32
    )
    width = config.backbone_config.hidden_size
    state["model.pixel_level_module.encoder.swin.layernorm.weight"] = np.ones(width, np.float32)
    state["model.pixel_level_module.encoder.swin.layernorm.bias"] = np.zeros(width, np.float32)
    write_state_dict(state, folder)
    config_dict = config.to_dict()
    config_dict.setdefault("architectures", ["Mask2FormerForUniversalSegmentation"])
    cfg = Mask2FormerConfig.from_dict(config_dict)
    cfg.save_pretrained(folder)


def save_flax_folder(params, config: Mask2FormerConfig, folder: str) -> None:
    from flax import serialization

    os.makedirs(folder, exist_ok=True)
    config.save_pretrained(folder)
    params = {"params": _to_numpy(params)}
    with open(os.path.join(folder, FLAX_WEIGHTS), "wb") as f:
        f.write(serialization.msgpack_serialize(params))


def load_flax_folder(folder: str) -> Tuple[Mask2FormerConfig, dict]:
    from flax import serialization

    from convert.mapping import _flatten

    config = Mask2FormerConfig.from_pretrained(folder)
    path = os.path.join(folder, FLAX_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {FLAX_WEIGHTS} in {folder}.")
    with open(path, "rb") as f:
        params = serialization.msgpack_restore(f.read())["params"]
    # Same strict check as for HF checkpoints: structure and shapes must match the config.
    hf_to_flax(flax_to_hf(params, disk_layout=False), param_shapes(config))
    return config, params


def _to_numpy(tree):
    if hasattr(tree, "items"):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def hf_folder_to_flax(src: str, dst: str, overwrite: bool = False) -> None:
    config, params = load_hf_folder(src)
    with _staged(src, dst, overwrite) as stage:
        save_flax_folder(params, config, stage)
        _copy_preprocessor(src, stage)


def flax_folder_to_hf(src: str, dst: str, overwrite: bool = False) -> None:
    config, params = load_flax_folder(src)
    with _staged(src, dst, overwrite) as stage:
        save_hf_folder(params, config, stage)
        _copy_preprocessor(src, stage)


@contextlib.contextmanager
def _staged(src: str, dst: str, overwrite: bool):
    """A fresh folder beside ``dst`` to write into; its files are moved into ``dst`` only once all
    are written (a failure leaves ``dst`` as it was). Refuses ``dst`` = ``src`` and, unless
    ``overwrite``, files of ``dst`` that the conversion would replace."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise FileExistsError(f"{dst} is a file; the output must be a folder.")
    if os.path.isdir(dst) and os.path.samefile(src, dst):
        raise ValueError(f"{dst} is the source folder; write the converted checkpoint to another folder.")
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".m2f-convert-", dir=parent)
    try:
        yield stage
        written = sorted(os.listdir(stage))
        clashes = [name for name in written if os.path.exists(os.path.join(dst, name))]
        if clashes and not overwrite:
            raise FileExistsError(f"{dst} already has {', '.join(clashes)}; pass --overwrite to replace "
                                  "them, or choose an empty folder.")
        os.makedirs(dst, exist_ok=True)
        for name in written:
            os.replace(os.path.join(stage, name), os.path.join(dst, name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _copy_preprocessor(src: str, dst: str) -> None:
    if os.path.isfile(os.path.join(src, PREPROCESSOR_CONFIG)):
        shutil.copy(os.path.join(src, PREPROCESSOR_CONFIG), os.path.join(dst, PREPROCESSOR_CONFIG))


def is_flax_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, FLAX_WEIGHTS))


def has_config(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, CONFIG_NAME))
