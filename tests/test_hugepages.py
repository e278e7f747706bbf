"""`m2f-jax train` restarts itself with glibc's huge-page malloc (m2f_jax/hugepages.py).

Oracles: the environment rules by hand, and the kernel's own count of minor page faults for a
256 MiB malloc'd block written once (65536 faults with 4 KiB pages, 128 with 2 MiB pages)."""
import os
import subprocess
import sys

import pytest

from m2f_jax.hugepages import SWITCH, TUNABLE, glibc_version, hugepage_environ, thp_mode

APPLIES = (glibc_version() or (0, 0)) >= (2, 35) and thp_mode() in ("always", "madvise")
needs_thp = pytest.mark.skipif(not APPLIES, reason="needs glibc >= 2.35 and transparent huge pages")


def test_environment_gets_the_tunable_once_and_only_where_it_applies():
    base = {"PATH": "/bin"}
    assert hugepage_environ(base, (2, 36), "madvise") == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert hugepage_environ(base, (2, 35), "always")["GLIBC_TUNABLES"] == TUNABLE
    # other tunables are kept, in order
    kept = hugepage_environ(dict(base, GLIBC_TUNABLES="glibc.malloc.arena_max=2"), (2, 36), "madvise")
    assert kept["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + TUNABLE
    # already set (the restarted process, or the user's own choice, 0 included): nothing to do
    assert hugepage_environ(dict(base, GLIBC_TUNABLES=TUNABLE), (2, 36), "madvise") is None
    assert hugepage_environ(dict(base, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), (2, 36), "madvise") is None
    # switched off, too old a glibc, not glibc, no THP
    assert hugepage_environ(dict(base, **{SWITCH: "0"}), (2, 36), "madvise") is None
    assert hugepage_environ(base, (2, 34), "madvise") is None
    assert hugepage_environ(base, None, "madvise") is None
    assert hugepage_environ(base, (2, 36), "never") is None
    assert hugepage_environ(base, (2, 36), None) is None


_FAULTS = """
import ctypes, resource, sys
from m2f_jax.hugepages import reexec_with_hugepages
reexec_with_hugepages()
import os
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(os.environ.get("GLIBC_TUNABLES", ""), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, sep="|")
"""


def _faults(**env):
    r = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}, **env})
    assert r.returncode == 0, r.stderr
    tunables, faults = r.stdout.strip().splitlines()[-1].split("|")
    return tunables, int(faults), r.stderr


@needs_thp
def test_restarted_process_writes_a_large_block_with_far_fewer_page_faults():
    tunables, faults, stderr = _faults()
    assert tunables == TUNABLE and "restarting with GLIBC_TUNABLES" in stderr
    assert faults < 65536 // 4, faults  # measured: ~130-1100 (2 MiB pages), against 65536
    if thp_mode() == "madvise":  # with "always" the kernel gives huge pages without asking
        off_tunables, off_faults, _ = _faults(**{SWITCH: "0"})
        assert off_tunables == "" and off_faults >= 65536 * 0.9, off_faults


@needs_thp
def test_train_command_restarts_with_the_same_arguments(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-m", "m2f_jax", "train", "--data", str(tmp_path / "missing"),
                        "--format", "semantic", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=dict(env, JAX_PLATFORMS="cpu"))
    # restarted once, then the restarted process saw the same arguments (its one-line data error)
    assert r.stderr.count("restarting with GLIBC_TUNABLES=" + TUNABLE) == 1, r.stderr
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr, r.stderr
