r"""ADE20K: CvT-13 + FPN + Semantic FPN head, 512x512 crops, 40k iterations.

The PVT Semantic FPN recipe (Wang et al. 2021, Table 3, as in mmsegmentation): AdamW lr
1e-4, weight decay 1e-4, poly decay power 0.9, batch 16, 40k iterations, mmsegmentation's
ADE20K augmentations; whole-image evaluation.

  python -m projects.cvt_segmentation.main \
    --config=projects/cvt_segmentation/configs/ade20k_cvt13_semantic_fpn.py:pretrained=cvt-13.msgpack,data_dir=/data/ade \
    --workdir=workdirs/cvt13_semantic_fpn_ade20k

Arguments: variant (13, 21, w24), pretrained, data_dir, runlocal.
"""

from projects.cvt_segmentation.configs import common


def get_config(arg=None):
  return common.mmseg_config(
      arg, 'cvt_semantic_fpn', 'ade20k', (512, 512), (2048, 512), 40_000,
      optimizer=dict(weight_decay=1e-4, power=0.9, warmup_steps=0, layer_decay=1.0))
