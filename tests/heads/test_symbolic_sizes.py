"""Segmentation models exported once with symbolic batch, height and width (`jax.export`)
give the jitted model's outputs at odd sizes. UPerNet and the ATSS detector with `detect` are
exported the same way by `cvt-export` (tests/projects/test_export.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.cvt_segmentation import models as segmentation_models
from projects.cvt_segmentation.configs import common

# (batch, height, width): odd sizes, none a multiple of a stride.
SIZES = ((1, 97, 131), (2, 40, 72))


def _symbolic_images():
  b, h, w = jax.export.symbolic_shape('b, h, w', constraints=('h >= 16', 'w >= 16'))
  return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)


def _images(batch, height, width):
  return np.random.default_rng(height).uniform(-1, 1, (batch, height, width, 3)).astype(
      np.float32)


def _exported(fn, *args):
  """`fn` exported for `args` and read back, as a deployment would read it."""
  return jax.export.deserialize(jax.export.export(jax.jit(fn))(*args).serialize())


def _init(flax_model):
  return jax.jit(lambda key: flax_model.init(key, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0))


@pytest.mark.parametrize('name', sorted(set(segmentation_models.MODELS) - {'cvt_upernet'}))
def test_segmentation_model_exports_for_every_size(name):
  config = common.base_config(name, 'synthetic')
  config.model.backbone.update(variant='cvt-tiny', drop_path_rate=0.0)
  for head in ('decode_head', 'auxiliary_head', 'neck'):
    for key in ('channels', 'out_channels'):
      if head in config.model and key in config.model[head]:
        config.model[head][key] = 16
  model = segmentation_models.get_model_cls(name)(config, {'num_classes': 3}).flax_model
  variables = _init(model)

  def apply(variables, images):
    return model.apply(variables, images, train=False)

  exported = _exported(apply, variables, _symbolic_images())
  for size in SIZES:
    images = _images(*size)
    expected = jax.jit(apply)(variables, images)
    got = exported.call(variables, images)
    assert got['logits'].shape == (*size, 3)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for key in expected:
      np.testing.assert_allclose(got[key], expected[key], atol=1e-5, err_msg=key)
