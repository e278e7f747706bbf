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
