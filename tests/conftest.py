import os
import tempfile

# The suite is written for the CPU (fp32 parity at 1e-4). With libtpu installed (the TPU compile
# tests) JAX would first try to open a TPU; set JAX_PLATFORMS to run the suite elsewhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The m2f-jax command turns JAX's persistent compilation cache on; the tests' go to a folder of
# their own, not the user's cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="m2f_jax_test_cache_"))
# The suite is bound by XLA:CPU compiles of small programs that then run once or twice: LLVM -O0
# compiles them ~40% faster (the same HLO and semantics; every test's programs are compiled alike).
# Subprocesses the tests start inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A noisy random-weight transformers model (transformers' tiny test config) saved with
    save_pretrained: (folder, torch model)."""
    from tests import TORCH_REASON
    from tests.hf_models import TINY, hf_config, noisy_model, save

    pytest.importorskip("torch", reason=TORCH_REASON)

    model = noisy_model(hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"]), seed=11)
    return save(model, tmp_path_factory.mktemp("tiny") / "ckpt"), model


# ---- lanes --------------------------------------------------------------------------------------
# Markers, set here from what each test uses (its function, the helpers it calls and its fixtures),
# so that no file has to remember them:
#   slow          builds one of the minutes-long fixtures below (a training run, two-process runs)
#   multiprocess  starts processes (several virtual devices, jax.distributed, grain workers, the CLI)
#   torch         needs torch, the parity oracle (the newest-stack run has none: they skip there)
#   tpu           compiles for a TPU topology with libtpu
# Lanes (README "Tests"): CI runs every test on the oracle stack and `-m "not slow"` on the newest;
# the fast lane is `-m "not slow and not multiprocess and not tpu"`.
import inspect  # noqa: E402
import re  # noqa: E402

SLOW_FIXTURES = {"trained", "runs", "multidevice_process"}
_MULTIPROCESS = re.compile(r"\bsubprocess\b|\bPopen\b|_multidevice|_distributed_train|num_workers=[1-9]")
_TORCH = re.compile(r"\bimport torch\b|importorskip\(\s*[\"']torch[\"']|\btorch\.")
# a module that imports torch (or skips without it) at its top level
_MODULE_TORCH = re.compile(r"^(\w+ = )?(pytest\.importorskip\(\s*[\"']torch[\"']|import torch\b|from torch\b)", re.M)


def _source(function) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def _code_of(item) -> str:
    """The test function's source, its fixtures' and those of the tests' own functions either
    calls (one level down)."""
    functions = [item.function] + [d.func for name in item.fixturenames
                                    for d in item._fixtureinfo.name2fixturedefs.get(name, ())]
    module = vars(item.module)
    called = [module[name] for f in functions for name in getattr(f, "__code__", None) and f.__code__.co_names or ()
              if inspect.isfunction(module.get(name)) and module[name].__module__.startswith("tests")]
    return "\n".join(_source(f) for f in functions + called)


def pytest_collection_modifyitems(config, items):
    for item in items:
        code = _code_of(item)
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        if _MULTIPROCESS.search(code):
            item.add_marker(pytest.mark.multiprocess)
        if (_TORCH.search(code) or _MODULE_TORCH.search(_source(item.module))
                or "tiny_checkpoint" in item.fixturenames):
            item.add_marker(pytest.mark.torch)
        if item.module.__name__.endswith("test_tpu_compile"):
            item.add_marker(pytest.mark.tpu)
