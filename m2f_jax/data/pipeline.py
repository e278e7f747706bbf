"""Batches with static shapes from an indexable dataset: sharding, background prefetch, and a
resumable position.

Each batch is a dict of NumPy arrays (B = ``batch_size`` per process, M = ``max_masks``,
(H, W) = the transform's output size)::

    pixel_values   (B, H, W, 3) float32   NHWC, normalised, 0 in the padding
    pixel_mask     (B, H, W)    int32     1 = image, 0 = padding
    mask_labels    (B, M, H, W) float32   target masks, zeros in unused slots
    class_labels   (B, M)       int32     contiguous class ids, 0 in unused slots
    label_valid    (B, M)       bool      which slots hold a target
    example_index  (B,)         int64     dataset index, -1 for a padding example
    example_valid  (B,)         bool      False only for padding examples (drop_remainder=False)

An example with more than M masks keeps its first M (dataset order) and drops the rest; a
warning is given once.

Order: epoch e visits ``permutation(seed, e)`` of the dataset (the identity with
``shuffle=False``). Process p of P takes positions p, p + P, p + 2P, ... of it, so the shards are
disjoint and every process gets the same number of batches (SPMD needs lockstep):
``drop_remainder=True`` keeps ``len // P`` examples per process and full batches only;
``drop_remainder=False`` covers every example, filling the last batch (and the shards of
processes that come out short) with padding examples.

Randomness of example i in epoch e comes from ``default_rng([seed, 1, e, i])``, so batches do not
depend on ``num_workers`` or thread timing. ``state()`` is the position of the next batch to be
returned; ``restore(state)`` (or ``state=`` in the constructor) resumes there exactly.
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import queue
import threading
import warnings
from typing import Callable, Dict, Iterator, List, Optional

import numpy as np

_END = object()
_STATE_KEYS = ("seed", "num_examples", "batch_size", "process_count", "shuffle", "drop_remainder")


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class _Schedule:
    """What to produce: the order, the shards and the per-example work. Holds no threads, so the
    producer thread refers to this and not to the iterator (which can then be collected)."""

    def __init__(self, dataset, batch_size, transform, max_masks, seed, shuffle, drop_remainder,
                 process_index, process_count, num_epochs):
        self.dataset, self.transform = dataset, transform
        self.batch_size, self.max_masks, self.seed = batch_size, max_masks, int(seed)
        self.shuffle, self.drop_remainder = shuffle, drop_remainder
        self.process_index, self.process_count, self.num_epochs = process_index, process_count, num_epochs
        self.num_examples = len(dataset)
        if drop_remainder:
            self.examples_per_process = self.num_examples // process_count
            self.batches_per_epoch = self.examples_per_process // batch_size
        else:
            self.examples_per_process = math.ceil(self.num_examples / process_count)
            self.batches_per_epoch = math.ceil(self.examples_per_process / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"a dataset of {self.num_examples} examples gives no batch of {batch_size} "
                             f"per process on {process_count} processes with drop_remainder=True.")
        self.warned_truncation = False

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            order = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        shard = order[self.process_index::self.process_count][:self.examples_per_process]
        total = self.batches_per_epoch * self.batch_size
        return np.concatenate([shard, -np.ones(max(total - len(shard), 0), np.int64)])[:total]

    def positions(self, epoch: int, batch: int) -> Iterator[tuple]:
        """(epoch, batch, dataset indices) from the given position on."""
        while self.num_epochs is None or epoch < self.num_epochs:
            indices = self.epoch_indices(epoch)
            for b in range(batch, self.batches_per_epoch):
                yield epoch, b, indices[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, batch = epoch + 1, 0

    def example(self, epoch: int, index: int) -> Optional[Dict[str, np.ndarray]]:
        if index < 0:
            return None
        rng = np.random.default_rng([self.seed, 1, epoch, int(index)])
        return self.transform(self.dataset[int(index)], rng)

    def collate(self, indices: np.ndarray, examples: List[Optional[dict]]) -> Dict[str, np.ndarray]:
        reference = next(e for e in examples if e is not None)
        height, width = reference["pixel_mask"].shape
        size, slots = len(examples), self.max_masks
        batch = {"pixel_values": np.zeros((size, height, width, 3), np.float32),
                 "pixel_mask": np.zeros((size, height, width), np.int32),
                 "mask_labels": np.zeros((size, slots, height, width), np.float32),
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

    def batch_at(self, epoch: int, batch: int) -> Dict[str, np.ndarray]:
        """The batch at one position, computed in the caller's thread."""
        epoch, batch, indices = next(self.positions(epoch, batch))
        return self.collate(indices, [self.example(epoch, i) for i in indices])


def _produce(schedule: _Schedule, epoch: int, batch: int, num_workers: int, prefetch: int,
             stop: threading.Event, out: queue.Queue) -> None:
    """Producer thread: keeps ``prefetch`` batches of example jobs in a pool of ``num_workers``
    threads, collates finished batches in order and queues them as (epoch, batch, arrays)."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    pool = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="m2f-data")
    pending: collections.deque = collections.deque()
    try:
        positions = schedule.positions(epoch, batch)
        while not stop.is_set():
            while len(pending) < prefetch:
                position = next(positions, None)
                if position is None:
                    break
                e, b, indices = position
                pending.append((e, b, indices, [pool.submit(schedule.example, e, i) for i in indices]))
            if not pending:
                put(_END)
                return
            e, b, indices, futures = pending.popleft()
            if not put((e, b, schedule.collate(indices, [f.result() for f in futures]))):
                return
    except BaseException as error:  # handed to the consumer, raised by next()
        put(_Failure(error))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class BatchIterator:
    """Iterates over static-shape batches; see the module docstring.

    Args:
      dataset: ``len`` + ``__getitem__`` giving ``image``, ``masks``, ``class_ids``.
      transform: ``transform(example, rng) -> {"pixel_values", "pixel_mask", "masks",
        "class_ids"}`` with a fixed output size (``augment.TrainTransform`` / ``EvalTransform``).
      process_index, process_count: this process's shard (``jax.process_index()``,
        ``jax.process_count()``); ``batch_size`` is per process.
      num_workers: threads loading and transforming examples (0: everything in the caller's
        thread, no prefetch). prefetch: batches prepared ahead of the one being consumed.
      num_epochs: None iterates forever.
      state: a ``state()`` dict to resume from.

    Background threads start at the first ``next()``; ``close()`` (or a ``with`` block, or
    dropping the iterator) stops them.
    """

    def __init__(self, dataset, batch_size: int, transform: Callable, max_masks: int, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 2, prefetch: int = 2,
                 num_epochs: Optional[int] = None, state: Optional[dict] = None):
        if batch_size < 1 or max_masks < 1:
            raise ValueError(f"batch_size and max_masks must be >= 1, got {batch_size}, {max_masks}.")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, {process_count}.")
        if num_workers < 0 or prefetch < 1:
            raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}.")
        self._thread: Optional[threading.Thread] = None
        self._schedule = _Schedule(dataset, batch_size, transform, max_masks, seed, shuffle, drop_remainder,
                                   process_index, process_count, num_epochs)
        self.num_workers, self.prefetch = num_workers, prefetch
        self._epoch, self._batch = 0, 0
        if state is not None:
            self.restore(state)

    def __getattr__(self, name):  # the settings: batch_size, seed, batches_per_epoch, ...
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._schedule, name)

    # ---- position ------------------------------------------------------------------------

    def state(self) -> dict:
        """JSON-able position of the next batch ``next()`` returns (plus settings it depends on)."""
        return {"epoch": self._epoch, "batch": self._batch,
                **{key: getattr(self._schedule, key) for key in _STATE_KEYS}}

    def restore(self, state: dict) -> None:
        """Moves to ``state``'s position; the next batch is the one that followed it."""
        for key in _STATE_KEYS:
            if key in state and state[key] != getattr(self._schedule, key):
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r}, this iterator "
                                 f"{getattr(self._schedule, key)!r}; the order would differ.")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"invalid position epoch={epoch}, batch={batch} "
                             f"({self.batches_per_epoch} batches per epoch).")
        self._stop_workers()
        self._epoch, self._batch = epoch, batch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This process's dataset indices for ``epoch`` in order, -1 for padding examples."""
        return self._schedule.epoch_indices(epoch)

    # ---- threads -------------------------------------------------------------------------

    def _start_workers(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.prefetch)
        args = (self._schedule, self._epoch, self._batch, self.num_workers, self.prefetch,
                self._stop, self._queue)
        self._thread = threading.Thread(target=_produce, args=args, name="m2f-data-producer", daemon=True)
        self._thread.start()

    def _stop_workers(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ---- iteration -----------------------------------------------------------------------

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self.num_workers == 0:
            arrays = self._schedule.batch_at(self._epoch, self._batch)
        else:
            if self._thread is None:
                self._start_workers()
            item = self._queue.get()
            if item is _END:
                self._stop_workers()
                raise StopIteration
            if isinstance(item, _Failure):
                self._stop_workers()
                raise item.error
            epoch, batch, arrays = item
            assert (epoch, batch) == (self._epoch, self._batch), "producer out of step"
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return arrays

    def close(self) -> None:
        """Stops the background threads (a later ``next()`` restarts them)."""
        self._stop_workers()

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        thread = self.__dict__.get("_thread")
        if thread is not None:
            self._stop.set()  # the producer notices within 50 ms; no join in a finalizer
