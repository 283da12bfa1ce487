"""Deterministic, step-indexed batch loading: the part every project's loaders share.

Training batches are a pure function of `(seed, step)`: the training stream is the
concatenation of epochs, each a seeded permutation of the split, and the example at
global position `i` is augmented with a generator keyed by `(seed, epoch, index)`.
A run resumed at step `s` (`iterate(start_step=s)`) therefore sees exactly the batches
an uninterrupted run would have seen, whatever the number of workers.

Parallelism comes from Grain (`grain.MapDataset`): threads within a process
(`num_threads`; numpy and PIL release the GIL for the heavy work) and optionally
worker processes (`num_workers`, Grain's `mp_prefetch`, which keeps the output order).
Without Grain installed the same batches are produced by a thread pool.

Batch sizes are global (the Scenic convention): with `process_count` hosts each host
loads its contiguous slice `[process_index * b, (process_index + 1) * b)` of every
global batch, `b = batch_size // process_count`, and may reshape it to
`[num_shards, b // num_shards, ...]` for `pmap`.

A project subclasses `StepIndexedLoader` with its `example(position)` (read and augment)
and `collate(examples)` (stack into a batch), and `SplitPass` for evaluation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# A stream long enough to never run out (Grain datasets need a finite length).
ENDLESS_STEPS = 2**40
# Domain tags keep the permutation and augmentation streams of one seed independent.
_PERMUTATION_TAG, _AUGMENTATION_TAG = 0, 1
BACKENDS = ('auto', 'grain', 'threads')


def have_grain() -> bool:
  try:
    import grain  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in training epoch `epoch`: `int64 [num_examples]`."""
  return np.random.default_rng([seed, _PERMUTATION_TAG, epoch]).permutation(num_examples)


def local_batch_size(batch_size: int, process_count: int, num_shards: int | None) -> int:
  """This process's share of a global batch; an error unless it divides evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f'global batch size {batch_size} must be a positive multiple of the process count '
        f'{process_count}'
    )
  local = batch_size // process_count
  if num_shards and local % num_shards:
    raise ValueError(
        f'per-process batch size {local} (global {batch_size} / {process_count} processes) '
        f'must be a multiple of num_shards={num_shards}'
    )
  return local


def shard(batch: dict, num_shards: int | None) -> dict:
  """Reshapes every array `[b, ...]` to `[num_shards, b // num_shards, ...]` (Scenic `shard`)."""
  if not num_shards:
    return batch
  return {k: v.reshape((num_shards, -1) + v.shape[1:]) for k, v in batch.items()}


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')


class StepIndexedLoader:
  """Training batches as a pure function of the step; subclasses read and collate examples.

  Subclasses implement `example(position, item, rng)` (the augmented example of a source
  item at global stream position `position`) and `collate(examples) -> dict of arrays`.

  Args:
    source: random-access split; `source[k]` gives one example's dict.
    batch_size: global batch size.
    seed: data seed (order and augmentation).
    process_index: this process among `process_count` (`jax.process_index()`).
    process_count: number of processes loading disjoint slices of each batch.
    num_shards: if set, reshape batches for `pmap` over this many local devices.
    num_threads: threads loading examples (0: in the consuming thread).
    num_workers: worker processes (Grain `mp_prefetch`); 0 for none.
    prefetch: batches computed ahead of the consumer (thread backend) or per worker.
    backend: 'grain', 'threads', or 'auto' (Grain when installed).
  """

  def __init__(self, source, *, batch_size: int, seed: int = 0, process_index: int = 0,
               process_count: int = 1, num_shards: int | None = None, num_threads: int = 2,
               num_workers: int = 0, prefetch: int = 2, backend: str = 'auto'):
    if len(source) == 0:
      raise ValueError('the training split is empty')
    _check_process(process_index, process_count)
    if backend not in BACKENDS:
      raise ValueError(f"backend must be 'auto', 'grain' or 'threads', got {backend!r}")
    self.source = source
    self.batch_size = batch_size
    self.local_batch_size = local_batch_size(batch_size, process_count, num_shards)
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = num_shards
    self.num_threads = num_threads
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.backend = ('grain' if have_grain() else 'threads') if backend == 'auto' else backend

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def steps_per_epoch(self) -> float:
    return self.num_examples / self.batch_size

  def record(self, position: int) -> tuple[int, int]:
    """`(epoch, example index)` at global stream position `position`."""
    epoch, offset = divmod(position, self.num_examples)
    return epoch, int(epoch_permutation(self.seed, epoch, self.num_examples)[offset])

  def example(self, position: int) -> Any:
    """The augmented example at global stream position `position`."""
    epoch, index = self.record(position)
    rng = np.random.default_rng([self.seed, _AUGMENTATION_TAG, epoch, index])
    return self.augment(self.source[index], rng)

  def augment(self, item: dict, rng: np.random.Generator) -> Any:
    """One source item, augmented with `rng` (subclasses)."""
    raise NotImplementedError

  def collate(self, examples: Sequence[Any]) -> dict:
    """Examples -> a batch dict of `[b, ...]` arrays (subclasses; no sharding)."""
    raise NotImplementedError

  def _collate(self, examples: Sequence[Any]) -> dict:
    return shard(self.collate(examples), self.num_shards)

  def _local_example(self, k: int) -> Any:
    """Example `k` of this process's stream: row `k % b` of its slice of step `k // b`."""
    step, row = divmod(k, self.local_batch_size)
    return self.example(step * self.batch_size + self.process_index * self.local_batch_size + row)

  def batch(self, step: int) -> dict:
    """This process's part of the global batch of training step `step`."""
    b = self.local_batch_size
    return self._collate([self._local_example(step * b + j) for j in range(b)])

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Batches for steps `start_step, start_step + 1, ...` (`num_steps` of them, or endless)."""
    stop = start_step + (ENDLESS_STEPS if num_steps is None else num_steps)
    if self.backend == 'grain':
      return self._iterate_grain(start_step, stop)
    return threaded(self.batch, range(start_step, stop), self.num_threads, self.prefetch)

  def __iter__(self) -> Iterator[dict]:
    return self.iterate()

  def _iterate_grain(self, start: int, stop: int) -> Iterator[dict]:
    import grain

    b = self.local_batch_size
    # Element `p` of the batched MapDataset is the batch of step `start + p`. Batching
    # stays in the MapDataset so that threads and worker processes each build whole
    # batches and Grain keeps them in step order (batching after `mp_prefetch`'s
    # round-robin over examples would mix steps).
    ds = grain.MapDataset.range(start * b, stop * b).map(self._local_example)
    ds = ds.batch(b, batch_fn=self._collate)
    return grain_iterator(ds, self.num_threads, self.num_workers, self.prefetch)


class SplitPass:
  """One pass over a split in global batches, the last one padded; subclasses build batches.

  Subclasses implement `batch(i)` from `local_indices(i)` (indices past the end of the
  split are padding, to be masked).
  """

  def __init__(self, source, *, batch_size: int, process_index: int = 0,
               process_count: int = 1, num_shards: int | None = None, num_threads: int = 2,
               prefetch: int = 2):
    _check_process(process_index, process_count)
    self.source = source
    self.batch_size = batch_size
    self.local_batch_size = local_batch_size(batch_size, process_count, num_shards)
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = num_shards
    self.num_threads = num_threads
    self.prefetch = prefetch

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def num_batches(self) -> int:
    """Batches in one pass (the last one padded)."""
    return math.ceil(self.num_examples / self.batch_size)

  def local_indices(self, i: int) -> list[int]:
    """This process's example indices of global batch `i` (some may be past the end)."""
    b = self.local_batch_size
    first = i * self.batch_size + self.process_index * b
    return [first + j for j in range(b)]

  def batch(self, i: int) -> dict:
    raise NotImplementedError

  def iterate(self) -> Iterator[dict]:
    """One pass over the split: `num_batches` batches."""
    return threaded(self.batch, range(self.num_batches), self.num_threads, self.prefetch)

  def __iter__(self) -> Iterator[dict]:
    return self.iterate()

  def repeat(self) -> Iterator[dict]:
    """Passes over the split without end (Scenic's `valid_iter` convention)."""
    while True:
      yield from self.iterate()


def threaded(fn, indices, num_threads: int, prefetch: int) -> Iterator[dict]:
  """`fn(i)` for `i` in order, computed by a thread pool up to `prefetch` ahead."""
  if num_threads <= 0:
    yield from map(fn, indices)
    return
  window = max(prefetch, num_threads)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    it = iter(indices)
    try:
      for i in it:
        pending.append(pool.submit(fn, i))
        if len(pending) >= window:
          break
      while pending:
        result = pending.popleft().result()
        nxt = next(it, None)
        if nxt is not None:
          pending.append(pool.submit(fn, nxt))
        yield result
    finally:
      for f in pending:
        f.cancel()


def grain_iterator(ds, num_threads: int, num_workers: int, prefetch: int) -> Iterator[dict]:
  import grain

  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))
  )
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
    )
  it = iter(it_ds)
  try:
    yield from it
  finally:
    if hasattr(it, 'close'):  # stops worker processes and threads promptly
      it.close()


def _ensure_absl_flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests, notebooks)
  # nothing has parsed them and Grain raises UnparsedFlagAccessError. Marking them
  # parsed keeps every default; an absl app parses them itself before this runs.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def round_up(shape, divisor: int) -> tuple[int, ...]:
  return tuple(int(math.ceil(s / divisor) * divisor) for s in shape)
