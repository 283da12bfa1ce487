r"""Cityscapes: CvT-13 + UPerNet (+ FCN auxiliary head), 512x1024 crops, 80k iterations.

mmsegmentation's Cityscapes schedule: batch 8, 80k iterations, random resize 0.5-2.0 of
(2048, 1024), crop 512x1024 (cat_max_ratio 0.75), flip, photometric distortion; 19 train
ids, ignore 255; sliding-window evaluation (512x1024 windows, stride 341x682) at full
resolution. Optimizer as the ADE20K UPerNet config.

  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/cityscapes_cvt13_upernet.py:pretrained=cvt-13.msgpack,data_dir=/data/cityscapes \
    --workdir=workdirs/cvt13_upernet_cityscapes

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  return common.mmseg_config(
      arg, 'cvt_upernet', 'cityscapes', (512, 1024), (2048, 1024), 80_000, batch_size=8,
      optimizer=dict(weight_decay=0.05),
      eval=dict(mode='slide', crop_size=(512, 1024), stride=(341, 682)))
