"""Necks and decode heads for dense prediction on any backbone returning NHWC feature dicts.

A backbone returns `{'stage1': [N, H/4, W/4, C1], ...}`; `FPN` turns those into `'p2'...`
levels; decode heads (`SemanticFPNHead`, `UPerNetHead`, `FCNHead`, `SegFormerHead`,
`LinearHead`) return `[N, h, w, K]` logits at their finest input's resolution; `Segmentor` ties
a backbone, neck and heads together and returns logits at the input size. `build_head` builds
heads from names or config dicts. `segmentation_loss` is the cross-entropy that resizes a
head's logits to the labels a block of rows at a time; the heads' convolutions run through
`dense_conv` (matrix-product kernel gradients on CPU).

Detection: `heads.detection.Detector` ties a backbone, the P3-P7 neck of `detection_fpn` and
an `ATSSHead` (FCOS/ATSS family) and returns per-point predictions; `heads.detection` also
holds the ATSS targets, the losses, the jit NMS and the box utilities.
"""

from heads.checkpoint import merge_variables, torch_to_flax
from heads.atss_head import ATSSHead, flatten_levels, split_levels
from heads.conv_module import NORMS, ConvModule
from heads.detection.detector import Detector
from heads.features import feature_kwargs, select_features
from heads.fpn import FPN, detection_fpn
from heads.linear import LinearHead
from heads.registry import HEADS, build_head, register_head
from heads.resampling import adaptive_avg_pool, resize_bilinear, resize_nearest
from heads.segformer import SegFormerHead, convert_hf_segformer_head
from heads.segmentation.segmentor import Segmentor
from heads.semantic_fpn import SemanticFPNHead
from heads.upernet import FCNHead, UPerNetHead, convert_hf_fcn_head, convert_hf_upernet_head

__all__ = [
    'ATSSHead',
    'Detector',
    'FPN',
    'HEADS',
    'NORMS',
    'ConvModule',
    'FCNHead',
    'LinearHead',
    'SegFormerHead',
    'Segmentor',
    'SemanticFPNHead',
    'UPerNetHead',
    'adaptive_avg_pool',
    'build_head',
    'convert_hf_fcn_head',
    'convert_hf_segformer_head',
    'convert_hf_upernet_head',
    'detection_fpn',
    'feature_kwargs',
    'flatten_levels',
    'merge_variables',
    'register_head',
    'resize_bilinear',
    'resize_nearest',
    'select_features',
    'split_levels',
    'torch_to_flax',
]
