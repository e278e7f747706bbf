"""m2f_jax: Mask2Former (universal image segmentation) in JAX/Flax, with parity to transformers."""
from m2f_jax.config import Mask2FormerConfig, SwinConfig
from m2f_jax.hub import Mask2Former, load

__version__ = "0.1.0"

__all__ = ["Mask2Former", "Mask2FormerConfig", "SwinConfig", "load"]
