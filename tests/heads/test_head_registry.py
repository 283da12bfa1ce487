"""Heads from names and config dicts; the documented default settings, checked by shape."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from heads import (
    FPN,
    HEADS,
    FCNHead,
    LinearHead,
    SegFormerHead,
    SemanticFPNHead,
    UPerNetHead,
    build_head,
    register_head,
)
from tests.heads.stand_in import StandInBackbone

FEATURE_INFO = StandInBackbone().feature_info
# Stage maps of a 97x131 input.
FEATURES = {'stage1': jnp.zeros((2, 24, 33, 8)), 'stage2': jnp.zeros((2, 12, 17, 12)),
            'stage3': jnp.zeros((2, 6, 9, 20))}


def test_every_documented_name_is_registered():
  assert {'fpn', 'semantic_fpn', 'upernet', 'fcn', 'segformer', 'linear'} <= set(HEADS)


def test_build_from_name_keywords_and_dict_agree():
  by_name = build_head('upernet', num_classes=150, channels=256)
  by_dict = build_head({'name': 'upernet', 'num_classes': 150, 'channels': 256})
  assert by_name == by_dict == UPerNetHead(num_classes=150, channels=256)


def test_overrides_replace_dict_settings_and_lists_become_tuples():
  head = build_head({'name': 'upernet', 'num_classes': 150, 'pool_scales': [1, 2]},
                    num_classes=19)
  assert head.num_classes == 19 and head.pool_scales == (1, 2)


def test_config_objects_with_to_dict_work():
  class ConfigDict:  # what ml_collections.ConfigDict offers
    def to_dict(self):
      return {'name': 'fcn', 'num_classes': 19}

  assert build_head(ConfigDict()) == FCNHead(num_classes=19)


def test_feature_info_fills_levels_channels_and_strides():
  fpn = build_head('fpn', feature_info=FEATURE_INFO)
  assert fpn.in_features == ('stage1', 'stage2', 'stage3')
  assert fpn.in_channels == (8, 12, 20) and fpn.in_strides == (4, 8, 16)
  # The FPN's own metadata configures the head after it.
  head = build_head('semantic_fpn', num_classes=3, feature_info=fpn.feature_info)
  assert head.in_features == ('p2', 'p3', 'p4') and head.in_channels == (256, 256, 256)
  # A subset of levels; heads without `in_strides` just do not get it.
  fcn = build_head('fcn', num_classes=3, in_features=['stage3'], feature_info=FEATURE_INFO)
  assert fcn.in_features == ('stage3',) and fcn.in_channels == (20,)


def test_unknown_name_and_unknown_settings_fail_loudly():
  with pytest.raises(ValueError, match=r"Unknown head 'uper'.*'upernet'"):
    build_head('uper', num_classes=3)
  with pytest.raises(ValueError, match=r"no setting\(s\) \['chanels'\].*'channels'"):
    build_head('upernet', num_classes=3, chanels=128)
  with pytest.raises(ValueError, match="needs a 'name' key"):
    build_head({'num_classes': 3})
  with pytest.raises(ValueError, match=r"Levels \['stage4'\] are not in feature_info"):
    build_head('fcn', num_classes=3, in_features=['stage4'], feature_info=FEATURE_INFO)


def test_register_head():
  @register_head('test_constant')
  class ConstantHead(nn.Module):
    num_classes: int

    def __call__(self, features, *, train=False):
      return jnp.zeros((*features['stage1'].shape[:3], self.num_classes))

  try:
    assert build_head('test_constant', num_classes=4) == ConstantHead(num_classes=4)
    with pytest.raises(ValueError, match='already registered'):
      register_head('test_constant')(LinearHead)
  finally:
    del HEADS['test_constant']


def _shapes(module, features):
  """Output and parameter shapes at the default widths, without compiling or running."""
  init = functools.partial(module.init_with_output, train=False)
  out, variables = jax.eval_shape(init, jax.random.key(0), features)
  return out, jax.tree_util.tree_map(lambda x: x.shape, variables['params'])


def test_default_settings():
  # Defaults of the papers and mmsegmentation configs, as documented in the issue.
  assert FPN().out_channels == 256 and FPN().norm == 'none'
  assert SemanticFPNHead(3).channels == 128 and SemanticFPNHead(3).norm == 'group'
  upernet = UPerNetHead(3)
  assert (upernet.channels, tuple(upernet.pool_scales), upernet.norm) == (512, (1, 2, 3, 6),
                                                                          'batch')
  assert FCNHead(3).channels == 256 and tuple(FCNHead(3).in_features) == ('stage3',)
  assert SegFormerHead(3).channels == 256
  for cls in (SemanticFPNHead, UPerNetHead, FCNHead, SegFormerHead, LinearHead):
    assert cls(3).dropout_rate == 0.1


def test_default_width_heads_by_shape():
  pyramid, fpn_params = _shapes(FPN(), FEATURES)
  assert {k: v.shape for k, v in pyramid.items()} == {
      'p2': (2, 24, 33, 256), 'p3': (2, 12, 17, 256), 'p4': (2, 6, 9, 256)}
  assert fpn_params['fpn_convs_0']['conv']['kernel'] == (3, 3, 256, 256)

  logits, params = _shapes(SemanticFPNHead(num_classes=5), pyramid)
  assert logits.shape == (2, 24, 33, 5)
  # Parameter names are the checkpoint format: pinned here (the Hugging Face-named heads are
  # pinned by the parity tests, which load converted weights with a strict merge).
  assert set(params) == {'scale_heads_0_0', 'scale_heads_1_0', 'scale_heads_2_0',
                         'scale_heads_2_1', 'classifier'}
  assert params['scale_heads_2_1']['conv']['kernel'] == (3, 3, 128, 128)
  assert params['scale_heads_2_1']['group_norm']['scale'] == (128,)

  logits, params = _shapes(UPerNetHead(num_classes=5), FEATURES)
  assert logits.shape == (2, 24, 33, 5)
  assert params['bottleneck']['conv']['kernel'] == (3, 3, 20 + 4 * 512, 512)
  assert params['fpn_bottleneck']['conv']['kernel'] == (3, 3, 3 * 512, 512)
  assert params['classifier']['kernel'] == (1, 1, 512, 5)

  logits, params = _shapes(FCNHead(num_classes=5), FEATURES)
  assert logits.shape == (2, 6, 9, 5)
  assert params['convs_0']['conv']['kernel'] == (3, 3, 20, 256)

  logits, params = _shapes(SegFormerHead(num_classes=5), FEATURES)
  assert logits.shape == (2, 24, 33, 5)
  assert params['linear_fuse']['kernel'] == (1, 1, 3 * 256, 256)

  logits, params = _shapes(LinearHead(num_classes=5), FEATURES)
  assert logits.shape == (2, 24, 33, 5)
  assert set(params) == {'batch_norm', 'classifier'}
  assert params['classifier']['kernel'] == (1, 1, 8 + 12 + 20, 5)
