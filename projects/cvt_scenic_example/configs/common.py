"""What the example's Scenic configs share: model, Scenic optimizer and schedule, runlocal.

Scenic's `classification_trainer` reads these configs, so their settings are Scenic's:
`CONFIG_KEYS` holds them, the models' (the project's and `model.py`'s) and the project's
datasets as registered with Scenic (`cvt_seg_*`).
"""

from __future__ import annotations

import ml_collections

from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs import common as segmentation
from projects.training import configs
from projects.training.configs import parse_arg

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
# Arguments of every config: `:model=...,steps=...,pretrained=...,sync_bn,runlocal`.
COMMON_ARGS = dict(model='cvt_linear_segmentation', steps=300, pretrained='', sync_bn=False,
                   runlocal=False)


def parse(arg: str | None, **dataset_args) -> ml_collections.ConfigDict:
  return parse_arg(arg, **COMMON_ARGS, **dataset_args)


def scenic_config(args: ml_collections.ConfigDict, dataset_name: str,
                  dataset_configs: dict) -> ml_collections.ConfigDict:
  """A Scenic `classification_trainer` config for `args.model` on a registered dataset."""
  config = ml_collections.ConfigDict(dict(
      experiment_name=f'{args.model}_{dataset_name}', rng_seed=0, dataset_name=dataset_name,
      data_dtype_str='float32', dataset_configs=dataset_configs, batch_size=16,
      eval_batch_size=16, model_name=args.model,
      loss=dict(aux_weight=models.LOSS_DEFAULTS['aux_weight']),
      # Scenic's optimizer and schedule settings (scenic.train_lib.optimizers, lr_schedules).
      optimizer_configs=dict(optimizer='adamw', weight_decay=0.01, b1=0.9, b2=0.999),
      lr_configs=dict(learning_rate_schedule='compound',
                      factors='constant*linear_warmup*cosine_decay', warmup_steps=30,
                      steps_per_cycle=args.steps, base_learning_rate=2e-3),
      num_training_steps=args.steps, max_grad_norm=1.0, log_summary_steps=50,
      log_eval_steps=100, checkpoint=True, checkpoint_steps=100, xprof=False,
      count_flops=False, debug_train=False, debug_eval=False))
  if args.model in models.MODELS:
    config.model = models.get_model_cls(args.model).default_model_config()
  else:
    config.model = ml_collections.ConfigDict({'backbone': {'variant': 'cvt-13'}})
  config.model.backbone.update(variant='cvt-tiny', drop_path_rate=0.0,
                               pretrained=args.pretrained)
  if args.sync_bn:
    config.model.backbone.bn_axis_name = 'batch'
    for head in ('decode_head', 'auxiliary_head'):
      if config.model.get(head, {}).get('norm') == 'batch':
        config.model[head].axis_name = 'batch'
  if args.runlocal:
    apply_runlocal(config)
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
  """A seconds-long CPU check: 3 steps, batch 4, small heads, evaluation at the end."""
  config.update(batch_size=4, eval_batch_size=4, num_training_steps=3, log_summary_steps=1,
                log_eval_steps=3, checkpoint_steps=3)
  config.lr_configs.update(warmup_steps=1, steps_per_cycle=3)
  config.model.backbone.attention = 'plain'
  for head, channels in (('decode_head', 32), ('auxiliary_head', 16), ('neck', 32)):
    key = 'out_channels' if head == 'neck' else 'channels'
    if key in config.model.get(head, {}):
      config.model[head][key] = channels


CONFIG_KEYS = configs.ProjectKeys(
    common=configs.merge_known_keys(
        configs.known_keys_of(scenic_config(parse(None), 'cvt_seg_synthetic', {})),
        dict.fromkeys((*configs.SCENIC_KEYS, *CLASSIFICATION_TRAINER_KEYS)),
        # The project's models read `config.loss` (as in the project's configs).
        {'loss': dict.fromkeys(models.LOSS_DEFAULTS)}),
    # `model.py`'s model (not importable without Scenic) and the project's.
    models={'cvt_linear_segmentation': {'backbone': configs.backbone_keys()},
            **segmentation.CONFIG_KEYS.models},
    # Only the names of Scenic's registry: `main` looks datasets up there.
    datasets={name: keys for name, keys in segmentation.CONFIG_KEYS.datasets.items()
              if name.startswith(segmentation.SCENIC_DATASET_PREFIX)})
