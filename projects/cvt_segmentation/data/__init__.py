"""Segmentation data for the cvt_segmentation project: sources, augmentations, loaders.

Nothing here imports jax or Scenic at module level; the numpy code runs without them.
"""

from projects.cvt_segmentation.data.builder import (
    DATASET_NAMES,
    Dataset,
    build_loaders,
    get_dataset,
    register_with_scenic,
    resolve_test_scale,
)
from projects.cvt_segmentation.data.folders import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    CITYSCAPES_TRAIN_IDS,
    SegmentationFolder,
    ade20k,
    cityscapes,
    cityscapes_label_ids_to_train_ids,
    image_mask_folders,
    reduce_zero_label,
)
from projects.cvt_segmentation.data.loader import EvalLoader, TrainLoader, epoch_permutation
from projects.cvt_segmentation.data.synthetic import SyntheticSegmentation, synthetic_class_names
from projects.cvt_segmentation.data.transforms import (
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    normalize,
    pad,
    photometric_distortion,
    random_crop,
    random_crop_box,
    random_flip,
    random_resize,
    random_resize_size,
    rescale_size,
    resize_image,
    resize_label,
)

__all__ = [
    'ADE20K_CLASSES',
    'CITYSCAPES_CLASSES',
    'CITYSCAPES_TRAIN_IDS',
    'DATASET_NAMES',
    'IGNORE_INDEX',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'Dataset',
    'EvalLoader',
    'EvalTransform',
    'SegmentationFolder',
    'SyntheticSegmentation',
    'TrainLoader',
    'TrainTransform',
    'ade20k',
    'build_loaders',
    'cityscapes',
    'cityscapes_label_ids_to_train_ids',
    'epoch_permutation',
    'get_dataset',
    'image_mask_folders',
    'normalize',
    'pad',
    'photometric_distortion',
    'random_crop',
    'random_crop_box',
    'random_flip',
    'random_resize',
    'random_resize_size',
    'reduce_zero_label',
    'register_with_scenic',
    'rescale_size',
    'resolve_test_scale',
    'resize_image',
    'resize_label',
    'synthetic_class_names',
]
