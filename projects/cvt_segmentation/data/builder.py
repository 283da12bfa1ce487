"""Segmentation datasets 'synthetic', 'ade20k', 'cityscapes', 'folder': loaders and Scenic.

`build_loaders` gives the `TrainLoader`, the `EvalLoader` and the meta data; `get_dataset`
Scenic's `Dataset`; `register_with_scenic` adds the builders to Scenic's registry. Folder
datasets are checked when built, before training (`folders.validate_splits`).
"""

from __future__ import annotations

import sys
from typing import Any

from projects.cvt_segmentation.data import folders
from projects.cvt_segmentation.data.loader import EvalLoader, TrainLoader
from projects.cvt_segmentation.data.synthetic import SyntheticSegmentation
from projects.cvt_segmentation.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform
from projects.training import data_index, datasets
from projects.training.step_loader import numpy_dtype

Dataset = datasets.Dataset

DATASET_NAMES = ('synthetic', 'ade20k', 'cityscapes', 'folder')

# Augmentation defaults per dataset, from the mmseg 1.x configs
# (configs/_base_/datasets/ade20k.py, cityscapes.py). Synthetic images are used at their
# own size, and photometric distortion is off there because hue identifies the class.
_TRAIN_DEFAULTS = {
    'ade20k': dict(crop_size=(512, 512), scale=(2048, 512), cat_max_ratio=0.75, photometric=True),
    'cityscapes': dict(
        crop_size=(512, 1024), scale=(2048, 1024), cat_max_ratio=0.75, photometric=True
    ),
    'folder': dict(crop_size=(512, 512), scale=(2048, 512), cat_max_ratio=0.75, photometric=True),
    'synthetic': dict(crop_size=None, scale=None, cat_max_ratio=1.0, photometric=False),
}
_TEST_SCALE = {'ade20k': (2048, 512), 'cityscapes': (2048, 1024), 'folder': (2048, 512)}
_AUG_KEYS = ('crop_size', 'scale', 'ratio_range', 'cat_max_ratio', 'flip_prob', 'photometric')


def resolve_test_scale(
    name: str, test_scale: tuple[int, int] | None | str = 'default'
) -> tuple[int, int] | None:
  """The `(long, short)` eval resize limits of dataset `name`; 'default' gives mmseg's."""
  if isinstance(test_scale, str):
    if test_scale != 'default':
      raise ValueError(f"test_scale must be (long, short), None or 'default', got {test_scale!r}")
    return _TEST_SCALE.get(name)
  return None if test_scale is None else (int(test_scale[0]), int(test_scale[1]))


def _sources(name: str, kw: dict, validate: str = 'full', quiet: bool = False):
  """(train source, eval source, default image size) for dataset `name`; pops its kwargs.

  Folder datasets are validated; the warnings about their labels are printed unless `quiet`.
  """
  data_index.check_validate(validate)
  if name == 'synthetic':
    common = dict(
        num_classes=kw.pop('num_classes', 6),
        image_size=tuple(kw.pop('image_size', (64, 64))),
        seed=kw.pop('data_seed', 0),
        max_objects=kw.pop('max_objects', 4),
    )
    train = SyntheticSegmentation(num_examples=kw.pop('num_train', 1000), split='train', **common)
    val = SyntheticSegmentation(num_examples=kw.pop('num_eval', 100), split='validation', **common)
    return train, val, common['image_size']
  # Images without a mask are kept aside, so that one error lists them with the rest.
  if name == 'ade20k':
    root = _pop_required(kw, 'data_dir', name)
    train, val = (folders.ade20k(root, split, missing_masks='keep')
                  for split in ('training', 'validation'))
  elif name == 'cityscapes':
    root = _pop_required(kw, 'data_dir', name)
    train, val = (folders.cityscapes(root, split, missing_masks='keep')
                  for split in ('train', 'val'))
  elif name == 'folder':
    common = dict(
        num_classes=_pop_required(kw, 'num_classes', name),
        class_names=kw.pop('class_names', None),
        reduce_zero_label=kw.pop('reduce_zero_label', False),
        mask_suffix=kw.pop('mask_suffix', '.png'),
        missing_masks='keep',
    )
    train, val = (folders.image_mask_folders(_pop_required(kw, f'{split}_images', name),
                                             _pop_required(kw, f'{split}_masks', name), **common)
                  for split in ('train', 'val'))
  else:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASET_NAMES}')
  for warning in folders.validate_splits({'train': train, 'validation': val}, validate):
    if not quiet:
      print(f'warning: {warning}', file=sys.stderr, flush=True)
  return train, val, None


def _pop_required(kw: dict, key: str, name: str):
  if key not in kw:
    raise ValueError(f'dataset {name!r} needs the argument {key!r}')
  return kw.pop(key)


def build_loaders(name: str, *, batch_size: int, eval_batch_size: int, seed: int = 0,
                  process_index: int = 0, process_count: int = 1, dtype_str: str = 'float32',
                  num_threads: int = 2, num_workers: int = 0,
                  eval_pad_shape: tuple[int, int] | None = None,
                  eval_label_pad_shape: tuple[int, int] | None = None, eval_size_divisor: int = 32,
                  test_scale: tuple[int, int] | None | str = 'default',
                  pixel_batch_mask: bool = False, validate: str = 'full',
                  **dataset_kwargs: Any) -> tuple[TrainLoader, EvalLoader, dict]:
  """The train and validation loaders of a dataset and its meta data.

  Args:
    name: one of `DATASET_NAMES`.
    batch_size: global training batch size.
    eval_batch_size: global evaluation batch size.
    dtype_str: dtype of `inputs`: 'float32' or 'bfloat16'.
    num_workers: Grain worker processes for training (0: threads only).
    eval_pad_shape, eval_label_pad_shape, eval_size_divisor: see `EvalLoader`.
    test_scale: `(long, short)` eval resize limits; None keeps the size; 'default' is
      the dataset's mmseg value.
    pixel_batch_mask: Scenic's segmentation layout (`TrainLoader`, `EvalLoader`).
    validate: how folder datasets are checked before training (`folders.validate_splits`):
      'full' (pairs, sizes, modes and every mask's label values, cached per file),
      'headers' (no label values: for huge datasets on slow storage) or 'none' (pairs).
    **dataset_kwargs: per dataset:
      synthetic: num_classes=6, image_size=(64, 64), num_train=1000, num_eval=100,
        data_seed=0, max_objects=4.
      ade20k, cityscapes: data_dir.
      folder: train_images, train_masks, val_images, val_masks, num_classes,
        class_names=None, reduce_zero_label=False, mask_suffix='.png'.
      All: augmentation overrides crop_size, scale, ratio_range, cat_max_ratio,
        flip_prob, photometric (`TrainTransform`).
  """
  kw = dict(dataset_kwargs)
  train_src, eval_src, image_size = _sources(name, kw, validate, quiet=process_index > 0)
  aug = dict(_TRAIN_DEFAULTS[name])
  aug.update({k: kw.pop(k) for k in _AUG_KEYS if k in kw})
  if kw:
    raise ValueError(f'unexpected arguments for dataset {name!r}: {sorted(kw)}')
  aug['crop_size'] = tuple(aug['crop_size'] or image_size)
  if aug['scale'] is not None:
    aug['scale'] = tuple(aug['scale'])
  dtype = numpy_dtype(dtype_str)
  common = dict(process_index=process_index, process_count=process_count,
                num_threads=num_threads, dtype=dtype, pixel_batch_mask=pixel_batch_mask)
  train = TrainLoader(train_src, TrainTransform(**aug), batch_size=batch_size, seed=seed,
                      num_workers=num_workers, **common)
  evaluation = EvalLoader(eval_src, EvalTransform(scale=resolve_test_scale(name, test_scale)),
                          batch_size=eval_batch_size, pad_shape=eval_pad_shape,
                          label_pad_shape=eval_label_pad_shape,
                          size_divisor=eval_size_divisor, **common)
  meta_data = {
      'input_shape': (-1,) + aug['crop_size'] + (3,),
      'num_classes': train_src.num_classes,
      'num_train_examples': len(train_src),
      'num_eval_examples': len(eval_src),
      'input_dtype': dtype,
      'target_is_onehot': False,
      'class_names': tuple(train_src.class_names),
      'ignore_index': IGNORE_INDEX,
      'num_eval_batches': evaluation.num_batches,
  }
  return train, evaluation, meta_data


get_dataset = datasets.dataset_getter(build_loaders)


def register_with_scenic(prefix: str = 'cvt_seg_') -> list[str]:
  """Registers the builders in Scenic's registry as `prefix + name` (clear of Scenic's own
  'cityscapes'); their batches carry Scenic's per-pixel `batch_mask`, eval labels padded
  like the inputs (`datasets.register_builders`)."""
  return datasets.register_builders(DATASET_NAMES, get_dataset, prefix=prefix,
                                    scenic_defaults={'pixel_batch_mask': True},
                                    project='cvt_segmentation')
