"""One process per host: JAX's distributed runtime, the global device mesh, global batches from
process-local rows, and checks that the processes agree.

``initialize`` must run before anything touches a JAX backend. Afterwards the train loop is the
single-process one over a mesh of every device of every process: the state is replicated,
each batch is split on its leading axis, and each process supplies the rows its own devices hold
(``jax.make_array_from_process_local_data``).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from m2f_jax.data.pipeline import absl_flags_parsed
from m2f_jax.training.train_step import MESH_AXIS, make_mesh


class DistributedError(RuntimeError):
    """The processes of one run cannot start together or disagree."""


def cluster_detected() -> bool:
    """Whether the environment is a multi-process launch JAX sets itself up for
    (``jax.distributed.initialize()`` with no arguments): a SLURM job step or an Open MPI job of
    several tasks, or a Cloud TPU slice of several hosts."""
    env = os.environ
    if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    # several host names; a value with spaces is not one (JAX's TPU set-up can leave a warning text
    # there on a host that is not a TPU VM, and child processes inherit it)
    hosts = env.get("TPU_WORKER_HOSTNAMES", "").split(",")
    return len(hosts) > 1 and all(h and not any(c.isspace() for c in h) for h in hosts)


def initialize(
    coordinator_address: Optional[str] = None,
    num_processes: Optional[int] = None,
    process_id: Optional[int] = None,
    *,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Starts JAX's distributed runtime when asked (``coordinator_address``/``num_processes``/
    ``process_id``, all three, or ``auto``) or when :func:`cluster_detected`; returns whether it
    did. CPU devices then use gloo collectives (a CPU-only run across processes, e.g. the test).
    A process other than 0 raises :class:`DistributedError` naming the coordinator when its port
    does not answer within ``timeout_s``; when the processes do not all join within it, JAX
    ends the process (SIGABRT) after a line on stderr that says why."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise DistributedError("--coordinator-address, --num-processes and --process-id go together "
                               f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}).")
    if coordinator_address is None and not (auto or cluster_detected()):
        return False
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id must be in [0, {num_processes}), got {process_id}.")
    if coordinator_address is not None and process_id != 0:
        _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _orbax_barriers_wait()
    # JAX ends the process (SIGABRT) when the runtime does not start in time: say why first.
    watchdog = threading.Timer(timeout_s, lambda: print(
        f"error: the distributed runtime has not started after {timeout_s} s: not every one of the "
        f"{num_processes or 'cluster'} processes joined the coordinator at {coordinator_address or 'the cluster address'} "
        "(JAX ends this process if they do not within 2 s). Start every process with the same "
        "--coordinator-address and --num-processes, or raise --distributed-timeout.", file=sys.stderr, flush=True))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(timeout_s) + 2)
    except Exception as e:  # e.g. a cluster-detection ValueError, or JAX's backends already started
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise DistributedError(f"could not start the distributed runtime: {type(e).__name__}: {first}") from e
    finally:
        watchdog.cancel()
    if jax.default_backend() == "cpu":
        # A gloo program taken from JAX's persistent compilation cache by one process while another
        # compiled it deadlocked in its first collective (jax 0.12.1, two CPU processes): no cache.
        jax.config.update("jax_enable_compilation_cache", False)
    return True


def _wait_for_coordinator(address: str, timeout_s: float, process_id: int, num_processes: int) -> None:
    """Connects to the coordinator's port until it answers; a clear error after ``timeout_s``
    (JAX itself would end the process with SIGABRT)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator-address must be HOST:PORT, got {address!r}.")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"process {process_id} of {num_processes} could not reach the coordinator at {address} "
                    f"within {timeout_s} s ({e.strerror or e}). Start process 0 with the same "
                    "--coordinator-address (its host and a free port) and check that this host can reach it."
                ) from None
            time.sleep(0.5)


def _orbax_barriers_wait() -> None:
    """Orbax's own barriers (creating, saving, restoring checkpoints) are device collectives by
    default, which gloo abandons after 30 s: a host still compiling or validating would fail the
    others. Its absl flag switches them to the distributed runtime's barrier, which waits."""
    from absl import flags
    from orbax.checkpoint import multihost  # noqa: F401  (defines the flag)

    absl_flags_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


_barriers = [0]


def barrier(name: str, timeout_s: int) -> None:
    """Waits until every process gets here (the distributed runtime's barrier through Orbax, which
    waits up to ``timeout_s``; a device collective would give up after gloo's 30 s on CPU). Before the first
    collective of a phase whose length differs between processes (start-up, compiling,
    validation on process 0). A no-op on one process."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    _barriers[0] += 1
    multihost.sync_global_processes(f"m2f_jax_{name}_{_barriers[0]}", timeout=int(timeout_s))


def global_mesh() -> Mesh:
    """A 1-D ``"data"`` mesh over every device of every process, in process order (so that the
    processes' rows of a batch laid end to end are the global batch)."""
    return make_mesh(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))


def local_batch_size(global_batch: int, mesh: Mesh) -> int:
    """This process's rows of a global batch; a clear error when it does not divide."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch % devices:
        raise DistributedError(
            f"the global batch size {global_batch} does not divide over the {devices} devices "
            f"({processes} process(es) x {jax.local_device_count()} local devices); use a multiple of {devices}.")
    return global_batch // processes


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
    """The global batch from each process's rows, split on the leading axis over ``mesh``."""
    sharding = NamedSharding(mesh, P(MESH_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree, mesh: Mesh):
    """Host (or single-device) arrays, the same on every process -> arrays replicated on ``mesh``."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def local_copy(tree):
    """Replicated global arrays -> this process's copy on its first device (readable with
    ``np.asarray``, usable by a single-device program such as validation)."""
    return jax.tree_util.tree_map(lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, tree)


def fingerprint(value: Any) -> int:
    """A 63-bit digest of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def check_agreement(values: Mapping[str, Any]) -> None:
    """Raises :class:`DistributedError` (on every process) naming what differs between processes
    and which processes disagree with process 0. One host collective; a no-op on one process."""
    if jax.process_count() == 1:
        return
    names = sorted(values)
    mine = np.asarray([fingerprint(values[n]) for n in names], np.int64)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # (processes, len(names))
    differ = [(n, [p for p in range(len(everyone)) if everyone[p, i] != everyone[0, i]])
              for i, n in enumerate(names)]
    differ = [(n, ps) for n, ps in differ if ps]
    if differ:
        what = "; ".join(f"{n} (process(es) {', '.join(map(str, ps))} differ from process 0)" for n, ps in differ)
        raise DistributedError(f"the processes of this run disagree: {what}. Start every process with the "
                               "same arguments, data and checkpoint folder.")


def any_process(flags: Mapping[str, bool]) -> Dict[str, list]:
    """For each flag, the processes where it is set (one host collective; no collective on one
    process)."""
    names = sorted(flags)
    mine = np.asarray([bool(flags[n]) for n in names], np.int32)
    if jax.process_count() == 1:
        return {n: [0] if mine[i] else [] for i, n in enumerate(names)}
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(names))
    return {n: [int(p) for p in np.flatnonzero(everyone[:, i])] for i, n in enumerate(names)}
