"""Bad input raises errors that name the level and the shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from heads import (
  FPN,
  FCNHead,
  LinearHead,
  SegFormerHead,
  Segmentor,
  SemanticFPNHead,
  UPerNetHead,
)
from tests.heads.stand_in import StandInBackbone

SHAPES = {'stage1': (24, 33, 8), 'stage2': (12, 17, 12), 'stage3': (6, 9, 20)}
CHANNELS = tuple(s[-1] for s in SHAPES.values())


def _features(**replace):
  features = {name: jnp.zeros((2, *shape)) for name, shape in SHAPES.items()}
  features.update(replace)
  return {k: v for k, v in features.items() if v is not None}


def _heads(**kwargs):
  """Every head and the FPN, reading the stage maps."""
  stages = dict(in_features=tuple(SHAPES), **kwargs)
  return {
      'fpn': FPN(**stages),
      'semantic_fpn': SemanticFPNHead(num_classes=3, **stages),
      'upernet': UPerNetHead(num_classes=3, **stages),
      'segformer': SegFormerHead(num_classes=3, **stages),
      'linear': LinearHead(num_classes=3, **stages),
  }


def _init(module, features):
  return module.init(jax.random.key(0), features)


@pytest.mark.parametrize('head', list(_heads()))
def test_missing_level_names_it_and_the_available_ones(head):
  with pytest.raises(ValueError) as error:
    _init(_heads()[head], _features(stage2=None))
  message = str(error.value)
  assert "['stage2']" in message
  assert "'stage1': (2, 24, 33, 8)" in message and "'stage3': (2, 6, 9, 20)" in message


@pytest.mark.parametrize('head', list(_heads()))
def test_channels_disagreeing_with_declared_in_channels(head):
  module = _heads(in_channels=CHANNELS)[head]
  with pytest.raises(ValueError, match=r"'stage2' should have 12 channels.*\(2, 12, 17, 13\)"):
    _init(module, _features(stage2=jnp.zeros((2, 12, 17, 13))))


@pytest.mark.parametrize('head', list(_heads()))
def test_non_4d_feature_names_level_and_shape(head):
  tokens = jnp.zeros((2, 12 * 17, 12))
  with pytest.raises(ValueError, match=r"'stage2' must be an \[N, H, W, C\].*\(2, 204, 12\)"):
    _init(_heads()[head], _features(stage2=tokens))


def test_channels_first_features_are_caught_by_declared_channels():
  nchw = jnp.zeros((2, 8, 24, 33))
  with pytest.raises(ValueError, match=r"'stage1'.*NHWC.*\(2, 8, 24, 33\)"):
    _init(_heads(in_channels=CHANNELS)['upernet'], _features(stage1=nchw))


def test_levels_must_be_ordered_fine_to_coarse():
  head = UPerNetHead(num_classes=3, in_features=('stage3', 'stage2', 'stage1'))
  with pytest.raises(ValueError, match='fine to coarse'):
    _init(head, _features())


def test_declared_channels_must_match_the_number_of_levels():
  head = UPerNetHead(num_classes=3, in_channels=(8, 12))
  with pytest.raises(ValueError, match=r'2 in_channels \(8, 12\) for 3 in_features'):
    _init(head, _features())


def test_fcn_head_reads_one_level_and_names_a_missing_one():
  with pytest.raises(ValueError, match='exactly one level'):
    _init(FCNHead(num_classes=3, in_features=('stage2', 'stage3')), _features())
  with pytest.raises(ValueError, match=r"\['stage4'\]"):
    _init(FCNHead(num_classes=3, in_features=('stage4',)), _features())


def test_features_must_be_a_dict():
  with pytest.raises(ValueError, match='dict of'):
    _init(LinearHead(num_classes=3), [jnp.zeros((2, 4, 4, 3))])


def test_unknown_norm():
  with pytest.raises(ValueError, match="unknown norm 'sync'"):
    _init(UPerNetHead(num_classes=3, norm='sync'), _features())


def test_segmentor_rejects_non_nhwc_images():
  model = Segmentor(StandInBackbone(), LinearHead(num_classes=3))
  with pytest.raises(ValueError, match=r'\(1, 3, 64, 64\) looks channels-first'):
    model.init(jax.random.key(0), jnp.zeros((1, 3, 64, 64)))
  with pytest.raises(ValueError, match=r'\[N, H, W, C\] images.*\(64, 64, 3\)'):
    model.init(jax.random.key(0), jnp.zeros((64, 64, 3)))
