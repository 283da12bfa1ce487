"""What every cvt_detection config shares: mmdet's 1x recipe for a transformer backbone.

Configs are `get_config(arg=None)` functions returning a locked ConfigDict, so a misspelled
key (`config.optimiser = ...` or `--config.optimizer.base_rl=...`) is an error naming it.
"""

from __future__ import annotations

import ml_collections

from projects.cvt_detection import models
from projects.training.configs import parse_arg

__all__ = ['apply_runlocal', 'base_config', 'parse_arg', 'schedule_1x']

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
