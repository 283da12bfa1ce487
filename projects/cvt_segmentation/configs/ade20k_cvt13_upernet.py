r"""ADE20K: CvT-13 + UPerNet (+ FCN auxiliary head), 512x512 crops, 160k iterations.

The mmsegmentation UPerNet recipe for ImageNet-pretrained transformers (as for
ConvNeXt/Swin): AdamW lr 1e-4, weight decay 0.05 (none on norms, biases, cls
token), layer-wise lr decay 0.9, linear warmup 1500 iterations then poly decay,
batch 16, random resize 0.5-2.0 of (2048, 512), crop 512 with cat_max_ratio
0.75, flip, photometric distortion; whole-image evaluation at (2048, 512).

  cvt-convert CvT-13-224x224-IN-1k.pth cvt-13.msgpack --backbone-only
  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/ade20k_cvt13_upernet.py:pretrained=cvt-13.msgpack,data_dir=/data/ade \
    --workdir=workdirs/cvt13_upernet_ade20k

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='13', pretrained='', data_dir='', runlocal=False)
  config = common.base_config('cvt_upernet', 'ade20k')
  config.experiment_name = f'cvt{args.variant}_upernet_ade20k_512x512_160k'
  config.model.backbone.variant = f'cvt-{args.variant}'
  config.model.backbone.pretrained = args.pretrained
  config.dataset_configs = common.mmseg_dataset_configs(args.data_dir, (512, 512), (2048, 512))
  config.num_training_steps = 160_000
  config.optimizer.base_lr = 1e-4
  config.optimizer.weight_decay = 0.05
  config.optimizer.layer_decay = 0.9
  config.optimizer.head_lr_mult = 1.0
  config.eval.mode = 'whole'
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
