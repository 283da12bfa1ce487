r"""Synthetic demo: CvT-tiny + UPerNet trained from scratch on generated shapes, on a CPU.

The README quickstart: no download, a few minutes on 2 CPU cores.

  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/synthetic_demo.py \
    --workdir=workdirs/cvt_synthetic_demo

Arguments (`--config=...synthetic_demo.py:steps=600,runlocal`): steps, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=500, runlocal=False)
  config = common.base_config('cvt_upernet', 'synthetic')
  config.model.backbone.update(variant='cvt-tiny', drop_path_rate=0.0)
  config.model.decode_head.channels = 64
  config.model.auxiliary_head.channels = 32
  config.dataset_configs = dict(num_classes=6, image_size=(64, 64), num_train=2000,
                                num_eval=64)
  config.update(eval_batch_size=16, num_training_steps=args.steps, log_eval_steps=250,
                checkpoint_steps=250)
  # From scratch, so no layer-wise decay and one rate for everything.
  config.optimizer.update(base_lr=2e-3, layer_decay=1.0, head_lr_mult=1.0, warmup_steps=50)
  config.eval.update(crop_size=(64, 64), stride=(48, 48))
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
