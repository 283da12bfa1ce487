r"""Cityscapes: CvT-13 + UPerNet (+ FCN auxiliary head), 512x1024 crops, 80k iterations.

mmsegmentation's Cityscapes schedule: batch 8, 80k iterations, random resize
0.5-2.0 of (2048, 1024), crop 512x1024 with cat_max_ratio 0.75, flip,
photometric distortion; 19 train ids, ignore 255; sliding-window evaluation
(512x1024 windows, stride 341x682) at full resolution. Optimizer as the
ADE20K UPerNet config.

  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/cityscapes_cvt13_upernet.py:pretrained=cvt-13.msgpack,data_dir=/data/cityscapes \
    --workdir=workdirs/cvt13_upernet_cityscapes

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='13', pretrained='', data_dir='', runlocal=False)
  config = common.base_config('cvt_upernet', 'cityscapes')
  config.experiment_name = f'cvt{args.variant}_upernet_cityscapes_512x1024_80k'
  config.model.backbone.variant = f'cvt-{args.variant}'
  config.model.backbone.pretrained = args.pretrained
  config.dataset_configs = common.mmseg_dataset_configs(args.data_dir, (512, 1024), (2048, 1024))
  config.batch_size = 8
  config.num_training_steps = 80_000
  config.log_eval_steps = 8_000
  config.optimizer.base_lr = 1e-4
  config.optimizer.weight_decay = 0.05
  config.optimizer.layer_decay = 0.9
  config.optimizer.head_lr_mult = 1.0
  config.eval.mode = 'slide'
  config.eval.crop_size = (512, 1024)
  config.eval.stride = (341, 682)
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
