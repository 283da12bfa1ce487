"""What every cvt_segmentation config shares: mmseg's recipe, runlocal, the known keys.

`CONFIG_KEYS` is every setting a config may hold (the defaults below, the models' heads,
the datasets' `DATASET_KEYS`); `main` and the tools check a config against it.
"""

from __future__ import annotations

import functools

import ml_collections

import heads
from cvt_backbone.tools import is_int
from heads.registry import head_fields
from projects.cvt_segmentation import models
from projects.training import configs
from projects.training.configs import parse_arg

__all__ = ['CONFIG_KEYS', 'DATASET_KEYS', 'apply_runlocal', 'base_config', 'load_config',
           'mmseg_config', 'parse_arg']

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
# of `build_loaders` that the runner leaves to the config.
COMMON_DATASET_KEYS = ('crop_size', 'scale', 'ratio_range', 'cat_max_ratio', 'flip_prob',
                       'photometric', 'num_threads', 'num_workers', 'eval_pad_shape',
                       'eval_label_pad_shape', 'eval_size_divisor', 'test_scale',
                       'pixel_batch_mask', 'validate')
# The datasets' names in Scenic's registry (`data.register_with_scenic`).
SCENIC_DATASET_PREFIX = 'cvt_seg_'


def base_config(model_name: str, dataset_name: str) -> ml_collections.ConfigDict:
  """mmseg's fine-tuning recipe (AdamW, warmup + poly, 160k steps, batch 16)."""
  return configs.training_config(
      model_name, dataset_name, models.get_model_cls(model_name).default_model_config(),
      optimizer=dict(base_lr=6e-5, weight_decay=0.01, warmup_steps=1500, warmup_ratio=1e-6,
                     layer_decay=0.9, head_lr_mult=10.0),
      loss=models.LOSS_DEFAULTS, batch_size=16, eval_batch_size=1, num_training_steps=160_000,
      log_eval_steps=16_000, checkpoint_steps=4_000,
      # Inference for evaluation (evaluate.py and the trainer's periodic evaluation).
      eval=dict(mode='whole', crop_size=(512, 512), stride=(341, 341), scales=(1.0,),
                flip=False))


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config to a minutes-long check of the whole pipeline on a CPU."""
  configs.apply_runlocal(config)
  if 'crop_size' in config.dataset_configs:
    config.dataset_configs.update(crop_size=(128, 128), scale=(256, 128))
  return config


def mmseg_config(arg: str | None, model_name: str, dataset_name: str, crop_size: tuple[int, int],
                 scale: tuple[int, int], steps: int, **settings) -> ml_collections.ConfigDict:
  """A pretrained CvT fine-tuned on a dataset folder with mmseg's pipeline, locked.

  Random resize 0.5-2.0 of `scale`, crop `crop_size` (cat_max_ratio 0.75), flip; AdamW lr
  1e-4 with one rate for the heads; evaluation every tenth of `steps`. `settings` update
  the config (`optimizer=dict(...)` merges). Arguments of `arg`: variant (13, 21, w24),
  pretrained, data_dir, runlocal.
  """
  args = parse_arg(arg, variant='13', pretrained='', data_dir='', runlocal=False)
  config = base_config(model_name, dataset_name)
  config.experiment_name = (f'cvt{args.variant}_{model_name.removeprefix("cvt_")}_'
                            f'{dataset_name}_{crop_size[0]}x{crop_size[1]}_{steps // 1000}k')
  config.model.backbone.update(variant=f'cvt-{args.variant}', pretrained=args.pretrained)
  config.dataset_configs = dict(data_dir=args.data_dir, crop_size=crop_size, scale=scale,
                                ratio_range=(0.5, 2.0), cat_max_ratio=0.75, num_workers=4,
                                validate='full')
  config.update(num_training_steps=steps, log_eval_steps=steps // 10)
  config.optimizer.update(base_lr=1e-4, head_lr_mult=1.0)
  config.update(settings)
  if args.runlocal:
    apply_runlocal(config)
  config.lock()
  return config


def model_keys(cls: type[models.SegmentationModel]) -> configs.KnownKeys:
  """`config.model`'s keys for a model class: its backbone's and heads' settings."""
  sections = {'decode_head': head_fields(heads.HEADS[cls.DECODE_HEAD])}
  if cls.NECK:
    sections['neck'] = head_fields(heads.HEADS[cls.NECK])
  if cls.AUXILIARY_HEAD:
    sections['auxiliary_head'] = (*head_fields(heads.HEADS[cls.AUXILIARY_HEAD]), 'in_feature')
  return configs.model_keys(cls.default_model_config(), **sections)


CONFIG_KEYS = configs.project_keys(
    base_config(next(iter(models.MODELS)), 'synthetic'),
    models={name: model_keys(cls) for name, cls in models.MODELS.items()},
    datasets=DATASET_KEYS, common_dataset_keys=COMMON_DATASET_KEYS,
    scenic_prefix=SCENIC_DATASET_PREFIX,
    # Read with defaults: the optimizer's other settings, `cli.inference_settings`'s.
    extra={'optimizer': dict.fromkeys(configs.OPTIMIZER_KEYS),
           'eval': dict.fromkeys(('min_size', 'pad_to_crop'))},
    # Labels are uint8 with 255 the ignore label; one class (all background) learns nothing.
    values={'dataset_configs.num_classes': configs.ValueRule(
        'an integer in [2, 255]', lambda v: is_int(v) and 2 <= v <= 255)})

load_config = functools.partial(configs.load_config, keys=CONFIG_KEYS)
