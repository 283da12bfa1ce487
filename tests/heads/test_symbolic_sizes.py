"""Every segmentation model and the ATSS detector with `detect`, exported once with symbolic
batch, height and width (`jax.export`), give the jitted model's outputs at odd sizes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.cvt_detection import models as detection_models
from projects.cvt_detection.configs import synthetic_demo as detection_demo
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


@pytest.mark.parametrize('name', sorted(segmentation_models.MODELS))
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


@pytest.mark.slow  # jax.export reasons about the summed level sizes: a minute or more
def test_detector_exports_for_every_size():
  config = detection_demo.get_config('runlocal')
  model = detection_models.get_model_cls(config.model_name)(config, {'num_classes': 4})
  variables = _init(model.flax_model)
  # Random weights score every point near the prior 0.01 (no detections, or only near-ties that
  # the last bit orders): a zero bias and a 300x classifier kernel spread the scores.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: (x * 300.0 if 'kernel' in str(path) else x * 0.0)
      if 'conv_cls' in str(path) else x, variables)

  def detect(variables, images, image_size, scale_factor):
    outputs = model.flax_model.apply(variables, images, train=False)
    return model.detect(outputs, images.shape[1:3], image_size, scale_factor)

  images = _symbolic_images()
  per_image = jax.ShapeDtypeStruct((images.shape[0], 2), jnp.float32)
  exported = _exported(detect, variables, images, per_image, per_image)
  for batch, height, width in SIZES:
    images = _images(batch, height, width)
    image_size = np.tile(np.float32([[height - 3, width - 5]]), (batch, 1))
    scale_factor = np.full((batch, 2), 0.5, np.float32)
    expected = jax.jit(detect)(variables, images, image_size, scale_factor)
    got = exported.call(variables, images, image_size, scale_factor)
    assert int(expected['valid'].sum()) > 0
    np.testing.assert_allclose(got['boxes'], expected['boxes'], atol=1e-3)
    # The exported forward pass may round the last bit differently (other fusions).
    np.testing.assert_allclose(got['scores'], expected['scores'], atol=1e-5)
    for key in ('classes', 'valid'):
      np.testing.assert_array_equal(got[key], expected[key])
