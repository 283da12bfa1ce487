r"""ADE20K: CvT-13 + UPerNet (+ FCN auxiliary head), 512x512 crops, 160k iterations.

mmsegmentation's UPerNet recipe for ImageNet-pretrained transformers (ConvNeXt/Swin): AdamW
lr 1e-4, weight decay 0.05 (none on norms, biases, cls token), layer-wise lr decay 0.9,
warmup 1500 iterations then poly decay, batch 16, random resize 0.5-2.0 of (2048, 512), crop
512 (cat_max_ratio 0.75), flip, photometric distortion; whole-image evaluation.

  cvt-convert CvT-13-224x224-IN-1k.pth cvt-13.msgpack --backbone-only
  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/ade20k_cvt13_upernet.py:pretrained=cvt-13.msgpack,data_dir=/data/ade \
    --workdir=workdirs/cvt13_upernet_ade20k

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  return common.mmseg_config(arg, 'cvt_upernet', 'ade20k', (512, 512), (2048, 512), 160_000,
                             optimizer=dict(weight_decay=0.05))
