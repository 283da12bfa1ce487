"""Deterministic, step-indexed batch loading: the part every project's loaders share.

Training batches are a pure function of `(seed, step)`: the stream is the concatenation of
epochs, each a seeded permutation of the split, and the example at global position `i` is
augmented with a generator keyed by `(seed, epoch, index)`, so a run resumed at step `s`
sees exactly the batches of an uninterrupted run, whatever the number of workers. Grain
supplies the parallelism: threads (numpy and PIL release the GIL) and optionally worker
processes (`mp_prefetch`, which keeps the order).

Batch sizes are global (Scenic's convention): each of `process_count` processes loads its
contiguous slice `[process_index * b, (process_index + 1) * b)` of every global batch,
`b = batch_size // process_count`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from cvt_backbone.tools import exit_with_parent
from projects.training.datasets import DatasetError

# A stream long enough to never run out (Grain datasets need a finite length).
ENDLESS_STEPS = 2**40
# Domain tags keep the permutation and augmentation streams of one seed independent.
_PERMUTATION_TAG, _AUGMENTATION_TAG = 0, 1


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in training epoch `epoch`: `int64 [num_examples]`."""
  return np.random.default_rng([seed, _PERMUTATION_TAG, epoch]).permutation(num_examples)


def numpy_dtype(dtype_str: str) -> np.dtype:
  """The numpy dtype of the inputs: 'float32', 'bfloat16' (ml_dtypes, installed with jax)..."""
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

  return np.dtype(dtype_str)


class _ProcessSlices:
  """A split read in global batches, this process loading its slice of each."""

  def __init__(self, source, transform, *, batch_size: int, process_index: int = 0,
               process_count: int = 1, num_threads: int = 2, prefetch: int = 2,
               dtype: Any = np.float32):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if batch_size <= 0 or batch_size % process_count:
      raise ValueError(f'global batch size {batch_size} must be a positive multiple of the '
                       f'process count {process_count}')
    self.source = source
    self.transform = transform
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count  # this process's share
    self.process_index = process_index
    self.process_count = process_count
    self.num_threads = num_threads
    self.prefetch = prefetch
    self.dtype = dtype

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @contextlib.contextmanager
  def naming(self, index: int) -> Iterator[None]:
    """Re-raises a failure to read or transform example `index` (in a thread or a worker
    process) as one `DatasetError` line naming it and its files (`source.example_files`)."""
    try:
      yield
    except Exception as error:
      files = getattr(self.source, 'example_files', None)
      where = f' ({", ".join(map(str, files(index)))})' if files else ''
      raise DatasetError(f'cannot load {self.role} example {index}{where}: '
                         f'{type(error).__name__}: {error}') from error

  def __iter__(self) -> Iterator[dict]:
    return self.iterate()


class StepIndexedLoader(_ProcessSlices):
  """Training batches as a pure function of the step; subclasses `augment` and `collate`.

  Args:
    source: random-access split; `source[k]` gives one example's dict.
    transform: the augmentation, for `augment`.
    batch_size: global batch size.
    seed: data seed (order and augmentation).
    process_index: this process among `process_count` (`jax.process_index()`).
    num_threads: threads loading examples (0: in the consuming thread).
    num_workers: worker processes (Grain `mp_prefetch`); 0 for none.
    prefetch: batches computed ahead of the consumer, per worker.
    dtype: dtype of `inputs`.
  """

  role = 'training'

  def __init__(self, source, transform, *, seed: int = 0, num_workers: int = 0, **kwargs: Any):
    if len(source) == 0:
      raise ValueError('the training split is empty')
    super().__init__(source, transform, **kwargs)
    self.seed = seed
    self.num_workers = num_workers

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
    with self.naming(index):
      return self.augment(self.source[index], rng)

  def augment(self, item: dict, rng: np.random.Generator) -> Any:
    raise NotImplementedError

  def collate(self, examples: Sequence[Any]) -> dict:
    """Examples -> a batch dict of `[b, ...]` arrays."""
    raise NotImplementedError

  def _local_example(self, k: int) -> Any:
    """Example `k` of this process's stream: row `k % b` of its slice of step `k // b`."""
    step, row = divmod(k, self.local_batch_size)
    return self.example(step * self.batch_size + self.process_index * self.local_batch_size + row)

  def batch(self, step: int) -> dict:
    """This process's part of the global batch of training step `step`."""
    b = self.local_batch_size
    return self.collate([self._local_example(step * b + j) for j in range(b)])

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Batches for steps `start_step, start_step + 1, ...` (`num_steps` of them, or endless)."""
    stop = start_step + (ENDLESS_STEPS if num_steps is None else num_steps)
    b = self.local_batch_size
    # Element `p` is the batch of step `start_step + p`. Batching stays in the MapDataset so
    # that threads and worker processes each build whole batches and Grain keeps them in
    # step order (batching after `mp_prefetch`'s round-robin over examples would mix steps).
    ds = grain.MapDataset.range(start_step * b, stop * b).map(self._local_example)
    ds = ds.batch(b, batch_fn=self.collate)
    return grain_iterator(ds, self.num_threads, self.num_workers, self.prefetch)


class SplitPass(_ProcessSlices):
  """One pass over a split in global batches, the last one padded; subclasses build `batch(i)`
  from `local_indices(i)` (indices past the end of the split are padding, to be masked)."""

  role = 'evaluation'

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
    ds = grain.MapDataset.range(self.num_batches).map(self.batch)
    return grain_iterator(ds, self.num_threads, 0, self.prefetch)

  def repeat(self) -> Iterator[dict]:
    """Passes over the split without end (Scenic's `valid_iter` convention)."""
    while True:
      yield from self.iterate()


def grain_iterator(ds, num_threads: int, num_workers: int, prefetch: int) -> Iterator[dict]:
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, num_threads))
  )
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
        worker_init_fn=functools.partial(_end_with_trainer, os.getpid()))
  it = iter(it_ds)
  try:
    yield from it
  finally:
    if hasattr(it, 'close'):  # stops worker processes and threads promptly
      it.close()


def _end_with_trainer(trainer: int, worker_index: int, num_workers: int) -> None:
  """A loader worker process exits as soon as the trainer process `trainer` has ended."""
  del worker_index, num_workers
  exit_with_parent(trainer)


def _ensure_absl_flags_parsed() -> None:
  # Grain's worker processes read absl flags; outside an absl app (tests, notebooks)
  # nothing has parsed them and Grain raises UnparsedFlagAccessError. Marking them
  # parsed keeps every default; an absl app parses them itself before this runs.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def round_up(shape, divisor: int) -> tuple[int, ...]:
  return tuple(int(math.ceil(s / divisor) * divisor) for s in shape)
