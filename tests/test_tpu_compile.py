"""The programs a TPU user runs compile for a TPU, on this CPU-only machine: libtpu compiles for a
named topology (a v5e 2x2 slice, 4 chips, 16 GiB each) without a TPU. Checked: the traced program
is the "xla" variant (no CPU machinery), the compiled outputs have the shapes the model defines,
and the per-chip memory XLA reports fits the chip."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip(
    "libtpu", reason='needs libtpu (pip install "jax[tpu]==<jax version>"): it compiles for a TPU topology on a CPU'
)

from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from m2f_jax.config import Mask2FormerConfig  # noqa: E402
from m2f_jax.modeling import variants  # noqa: E402
from m2f_jax.modeling.mask2former import Mask2FormerForUniversalSegmentation  # noqa: E402
from m2f_jax.training import train_step as ts  # noqa: E402
from m2f_jax.training.optimizer import make_optimizer  # noqa: E402
from tests import _multidevice_check as md  # noqa: E402
from tests.hf_models import TINY, hf_config  # noqa: E402

V5E_HBM = 16 * 2**30


@pytest.fixture(scope="module")
def v5e():
    """The 4 chips of a v5e 2x2 slice (libtpu reads the host's TPU type from these variables)."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices


def _per_chip_bytes(compiled) -> int:
    ma = compiled.memory_analysis()
    return ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes


def _abstract(tree, sharding=None):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _compiled_forward(config, devices, size, dtype):
    """The jitted forward of ``config`` at ``size``, batch 1, compiled for one chip."""
    module = Mask2FormerForUniversalSegmentation(config, dtype=dtype, variant=variants.resolve(None, "tpu"))
    one_chip = NamedSharding(Mesh(np.array(devices[:1]), ("d",)), P())
    x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32, sharding=one_chip)
    params = _abstract(jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, x.dtype))["params"],
                       one_chip)

    def forward(params, x):
        out = module.apply({"params": params}, x)
        return out.class_queries_logits, out.masks_queries_logits

    assert variants.cpu_machinery(forward, params, x) == set()
    return jax.jit(forward).lower(params, x).compile()


def test_tpu_compile_tiny_forward(v5e):
    config = Mask2FormerConfig.from_dict(hf_config(TINY["backbone"], TINY["model"], TINY["num_labels"]).to_dict())
    compiled = _compiled_forward(config, v5e, (64, 96), jnp.float32)
    classes, masks = compiled.out_info
    assert classes.shape == (1, config.num_queries, config.num_labels + 1)
    assert masks.shape == (1, config.num_queries, 64 // 4, 96 // 4)
    assert _per_chip_bytes(compiled) <= V5E_HBM


def _train_inputs():
    module, loss_config, params, batch = md.setup()
    optimizer = make_optimizer(params, **md.OPTIMIZER)
    state = jax.eval_shape(lambda p: ts.TrainState.create(p, optimizer.tx, jax.random.key(md.SEED)), params)
    return module, loss_config, optimizer, state, batch


def test_tpu_compile_sharded_train_step(v5e):
    module, loss_config, optimizer, state, batch = _train_inputs()
    mesh = ts.make_mesh(v5e)
    step = ts.make_sharded_train_step(module, loss_config, optimizer, mesh)
    state = _abstract(state, NamedSharding(mesh, P()))
    batch = _abstract(batch, NamedSharding(mesh, P(ts.MESH_AXIS)))
    assert variants.cpu_machinery(step, state, batch) == set()
    compiled = step.lower(state, batch).compile()
    new_state, metrics = compiled.out_info
    assert metrics["loss"].shape == ()
    assert _per_chip_bytes(compiled) <= V5E_HBM
