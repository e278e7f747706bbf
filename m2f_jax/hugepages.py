"""Transparent huge pages for glibc's malloc in the ``m2f-jax train`` process (CPU training).

XLA:CPU allocates a compiled step's temporaries as one block per call (3.3 GB for the Swin-T
train step at 384x384, batch 2) and frees it afterwards; glibc serves blocks that large with a
fresh ``mmap``, so every step writes ~850k never-touched 4 KiB pages, each one a page fault
(``python benchmarks/bench_train.py`` prints the count). glibc >= 2.35 can ask the kernel for 2 MiB
transparent huge pages instead (tunable ``glibc.malloc.hugetlb=1``): 512x fewer faults. Tunables
are read when the process starts, so the command re-executes itself once with the tunable set.
``M2F_JAX_HUGEPAGES=0`` turns this off.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional, Tuple

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH = "M2F_JAX_HUGEPAGES"  # "0" turns the re-execution off
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> Optional[str]:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> Optional[Tuple[int, int]]:
    """(major, minor) of the C library if it is glibc, else None."""
    name, version = platform.libc_ver()
    if name != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def hugepage_environ(
    environ: Mapping[str, str], libc: Optional[Tuple[int, int]], thp: Optional[str]
) -> Optional[dict]:
    """The environment to re-execute with, or None when there is nothing to do: the tunable is
    already set (this is the re-executed process), ``M2F_JAX_HUGEPAGES=0``, the C library is not
    glibc >= 2.35, or the kernel has no transparent huge pages for malloc to ask for."""
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    if any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        return None
    if environ.get(SWITCH, "1") == "0" or libc is None or libc < (2, 35) or thp not in ("always", "madvise"):
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(tunables + [TUNABLE]))


def reexec_with_hugepages() -> None:
    """Re-executes this Python process with glibc's huge-page malloc if it makes a difference
    (see :func:`hugepage_environ`); returns only when it does not. Call it before anything heavy
    is imported: the new process starts from the same command line."""
    env = hugepage_environ(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    print(f"m2f-jax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages for "
          f"CPU training; {SWITCH}=0 turns this off)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
