"""What every cvt_segmentation config shares: training defaults, argument parsing, runlocal.

Configs are `get_config(arg=None)` functions returning a locked ConfigDict, so a
misspelled key (`config.optimiser = ...` or `--config.optimizer.base_rl=...`) is an
error naming it instead of a silently ignored setting.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from projects.cvt_segmentation import models
from projects.training.configs import parse_arg

__all__ = ['apply_runlocal', 'base_config', 'mmseg_dataset_configs', 'parse_arg']


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
