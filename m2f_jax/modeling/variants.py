"""Which implementation of the hot layers a program is traced with: the one switch for
backend-specific machinery.

Two variants, the same parameters, the same outputs (both parity-tested against transformers):

* ``"xla"`` (GPU, TPU and any other platform): the plain program. Linear layers are
  ``x @ W + b`` and convolutions ``lax.conv_general_dilated``, both differentiated by JAX; the
  multi-scale deformable attention reads each sample's four corners with one row gather from a
  corner table, also differentiated by JAX (``jax.grad`` and ``jax.jvp`` both work); the loss
  samples the masks through a 128-lane window table, takes ``lax.top_k`` and writes its
  prediction levels out without a loop (``criterion.py``); the gather layouts are the ones XLA's
  TPU cost model charges least for (``benchmarks/tpu_cost.py``).
* ``"cpu"``: what runs faster on XLA:CPU (``benchmarks/bench_train.py``): hand-written backward
  passes for Linear and convolution layers (``dense.py``, ``conv.py``), the deformable attention
  in a ``lax.scan`` with a hand-written backward and a ``vmap`` rule (``deformable.py``), the
  loss's bisection top-k and ``lax.map`` over levels, and in the train step one independent
  chain of examples per core plus XLA:CPU compiler options (``train_step.py``). These use
  ``custom_vjp``, so ``jax.jvp`` does not go through them.

The variant follows the platform the program is compiled for, not the host's default backend:
the entry points resolve it from their devices (``m2f_jax.load``: the default device;
``make_sharded_train_step``: the mesh; ``make_pmap_train_step``: the local devices) and a caller
that compiles for other devices passes ``platform=`` (e.g. a TPU program compiled from a CPU host).
To override it for a whole model, construct ``Mask2FormerForUniversalSegmentation(config,
variant="xla")`` (or ``"cpu"``); layers used on their own read :func:`current`, which
``use(...)`` sets::

    with m2f_jax.modeling.variants.use("xla"):
        out = swin.apply(params, pixels)  # traced with the plain program

Layers ask once, at trace time; a jitted function keeps the variant it was traced with.

**Scanned layers** (MaxText's ``scan_layers``), a setting beside the variant: the repeated layers
(Swin blocks in (regular, shifted) pairs, the pixel decoder's encoder layers, the transformer
decoder's layers in rounds of one per feature level) run as one ``lax.scan`` over their stacked
parameters, each trip under ``jax.checkpoint`` with the named policy :data:`REMAT_POLICY`, so that
the compiled program does not grow with depth. Off: the same layers unrolled. The parameters are
the unrolled ones either way (``blocks_0``, ``layers_0``, ...); the scanning module stacks them
when it is called. Default (None): on for the "xla" variant (the deviceless v5e forward compiles
1.4-1.5x faster, ``benchmarks/README.md``), off for "cpu" (not measured there). Set it for a whole
model with ``Mask2FormerForUniversalSegmentation(config, scan_layers=...)``; layers used on their
own read :func:`scan_layers`, which ``use_scan_layers(...)`` sets.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = ("xla", "cpu")

# Platform -> variant. Platforms not listed get "xla".
PLATFORM_VARIANTS = {"cpu": "cpu"}

_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("m2f_jax_variant", default=None)


def for_platform(platform: Optional[str] = None) -> str:
    """The variant for ``platform`` ("cpu", "gpu", "tpu", ...; default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    return PLATFORM_VARIANTS.get(platform, "xla")


def check(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    return variant


def resolve(variant: Optional[str] = None, platform: Optional[str] = None) -> str:
    """``variant`` if given, else the one ``use`` set, else the one for ``platform``."""
    if variant is not None:
        return check(variant)
    return _current.get() or for_platform(platform)


def current() -> str:
    """The variant a layer traces now (see the module docstring)."""
    return resolve()


@contextlib.contextmanager
def use(variant: str) -> Iterator[str]:
    """Layers traced inside this block use ``variant``."""
    token = _current.set(check(variant))
    try:
        yield variant
    finally:
        _current.reset(token)


_scan_layers: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("m2f_jax_scan_layers", default=None)

# Saves the matmuls with no batch dimension (the layers' projections) and recomputes the rest of a
# trip (attention products, norms, activations) in the backward, as MaxText's "minimal" policy.
REMAT_POLICY = "dots_with_no_batch_dims_saveable"


def resolve_scan_layers(scan: Optional[bool] = None, variant: Optional[str] = None) -> bool:
    """``scan`` if given, else the one ``use_scan_layers`` set, else on for the "xla" variant."""
    if scan is not None:
        return bool(scan)
    current_scan = _scan_layers.get()
    if current_scan is not None:
        return current_scan
    return resolve(variant) == "xla"


def scan_layers() -> bool:
    """Whether a layer stack traced now runs as a scan (see the module docstring)."""
    return resolve_scan_layers()


@contextlib.contextmanager
def use_scan_layers(scan: bool) -> Iterator[bool]:
    """Layer stacks traced inside this block are scanned (True) or unrolled (False)."""
    token = _scan_layers.set(bool(scan))
    try:
        yield bool(scan)
    finally:
        _scan_layers.reset(token)


def scan_trips(body: Callable, carry: Any, trips: Sequence[Any]) -> Tuple[Any, Any]:
    """``lax.scan`` of ``body(carry, trip) -> (carry, y)`` over ``trips`` (one pytree per trip, all
    of one structure: the trip's parameters, dropout keys, rates), stacked here, each trip under
    ``jax.checkpoint`` with :data:`REMAT_POLICY`. Returns (carry, ys stacked on a leading axis)."""
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *trips)
    policy = getattr(jax.checkpoint_policies, REMAT_POLICY)
    return jax.lax.scan(jax.checkpoint(body, policy=policy, prevent_cse=False), carry, stacked)


def unstack(tree: Any, count: int) -> list:
    """The ``count`` slices of a pytree of arrays stacked on a leading axis, as a list."""
    return [jax.tree.map(lambda leaf: leaf[i], tree) for i in range(count)]


def platform_of(devices) -> str:
    """The platform of a mesh, a sharding or a sequence of devices (they must agree)."""
    if hasattr(devices, "device_set"):  # a Sharding
        flat = list(devices.device_set)
    elif hasattr(devices, "devices"):  # a Mesh
        flat = list(np.asarray(devices.devices).flat)
    else:
        flat = list(np.asarray(devices, dtype=object).flat)
    platforms = {d.platform for d in flat}
    if len(platforms) != 1:
        raise ValueError(f"devices of one program must share a platform, got {sorted(platforms)}.")
    return platforms.pop()


def equations(jaxpr, loop_depth: int = 0):
    """Every equation of ``jaxpr`` and of all its sub-jaxprs (scan and while bodies, custom_vjp
    and custom_vmap calls, pjit, remat), as (loop_depth, eqn): the number of scans and while
    loops around the equation."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    for eqn in jaxpr.eqns:
        yield loop_depth, eqn
        inner_depth = loop_depth + (eqn.primitive.name in ("scan", "while"))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
                    yield from equations(sub, inner_depth)


def cpu_machinery(fn, *args) -> set:
    """The "cpu" variant's primitives (custom_vjp / custom_vmap calls) in ``fn(*args)`` as traced
    now: empty for a program of the "xla" variant."""
    names = {eqn.primitive.name for _, eqn in equations(jax.make_jaxpr(fn)(*args))}
    return {name for name in names if name.startswith(("custom_vjp", "custom_vmap"))}
