r"""Scenic config: a CvT segmentation model trained by Scenic's `classification_trainer`.

  python -m projects.cvt_scenic_example.main \
    --config=projects/cvt_scenic_example/configs/synthetic.py:model=cvt_upernet \
    --workdir=workdirs/scenic_example

Arguments (`:model=...,steps=...,pretrained=...,runlocal`):
  model: a Scenic model name: 'cvt_linear_segmentation' (the user model of `model.py`,
    default), or the project's 'cvt_upernet', 'cvt_semantic_fpn', 'cvt_segformer',
    'cvt_fpn_linear'.
  dataset: a registered dataset: 'cvt_seg_synthetic' (default) or 'cvt_seg_folder' (then
    set `--config.dataset_configs.*`: train_images, train_masks, val_images, val_masks,
    num_classes).
  steps: training steps.
  pretrained: a converted CvT checkpoint (`cvt-convert ... --backbone-only`) for the backbone.
  sync_bn: BatchNorm statistics over all devices (the pmap axis 'batch'), backbone and heads.
  runlocal: a seconds-long CPU check (tiny images, 3 steps).
"""

import ml_collections

from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, model='cvt_linear_segmentation', dataset='cvt_seg_synthetic',
                          steps=300, pretrained='', sync_bn=False, runlocal=False)
  config = ml_collections.ConfigDict()
  config.experiment_name = f'{args.model}_{args.dataset}'
  config.rng_seed = 0

  config.dataset_name = args.dataset
  config.data_dtype_str = 'float32'
  config.dataset_configs = ml_collections.ConfigDict(
      dict(num_classes=6, image_size=(64, 64), num_train=2000, num_eval=64))
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
    config.dataset_configs.image_size = (32, 48)
    config.dataset_configs.num_train = 16
    config.dataset_configs.num_eval = 6
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
  return config
