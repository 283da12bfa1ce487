"""Segmentation batches: step-indexed training batches and padded evaluation passes.

The determinism, process slicing and parallelism (Grain) are
`projects.training.step_loader`'s: a training batch is a pure function of `(seed, step)`,
so a run resumed at step `s` sees exactly the batches an uninterrupted run would have seen.
This module reads, augments and stacks segmentation examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from projects.cvt_segmentation.data.transforms import (
    IGNORE_INDEX,
    EvalTransform,
    TrainTransform,
    resize_label,
)
from projects.training.step_loader import (
    SplitPass,
    StepIndexedLoader,
    epoch_permutation,
    round_up,
)

__all__ = ['EvalLoader', 'TrainLoader', 'epoch_permutation']


class TrainLoader(StepIndexedLoader):
  """Step-indexed training batches.

  `batch(step)` returns `{'inputs': [b, H, W, 3], 'label': int32 [b, H, W],
  'batch_mask': float32 [b]}` (all ones), `b` the per-process batch size; with
  `pixel_batch_mask` the mask is per pixel, `[b, H, W]`, 0 where the label is ignored
  (Scenic's segmentation convention).

  Args:
    source: random-access split; `source[k]` gives `{'image', 'label', ...}`.
    transform: the augmentation pipeline (`TrainTransform`).
    batch_size: global batch size.
    seed: data seed (order and augmentation).
    process_index: this process among `process_count` (`jax.process_index()`).
    process_count: number of processes loading disjoint slices of each batch.
    num_threads: threads loading examples (0: in the consuming thread).
    num_workers: worker processes (Grain `mp_prefetch`); 0 for none.
    prefetch: batches computed ahead of the consumer, per worker.
    dtype: dtype of `inputs` (e.g. np.float32 or ml_dtypes.bfloat16).
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
      num_threads: int = 2,
      num_workers: int = 0,
      prefetch: int = 2,
      dtype: Any = np.float32,
      pixel_batch_mask: bool = False,
  ):
    super().__init__(source, batch_size=batch_size, seed=seed, process_index=process_index,
                     process_count=process_count, num_threads=num_threads,
                     num_workers=num_workers, prefetch=prefetch)
    self.transform = transform
    self.dtype = dtype
    self.pixel_batch_mask = pixel_batch_mask

  def augment(self, item: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The augmented `(inputs, label)` of one source item."""
    image, label = self.transform(item['image'], item['label'], rng)
    return image.astype(self.dtype, copy=False), label

  def collate(self, examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    inputs, labels = zip(*examples, strict=True)
    labels = np.stack(labels).astype(np.int32)
    if self.pixel_batch_mask:
      batch_mask = (labels != IGNORE_INDEX).astype(np.float32)
    else:
      batch_mask = np.ones(len(inputs), np.float32)
    return {'inputs': np.stack(inputs), 'label': labels, 'batch_mask': batch_mask}


class EvalLoader(SplitPass):
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
      pad_shape: tuple[int, int] | None = None,
      label_pad_shape: tuple[int, int] | None = None,
      size_divisor: int = 32,
      num_threads: int = 2,
      prefetch: int = 2,
      dtype: Any = np.float32,
      pixel_batch_mask: bool = False,
  ):
    super().__init__(source, batch_size=batch_size, process_index=process_index,
                     process_count=process_count, num_threads=num_threads, prefetch=prefetch)
    self.transform = transform
    self.pixel_batch_mask = pixel_batch_mask
    self.pad_shape = pad_shape
    self.label_pad_shape = label_pad_shape
    self.size_divisor = max(int(size_divisor), 1)
    self.dtype = dtype

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
    indices = self.local_indices(i)
    real = [self.example(k) for k in indices if k < self.num_examples]
    if not real:  # a batch of padding only: borrow the shapes of the last example
      real_shapes = [self.example(self.num_examples - 1)]
    else:
      real_shapes = real
    in_shape = self.pad_shape or round_up(
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
    return batch
