"""What the example's Scenic configs share: model, Scenic optimizer and schedule, runlocal.

These configs are read by Scenic's `classification_trainer`, so their settings are Scenic's:
`known_config_keys` holds them (`CLASSIFICATION_TRAINER_KEYS`), the models' (the project's
and `model.py`'s) and the project datasets' as registered with Scenic (`cvt_seg_*`);
`check_config` is run by the example's `main` before Scenic's.
"""

from __future__ import annotations

import sys
from typing import Any

import ml_collections

from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs import common as segmentation
from projects.cvt_segmentation.configs.common import parse_arg
from projects.training import configs

# Top-level keys Scenic reads with `classification_trainer` (../shared/third_party/scenic):
# train_lib/classification_trainer.py (optimizer via optimizers.get_optax_optimizer_config,
# schedule via lr_schedules.get_learning_rate_fn, `max_grad_norm`, `mixup`, logging and
# checkpoint steps), train_lib/train_utils.py (steps, epochs, `init_head_bias`, `batch_sizes`)
# and model_lib/base_models/segmentation_model.py (its loss settings). `optimizer_configs`
# and `lr_configs` are Scenic's own vocabulary, passed on to optax: not checked inside.
CLASSIFICATION_TRAINER_KEYS = (
    'optimizer_configs', 'lr_configs', 'max_grad_norm', 'mixup', 'log_summary_steps',
    'log_eval_steps', 'checkpoint_steps', 'max_checkpoint_keep', 'steps_per_eval',
    'report_progress_step', 'num_training_steps', 'num_training_epochs', 'init_head_bias',
    'batch_sizes', 'label_smoothing', 'l2_decay_factor', 'class_rebalancing_factor')
# Models of `model.py` (not importable without Scenic): `config.model`'s keys.
USER_MODELS = {'cvt_linear_segmentation': lambda: {'backbone': configs.backbone_keys()}}

# Arguments of every config: `:model=...,steps=...,pretrained=...,sync_bn,runlocal`.
COMMON_ARGS = dict(model='cvt_linear_segmentation', steps=300, pretrained='', sync_bn=False,
                   runlocal=False)


def parse(arg: str | None, **dataset_args) -> ml_collections.ConfigDict:
  return parse_arg(arg, **COMMON_ARGS, **dataset_args)


def scenic_config(args: ml_collections.ConfigDict, dataset_name: str,
                  dataset_configs: dict) -> ml_collections.ConfigDict:
  """A Scenic `classification_trainer` config for `args.model` on a registered dataset."""
  config = ml_collections.ConfigDict()
  config.experiment_name = f'{args.model}_{dataset_name}'
  config.rng_seed = 0

  config.dataset_name = dataset_name
  config.data_dtype_str = 'float32'
  config.dataset_configs = ml_collections.ConfigDict(dataset_configs)
  config.batch_size = 16
  config.eval_batch_size = 16

  config.model_name = args.model
  if args.model in models.MODELS:
    config.model = models.default_model_config(args.model)
  else:
    config.model = ml_collections.ConfigDict({'backbone': {'variant': 'cvt-13'}})
  config.model.backbone.variant = 'cvt-tiny'
  config.model.backbone.drop_path_rate = 0.0
  config.model.backbone.pretrained = args.pretrained
  if args.sync_bn:
    config.model.backbone.bn_axis_name = 'batch'
    for head in ('decode_head', 'auxiliary_head'):
      if config.model.get(head, {}).get('norm') == 'batch':
        config.model[head].axis_name = 'batch'
  config.loss = ml_collections.ConfigDict(dict(aux_weight=0.4))

  # Scenic's optimizer and schedule settings (scenic.train_lib.optimizers, lr_schedules).
  config.optimizer_configs = ml_collections.ConfigDict(dict(
      optimizer='adamw', weight_decay=0.01, b1=0.9, b2=0.999))
  config.lr_configs = ml_collections.ConfigDict(dict(
      learning_rate_schedule='compound', factors='constant*linear_warmup*cosine_decay',
      warmup_steps=30, steps_per_cycle=args.steps, base_learning_rate=2e-3))
  config.num_training_steps = args.steps
  config.max_grad_norm = 1.0
  config.log_summary_steps = 50
  config.log_eval_steps = 100
  config.checkpoint = True
  config.checkpoint_steps = 100
  config.xprof = False
  config.count_flops = False
  config.debug_train = False
  config.debug_eval = False
  if args.runlocal:
    apply_runlocal(config)
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
  """A seconds-long CPU check: 3 steps, batch 4, small heads, evaluation at the end."""
  config.batch_size = 4
  config.eval_batch_size = 4
  config.num_training_steps = 3
  config.lr_configs.warmup_steps = 1
  config.lr_configs.steps_per_cycle = 3
  config.log_summary_steps = 1
  config.log_eval_steps = 3
  config.checkpoint_steps = 3
  config.model.backbone.attention = 'plain'
  for head, channels in (('decode_head', 32), ('auxiliary_head', 16), ('neck', 32)):
    key = 'out_channels' if head == 'neck' else 'channels'
    if key in config.model.get(head, {}):
      config.model[head][key] = channels


def _dataset_keys(dataset_name: str) -> tuple[str, ...] | None:
  # Only the names of Scenic's registry: the example's `main` looks datasets up there.
  if not dataset_name.startswith(segmentation.SCENIC_DATASET_PREFIX):
    return None
  return segmentation.dataset_keys(dataset_name)


def claims(config: Any) -> bool:
  """Whether `config` is one of this example's (a CvT model on a `cvt_seg_*` dataset)."""
  return (configs.config_get(config, 'dataset_name') is not None
          and configs.names_project(config, [*models.MODELS, *USER_MODELS], _dataset_keys))


def known_config_keys(config: Any) -> configs.KnownKeys:
  """The settings of an example config: `scenic_config`'s, Scenic's and the model's."""
  model_name = configs.config_get(config, 'model_name', 'cvt_linear_segmentation')
  known = configs.known_keys_of(scenic_config(parse(None), 'cvt_seg_synthetic', {}))
  known.update(dict.fromkeys((*configs.SCENIC_KEYS, *CLASSIFICATION_TRAINER_KEYS)))
  # The project's models read `config.loss` (as in the project's configs).
  known['loss'] = configs.known_keys_of(segmentation.base_config(
      next(iter(models.MODELS)), 'synthetic').loss)
  if model_name in USER_MODELS:
    known['model'] = USER_MODELS[model_name]()
  else:
    known['model'] = segmentation.model_keys(model_name)
  names = _dataset_keys(configs.config_get(config, 'dataset_name', ''))
  known['dataset_configs'] = None if names is None else dict.fromkeys(names)
  return known


def check_config(config: Any, source: str | None = None) -> None:
  """Raises `configs.ConfigKeyError` for keys of `config` that nothing reads."""
  configs.check_config_keys(config, known_config_keys(config), source)


# `projects.training.configs.load_config` checks a config loaded from a file against the
# projects registered here (a config file imports its project's common module).
configs.register_config_family(sys.modules[__name__])
