"""Detection data: COCO-format and synthetic sources, mmdet's 1x pipeline, loaders.

Numpy only (no jax, no Scenic).
"""

from projects.cvt_detection.data.builder import DATASET_NAMES, build_loaders, register_with_scenic
from projects.cvt_detection.data.coco import CocoDetection, coco_ground_truth, write_coco
from projects.cvt_detection.data.synthetic import SyntheticDetection
from projects.cvt_detection.data.transforms import (
    DetectionEvalTransform,
    collate,
    default_canvas_sizes,
)

__all__ = [
    'DATASET_NAMES', 'CocoDetection', 'DetectionEvalTransform', 'SyntheticDetection',
    'build_loaders', 'coco_ground_truth', 'collate', 'default_canvas_sizes',
    'register_with_scenic', 'write_coco',
]
