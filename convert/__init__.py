"""Conversion between HF (transformers / Hub) Mask2Former checkpoints and m2f_jax Flax params."""
from convert.checkpoint import read_state_dict, write_state_dict
from convert.folders import (
    FLAX_WEIGHTS,
    hf_folder_to_flax,
    load_flax_folder,
    load_hf_folder,
    save_flax_folder,
    save_hf_folder,
)
from convert.mapping import ConversionError, flax_to_hf, hf_to_flax

__all__ = [
    "ConversionError",
    "FLAX_WEIGHTS",
    "flax_to_hf",
    "hf_folder_to_flax",
    "hf_to_flax",
    "load_flax_folder",
    "load_hf_folder",
    "read_state_dict",
    "save_flax_folder",
    "save_hf_folder",
    "write_state_dict",
]
