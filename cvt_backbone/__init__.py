"""CvT (Convolutional vision Transformer) in Flax: dense backbone, classifier, weights."""

from cvt_backbone.cvt import (
    VARIANTS,
    CvT,
    CvTBackbone,
    CvTSpec,
    assert_finite,
    build_backbone,
    count_params,
    get_spec,
)
from cvt_backbone.flops import cvt_flops, stage_flops
from cvt_backbone.kernels.attention import choose_implementation
from cvt_backbone.preprocessing import IMAGENET_MEAN, IMAGENET_STD, normalize
from cvt_backbone.weights.convert import (
    CheckpointError,
    CheckpointMismatchError,
    convert_state_dict,
    infer_architecture,
    merge_variables,
)
from cvt_backbone.weights.converted import (
    convert_checkpoint,
    load_backbone,
    load_classifier,
    load_converted,
    load_pretrained,
    save_converted,
)
from cvt_backbone.weights.pretrained import (
    PretrainedBackboneInit,
    load_backbone_into_train_state,
    load_backbone_weights,
    pretrained_settings,
)
from cvt_backbone.weights.readers import read_state_dict

__all__ = [
    'IMAGENET_MEAN',
    'IMAGENET_STD',
    'VARIANTS',
    'CheckpointError',
    'CheckpointMismatchError',
    'CvT',
    'CvTBackbone',
    'CvTSpec',
    'PretrainedBackboneInit',
    'assert_finite',
    'build_backbone',
    'choose_implementation',
    'convert_checkpoint',
    'convert_state_dict',
    'count_params',
    'cvt_flops',
    'get_spec',
    'infer_architecture',
    'load_backbone_into_train_state',
    'load_backbone_weights',
    'load_backbone',
    'load_classifier',
    'load_converted',
    'load_pretrained',
    'merge_variables',
    'normalize',
    'pretrained_settings',
    'read_state_dict',
    'save_converted',
    'stage_flops',
]
