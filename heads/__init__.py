"""Necks, heads and the dense models built from them, on any backbone that returns a dict of
NHWC maps with a timm-style `feature_info`.

Top level: the necks (`FPN`, `detection_fpn` for P3-P7) and heads (`SemanticFPNHead`,
`UPerNetHead`, `FCNHead`, `SegFormerHead`, `LinearHead`, `ATSSHead`), by name with
`build_head`; `segmentation/` holds `Segmentor` and its loss, `detection/` holds `Detector`,
its ATSS targets, losses, boxes and jit NMS; `model_flops` counts the FLOPs of any of them.
"""

from heads.atss_head import ATSSHead
from heads.detection.detector import Detector
from heads.flops import model_flops, training_step_flops
from heads.fpn import FPN, detection_fpn
from heads.linear import LinearHead
from heads.registry import HEADS, build_head, register_head
from heads.segformer import SegFormerHead
from heads.segmentation.segmentor import Segmentor
from heads.semantic_fpn import SemanticFPNHead
from heads.upernet import FCNHead, UPerNetHead

__all__ = [
    'ATSSHead',
    'Detector',
    'FPN',
    'HEADS',
    'FCNHead',
    'LinearHead',
    'SegFormerHead',
    'Segmentor',
    'SemanticFPNHead',
    'UPerNetHead',
    'build_head',
    'detection_fpn',
    'model_flops',
    'register_head',
    'training_step_flops',
]
