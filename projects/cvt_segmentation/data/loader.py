"""Deterministic, step-indexed batch loading for segmentation.

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
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from projects.cvt_segmentation.data.transforms import (
    IGNORE_INDEX,
    EvalTransform,
    TrainTransform,
    resize_label,
)

# A stream long enough to never run out (Grain datasets need a finite length).
_ENDLESS_STEPS = 2**40
# Domain tags keep the permutation and augmentation streams of one seed independent.
_PERMUTATION_TAG, _AUGMENTATION_TAG = 0, 1


def _have_grain() -> bool:
  try:
    import grain  # noqa: F401
  except ImportError:
    return False
  return True


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in training epoch `epoch`: `int64 [num_examples]`."""
  return np.random.default_rng([seed, _PERMUTATION_TAG, epoch]).permutation(num_examples)


def _local_batch_size(batch_size: int, process_count: int, num_shards: int | None) -> int:
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


def _shard(batch: dict, num_shards: int | None) -> dict:
  """Reshapes every array `[b, ...]` to `[num_shards, b // num_shards, ...]` (Scenic `shard`)."""
  if not num_shards:
    return batch
  return {k: v.reshape((num_shards, -1) + v.shape[1:]) for k, v in batch.items()}


class TrainLoader:
  """Step-indexed training batches.

  `batch(step)` returns `{'inputs': [b, H, W, 3], 'label': int32 [b, H, W],
  'batch_mask': float32 [b]}` (all ones), `b` the per-process batch size; with
  `pixel_batch_mask` the mask is per pixel, `[b, H, W]`, 0 where the label is ignored
  (Scenic's segmentation convention). With `num_shards` every array gains a leading
  `[num_shards, b // num_shards]` split.

  Args:
    source: random-access split; `source[k]` gives `{'image', 'label', ...}`.
    transform: the augmentation pipeline (`TrainTransform`).
    batch_size: global batch size.
    seed: data seed (order and augmentation).
    process_index: this process among `process_count` (`jax.process_index()`).
    process_count: number of processes loading disjoint slices of each batch.
    num_shards: if set, reshape batches for `pmap` over this many local devices.
    num_threads: threads loading examples (0: in the consuming thread).
    num_workers: worker processes (Grain `mp_prefetch`); 0 for none.
    prefetch: batches computed ahead of the consumer (thread backend) or per worker.
    dtype: dtype of `inputs` (e.g. np.float32 or ml_dtypes.bfloat16).
    backend: 'grain', 'threads', or 'auto' (Grain when installed).
    pixel_batch_mask: per-pixel `batch_mask` (Scenic's segmentation models need it).
  """

  def __init__(
      self,
      source,
      transform: TrainTransform,
      *,
      batch_size: int,
      seed: int = 0,
      process_index: int = 0,
      process_count: int = 1,
      num_shards: int | None = None,
      num_threads: int = 2,
      num_workers: int = 0,
      prefetch: int = 2,
      dtype: Any = np.float32,
      backend: str = 'auto',
      pixel_batch_mask: bool = False,
  ):
    if len(source) == 0:
      raise ValueError('the training split is empty')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if backend not in ('auto', 'grain', 'threads'):
      raise ValueError(f"backend must be 'auto', 'grain' or 'threads', got {backend!r}")
    self.source = source
    self.transform = transform
    self.batch_size = batch_size
    self.local_batch_size = _local_batch_size(batch_size, process_count, num_shards)
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = num_shards
    self.num_threads = num_threads
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.dtype = dtype
    self.backend = ('grain' if _have_grain() else 'threads') if backend == 'auto' else backend
    self.pixel_batch_mask = pixel_batch_mask

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

  def example(self, position: int) -> tuple[np.ndarray, np.ndarray]:
    """The augmented example at global stream position `position`: `(inputs, label)`."""
    epoch, index = self.record(position)
    item = self.source[index]
    rng = np.random.default_rng([self.seed, _AUGMENTATION_TAG, epoch, index])
    image, label = self.transform(item['image'], item['label'], rng)
    return image.astype(self.dtype, copy=False), label

  def _local_example(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Example `k` of this process's stream: row `k % b` of its slice of step `k // b`."""
    step, row = divmod(k, self.local_batch_size)
    return self.example(step * self.batch_size + self.process_index * self.local_batch_size + row)

  def _collate(self, examples) -> dict:
    inputs, labels = zip(*examples, strict=True)
    labels = np.stack(labels).astype(np.int32)
    if self.pixel_batch_mask:
      batch_mask = (labels != IGNORE_INDEX).astype(np.float32)
    else:
      batch_mask = np.ones(len(inputs), np.float32)
    batch = {'inputs': np.stack(inputs), 'label': labels, 'batch_mask': batch_mask}
    return _shard(batch, self.num_shards)

  def batch(self, step: int) -> dict:
    """This process's part of the global batch of training step `step`."""
    b = self.local_batch_size
    return self._collate([self._local_example(step * b + j) for j in range(b)])

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Batches for steps `start_step, start_step + 1, ...` (`num_steps` of them, or endless)."""
    stop = start_step + (_ENDLESS_STEPS if num_steps is None else num_steps)
    if self.backend == 'grain':
      return self._iterate_grain(start_step, stop)
    return _threaded(self.batch, range(start_step, stop), self.num_threads, self.prefetch)

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
    return _grain_iterator(ds, self.num_threads, self.num_workers, self.prefetch)


class EvalLoader:
  """Evaluation batches over one pass of a split, padded to a multiple of the batch size.

  Each batch holds `{'inputs': [b, Hp, Wp, 3], 'label': int32 [b, Hl, Wl],
  'batch_mask': float32 [b], 'input_size': int32 [b, 2], 'label_size': int32 [b, 2]}`:
  `inputs[i, :input_size[i, 0], :input_size[i, 1]]` is the resized image (rest 0),
  `label[i, :label_size[i, 0], :label_size[i, 1]]` the label at original resolution
  (rest 255). Examples past the end of the split (the padded last batch) have
  `batch_mask` 0 and all-255 labels. Score by resizing the logits of the valid input
  region to `label_size` (mmseg's resize back to the original shape).

  With `batch_size=1` and `size_divisor=1`, batches are single unpadded examples:
  exact full-resolution evaluation, one shape per image.

  With `pixel_batch_mask` (Scenic's segmentation convention) labels are instead resized
  (nearest) to the resized image and padded like the inputs, so `inputs` and `label`
  share `[b, Hp, Wp]`, and `batch_mask` is per pixel, `[b, Hp, Wp]`: 1 on the real,
  labelled pixels of real examples, 0 on padding and ignored pixels.

  Args:
    source: random-access split.
    transform: `EvalTransform` (keep-ratio resize of the image, label untouched).
    batch_size: global batch size.
    process_index: this process among `process_count`.
    process_count: processes sharing each global batch.
    num_shards: if set, reshape batches for `pmap`.
    pad_shape: fixed `(Hp, Wp)` of `inputs`; None: the batch maximum rounded up to a
      multiple of `size_divisor`. Use a fixed shape on several processes.
    label_pad_shape: fixed `(Hl, Wl)` of `label`; None: the batch maximum.
    size_divisor: rounding of the input size when `pad_shape` is None.
    num_threads: threads loading examples.
    dtype: dtype of `inputs`.
    pixel_batch_mask: Scenic's layout (see above).
  """

  def __init__(
      self,
      source,
      transform: EvalTransform,
      *,
      batch_size: int,
      process_index: int = 0,
      process_count: int = 1,
      num_shards: int | None = None,
      pad_shape: tuple[int, int] | None = None,
      label_pad_shape: tuple[int, int] | None = None,
      size_divisor: int = 32,
      num_threads: int = 2,
      prefetch: int = 2,
      dtype: Any = np.float32,
      pixel_batch_mask: bool = False,
  ):
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    self.source = source
    self.transform = transform
    self.pixel_batch_mask = pixel_batch_mask
    self.batch_size = batch_size
    self.local_batch_size = _local_batch_size(batch_size, process_count, num_shards)
    self.process_index = process_index
    self.process_count = process_count
    self.num_shards = num_shards
    self.pad_shape = pad_shape
    self.label_pad_shape = label_pad_shape
    self.size_divisor = max(int(size_divisor), 1)
    self.num_threads = num_threads
    self.prefetch = prefetch
    self.dtype = dtype

  @property
  def num_examples(self) -> int:
    return len(self.source)

  @property
  def num_batches(self) -> int:
    """Batches in one pass (the last one padded)."""
    return math.ceil(self.num_examples / self.batch_size)

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs float [h, w, 3], label int32 [H, W])` of example `index`."""
    item = self.source[index]
    image, label = self.transform(item['image'], item['label'])
    if self.pixel_batch_mask and label.shape != image.shape[:2]:
      label = resize_label(label, image.shape[:2])
    return image.astype(self.dtype, copy=False), label

  def batch(self, i: int) -> dict:
    """This process's part of evaluation batch `i` (0 <= i < num_batches)."""
    b = self.local_batch_size
    first = i * self.batch_size + self.process_index * b
    indices = [first + j for j in range(b)]
    real = [self.example(k) for k in indices if k < self.num_examples]
    if not real:  # a batch of padding only: borrow the shapes of the last example
      real_shapes = [self.example(self.num_examples - 1)]
    else:
      real_shapes = real
    in_shape = self.pad_shape or _round_up(
        np.max([x.shape[:2] for x, _ in real_shapes], axis=0), self.size_divisor
    )
    if self.pixel_batch_mask:
      label_shape = tuple(in_shape)
    else:
      label_shape = self.label_pad_shape or tuple(
          np.max([y.shape for _, y in real_shapes], axis=0))
    inputs = np.zeros((b,) + tuple(in_shape) + (3,), self.dtype)
    labels = np.full((b,) + tuple(label_shape), IGNORE_INDEX, np.int32)
    input_size = np.zeros((b, 2), np.int32)
    label_size = np.zeros((b, 2), np.int32)
    for j, (x, y) in enumerate(real):
      if x.shape[0] > in_shape[0] or x.shape[1] > in_shape[1] or any(
          s > p for s, p in zip(y.shape, label_shape, strict=True)
      ):
        raise ValueError(
            f'example {indices[j]} (input {x.shape[:2]}, label {y.shape}) does not fit the '
            f'eval pad shapes {tuple(in_shape)} / {tuple(label_shape)}'
        )
      inputs[j, : x.shape[0], : x.shape[1]] = x
      labels[j, : y.shape[0], : y.shape[1]] = y
      input_size[j], label_size[j] = x.shape[:2], y.shape
    batch_mask = np.array([k < self.num_examples for k in indices], np.float32)
    if self.pixel_batch_mask:
      batch_mask = batch_mask[:, None, None] * (labels != IGNORE_INDEX)
    batch = {
        'inputs': inputs,
        'label': labels,
        'batch_mask': batch_mask,
        'input_size': input_size,
        'label_size': label_size,
    }
    return _shard(batch, self.num_shards)

  def iterate(self) -> Iterator[dict]:
    """One pass over the split: `num_batches` batches."""
    return _threaded(self.batch, range(self.num_batches), self.num_threads, self.prefetch)

  def __iter__(self) -> Iterator[dict]:
    return self.iterate()

  def repeat(self) -> Iterator[dict]:
    """Passes over the split without end (Scenic's `valid_iter` convention)."""
    while True:
      yield from self.iterate()


def _round_up(shape, divisor: int) -> tuple[int, int]:
  return tuple(int(math.ceil(s / divisor) * divisor) for s in shape)


def _threaded(fn, indices, num_threads: int, prefetch: int) -> Iterator[dict]:
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


def _grain_iterator(ds, num_threads: int, num_workers: int, prefetch: int) -> Iterator[dict]:
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
