"""m2f_jax: Mask2Former (universal image segmentation) in JAX/Flax, with parity to transformers.

    model = m2f_jax.load("facebook/mask2former-swin-tiny-coco-panoptic")   # or a local folder
    results = m2f_jax.segment(model, images, task="panoptic")

The JAX-heavy entry points are imported lazily, so the NumPy processing modules can be used
without importing jax.
"""
from m2f_jax.config import Mask2FormerConfig, SwinConfig

__version__ = "0.1.0"

_LAZY = {
    "load": "m2f_jax.hub",
    "Mask2Former": "m2f_jax.hub",
    "enable_compilation_cache": "m2f_jax.hub",
    "segment": "m2f_jax.inference",
    "iter_segment": "m2f_jax.inference",
    "bucket_sizes": "m2f_jax.inference",
    "overlay": "m2f_jax.visualize",
    "Mask2FormerImageProcessor": "m2f_jax.processing.image_processor",
    "Mask2FormerForUniversalSegmentation": "m2f_jax.hub",
    "Mask2FormerModel": "m2f_jax.hub",
}

__all__ = ["Mask2Former", "Mask2FormerConfig", "Mask2FormerForUniversalSegmentation", "Mask2FormerImageProcessor",
           "Mask2FormerModel", "SwinConfig", "bucket_sizes", "enable_compilation_cache", "iter_segment", "load", "overlay",
           "segment"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'm2f_jax' has no attribute {name!r}")
