"""Reading and writing HF checkpoint folders (config.json + weights)."""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def _read_torch(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch. Install the extra: "
            "pip install 'm2f-jax[torch]' (or convert the folder to model.safetensors)."
        ) from e
    import pickle
    import zipfile

    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors (a malicious pickle)
        raise ValueError(f"{path} holds objects other than tensors and was refused (unpickling it could "
                         "run code); convert it where you trust it, or use model.safetensors") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or damaged?): "
                         f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from e
    if not isinstance(state, dict) or not all(hasattr(v, "is_floating_point") for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors.")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _read_shards(folder: str, index_name: str, reader) -> Dict[str, np.ndarray]:
    path = os.path.join(folder, index_name)
    try:
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not a valid weight index (JSON with a weight_map): {e}") from e
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise FileNotFoundError(f"{path} names shards that are not in {folder}: {', '.join(missing)}")
    out: Dict[str, np.ndarray] = {}
    for shard in shards:
        out.update(reader(os.path.join(folder, shard)))
    return out


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or damaged?): {e}") from e


def read_state_dict(folder: str) -> Dict[str, np.ndarray]:
    """The weights of an HF folder as numpy arrays: ``model.safetensors`` (read with numpy only,
    sharded or not), else ``pytorch_model.bin`` (needs torch). A file that cannot be read is a
    ValueError naming it."""

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory.")
    if os.path.isfile(os.path.join(folder, SAFETENSORS)):
        return _read_safetensors(os.path.join(folder, SAFETENSORS))
    if os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)):
        return _read_shards(folder, SAFETENSORS_INDEX, _read_safetensors)
    if os.path.isfile(os.path.join(folder, TORCH_BIN)):
        return _read_torch(os.path.join(folder, TORCH_BIN))
    if os.path.isfile(os.path.join(folder, TORCH_BIN_INDEX)):
        return _read_shards(folder, TORCH_BIN_INDEX, _read_torch)
    raise FileNotFoundError(
        f"No weights in {folder}: expected one of {SAFETENSORS}, {SAFETENSORS_INDEX}, "
        f"{TORCH_BIN}, {TORCH_BIN_INDEX}."
    )


def write_state_dict(state_dict: Dict[str, np.ndarray], folder: str) -> str:
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, SAFETENSORS)
    # transformers refuses safetensors files without format metadata.
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path, metadata={"format": "pt"})
    return path
