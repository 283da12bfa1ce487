"""What every cvt_detection config shares: mmdet's 1x recipe for a transformer backbone.

Configs are `get_config(arg=None)` functions returning a locked ConfigDict, so a misspelled
key (`config.optimiser = ...` or `--config.optimizer.base_rl=...`) is an error naming it.
A key a config file adds before locking is caught where configs enter (`check_config`: the
project's `main` and trainer, `load_config`), against `known_config_keys`: the defaults
below, the model's neck and head and the dataset's `DATASET_KEYS`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections

from heads import FPN, ATSSHead
from projects.cvt_detection import models
from projects.training import configs
from projects.training.configs import parse_arg

__all__ = ['DATASET_KEYS', 'apply_runlocal', 'base_config', 'check_config', 'claims',
           'dataset_keys', 'known_config_keys', 'parse_arg', 'schedule_1x']

# `dataset_configs` keys of each dataset, as `data/builder.py` reads them (`_sources`).
DATASET_KEYS = {
    'synthetic': ('num_classes', 'image_size', 'num_train', 'num_eval'),
    'coco': ('data_dir', 'invalid_boxes'),
    'coco_format': ('train_annotations', 'train_images', 'val_annotations', 'val_images',
                    'invalid_boxes'),
}
# ... and of every dataset (`build_loaders`).
COMMON_DATASET_KEYS = ('scale', 'canvas_sizes', 'max_boxes', 'flip_prob', 'num_threads',
                       'prefetch', 'num_workers', 'validate')
# The datasets' names in Scenic's registry (`data.register_with_scenic`), whose builders
# also take `start_step`.
SCENIC_DATASET_PREFIX = 'cvt_det_'
# `heads.detection_fpn` sets these FPN fields from the backbone; it adds `max_stride`.
_NECK_DERIVED = ('in_features', 'in_strides', 'in_channels', 'num_extra_levels')

# COCO train2017 images with at least one box (mmdet's filter_empty_gt): 117,266.
COCO_TRAIN_IMAGES = 117_266


def schedule_1x(num_images: int, batch_size: int) -> tuple[int, tuple[int, int]]:
  """mmdet's 1x schedule in steps: 12 epochs, x0.1 after epochs 8 and 11."""
  steps_per_epoch = -(-num_images // batch_size)
  return 12 * steps_per_epoch, (8 * steps_per_epoch, 11 * steps_per_epoch)


def base_config(model_name: str, dataset_name: str) -> ml_collections.ConfigDict:
  """mmdet's 1x recipe with AdamW (PVT / Swin detection configs): batch 16, 12 epochs."""
  config = ml_collections.ConfigDict()
  config.experiment_name = f'{model_name}_{dataset_name}'
  config.rng_seed = 0
  config.model_name = model_name
  config.model = models.default_model_config(model_name)
  config.loss = ml_collections.ConfigDict(models.LOSS_DEFAULTS)

  config.dataset_name = dataset_name
  config.dataset_configs = ml_collections.ConfigDict()
  config.data_dtype_str = 'float32'
  config.batch_size = 16
  config.eval_batch_size = 8
  total, decays = schedule_1x(COCO_TRAIN_IMAGES, config.batch_size)
  config.num_training_steps = total
  config.log_summary_steps = 50
  config.log_eval_steps = total // 12  # every epoch, as mmdet
  config.checkpoint_steps = 2_000
  config.max_checkpoints_to_keep = 3

  # AdamW lr 1e-4, weight decay 0.05 (none on norms and biases); mmdet's warmup: 500 steps
  # from 0.001 of the rate (schedule_1x.py), then step decay.
  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=1e-4, weight_decay=0.05, b1=0.9, b2=0.999, schedule='step', decay_steps=decays,
      decay_factor=0.1, warmup_steps=500, warmup_ratio=1e-3, power=1.0, min_lr=0.0,
      layer_decay=1.0, head_lr_mult=1.0, grad_clip_norm=0.0, accumulation_steps=1))

  # Post-processing of evaluation and prediction (mmdet ATSS test_cfg).
  config.eval = ml_collections.ConfigDict(dict(models.DETECT_DEFAULTS))
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a minutes-long check of the whole pipeline on a CPU."""
  config.model.backbone.variant = 'cvt-tiny'
  config.model.backbone.pretrained = ''
  config.model.neck.out_channels = 32
  config.model.head.channels = 32
  config.batch_size = 2
  config.eval_batch_size = 2
  config.num_training_steps = 4
  config.log_summary_steps = 2
  config.log_eval_steps = 4
  config.checkpoint_steps = 2
  config.optimizer.warmup_steps = 1
  config.optimizer.decay_steps = (3,)
  if config.dataset_name != 'synthetic':
    config.dataset_configs.scale = (160, 96)
  return config


def dataset_keys(dataset_name: str | None) -> tuple[str, ...] | None:
  """The `dataset_configs` keys of a dataset (any one of them for None); None if unknown."""
  return configs.dataset_keys_of(dataset_name, DATASET_KEYS, COMMON_DATASET_KEYS,
                                 SCENIC_DATASET_PREFIX)


def _fields(cls: type) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in ('parent', 'name')]


def model_keys(model_name: str) -> configs.KnownKeys | None:
  """`config.model`'s keys for a registered model: its backbone, neck and head settings."""
  cls = models.MODELS.get(model_name)
  if cls is None:
    return None
  known = {
      'backbone': configs.backbone_keys(),
      'neck': dict.fromkeys([k for k in _fields(FPN) if k not in _NECK_DERIVED]
                            + ['max_stride']),
      # num_classes comes from the dataset, not the config.
      'head': dict.fromkeys(k for k in _fields(ATSSHead) if k != 'num_classes'),
  }
  return configs.merge_known_keys(known, configs.known_keys_of(cls.default_model_config()))


def claims(config: Any) -> bool:
  """Whether `config` names (or may be) one of this project's models and datasets."""
  return configs.names_project(config, models.MODELS, dataset_keys)


def known_config_keys(config: Any) -> configs.KnownKeys:
  """Every setting a config of this project may hold, for its model and dataset.

  `base_config`'s keys (`loss` and `eval` as the model reads them), the optimizer's
  (`configs.OPTIMIZER_KEYS`), the top-level keys of Scenic's main (`configs.SCENIC_KEYS`),
  `config.model` for the model and `config.dataset_configs` for the dataset
  (`dataset_keys`; unchecked for a dataset the builders do not know, which they reject).
  """
  known = configs.known_keys_of(base_config(next(iter(models.MODELS)), 'synthetic'))
  known.update(dict.fromkeys(configs.SCENIC_KEYS))
  known['optimizer'].update(dict.fromkeys(configs.OPTIMIZER_KEYS))
  model_name = configs.config_get(config, 'model_name')
  known['model'] = (model_keys(model_name) if model_name is not None else
                    configs.merge_known_keys(*(model_keys(name) for name in models.MODELS)))
  names = dataset_keys(configs.config_get(config, 'dataset_name'))
  known['dataset_configs'] = None if names is None else dict.fromkeys(names)
  return known


def check_config(config: Any, source: str | None = None) -> None:
  """Raises `configs.ConfigKeyError` for keys of `config` this project does not read."""
  configs.check_config_keys(config, known_config_keys(config), source)


# `projects.training.configs.load_config` checks a config loaded from a file against the
# projects registered here (a config file imports its project's common module).
configs.register_config_family(sys.modules[__name__])
