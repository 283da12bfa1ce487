"""What the example's Scenic configs share: model, Scenic optimizer and schedule, runlocal."""

from __future__ import annotations

import ml_collections

from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs.common import parse_arg

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
