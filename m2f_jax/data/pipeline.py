"""Batches with static shapes from an indexable dataset, on grain: the global order, this
process's share of each global batch, worker processes, and a resumable position.

Each batch is a dict of NumPy arrays (B = this process's share of the global ``batch_size``,
M = ``max_masks``, (H, W) = the transform's output size)::

    pixel_values   (B, H, W, 3) float32   NHWC, normalised, 0 in the padding
    pixel_mask     (B, H, W)    int32     1 = image, 0 = padding
    mask_labels    (B, M, H, W) uint8     target masks (0/1), zeros in unused slots; the loss
                                          takes them as they are (a quarter of float32's bytes
                                          from the workers and to the devices)
    class_labels   (B, M)       int32     contiguous class ids, 0 in unused slots
    label_valid    (B, M)       bool      which slots hold a target
    example_index  (B,)         int64     dataset index, -1 for a padding example
    example_valid  (B,)         bool      False only for padding examples (drop_remainder=False)

An example with more than M masks keeps its first M (dataset order) and drops the rest; a
warning is given once.

**Global order, whatever the number of processes.** Epoch e visits ``permutation(seed, e)`` of
the dataset (the identity with ``shuffle=False``), cut into global batches of ``batch_size``;
process p of P takes rows ``[p B, (p + 1) B)`` of each (B = batch_size / P), so the processes'
batches laid end to end (``jax.make_array_from_process_local_data`` over a mesh whose devices are
in process order) are the global batch one process would see, and every process gets the same
number of batches (SPMD needs lockstep). ``drop_remainder=True`` keeps full global batches only;
``drop_remainder=False`` covers every example, filling the last global batch with padding
examples. (grain's stock ``IndexSampler`` shards the records before it shuffles and seeds each
record's randomness by its position in the shard, so its global batches change with the process
count; this order does not.)

Randomness of example i in epoch e comes from ``default_rng([seed, 1, e, i])`` (its dataset
index), so batches depend neither on the process count nor on ``num_workers``.

**grain.** The pipeline is a ``grain.MapDataset``: this process's (epoch, dataset index) positions
as the source, the dataset read and the transform as one map step, the collation as the batch
step; ``num_workers`` > 0 runs the map step in that many worker processes (``mp_prefetch``; they
return examples in order, this process collates them), 0 runs it in the caller's thread. The
iterator is a
``grain.DatasetIterator`` whose state is the position of the next batch, ``{"epoch", "batch"}``
plus the settings the order depends on: JSON, independent of the worker count (resume with other
``num_workers`` and get the same batches), and saved in an Orbax checkpoint by grain's own
handler (``grain.checkpoint.CheckpointSave(iterator)``, one file per process).
Dataset and transform must be picklable when ``num_workers`` > 0 (worker processes are spawned).
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import grain
import numpy as np

# what the global order depends on (not the process count: any count sees the same global batches)
_STATE_KEYS = ("seed", "num_examples", "batch_size", "shuffle", "drop_remainder")
_ENDLESS_EPOCHS = 2 ** 31  # num_epochs=None: a source this long is never exhausted


class _Schedule:
    """What to produce: the global order, this process's rows and the per-example work. Picklable
    (it travels to grain's worker processes)."""

    def __init__(self, dataset, batch_size, transform, max_masks, seed, shuffle, drop_remainder,
                 process_index, process_count, num_epochs):
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.max_masks, self.seed = batch_size, max_masks, int(seed)
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.process_index, self.process_count, self.num_epochs = process_index, process_count, num_epochs
        self.num_examples = len(dataset)
        if batch_size % process_count:
            raise ValueError(f"the global batch size {batch_size} does not divide over {process_count} "
                             "processes; use a multiple of the process count.")
        self.local_batch_size = batch_size // process_count
        if drop_remainder:
            self.batches_per_epoch = self.num_examples // batch_size
        else:
            self.batches_per_epoch = math.ceil(self.num_examples / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"a dataset of {self.num_examples} examples gives no global batch of "
                             f"{batch_size} with drop_remainder=True.")
        self.warned_truncation = False

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's dataset indices for ``epoch`` in order, -1 for padding examples."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        total = self.batches_per_epoch * self.batch_size
        order = np.concatenate([order, -np.ones(max(total - len(order), 0), np.int64)])[:total]
        rows = order.reshape(self.batches_per_epoch, self.process_count, self.local_batch_size)
        return rows[:, self.process_index].reshape(-1)

    def __len__(self) -> int:  # grain's source: this process's (epoch, index) positions
        epochs = _ENDLESS_EPOCHS if self.num_epochs is None else self.num_epochs
        return epochs * self.batches_per_epoch * self.local_batch_size

    def __getitem__(self, position: int) -> Tuple[int, int]:
        per_epoch = self.batches_per_epoch * self.local_batch_size
        epoch, offset = divmod(int(position), per_epoch)
        return epoch, int(self._indices(epoch)[offset])

    def _indices(self, epoch: int) -> np.ndarray:
        cached = self.__dict__.get("_cached")
        if cached is None or cached[0] != epoch:
            cached = self._cached = (epoch, self.epoch_indices(epoch))
        return cached[1]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_cached"}

    def example(self, position: Tuple[int, int]) -> Tuple[int, Any]:
        epoch, index = position
        if index < 0:
            return index, None
        rng = np.random.default_rng([self.seed, 1, epoch, index])
        try:
            return index, self.transform(self.dataset[index], rng)
        except Exception as e:  # raised by __next__, in this process: the workers stay healthy
            return index, _Failed(e)

    def collate(self, items: List[Tuple[int, Any]]) -> Dict[str, np.ndarray]:
        for _, example in items:
            if isinstance(example, _Failed):  # raised by __next__, where no example is held
                return {_FAILED: example.error}
        indices = [index for index, _ in items]
        examples = [example for _, example in items]
        reference = next(e for e in examples if e is not None)
        height, width = reference["pixel_mask"].shape
        size, slots = len(examples), self.max_masks
        batch = {"pixel_values": np.zeros((size, height, width, 3), np.float32),
                 "pixel_mask": np.zeros((size, height, width), np.int32),
                 "mask_labels": np.zeros((size, slots, height, width), np.uint8),
                 "class_labels": np.zeros((size, slots), np.int32),
                 "label_valid": np.zeros((size, slots), bool),
                 "example_index": np.asarray(indices, np.int64),
                 "example_valid": np.asarray([e is not None for e in examples])}
        for i, example in enumerate(examples):
            if example is None:
                continue
            if example["pixel_mask"].shape != (height, width):
                raise ValueError(f"the transform gave sizes {(height, width)} and "
                                 f"{example['pixel_mask'].shape} in one batch; batches need a fixed output size.")
            count = min(len(example["class_ids"]), slots)
            if len(example["class_ids"]) > slots and not self.warned_truncation:
                self.warned_truncation = True
                warnings.warn(f"an example has {len(example['class_ids'])} masks, more than max_masks={slots}; "
                              "the masks past the first max_masks are dropped.", stacklevel=2)
            batch["pixel_values"][i] = example["pixel_values"]
            batch["pixel_mask"][i] = example["pixel_mask"]
            batch["mask_labels"][i, :count] = example["masks"][:count]
            batch["class_labels"][i, :count] = example["class_ids"][:count]
            batch["label_valid"][i, :count] = True
        return batch


_FAILED = "_failed"  # the key of a batch that holds an example's error instead of arrays


class _Failed:
    """An example whose reading or transform raised: it travels from a worker like an example and
    its batch holds only the error, which ``__next__`` raises. An error raised inside grain would
    stop the workers and keep the examples in flight alive in its traceback: their shared memory
    would outlive the process (Python warns at exit about each one)."""

    def __init__(self, error: Exception):
        self.error = error


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """grain's ``worker_init_fn``: the worker ends as soon as the process that started it is gone.
    A trainer killed by a signal it cannot catch (SIGKILL, the OOM killer, a preempted node's
    agent) never stops its workers, which would otherwise hold their memory and shared-memory
    blocks until the host reboots. A daemon thread polls the parent's pid (POSIX and macOS alike,
    unlike Linux's PR_SET_PDEATHSIG, which follows the parent *thread*)."""
    import os
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="m2f-jax-exit-with-parent", daemon=True).start()


def absl_flags_parsed() -> None:
    """grain (in its prefetch threads) and Orbax read absl flags; a program that does not run
    absl.app (ours, pytest, a notebook) has not parsed flags, which they report as an error. Mark
    them parsed (their defaults) when nobody has."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class BatchIterator(grain.DatasetIterator):
    """Iterates over static-shape batches; see the module docstring.

    Args:
      dataset: ``len`` + ``__getitem__`` giving ``image``, ``masks``, ``class_ids``.
      batch_size: the global batch (all processes together); each process gets
        ``batch_size // process_count`` rows (it must divide).
      transform: ``transform(example, rng) -> {"pixel_values", "pixel_mask", "masks",
        "class_ids"}`` with a fixed output size (``augment.TrainTransform`` / ``EvalTransform``).
      process_index, process_count: this process's share (``jax.process_index()``,
        ``jax.process_count()``).
      num_workers: grain worker processes (0: everything in the caller's thread, no prefetch).
      prefetch: batches each worker prepares ahead.
      num_epochs: None iterates forever.
      state: a ``get_state()`` dict to resume from.

    Workers start at the first ``next()``; ``close()`` (or a ``with`` block) stops them.
    """

    def __init__(self, dataset, batch_size: int, transform: Callable, max_masks: int, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 2, prefetch: int = 2,
                 num_epochs: Optional[int] = None, state: Optional[dict] = None):
        super().__init__()
        if batch_size < 1 or max_masks < 1:
            raise ValueError(f"batch_size and max_masks must be >= 1, got {batch_size}, {max_masks}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}.")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}.")
        self._schedule = _Schedule(dataset, batch_size, transform, max_masks, seed, shuffle, drop_remainder,
                                   process_index, process_count, num_epochs)
        self.num_workers, self.prefetch = num_workers, prefetch
        self._epoch, self._batch = 0, 0
        self._iterator = None
        if state is not None:
            self.set_state(state)

    def __getattr__(self, name):  # the settings: batch_size, seed, batches_per_epoch, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._schedule, name)

    # ---- position ------------------------------------------------------------------------

    def get_state(self) -> dict:
        """JSON-able position of the next batch ``next()`` returns (plus settings it depends on)."""
        return {"epoch": self._epoch, "batch": self._batch,
                **{key: getattr(self._schedule, key) for key in _STATE_KEYS}}

    def set_state(self, state: dict) -> None:
        """Moves to ``state``'s position; the next batch is the one that followed it."""
        for key in _STATE_KEYS:
            if key in state and state[key] != getattr(self._schedule, key):
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this iterator "
                                 f"{getattr(self._schedule, key)!r}; the order would differ.")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"invalid position epoch={epoch}, batch={batch} "
                             f"({self.batches_per_epoch} batches per epoch).")
        self.close()
        self._epoch, self._batch = epoch, batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's dataset indices for ``epoch`` in order, -1 for padding examples."""
        return self._schedule.epoch_indices(epoch)

    # ---- grain ---------------------------------------------------------------------------

    def _pipeline(self) -> grain.IterDataset:
        schedule = self._schedule
        start = (self._epoch * schedule.batches_per_epoch + self._batch) * schedule.local_batch_size
        examples = grain.MapDataset.source(schedule)[start:].map(schedule.example)
        if self.num_workers == 0:
            examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        else:
            # Workers send examples (their masks unpadded) and this process collates: padding M
            # slots in the workers would send ~4x the bytes through shared memory.
            absl_flags_parsed()
            examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            # Examples travel in shared memory (grain's default): through the worker queues'
            # pipes, a worker still flushing its queue when the iterator stops does not exit, and
            # grain waits 25 s before it kills it.
            examples = examples.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=self.num_workers,
                                             per_worker_buffer_size=self.prefetch * schedule.local_batch_size),
                worker_init_fn=exit_with_parent)
        return examples.batch(schedule.local_batch_size, batch_fn=schedule.collate)

    # ---- iteration -----------------------------------------------------------------------

    def __next__(self) -> Dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._iterator is None:
            self._iterator = iter(self._pipeline())
        try:
            arrays = next(self._iterator)
        except BaseException:
            self.close()
            raise
        if _FAILED in arrays:
            self.close()
            raise arrays[_FAILED]
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return arrays

    def close(self) -> None:
        """Stops the worker processes (a later ``next()`` starts them again at the position)."""
        iterator, self._iterator = self.__dict__.get("_iterator"), None
        if iterator is not None:
            iterator.close()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
