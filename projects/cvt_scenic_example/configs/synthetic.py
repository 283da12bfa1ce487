r"""Scenic config: a CvT segmentation model trained by Scenic's `classification_trainer`.

  python -m projects.cvt_scenic_example.main \
    --config=projects/cvt_scenic_example/configs/synthetic.py:model=cvt_upernet \
    --workdir=workdirs/scenic_example

On the project's generated shapes (`cvt_seg_synthetic`, 6 classes, 64x64). Arguments:
model ('cvt_linear_segmentation' of `model.py`, the default, or the project's 'cvt_upernet',
'cvt_semantic_fpn', 'cvt_segformer', 'cvt_fpn_linear'), steps (300), pretrained (a
converted CvT checkpoint), sync_bn (BatchNorm statistics over all devices), runlocal (a
seconds-long CPU check).
"""

from projects.cvt_scenic_example.configs import common


def get_config(arg=None):
  args = common.parse(arg)
  config = common.scenic_config(args, 'cvt_seg_synthetic', dict(
      num_classes=6, image_size=(64, 64), num_train=2000, num_eval=64))
  if args.runlocal:
    config.dataset_configs.update(image_size=(32, 32), num_train=16, num_eval=6)
  return config
