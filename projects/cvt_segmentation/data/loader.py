"""Segmentation batches: step-indexed training batches and padded evaluation passes.

Determinism, process slicing and parallelism are `projects.training.step_loader`'s; this
module reads, augments and stacks segmentation examples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from projects.cvt_segmentation.data.transforms import IGNORE_INDEX, resize_label
from projects.training.step_loader import SplitPass, StepIndexedLoader, round_up


class TrainLoader(StepIndexedLoader):
  """Training batches `{'inputs': [b, H, W, 3], 'label': int32 [b, H, W], 'batch_mask':
  float32 [b]}` (all ones), `b` the per-process batch size, from a `TrainTransform`.

  With `pixel_batch_mask` (Scenic's segmentation models need it) the mask is per pixel,
  `[b, H, W]`, 0 where the label is ignored. Other arguments: `StepIndexedLoader`'s.
  """

  def __init__(self, source, transform, *, pixel_batch_mask: bool = False, **kwargs: Any):
    super().__init__(source, transform, **kwargs)
    self.pixel_batch_mask = pixel_batch_mask

  def augment(self, item: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    image, label = self.transform(item['image'], item['label'], rng)
    return image.astype(self.dtype, copy=False), label

  def collate(self, examples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    inputs, labels = zip(*examples, strict=True)
    labels = np.stack(labels).astype(np.int32, copy=False)
    if self.pixel_batch_mask:
      batch_mask = (labels != IGNORE_INDEX).astype(np.float32)
    else:
      batch_mask = np.ones(len(inputs), np.float32)
    return {'inputs': np.stack(inputs), 'label': labels, 'batch_mask': batch_mask}


class EvalLoader(SplitPass):
  """Evaluation batches over one pass of a split, padded to a multiple of the batch size.

  Each batch holds `{'inputs': [b, Hp, Wp, 3], 'label': int32 [b, Hl, Wl], 'batch_mask':
  float32 [b], 'input_size': int32 [b, 2], 'label_size': int32 [b, 2]}`: the resized
  image in `inputs[i, :input_size[i, 0], :input_size[i, 1]]` (rest 0), the label at
  original resolution in `label[i, :label_size[i, 0], :label_size[i, 1]]` (rest 255).
  Padding examples have `batch_mask` 0 and all-255 labels. Scores come from the logits of
  the valid input region resized to `label_size` (mmseg resizes back to the original).
  `batch_size=1` and `size_divisor=1` give exact unpadded examples, one shape per image.

  With `pixel_batch_mask` (Scenic's layout) labels are resized (nearest) to the resized
  image and padded like it, so `inputs` and `label` share `[b, Hp, Wp]`, and `batch_mask`
  is `[b, Hp, Wp]`: 1 on the real, labelled pixels of real examples.

  Args:
    transform: `EvalTransform` (keep-ratio resize of the image, label untouched).
    pad_shape: fixed `(Hp, Wp)` of `inputs` (use one on several processes); None: the
      batch maximum rounded up to a multiple of `size_divisor`.
    label_pad_shape: fixed `(Hl, Wl)` of `label`; None: the batch maximum.
    **kwargs: `SplitPass` settings (batch size, process slicing, threads, dtype).
  """

  def __init__(self, source, transform, *, pad_shape: tuple[int, int] | None = None,
               label_pad_shape: tuple[int, int] | None = None, size_divisor: int = 32,
               pixel_batch_mask: bool = False, **kwargs: Any):
    super().__init__(source, transform, **kwargs)
    self.pixel_batch_mask = pixel_batch_mask
    self.pad_shape = pad_shape
    self.label_pad_shape = label_pad_shape
    self.size_divisor = max(int(size_divisor), 1)

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """`(inputs float [h, w, 3], label int32 [H, W])` of example `index`."""
    with self.naming(index):
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
    # A batch of padding only borrows the shapes of the last example.
    real_shapes = real or [self.example(self.num_examples - 1)]
    in_shape = self.pad_shape or round_up(
        np.max([x.shape[:2] for x, _ in real_shapes], axis=0), self.size_divisor)
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
          s > p for s, p in zip(y.shape, label_shape, strict=True)):
        raise ValueError(
            f'example {indices[j]} (input {x.shape[:2]}, label {y.shape}) does not fit the '
            f'eval pad shapes {tuple(in_shape)} / {tuple(label_shape)}')
      inputs[j, : x.shape[0], : x.shape[1]] = x
      labels[j, : y.shape[0], : y.shape[1]] = y
      input_size[j], label_size[j] = x.shape[:2], y.shape
    batch_mask = np.array([k < self.num_examples for k in indices], np.float32)
    if self.pixel_batch_mask:
      batch_mask = batch_mask[:, None, None] * (labels != IGNORE_INDEX)
    return {'inputs': inputs, 'label': labels, 'batch_mask': batch_mask,
            'input_size': input_size, 'label_size': label_size}
