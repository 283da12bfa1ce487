"""Models exported by `to_onnx` with symbolic batch, height and width run in onnxruntime at any
size as the jitted function does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from cvt_backbone.cvt import CvTBackbone

ort = pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')
from projects.deploy.onnx import to_onnx  # noqa: E402


def _spec(dtype=jnp.float32, channels=3):
  b, h, w = export.symbolic_shape('b, h, w', constraints=('h >= 16', 'w >= 16'))
  return jax.ShapeDtypeStruct((b, h, w, channels), dtype)


def _session(model: bytes):
  options = ort.SessionOptions()
  options.log_severity_level = 3  # jax2onnx leaves unused initializers in loop bodies.
  return ort.InferenceSession(model, options, providers=['CPUExecutionProvider'])


def _assert_runs_as_jitted(session, fn, images, atol=1e-4):
  want = jax.jit(fn)(images)
  names = [o.name for o in session.get_outputs()]
  assert sorted(names) == sorted(want)
  for name, value in zip(names, session.run(None, {'images': np.asarray(images)}), strict=True):
    np.testing.assert_allclose(value, want[name], atol=atol, rtol=1e-4, err_msg=name)


@pytest.fixture(scope='module')
def backbone():
  """The tiny backbone with 'auto' attention: chunked (ONNX Loops) for symbolic sizes."""
  model = CvTBackbone(variant='cvt-tiny')
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  fn = lambda x: model.apply(variables, x)
  return fn, _session(to_onnx(fn, _spec()))


# 265x271: stage 1 has 4,488 queries over 1,122 keys, several query and key blocks.
@pytest.mark.parametrize('shape', [(1, 97, 131, 3), (3, 265, 271, 3)])
def test_the_backbone_runs_at_any_size_as_the_jitted_one(backbone, shape):
  fn, session = backbone
  assert [i.name for i in session.get_inputs()] == ['images']
  _assert_runs_as_jitted(session, fn, jax.random.normal(jax.random.PRNGKey(1), shape))


def test_a_cls_token_sliced_off_after_a_symbolic_concatenation_keeps_its_rows():
  # jax2onnx alone gives 0 rows: its concatenation kept the first operand's symbolic size.
  fn = lambda x: {'tokens': jnp.concatenate(
      [x[:, :1, :1].reshape(x.shape[0], 1, 3), x.reshape(x.shape[0], -1, 3)], 1)[:, 1:]}
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 17, 19, 3))
  _assert_runs_as_jitted(_session(to_onnx(fn, _spec())), fn, images)


def test_uint8_images_normalised_inside_and_outputs_in_the_function_order():
  mean, std = jnp.array([123.7, 116.3, 103.5]), jnp.array([58.4, 57.1, 57.4])
  normalise = lambda x: (x.astype(jnp.float32) - mean) / std
  fn = lambda x: {'normalised': normalise(x), 'channel': jnp.argmax(normalise(x), -1)}
  images = jax.random.randint(jax.random.PRNGKey(3), (3, 21, 17, 3), 0, 256).astype(jnp.uint8)
  session = _session(to_onnx(fn, _spec(jnp.uint8)))
  assert [o.name for o in session.get_outputs()] == ['normalised', 'channel']
  _assert_runs_as_jitted(session, fn, images)


# At symbolic sizes onnxruntime rejects an Expand inside the NMS Loop (cvt-export refuses it).
@pytest.mark.slow  # a minute to convert: left out by -m "not slow"
def test_the_detector_at_one_size_with_its_nms_runs_as_the_jitted_one():
  from projects.cvt_detection import models
  from projects.cvt_detection.configs import synthetic_demo

  config = synthetic_demo.get_config('runlocal')
  config.unlock()
  config.eval.score_threshold = 0.0  # An untrained head scores 0.01: all 100 detections kept.
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 4})
  variables = model.init_variables(jax.random.PRNGKey(0), (1, 64, 64, 3))

  def fn(images):
    outputs = model.flax_model.apply(variables, images, train=False)
    sizes = jnp.broadcast_to(jnp.array(images.shape[1:3], jnp.float32), (images.shape[0], 2))
    return model.detect(outputs, images.shape[1:3], sizes, jnp.ones_like(sizes))

  shape = (2, 97, 131, 3)
  session = _session(to_onnx(fn, jax.ShapeDtypeStruct(shape, jnp.float32)))
  images = jax.random.normal(jax.random.PRNGKey(5), shape)
  want = jax.jit(fn)(images)
  got = dict(zip([o.name for o in session.get_outputs()],
                 session.run(None, {'images': np.asarray(images)}), strict=True))
  assert want['valid'].sum() == 100 * shape[0]
  np.testing.assert_allclose(got['boxes'], want['boxes'], atol=1e-3, rtol=0)
  np.testing.assert_allclose(got['scores'], want['scores'], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(got['classes'], want['classes'])
  np.testing.assert_array_equal(got['valid'], want['valid'])
