"""m2f_jax's tests. transformers (and, for most parity tests, torch) are the oracle."""

TORCH_REASON = (
    "needs torch, the parity oracle: the local torch 2.13.0 CPU wheel is for Python 3.11 only "
    "(any other torch request downloads a multi-GB CUDA build), so the newest-stack run has none"
)
