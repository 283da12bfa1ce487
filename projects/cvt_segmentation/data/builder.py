"""Dataset builders: 'synthetic', 'ade20k', 'cityscapes', 'folder' -> Scenic-style `Dataset`.

`get_dataset(name, batch_size=..., eval_batch_size=..., **dataset_kwargs)` returns
`Dataset(train_iter, valid_iter, test_iter, meta_data)` with the fields of Scenic's
`dataset_utils.Dataset`; `build_loaders` returns the underlying `TrainLoader` and
`EvalLoader` for callers that resume at a given step or want single eval passes.

The folder datasets are checked when built, before any training: every image has its
mask, sizes and modes agree and (`validate='full'`, the default) every mask's label values
are valid; one `DatasetError` lists every bad file (`folders.validate_splits`).
`register_with_scenic()` adds the builders to Scenic's dataset registry when Scenic
is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from projects.cvt_segmentation.data import folders
from projects.cvt_segmentation.data.loader import EvalLoader, TrainLoader
from projects.cvt_segmentation.data.synthetic import SyntheticSegmentation
from projects.cvt_segmentation.data.transforms import IGNORE_INDEX, EvalTransform, TrainTransform
from projects.training import datasets

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


def _dtype(dtype_str: str):
  if dtype_str == 'bfloat16':
    import ml_dtypes  # installed with jax

    return ml_dtypes.bfloat16
  return np.dtype(dtype_str).type


def _sources(name: str, kw: dict, validate: str = 'full'):
  """(train source, eval source, default image size) for dataset `name`; pops its kwargs.

  Folder datasets are validated (`folders.validate_splits` in mode `validate`).
  """
  if validate not in folders.VALIDATE_MODES:
    raise ValueError(f'validate must be one of {folders.VALIDATE_MODES}, got {validate!r}')
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
    train = folders.image_mask_folders(
        _pop_required(kw, 'train_images', name), _pop_required(kw, 'train_masks', name), **common
    )
    val = folders.image_mask_folders(
        _pop_required(kw, 'val_images', name), _pop_required(kw, 'val_masks', name), **common
    )
  else:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASET_NAMES}')
  folders.validate_splits({'train': train, 'validation': val}, validate)
  return train, val, None


def _pop_required(kw: dict, key: str, name: str):
  if key not in kw:
    raise ValueError(f'dataset {name!r} needs the argument {key!r}')
  return kw.pop(key)


def build_loaders(
    name: str,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    dtype_str: str = 'float32',
    num_threads: int = 2,
    num_workers: int = 0,
    eval_pad_shape: tuple[int, int] | None = None,
    eval_label_pad_shape: tuple[int, int] | None = None,
    eval_size_divisor: int = 32,
    test_scale: tuple[int, int] | None | str = 'default',
    pixel_batch_mask: bool = False,
    validate: str = 'full',
    **dataset_kwargs: Any,
) -> tuple[TrainLoader, EvalLoader, dict]:
  """Builds the train and validation loaders of a dataset and its meta data.

  Args:
    name: 'synthetic', 'ade20k', 'cityscapes' or 'folder'.
    batch_size: global training batch size.
    eval_batch_size: global evaluation batch size.
    seed: shuffling and augmentation seed.
    process_index: this process (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    dtype_str: dtype of `inputs`: 'float32' or 'bfloat16'.
    num_threads: loading threads per process.
    num_workers: Grain worker processes for training (0: threads only).
    eval_pad_shape: fixed eval input shape (see `EvalLoader`).
    eval_label_pad_shape: fixed eval label shape.
    eval_size_divisor: eval input padding multiple when `eval_pad_shape` is None.
    test_scale: `(long, short)` eval resize limits; None keeps the size; 'default' uses
      the mmseg value of the dataset.
    pixel_batch_mask: Scenic's segmentation layout: per-pixel `batch_mask` (0 on padding
      and ignored pixels), eval labels at the input size and padded like the inputs.
    validate: how the folder datasets are checked before training
      (`folders.validate_splits`): 'full' (default; pairs, sizes, modes and every mask's
      label values, decoded once and cached per file), 'headers' (no label values: for
      huge datasets on slow storage) or 'none' (pairs only).
    **dataset_kwargs: per dataset:
      synthetic: num_classes=6, image_size=(64, 64), num_train=1000, num_eval=100,
        data_seed=0, max_objects=4.
      ade20k, cityscapes: data_dir.
      folder: train_images, train_masks, val_images, val_masks, num_classes,
        class_names=None, reduce_zero_label=False, mask_suffix='.png'.
      All: augmentation overrides crop_size, scale, ratio_range, cat_max_ratio,
        flip_prob, photometric (see `TrainTransform`).

  Returns:
    `(train_loader, eval_loader, meta_data)`.
  """
  kw = dict(dataset_kwargs)
  train_src, eval_src, image_size = _sources(name, kw, validate)
  aug = dict(_TRAIN_DEFAULTS[name])
  aug.update({k: kw.pop(k) for k in _AUG_KEYS if k in kw})
  if kw:
    raise ValueError(f'unexpected arguments for dataset {name!r}: {sorted(kw)}')
  if aug['crop_size'] is None:
    aug['crop_size'] = image_size
  aug['crop_size'] = tuple(aug['crop_size'])
  if aug['scale'] is not None:
    aug['scale'] = tuple(aug['scale'])
  test_scale = resolve_test_scale(name, test_scale)
  dtype = _dtype(dtype_str)
  train = TrainLoader(
      train_src,
      TrainTransform(**aug),
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_threads=num_threads,
      num_workers=num_workers,
      dtype=dtype,
      pixel_batch_mask=pixel_batch_mask,
  )
  evaluation = EvalLoader(
      eval_src,
      EvalTransform(scale=test_scale),
      batch_size=eval_batch_size,
      process_index=process_index,
      process_count=process_count,
      pad_shape=eval_pad_shape,
      label_pad_shape=eval_label_pad_shape,
      size_divisor=eval_size_divisor,
      num_threads=num_threads,
      dtype=dtype,
      pixel_batch_mask=pixel_batch_mask,
  )
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


def get_dataset(
    name: str,
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    **kwargs: Any,
) -> Dataset:
  """Scenic-style dataset: endless train batches from `start_step`, endless eval passes.

  `valid_iter` repeats the padded validation pass forever, as Scenic's trainers expect
  (they take `meta_data['num_eval_batches']` batches, or compute it from
  `num_eval_examples`); `test_iter` is None (no public test labels). Batches are dicts of
  numpy arrays, see `TrainLoader` and `EvalLoader`.

  Args:
    name: 'synthetic', 'ade20k', 'cityscapes' or 'folder'.
    batch_size: global training batch size.
    eval_batch_size: global evaluation batch size.
    seed: shuffling and augmentation seed.
    start_step: first training step to produce (resuming).
    **kwargs: forwarded to `build_loaders`.

  Returns:
    `Dataset(train_iter, valid_iter, test_iter, meta_data)`.
  """
  train, evaluation, meta_data = build_loaders(
      name, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, **kwargs
  )
  return datasets.scenic_dataset(train, evaluation, meta_data, start_step)


def register_with_scenic(prefix: str = 'cvt_seg_') -> list[str]:
  """Registers the builders in Scenic's dataset registry as `prefix + name`.

  The registered builders follow Scenic's signature (`batch_size, eval_batch_size,
  num_shards, dtype_str, shuffle_seed, rng, dataset_configs, dataset_service_address`)
  and conventions: `batch_size` and `eval_batch_size` are per host (Scenic's
  `train_utils.get_dataset` divides the config's by the process count), batches carry
  a per-pixel `batch_mask` (0 on padding and ignored pixels) and eval labels are at the
  input size, padded like the inputs (`eval_pad_shape` fixes that shape). Batches are
  reshaped to `[num_shards, ...]` for pmap. `dataset_configs` holds the keyword
  arguments of `build_loaders` (plus `start_step`). Registering twice is harmless.

  Args:
    prefix: name prefix; it keeps clear of Scenic's own 'cityscapes'.

  Returns:
    The registered names, or an empty list when Scenic is not installed.
  """
  # Scenic's segmentation models read a per-pixel batch_mask.
  return datasets.register_builders(DATASET_NAMES, get_dataset, prefix=prefix,
                                    scenic_defaults={'pixel_batch_mask': True},
                                    project='cvt_segmentation')
