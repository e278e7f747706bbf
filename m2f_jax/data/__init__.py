"""Training data: synthetic dataset writer, readers for ADE20K-style semantic, COCO panoptic and
COCO instance annotations, static-shape augmentation, and the batch iterator (NumPy only)."""
from m2f_jax.data.augment import EvalTransform, TrainTransform, normalize
from m2f_jax.data.datasets import CocoInstanceDataset, CocoPanopticDataset, SemanticDataset
from m2f_jax.data.pipeline import BatchIterator
from m2f_jax.data.synthetic import render_scene, write_dataset

__all__ = ["BatchIterator", "CocoInstanceDataset", "CocoPanopticDataset", "EvalTransform", "SemanticDataset",
           "TrainTransform", "normalize", "render_scene", "write_dataset"]
