"""NumPy pre- and post-processing with transformers' API: ``image_processor`` (resize, normalise,
pad, targets), ``post_processing`` (semantic, instance and panoptic results) over
``mask_resize`` (PyTorch-exact resizing) and ``post_kernels`` (the per-image kernels), ``rle``
(COCO run-length encoding) and ``arrays``."""
