r"""ADE20K: CvT-13 + FPN + Semantic FPN head, 512x512 crops, 40k iterations.

The PVT Semantic FPN recipe (Wang et al. 2021, Table 3, as in mmsegmentation):
AdamW lr 1e-4, weight decay 1e-4, poly decay power 0.9, batch 16, 40k
iterations, the ADE20K augmentations of mmsegmentation; whole-image evaluation.

  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/ade20k_cvt13_semantic_fpn.py:pretrained=cvt-13.msgpack,data_dir=/data/ade \
    --workdir=workdirs/cvt13_semantic_fpn_ade20k

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, variant='13', pretrained='', data_dir='', runlocal=False)
  config = common.base_config('cvt_semantic_fpn', 'ade20k')
  config.experiment_name = f'cvt{args.variant}_semantic_fpn_ade20k_512x512_40k'
  config.model.backbone.variant = f'cvt-{args.variant}'
  config.model.backbone.pretrained = args.pretrained
  config.dataset_configs = common.mmseg_dataset_configs(args.data_dir, (512, 512), (2048, 512))
  config.num_training_steps = 40_000
  config.log_eval_steps = 4_000
  config.optimizer.base_lr = 1e-4
  config.optimizer.weight_decay = 1e-4
  config.optimizer.power = 0.9
  config.optimizer.warmup_steps = 0
  config.optimizer.layer_decay = 1.0
  config.optimizer.head_lr_mult = 1.0
  config.eval.mode = 'whole'
  if args.runlocal:
    common.apply_runlocal(config)
  config.lock()
  return config
