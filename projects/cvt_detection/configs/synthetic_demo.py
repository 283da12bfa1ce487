r"""Synthetic detection demo: CvT-tiny + ATSS trained from scratch on generated shapes, on a CPU.

No download; minutes on 2 CPU cores; ends with COCO AP on the validation split.

  python -m projects.cvt_detection.main \
    --config=projects/cvt_detection/configs/synthetic_demo.py \
    --workdir=workdirs/cvt_detection_demo

Arguments (`--config=...synthetic_demo.py:steps=1200,runlocal`): steps, runlocal.
"""

from projects.cvt_detection.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, steps=1000, runlocal=False)
  config = common.base_config('cvt_atss', 'synthetic')
  config.model.backbone.update(variant='cvt-tiny', drop_path_rate=0.0)
  # A narrow neck and head: the objects are simple, the CPU small.
  config.model.neck.out_channels = 64
  config.model.head.channels = 64
  config.dataset_configs = dict(num_classes=4, image_size=(128, 128), num_train=4000,
                                num_eval=100, max_boxes=8)
  config.update(eval_batch_size=25, num_training_steps=args.steps,
                log_eval_steps=args.steps // 2, checkpoint_steps=args.steps // 4)
  # From scratch: a higher rate, a short warmup, the 1x shape of decays (8/12 and 11/12).
  config.optimizer.update(base_lr=1e-3, warmup_steps=100, grad_clip_norm=10.0,
                          decay_steps=(args.steps * 8 // 12, args.steps * 11 // 12))
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
