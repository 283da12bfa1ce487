"""Segmentation data: folder and synthetic sources, mmseg's augmentations, loaders.

Numpy only at module level (no jax, no Scenic).
"""

from projects.cvt_segmentation.data.builder import (
    DATASET_NAMES,
    build_loaders,
    get_dataset,
    register_with_scenic,
    resolve_test_scale,
)
from projects.cvt_segmentation.data.folders import ADE20K_CLASSES, CITYSCAPES_CLASSES
from projects.cvt_segmentation.data.loader import EvalLoader, TrainLoader
from projects.cvt_segmentation.data.synthetic import SyntheticSegmentation, synthetic_class_names
from projects.cvt_segmentation.data.transforms import (
    EvalTransform,
    TrainTransform,
    normalize,
    resize_image,
)

__all__ = [
    'ADE20K_CLASSES', 'CITYSCAPES_CLASSES', 'DATASET_NAMES', 'EvalLoader', 'EvalTransform',
    'SyntheticSegmentation', 'TrainLoader', 'TrainTransform', 'build_loaders', 'get_dataset',
    'normalize', 'register_with_scenic', 'resize_image', 'resolve_test_scale',
    'synthetic_class_names',
]
