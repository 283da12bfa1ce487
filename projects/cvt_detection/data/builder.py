"""Detection datasets 'synthetic', 'coco', 'coco_format': loaders and Scenic.

`build_loaders` gives the step-indexed `TrainLoader`, the padded `EvalLoader` and the meta
data (`num_classes`, `class_names`, `category_ids`: the COCO id of each label, from the
training file and listed alike by the validation one; `ground_truth`: the validation
annotations for COCO evaluation); `get_dataset` Scenic's `Dataset`; `register_with_scenic`
adds the builders to Scenic's registry as `cvt_det_<name>`.

Settings (`dataset_configs`):
- 'synthetic' (`SyntheticDetection`): num_classes, image_size, num_train, num_eval; images
  used at their size.
- 'coco': `data_dir` holding `train2017/`, `val2017/` and `annotations/`.
- 'coco_format': `train_annotations`, `train_images`, `val_annotations`, `val_images`.
- both COCO ones: `invalid_boxes` ('error' or 'drop', see `CocoDetection`; evaluation
  scores against the annotation file as it is) and `validate` ('headers': every missing
  image file and every header size that is not the json's; 'full' also every image that
  does not decode; 'none': existence).
- all: `scale` (keep-ratio resize to fit, mmdet's (1333, 800)), `flip_prob`, `max_boxes`,
  `canvas_sizes` (the padded batch shapes; default `default_canvas_sizes(scale)`),
  `num_threads`, `prefetch`, `num_workers`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from projects.cvt_detection.data.coco import (
    CocoDetection,
    check_same_categories,
    coco_ground_truth,
)
from projects.cvt_detection.data.synthetic import SyntheticDetection
from projects.cvt_detection.data.transforms import (
    DEFAULT_MAX_BOXES,
    DEFAULT_SCALE,
    DetectionEvalTransform,
    DetectionTrainTransform,
    collate,
    default_canvas_sizes,
    pad_batch,
)
from projects.training import data_index, datasets
from projects.training.step_loader import SplitPass, StepIndexedLoader, numpy_dtype

Dataset = datasets.Dataset
DATASET_NAMES = ('synthetic', 'coco', 'coco_format')
# What a training step reads; the rest (ids, original sizes) stays on the host.
TRAIN_KEYS = ('inputs', 'boxes', 'labels', 'box_mask', 'batch_mask')
# What evaluation puts on the device (the boxes are scored against the annotation file).
EVAL_DEVICE_KEYS = ('inputs', 'image_size', 'scale_factor')


class _Canvases:
  """Batches padded to one of `canvas_sizes` (bounded compiles) with `max_boxes` per image."""

  def __init__(self, source, transform, *, canvas_sizes: Sequence[tuple[int, int]],
               max_boxes: int = DEFAULT_MAX_BOXES, **kwargs: Any):
    super().__init__(source, transform, **kwargs)
    self.canvas_sizes = tuple(tuple(c) for c in canvas_sizes)
    self.max_boxes = max_boxes

  def _collate(self, examples: Sequence[dict]) -> dict:
    batch = collate(examples, self.canvas_sizes, self.max_boxes)
    batch['inputs'] = batch['inputs'].astype(self.dtype, copy=False)
    return batch


class TrainLoader(_Canvases, StepIndexedLoader):
  """Step-indexed training batches of `TRAIN_KEYS` (`transforms.collate`)."""

  def augment(self, item: dict, rng: np.random.Generator) -> dict:
    return self.transform(item, rng)

  def collate(self, examples: Sequence[dict]) -> dict:
    batch = self._collate(examples)
    return {k: batch[k] for k in TRAIN_KEYS}


class EvalLoader(_Canvases, SplitPass):
  """One pass over a split: batches of `transforms.collate`, the last padded (`batch_mask` 0)."""

  def example(self, k: int) -> dict:
    with self.naming(k):
      return self.transform(self.source[k])

  def batch(self, i: int) -> dict:
    indices = [k for k in self.local_indices(i) if k < self.num_examples]
    # A process past the end of the split still sends a (fully masked) batch.
    batch = self._collate([self.example(k) for k in indices or [self.num_examples - 1]])
    if not indices:
      batch = {k: v[:0] for k, v in batch.items()}
    return pad_batch(batch, self.local_batch_size)


def _sources(name: str, kw: dict[str, Any], with_train: bool = True) -> tuple[Any, Any, Any]:
  """`(train source or None, eval source, ground truth)` of `name`; pops its settings."""
  if name == 'synthetic':
    validate = kw.pop('validate', 'full')  # accepted for every dataset; nothing to check here
    data_index.check_validate(validate)
    settings = dict(num_classes=kw.pop('num_classes', 4),
                    image_size=tuple(kw.pop('image_size', (128, 128))))
    num_train = kw.pop('num_train', 512)
    train = SyntheticDetection(num_train, split='train', **settings) if with_train else None
    evaluation = SyntheticDetection(kw.pop('num_eval', 64), split='val', **settings)
    return train, evaluation, coco_ground_truth(evaluation)
  if name == 'coco':
    root = kw.pop('data_dir', None)
    if not root:
      raise ValueError("dataset 'coco' needs dataset_configs.data_dir, the folder holding "
                       'train2017/, val2017/ and annotations/.')
    paths = {f'{s}_{k}': (os.path.join(root, 'annotations', f'instances_{s}2017.json')
                          if k == 'annotations' else os.path.join(root, f'{s}2017'))
             for s in ('train', 'val') for k in ('annotations', 'images')}
  elif name == 'coco_format':
    paths = {}
    for key in ('train_annotations', 'train_images', 'val_annotations', 'val_images'):
      if not kw.get(key):
        raise ValueError(f"dataset 'coco_format' needs dataset_configs.{key}.")
      paths[key] = kw.pop(key)
  else:
    raise ValueError(f'Unknown detection dataset {name!r}; known: {DATASET_NAMES}.')
  invalid_boxes = kw.pop('invalid_boxes', 'error')
  validate = kw.pop('validate', 'full')
  # mmdet's train dataloader filters images without boxes (`filter_empty_gt=True`). Only
  # built when asked: COCO's train annotations take a while to read.
  train = (CocoDetection(paths['train_annotations'], paths['train_images'], filter_empty=True,
                         invalid_boxes=invalid_boxes, validate=validate)
           if with_train else None)
  evaluation = CocoDetection(paths['val_annotations'], paths['val_images'],
                             invalid_boxes=invalid_boxes, validate=validate)
  if train is not None:  # the training file's categories are the run's map
    check_same_categories(evaluation.categories, evaluation.annotation_file, train.categories,
                          train.annotation_file)
  return train, evaluation, evaluation.ground_truth


def build_loaders(name: str, *, batch_size: int, eval_batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, dtype_str: str = 'float32',
                  with_train: bool = True,
                  **kwargs: Any) -> tuple[TrainLoader | None, EvalLoader, dict[str, Any]]:
  """The train and validation loaders of a detection dataset and its meta data.

  `with_train=False` reads no training split (evaluation only; the train loader is None);
  `kwargs` are the dataset's settings (module docstring).
  """
  kw = dict(kwargs)
  train_src, eval_src, ground_truth = _sources(name, kw, with_train)
  default_scale = tuple(eval_src.image_size[::-1]) if name == 'synthetic' else None
  scale = tuple(kw.pop('scale', None) or default_scale or DEFAULT_SCALE)
  common = dict(canvas_sizes=kw.pop('canvas_sizes', None) or default_canvas_sizes(scale),
                max_boxes=int(kw.pop('max_boxes', DEFAULT_MAX_BOXES)),
                dtype=numpy_dtype(dtype_str), process_index=process_index,
                process_count=process_count, num_threads=kw.pop('num_threads', 2),
                prefetch=kw.pop('prefetch', 2))
  flip_prob = float(kw.pop('flip_prob', 0.5))
  num_workers = kw.pop('num_workers', 0)
  kw.pop('start_step', None)  # Scenic builders pass it; get_dataset takes it
  if kw:
    raise ValueError(f'Unknown settings for detection dataset {name!r}: {sorted(kw)}.')
  train = None
  if with_train:
    train = TrainLoader(train_src, DetectionTrainTransform(scale=scale, flip_prob=flip_prob),
                        batch_size=batch_size, seed=seed, num_workers=num_workers, **common)
  evaluation = EvalLoader(eval_src, DetectionEvalTransform(scale=scale),
                          batch_size=eval_batch_size, **common)
  canvas = min(evaluation.canvas_sizes, key=lambda c: c[0] * c[1])
  # The category map: label k is category_ids[k], the same in every split (checked).
  meta_data = {
      'num_classes': int(eval_src.num_classes),
      'input_shape': (-1, *canvas, 3),
      'num_train_examples': len(train_src) if with_train else 0,
      'num_eval_examples': len(eval_src),
      'input_dtype': common['dtype'],
      'target_is_onehot': False,
      'class_names': tuple(eval_src.class_names),
      'category_ids': tuple(int(c) for c in eval_src.label_to_category_id),
      'ground_truth': ground_truth,
      'max_boxes': common['max_boxes'],
  }
  return train, evaluation, meta_data


get_dataset = datasets.dataset_getter(build_loaders)


def register_with_scenic(prefix: str = 'cvt_det_') -> list[str]:
  """Registers the builders in Scenic's registry as `prefix + name`
  (`datasets.register_builders`)."""
  return datasets.register_builders(DATASET_NAMES, get_dataset, prefix=prefix,
                                    project='cvt_detection')
