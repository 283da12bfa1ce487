r"""Scenic config: a CvT segmentation model on your own images and masks.

  python -m projects.cvt_scenic_example.main --workdir=workdirs/scenic_folder \
    --config=projects/cvt_scenic_example/configs/folder.py:data_dir=/data/mine,num_classes=5

`data_dir` in mmsegmentation's custom layout: `img_dir/{train,val}/*.jpg|png|...` and
`ann_dir/{train,val}/*.png`, masks of class indices with 255 ignored, paired by file stem.
Any image size: training crops of `crop` pixels after mmseg's random resize; evaluation on
whole images padded to a multiple of 32. Arguments (`:data_dir=...,num_classes=...,crop=...`,
plus those of `synthetic.py`: model, steps, pretrained, sync_bn, runlocal).
"""

import os

from projects.cvt_scenic_example.configs import common


def get_config(arg=None):
  args = common.parse(arg, data_dir='', num_classes=0, crop=256)
  if not args.data_dir or args.num_classes <= 0:
    raise ValueError('folder.py needs the arguments data_dir and num_classes, e.g. '
                     f'folder.py:data_dir=/data/mine,num_classes=5; got {arg!r}.')
  root = args.data_dir
  config = common.scenic_config(args, 'cvt_seg_folder', dict(
      train_images=os.path.join(root, 'img_dir', 'train'),
      train_masks=os.path.join(root, 'ann_dir', 'train'),
      val_images=os.path.join(root, 'img_dir', 'val'),
      val_masks=os.path.join(root, 'ann_dir', 'val'),
      num_classes=args.num_classes, crop_size=(args.crop, args.crop),
      scale=(4 * args.crop, args.crop), test_scale=None))
  config.batch_size = config.eval_batch_size = 8
  if args.runlocal:
    config.dataset_configs.update(crop_size=(32, 32), scale=(64, 32))
    config.batch_size = config.eval_batch_size = 4
  return config
