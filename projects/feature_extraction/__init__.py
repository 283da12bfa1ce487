"""Feature extraction from large images with CvT: the `cvt-extract` tool and its Python API.

    maps = extract_features(backbone, variables, rgb_image, memory_budget_mb=1024)
    # {'stage1': [H/4, W/4, 64], 'stage2': [H/8, W/8, 192], 'stage3': [H/16, W/16, 384]}
"""

from projects.feature_extraction.extract import (
    ExtractionError,
    FeatureExtractor,
    extract_features,
    extract_files,
    main,
)
from projects.feature_extraction.images import IMAGENET_MEAN, IMAGENET_STD, read_image
from projects.feature_extraction.planning import (
    DEFAULT_MEMORY_BUDGET_MB,
    AttentionPlan,
    MemoryBudgetError,
    plan_attention,
)
from projects.feature_extraction.writers import pca_rgb, read_features

__all__ = [
    'DEFAULT_MEMORY_BUDGET_MB',
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'AttentionPlan',
    'ExtractionError',
    'FeatureExtractor',
    'MemoryBudgetError',
    'extract_features',
    'extract_files',
    'main',
    'pca_rgb',
    'plan_attention',
    'read_features',
    'read_image',
]
