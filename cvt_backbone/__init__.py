"""CvT (Convolutional vision Transformer) in Flax: dense backbone, classifier, weights."""

from cvt_backbone.attention import choose_implementation
from cvt_backbone.cvt import (
    VARIANTS,
    CvT,
    CvTBackbone,
    CvTSpec,
    count_params,
    get_spec,
)

__all__ = [
    'VARIANTS',
    'CvT',
    'CvTBackbone',
    'CvTSpec',
    'choose_implementation',
    'count_params',
    'get_spec',
]
