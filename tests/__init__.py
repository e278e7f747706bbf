"""m2f_jax's tests. transformers (and, for most parity tests, torch) are the oracle."""
import os

TORCH_REASON = (
    "needs torch, the parity oracle: the local torch 2.13.0 CPU wheel is for Python 3.11 only "
    "(any other torch request downloads a multi-GB CUDA build), so the newest-stack run has none"
)


def largest_file(folder):
    """The largest file under ``folder`` (a checkpoint's biggest array file, to damage)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def flip_64_bytes(path):
    """Inverts 64 bytes in the middle of the file."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    open(path, "wb").write(bytes(data))
