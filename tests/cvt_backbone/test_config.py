"""The backbone from a config block, and pretrained weights loaded into a user's model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvt_backbone import (
    CheckpointMismatchError,
    CvTBackbone,
    PretrainedBackboneInit,
    build_backbone,
    get_spec,
    load_backbone_weights,
    pretrained_settings,
)
from tests.weights_support import write_converted_backbone


def test_build_backbone_from_configdict_dict_and_none():
  config = ml_collections.ConfigDict(dict(
      variant='cvt-tiny', dtype='bfloat16', out_features=[0, 'stage3'], frozen_stages=1,
      pretrained='/some/file.msgpack', keep_cls_token=False, attention_chunk_size=None))
  backbone = build_backbone(config)
  assert backbone.variant == 'cvt-tiny' and backbone.dtype == jnp.bfloat16
  assert backbone.out_names == ('stage1', 'stage3') and backbone.frozen_stages == 1
  assert build_backbone(config.to_dict()) == backbone
  assert build_backbone(None) == CvTBackbone()
  assert build_backbone({'variant': 'cvt-tiny'}, bn_axis_name='batch').bn_axis_name == 'batch'
  assert pretrained_settings(config) == ('/some/file.msgpack', False)
  assert pretrained_settings({}) == ('', True)
  spec = get_spec('cvt-tiny')
  custom = build_backbone({'spec': {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in vars(spec).items()}})
  assert custom.resolved_spec == spec


def test_build_backbone_bad_settings():
  with pytest.raises(ValueError, match=r"'drop_path_rat'.*Did you mean 'drop_path_rate'"):
    build_backbone({'drop_path_rat': 0.1})
  with pytest.raises(ValueError, match='not a dtype name'):
    build_backbone({'dtype': 'bfloat61'})
  with pytest.raises(TypeError, match='mapping or a ConfigDict'):
    build_backbone('cvt-13')


def _converted_tiny(tmp_path):
  path = tmp_path / 'tiny.msgpack'
  return path, write_converted_backbone(path)


class UserSegmenter(PretrainedBackboneInit, nn.Module):
  """What a user writes: their own head on the backbone, pretrained through `init`."""

  backbone: CvTBackbone
  pretrained: str = ''

  @nn.compact
  def __call__(self, x, *, train=False, debug=False):
    return nn.Conv(3, (1, 1), name='classifier')(self.backbone(x, train=train)['stage1'])


def test_user_module_init_loads_the_pretrained_backbone(tmp_path):
  path, weights = _converted_tiny(tmp_path)
  images = jnp.zeros((2, 40, 56, 3))
  model = UserSegmenter(build_backbone({'variant': 'cvt-tiny'}), pretrained=str(path))
  variables = model.init(jax.random.PRNGKey(1), images, train=False, debug=False)
  for collection in ('params', 'batch_stats'):
    for got, want in zip(jax.tree.leaves(variables[collection]['backbone']),
                         jax.tree.leaves(weights[collection]), strict=True):
      np.testing.assert_array_equal(got, want)
  scratch = UserSegmenter(model.backbone).init(jax.random.PRNGKey(1), images)
  assert jax.tree.map(jnp.shape, scratch) == jax.tree.map(jnp.shape, variables)
  np.testing.assert_array_equal(scratch['params']['classifier']['kernel'],
                                variables['params']['classifier']['kernel'])
  out = model.apply(variables, images, train=False, debug=False)
  assert out.shape == (2, 10, 14, 3)

  with pytest.raises(FileNotFoundError, match='missing.msgpack.*cvt-convert'):
    UserSegmenter(model.backbone, pretrained=str(tmp_path / 'missing.msgpack')).init(
        jax.random.PRNGKey(1), images)
  with pytest.raises(CheckpointMismatchError, match='cvt-13'):
    UserSegmenter(CvTBackbone(variant='cvt-13'), pretrained=str(path)).init(
        jax.random.PRNGKey(1), images)


def test_load_backbone_weights_into_a_subtree(tmp_path):
  path, weights = _converted_tiny(tmp_path)
  backbone = CvTBackbone(variant='cvt-tiny')
  fresh = UserSegmenter(backbone).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  nested = {'params': {'encoder': {'cvt': fresh['params']['backbone']}, 'head': {'w': 1}},
            'batch_stats': {'encoder': {'cvt': fresh['batch_stats']['backbone']}}}
  loaded = load_backbone_weights(nested, path, backbone, path=('encoder', 'cvt'))
  assert loaded['params']['head'] == {'w': 1}
  for got, want in zip(jax.tree.leaves(loaded['params']['encoder']['cvt']),
                       jax.tree.leaves(weights['params']), strict=True):
    np.testing.assert_array_equal(got, want)
  with pytest.raises(KeyError, match="has no 'backbone' subtree.*found \\['encoder'"):
    load_backbone_weights(nested, path, backbone)
  # The subtree must be the backbone's: a tree of another structure is refused.
  wrong = {'params': {'backbone': {'x': np.zeros(3)}}, 'batch_stats': {'backbone': {}}}
  with pytest.raises(ValueError, match='does not have the structure'):
    load_backbone_weights(wrong, path, backbone)


def test_in_memory_weights_of_another_variant_name_both(tmp_path):
  # cvt-13's heads (1, 3, 6) cannot split cvt-tiny's widths: the weights' own variant is named.
  _, weights = _converted_tiny(tmp_path)
  backbone = CvTBackbone(variant='cvt-13')
  fresh = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(CheckpointMismatchError, match='holds cvt-tiny weights.*model is cvt-13'):
    load_backbone_weights({'params': {'backbone': fresh['params']},
                           'batch_stats': {'backbone': fresh['batch_stats']}}, weights, backbone)
