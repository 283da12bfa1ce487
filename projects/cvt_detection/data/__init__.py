"""Detection data for the cvt_detection project: COCO-format sources, synthetic set, pipeline.

Nothing here imports jax or Scenic; the numpy code runs without them.
"""

from projects.cvt_detection.data.builder import (
    DATASET_NAMES,
    build_loaders,
    get_dataset,
    register_with_scenic,
)
from projects.cvt_detection.data.coco import CocoDetection, coco_ground_truth, write_coco
from projects.cvt_detection.data.synthetic import SHAPES, SyntheticDetection
from projects.cvt_detection.data.transforms import (
    DEFAULT_MAX_BOXES,
    DEFAULT_SCALE,
    DetectionEvalTransform,
    DetectionTrainTransform,
    collate,
    default_canvas_sizes,
    flip_boxes,
    pad_batch,
    pad_to,
    random_flip,
    resize_keep_ratio,
)

__all__ = [
    'DATASET_NAMES',
    'build_loaders',
    'coco_ground_truth',
    'get_dataset',
    'register_with_scenic',
    'DEFAULT_MAX_BOXES',
    'DEFAULT_SCALE',
    'SHAPES',
    'CocoDetection',
    'DetectionEvalTransform',
    'DetectionTrainTransform',
    'SyntheticDetection',
    'collate',
    'default_canvas_sizes',
    'flip_boxes',
    'pad_batch',
    'pad_to',
    'random_flip',
    'resize_keep_ratio',
    'write_coco',
]
