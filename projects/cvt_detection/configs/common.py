"""What every cvt_detection config shares: mmdet's 1x recipe, runlocal, the known keys.

`CONFIG_KEYS` is every setting a config may hold (the defaults below, the model's neck and
head, the datasets' `DATASET_KEYS`); `main` and the tools check a config against it.
"""

from __future__ import annotations

import functools

import ml_collections

from heads import FPN, ATSSHead
from heads.registry import head_fields
from projects.cvt_detection import models
from projects.training import configs
from projects.training.configs import parse_arg

__all__ = ['CONFIG_KEYS', 'DATASET_KEYS', 'apply_runlocal', 'base_config', 'load_config',
           'parse_arg', 'schedule_1x']

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
# The datasets' names in Scenic's registry (`data.register_with_scenic`).
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
  batch_size = 16
  total, decays = schedule_1x(COCO_TRAIN_IMAGES, batch_size)
  return configs.training_config(
      model_name, dataset_name, models.get_model_cls(model_name).default_model_config(),
      # AdamW lr 1e-4, weight decay 0.05 (none on norms and biases); mmdet's warmup: 500
      # steps from 0.001 of the rate (schedule_1x.py), then step decay.
      optimizer=dict(base_lr=1e-4, weight_decay=0.05, schedule='step', decay_steps=decays,
                     decay_factor=0.1, warmup_steps=500, warmup_ratio=1e-3, layer_decay=1.0,
                     head_lr_mult=1.0),
      loss=models.LOSS_DEFAULTS, batch_size=batch_size, eval_batch_size=8, num_training_steps=total,
      log_eval_steps=total // 12,  # every epoch, as mmdet
      checkpoint_steps=2_000,
      # Post-processing of evaluation and prediction (mmdet ATSS test_cfg).
      eval=models.DETECT_DEFAULTS)


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a minutes-long check of the whole pipeline on a CPU."""
  configs.apply_runlocal(config)
  config.model.neck.out_channels = 32
  config.model.head.channels = 32
  config.eval_batch_size = 2
  config.optimizer.decay_steps = (3,)
  if config.dataset_name != 'synthetic':
    config.dataset_configs.scale = (160, 96)
  return config


def model_keys(cls: type[models.DetectionModel]) -> configs.KnownKeys:
  """`config.model`'s keys for a model class: its backbone, neck and head settings."""
  return configs.model_keys(
      cls.default_model_config(), head=head_fields(ATSSHead),
      neck=[*(k for k in head_fields(FPN) if k not in _NECK_DERIVED), 'max_stride'])


CONFIG_KEYS = configs.project_keys(
    base_config(next(iter(models.MODELS)), 'synthetic'),
    models={name: model_keys(cls) for name, cls in models.MODELS.items()},
    datasets=DATASET_KEYS, common_dataset_keys=COMMON_DATASET_KEYS,
    scenic_prefix=SCENIC_DATASET_PREFIX,
    extra={'optimizer': dict.fromkeys(configs.OPTIMIZER_KEYS)})

load_config = functools.partial(configs.load_config, keys=CONFIG_KEYS)
