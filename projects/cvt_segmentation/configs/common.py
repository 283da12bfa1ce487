"""What every cvt_segmentation config shares: training defaults, argument parsing, runlocal.

Configs are `get_config(arg=None)` functions returning a locked ConfigDict, so a
misspelled key (`config.optimiser = ...` or `--config.optimizer.base_rl=...`) is an
error naming it instead of a silently ignored setting. A key a config file adds before
locking is caught where configs enter (`check_config`: the project's `main` and trainer,
`load_config`), against `known_config_keys`: the defaults below, the model's heads and the
dataset's `DATASET_KEYS`.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_collections

import heads
from heads.registry import head_fields
from projects.cvt_segmentation import models
from projects.training import configs
from projects.training.configs import parse_arg

__all__ = ['DATASET_KEYS', 'apply_runlocal', 'base_config', 'check_config', 'claims',
           'dataset_keys', 'known_config_keys', 'mmseg_dataset_configs', 'parse_arg']

# `dataset_configs` keys of each dataset, as `data/builder.py` reads them (`_sources`).
DATASET_KEYS = {
    'synthetic': ('num_classes', 'image_size', 'num_train', 'num_eval', 'data_seed',
                  'max_objects'),
    'ade20k': ('data_dir',),
    'cityscapes': ('data_dir',),
    'folder': ('train_images', 'train_masks', 'val_images', 'val_masks', 'num_classes',
               'class_names', 'reduce_zero_label', 'mask_suffix'),
}
# ... and of every dataset: `TrainTransform`'s augmentation settings and the loader settings
# of `build_loaders` that `main.build_dataset` leaves to the config.
COMMON_DATASET_KEYS = ('crop_size', 'scale', 'ratio_range', 'cat_max_ratio', 'flip_prob',
                       'photometric', 'num_threads', 'num_workers', 'eval_pad_shape',
                       'eval_label_pad_shape', 'eval_size_divisor', 'test_scale',
                       'pixel_batch_mask', 'validate')
# The datasets' names in Scenic's registry (`data.register_with_scenic`), whose builders
# also take `start_step`.
SCENIC_DATASET_PREFIX = 'cvt_seg_'
# `config.eval` keys read by `inference.inference_settings` beyond those of `base_config`.
_EVAL_EXTRA_KEYS = ('min_size', 'pad_to_crop')


def base_config(model_name: str, dataset_name: str) -> ml_collections.ConfigDict:
  """mmseg's fine-tuning recipe (AdamW, warmup + poly, 160k steps, batch 16)."""
  config = ml_collections.ConfigDict()
  config.experiment_name = f'{model_name}_{dataset_name}'
  config.rng_seed = 0
  config.model_name = model_name
  config.model = models.default_model_config(model_name)
  config.loss = ml_collections.ConfigDict(
      dict(label_smoothing=0.0, aux_weight=0.4, avg_non_ignore=True))

  config.dataset_name = dataset_name
  config.dataset_configs = ml_collections.ConfigDict()
  config.data_dtype_str = 'float32'
  config.batch_size = 16
  config.eval_batch_size = 1
  config.num_training_steps = 160_000
  config.log_summary_steps = 50
  config.log_eval_steps = 16_000
  config.checkpoint_steps = 4_000
  config.max_checkpoints_to_keep = 3

  config.optimizer = ml_collections.ConfigDict(dict(
      base_lr=6e-5, weight_decay=0.01, b1=0.9, b2=0.999, warmup_steps=1500,
      warmup_ratio=1e-6, power=1.0, min_lr=0.0, layer_decay=0.9, head_lr_mult=10.0,
      grad_clip_norm=0.0, accumulation_steps=1))

  # Inference for evaluation (evaluate.py and the trainer's periodic evaluation).
  config.eval = ml_collections.ConfigDict(dict(
      mode='whole', crop_size=(512, 512), stride=(341, 341), scales=(1.0,), flip=False))
  return config


def mmseg_dataset_configs(data_dir: str, crop_size: tuple[int, int],
                          scale: tuple[int, int]) -> dict[str, Any]:
  """mmseg's training pipeline for a folder dataset: resize 0.5-2.0 of `scale`, crop, flip."""
  return dict(data_dir=data_dir, crop_size=crop_size, scale=scale, ratio_range=(0.5, 2.0),
              cat_max_ratio=0.75, num_workers=4)


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a minutes-long check of the whole pipeline on a CPU."""
  config.model.backbone.variant = 'cvt-tiny'
  config.model.backbone.pretrained = ''
  config.batch_size = 2
  config.num_training_steps = 4
  config.log_summary_steps = 2
  config.log_eval_steps = 4
  config.checkpoint_steps = 2
  config.optimizer.warmup_steps = 1
  if 'crop_size' in config.dataset_configs:
    config.dataset_configs.crop_size = (128, 128)
    config.dataset_configs.scale = (256, 128)
  return config


def dataset_keys(dataset_name: str | None) -> tuple[str, ...] | None:
  """The `dataset_configs` keys of a dataset (any one of them for None); None if unknown."""
  return configs.dataset_keys_of(dataset_name, DATASET_KEYS, COMMON_DATASET_KEYS,
                                 SCENIC_DATASET_PREFIX)


def _head_keys(head: str, *extra: str) -> configs.KnownKeys:
  # num_classes comes from the dataset, not the config.
  return dict.fromkeys([k for k in head_fields(heads.HEADS[head]) if k != 'num_classes']
                       + list(extra))


def model_keys(model_name: str) -> configs.KnownKeys | None:
  """`config.model`'s keys for a registered model: its backbone's and heads' settings."""
  cls = models.MODELS.get(model_name)
  if cls is None:
    return None
  known = {'backbone': configs.backbone_keys(), 'decode_head': _head_keys(cls.DECODE_HEAD)}
  if cls.NECK:
    known['neck'] = _head_keys(cls.NECK)
  if cls.AUXILIARY_HEAD:
    known['auxiliary_head'] = _head_keys(cls.AUXILIARY_HEAD, 'in_feature')
  return configs.merge_known_keys(known, configs.known_keys_of(cls.default_model_config()))


def claims(config: Any) -> bool:
  """Whether `config` names (or may be) one of this project's models and datasets."""
  return configs.names_project(config, models.MODELS, dataset_keys)


def known_config_keys(config: Any) -> configs.KnownKeys:
  """Every setting a config of this project may hold, for its model and dataset.

  `base_config`'s keys, the optimizer's (`configs.OPTIMIZER_KEYS`), `config.eval`'s, the
  top-level keys of Scenic's main (`configs.SCENIC_KEYS`), `config.model` for the model
  (its backbone and heads' fields; any registered model's when there is no `model_name`)
  and `config.dataset_configs` for the dataset (`dataset_keys`; unchecked for a dataset
  the builders do not know, which they reject themselves).
  """
  known = configs.known_keys_of(base_config(next(iter(models.MODELS)), 'synthetic'))
  known.update(dict.fromkeys(configs.SCENIC_KEYS))
  known['optimizer'].update(dict.fromkeys(configs.OPTIMIZER_KEYS))
  known['eval'].update(dict.fromkeys(_EVAL_EXTRA_KEYS))
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
