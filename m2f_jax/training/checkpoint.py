"""Training checkpoints: a thin wrapper over Orbax's ``CheckpointManager``.

Each checkpoint is a step directory holding two items:

* ``state``: the :class:`~m2f_jax.training.train_step.TrainState` arrays (step, params, optimizer
  state, raw rng key data), saved with ``StandardSave``;
* ``extra``: a JSON dict for what is not an array: the config, anything the loop needs to
  continue exactly;
* ``data`` (when given): the input pipeline's iterator state, written by grain's own Orbax
  handler, one file per process (``process_<i>-of-<n>.json``).

With several processes (``jax.distributed``) every process calls ``save`` and ``restore`` with
the same step: Orbax writes one checkpoint (the replicated arrays once, the JSON item from the
primary process, each process its iterator file) and renames it into place when all are done.

Crash safety comes from Orbax: a step is written into ``<step>.orbax-checkpoint-tmp*`` and
renamed to ``<step>`` only once complete (on a local or POSIX filesystem the rename is atomic),
and step listing ignores tmp directories, so a save interrupted at any point leaves the previous
checkpoint as the latest one. A manager opening the directory deletes leftover tmp directories in
the background (``cleanup_tmp_directories``; ``wait_until_finished`` waits for it).
``tests/test_checkpoint.py`` kills a process inside a save to check all this.

Damage after the save (a file truncated or deleted, flipped bytes, lost metadata) is detected:
every array's CRC-32 is kept in ``extra`` (``_checksums``) and checked after a restore, and a
step whose restore fails or whose arrays do not match is skipped by :meth:`restore_latest`,
which falls back to the newest intact checkpoint (saying so in one line on stderr) or raises
:class:`DamagedCheckpointError` when none is intact. What Orbax and TensorStore log or print while
a damaged step fails to restore (possibly a traceback per array) is dropped: the first line of
their exception is in the warning, the whole exception is chained to the error.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import zlib
from typing import Any, Dict, Mapping, Optional, Tuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


CHECKSUMS = "_checksums"
# Orbax splits the writing of a replicated array over its replicas, slicing each array on its
# devices with eager ops (one small compile per shape: ~5 s per save of the tiny model's ~450
# arrays on 4 devices). Arrays under this many bytes per replica are written whole by one replica.
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _register_array_handler() -> None:
    """Orbax's jax.Array handler with :data:`MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL` (process-wide,
    as Orbax's registry is)."""
    from absl import logging
    from orbax.checkpoint import type_handlers

    handler = type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns that it replaces its default handler
    try:
        type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        logging.set_verbosity(verbosity)


class DamagedCheckpointError(ValueError):
    """No checkpoint in the directory could be restored intact."""


class _CapturedOutput:
    text = ""


@contextlib.contextmanager
def _captured_output():
    """Holds back what is logged (Python and absl logging), written to ``sys.stderr`` or written to
    file descriptor 2 (TensorStore's C++ logs) inside the block; yields an object whose ``text``
    is what was written (not the log records), for the caller to pass on or drop."""
    captured = _CapturedOutput()
    previous_disable = logging.root.manager.disable
    previous_stderr = sys.stderr
    text = io.StringIO()
    sys.stderr.flush()
    try:
        saved_fd = os.dup(2)
    except OSError:  # no file descriptor 2: nothing below Python to hold back
        saved_fd = None
    with tempfile.TemporaryFile() as sink:
        if saved_fd is not None:
            os.dup2(sink.fileno(), 2)
        logging.disable(logging.CRITICAL)
        sys.stderr = text
        try:
            yield captured
        finally:
            sys.stderr = previous_stderr
            logging.disable(previous_disable)
            if saved_fd is not None:
                os.dup2(saved_fd, 2)
                os.close(saved_fd)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace") + text.getvalue()


def _host_array(leaf) -> np.ndarray:
    """A leaf's whole value on this host: a replicated global array (several processes) has it on
    each of this process's devices."""
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.sharding.is_fully_replicated:
            raise ValueError("checkpoint checksums need the state replicated on every process "
                             f"(data parallelism), got an array sharded as {leaf.sharding}.")
        leaf = leaf.addressable_data(0)
    return np.ascontiguousarray(jax.device_get(leaf))


def checksums(state) -> Dict[str, int]:
    """CRC-32 of every array of ``state`` (its bytes on the host), by tree path."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = _host_array(leaf)
        out[jax.tree_util.keystr(path)] = zlib.crc32(array.tobytes()) ^ zlib.crc32(repr((array.dtype.str, array.shape)).encode())
    return out


class _SavedPosition(grain.DatasetIterator):
    """An input position already read (``BatchIterator.get_state()``), for grain's checkpoint
    handler: the loop may have moved the iterator on since that position was the one to save."""

    def __init__(self, position: Mapping[str, Any]):
        super().__init__()
        self._position = dict(position)

    def get_state(self) -> dict:
        return self._position

    def set_state(self, state) -> None:
        self._position = dict(state)

    def __next__(self):
        raise TypeError("a saved input position is not an iterator")


def abstract_state(state) -> Any:
    """``ShapeDtypeStruct`` tree (with shardings) of a live state, e.g. a freshly built one:
    what :meth:`CheckpointManager.restore_latest` needs to restore onto the same devices."""

    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map(spec, state)


class CheckpointManager:
    """``CheckpointManager(directory, save_every=N, keep=k)``.

    ``save(step, state, extra, data=iterator)`` writes when ``step`` is a multiple of
    ``save_every`` (or ``force=True``) and keeps the ``keep`` newest;
    ``restore_latest(abstract_state, data=iterator)`` returns ``(state, extra)`` of the newest
    complete checkpoint (moving ``iterator`` to its saved position), or None when there is none.
    Saves are asynchronous by default (``async_save``): the arrays are copied off the devices
    before ``save`` returns, the writing goes on in the background, and the next ``save``,
    ``wait_until_finished`` or ``close`` waits for it.
    """

    def __init__(
        self,
        directory,
        *,
        save_every: int = 1,
        keep: Optional[int] = 3,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}.")
        # Orbax needs an absolute path; a relative one is taken from the working directory
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        _register_array_handler()
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "extra", "data"), options=options
        )

    def save(
        self, step: int, state, extra: Optional[Mapping[str, Any]] = None, *, data=None, force: bool = False
    ) -> bool:
        """Saves if due (see class docstring); returns whether a save started."""
        step = int(step)
        # Decided here: Orbax's own interval check also saves the first step it sees.
        if not force and step % self.save_every:
            return False
        extra = dict(extra or {})
        extra[CHECKSUMS] = checksums(state)
        items = dict(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra))
        if data is not None:  # an iterator (its state is read now, before save returns) or its state
            position = _SavedPosition(data) if isinstance(data, Mapping) else data
            items["data"] = grain.checkpoint.CheckpointSave(position)
        args = ocp.args.Composite(**items)
        return self._manager.save(step, args=args, force=True)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def restore(self, step: int, abstract_state, *, data=None) -> Tuple[Any, dict]:
        """``abstract_state``: the state's tree of ``jax.ShapeDtypeStruct`` (with shardings, see
        :func:`abstract_state`) or a live state of the same structure. ``data``: the input
        iterator, moved to the saved position when the checkpoint has one for this process (else
        the caller positions it, e.g. from ``extra``). Raises
        :class:`DamagedCheckpointError` when the step cannot be read or its arrays do not match
        the checksums saved with them."""
        where = os.path.join(os.fspath(self.directory), str(int(step)))
        items = dict(state=ocp.args.StandardRestore(abstract_state), extra=ocp.args.JsonRestore())
        own = os.path.join(where, "data", f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if data is not None and os.path.isfile(own):  # else the caller positions it (another process count)
            items["data"] = grain.checkpoint.CheckpointRestore(data)
        with _captured_output() as output:
            try:
                restored, error = self._manager.restore(int(step), args=ocp.args.Composite(**items)), None
            except Exception as e:  # the files are at fault: Orbax and tensorstore raise many kinds
                restored, error = None, e
        if error is not None:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            raise DamagedCheckpointError(f"{where} cannot be read ({type(error).__name__}: {first})") from error
        sys.stderr.write(output.text)  # an intact step's messages are the user's to see
        state, extra = restored["state"], dict(restored["extra"] or {})
        expected = extra.pop(CHECKSUMS, None)
        if expected is None:
            raise DamagedCheckpointError(f"{where} has no array checksums (its metadata is incomplete)")
        actual = checksums(state)
        bad = sorted(name for name in actual if expected.get(name) != actual[name])
        if bad or set(expected) != set(actual):
            raise DamagedCheckpointError(
                f"{where} is damaged: {len(bad)} array(s) differ from their saved checksums ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''})")
        return state, extra

    def restore_latest(self, abstract_state, *, data=None) -> Optional[Tuple[Any, dict]]:
        """The newest intact checkpoint ``(state, extra)``, or None when there is none at all.
        Damaged newer ones are skipped and deleted (the resumed run saves those steps again),
        with one line on stderr naming them, why, and the step resumed from; when every one is
        damaged, :class:`DamagedCheckpointError` names them and nothing is deleted. With several
        processes every process calls this."""
        steps = sorted(self.all_steps(), reverse=True)
        problems, damaged = [], []
        for step in steps:
            try:
                restored = self.restore(step, abstract_state, data=data)
            except DamagedCheckpointError as e:
                problems.append(str(e))
                damaged.append(step)
                continue
            if problems:
                names = ", ".join(map(str, damaged))
                print(f"warning: skipped checkpoint step(s) {names}: {'; '.join(problems)}; resuming from step "
                      f"{step}, the newest intact checkpoint; deleting the damaged step(s) {names}", file=sys.stderr)
                for bad in damaged:
                    self._manager.delete(bad)
            return restored
        if problems:
            raise DamagedCheckpointError(f"no intact checkpoint in {os.fspath(self.directory)}: " + "; ".join(problems))
        return None

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
