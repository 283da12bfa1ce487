"""Edges of the model API: bad settings fail at construction or trace time with one clear line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from cvt_backbone import CvT, CvTBackbone, assert_finite, build_backbone
from cvt_backbone.kernels import attention as attention_lib


def _shapes(model, images):
  """The variables' shapes (`jax.eval_shape`: traces the forward pass, computes nothing)."""
  return jax.eval_shape(model.init, jax.random.key(0), images)


def _classifier(**kwargs):
  return CvT.from_variant('cvt-tiny', num_classes=3, **kwargs)


@pytest.mark.parametrize('make', [lambda: CvTBackbone('cvt-tiny'), _classifier])
def test_empty_batch(make):
  with pytest.raises(ValueError, match=r'at least one image; got shape \(0, 32, 32, 3\)'):
    _shapes(make(), jnp.zeros((0, 32, 32, 3)))


@pytest.mark.parametrize('chunk', [0, -3, 2.5, True])
def test_attention_chunk_size(chunk):
  expected = rf'attention_chunk_size must be None or an integer >= 1; got {chunk!r}'
  with pytest.raises(ValueError, match=expected):
    CvTBackbone('cvt-tiny', attention='chunked', attention_chunk_size=chunk)
  with pytest.raises(ValueError, match=expected):
    _classifier(attention='chunked', attention_chunk_size=chunk)
  q = jnp.zeros((1, 8, 1, 4))
  expected = rf'^chunk_size must be None or an integer >= 1; got {chunk!r}'
  with pytest.raises(ValueError, match=expected):
    attention_lib.attention(q, q, q, scale=1.0, implementation='chunked', chunk_size=chunk)


def test_attention_chunk_size_still_accepts_numpy_integers():
  model = CvTBackbone('cvt-tiny', attention='chunked', attention_chunk_size=np.int64(5))
  out = jax.eval_shape(model.apply, _shapes(model, jnp.zeros((1, 32, 32, 3))),
                       jnp.zeros((2, 32, 32, 3)))
  assert out['stage3'].shape == (2, 2, 2, 48)


@pytest.mark.parametrize('features, shown', [
    ((1.5,), '1.5'), ((None,), 'None'), ((True,), 'True'), (('stage1', 2.0), '2.0')])
def test_out_features_entries(features, shown):
  with pytest.raises(ValueError, match=rf'out_features entries must be .*; got {shown} '):
    CvTBackbone('cvt-tiny', out_features=features)


def test_out_features_still_accepts_names_and_indices():
  model = CvTBackbone('cvt-tiny', out_features=('stage1', np.int32(-1)))
  assert model.out_names == ('stage1', 'stage3')


@pytest.mark.parametrize('frozen', [-1, 4, 1.0, None])
def test_frozen_stages(frozen):
  expected = rf'frozen_stages must be an integer in \[0, 3\]; got {frozen}'
  with pytest.raises(ValueError, match=expected):
    CvTBackbone('cvt-tiny', frozen_stages=frozen)


def test_frozen_stages_range_ends_are_valid():
  assert CvTBackbone('cvt-tiny', frozen_stages=0).frozen_stages == 0
  assert CvTBackbone('cvt-tiny', frozen_stages=3).frozen_stages == 3


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5, float('nan')])
def test_drop_path_rate(rate):
  with pytest.raises(ValueError, match=rf'drop_path_rate must be in \[0, 1\); got {rate}'):
    CvTBackbone('cvt-tiny', drop_path_rate=rate)
  with pytest.raises(ValueError, match=rf'drop_path_rate must be in \[0, 1\); got {rate}'):
    _classifier(drop_path_rate=rate)


def test_dropout_rates():
  with pytest.raises(ValueError, match=r'dropout_rate must be in \[0, 1\); got 1.0'):
    CvTBackbone('cvt-tiny', dropout_rate=1.0)
  with pytest.raises(ValueError, match=r'dropout must be in \[0, 1\); got -0.5'):
    _classifier(dropout=-0.5)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r'frozen_stages must be an integer in \[0, 3\]; got 7'):
    build_backbone({'variant': 'cvt-tiny', 'frozen_stages': 7})


@pytest.mark.parametrize('height, width, error', [
    (-5, 10, 'images of at least 16x16 pixels; got -5x10'),
    (10, 64, 'images of at least 16x16 pixels; got 10x64'),
    (64, 0, 'images of at least 16x16 pixels; got 64x0'),
    (32.5, 64, r'sizes in pixels must be integers; got 32\.5x64'),
])
def test_output_sizes_refuses_what_the_model_refuses(height, width, error):
  model = CvTBackbone('cvt-tiny')
  with pytest.raises(ValueError, match=error):
    model.output_sizes(height, width)
  with pytest.raises(ValueError, match=error):
    model.output_shapes(height, width)


def test_spec_output_sizes_refuses_empty_maps():
  spec = CvTBackbone('cvt-tiny').resolved_spec
  with pytest.raises(ValueError, match=r'height and width must be integers >= 1; got -5x10'):
    spec.output_sizes(-5, 10)
  # The first conv (kernel 7, padding 2) needs 3 pixels.
  with pytest.raises(ValueError, match=r'an input of 2x64 leaves stage 1 an empty map \(0x16\)'):
    spec.output_sizes(2, 64)
  assert spec.output_sizes(16, 16) == ((4, 4), (2, 2), (1, 1))


# ---------------------------------------------------------------------------
# Non-finite inputs
# ---------------------------------------------------------------------------


def _nan_images():
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  images[0, 5, 7, 1] = np.nan
  return images


@pytest.fixture(scope='module')
def tiny_variables():
  """Random weights of the shapes of `init`, without compiling it."""
  rng = np.random.default_rng(0)
  shapes = _shapes(CvTBackbone('cvt-tiny'), jnp.zeros((1, 32, 32, 3)))
  # abs: BatchNorm variances are positive.
  return jax.tree.map(lambda s: np.abs(0.1 * rng.standard_normal(s.shape, np.float32)), shapes)


def test_one_nan_pixel_spreads_over_its_whole_image_only(tiny_variables):
  """What the docstring warns of: global attention carries one NaN to every position."""
  out = jax.jit(CvTBackbone('cvt-tiny').apply)(tiny_variables, _nan_images())
  for name, x in out.items():
    assert np.isnan(x[0]).all(), name
    assert np.isfinite(x[1]).all(), name


def test_assert_finite_outside_jit():
  assert_finite(jnp.ones((1, 4, 4, 3)))
  with pytest.raises(ValueError, match=r'images hold 1 non-finite value \(NaN or inf\); '
                     r'the first at index \(0, 5, 7, 1\)'):
    assert_finite(_nan_images())


def test_check_finite_field(tiny_variables):
  checked = CvTBackbone('cvt-tiny', check_finite=True)
  # Eager: the concrete values are checked before anything runs.
  with pytest.raises(ValueError, match=r'non-finite value.*index \(0, 5, 7, 1\)'):
    checked.apply(tiny_variables, _nan_images())
  # Under jit: a checkify check, functionalized by the caller.
  apply = jax.jit(checkify.checkify(checked.apply, errors=checkify.user_checks))
  error, _ = apply(tiny_variables, np.nan_to_num(_nan_images()))
  error.throw()
  error, _ = apply(tiny_variables, _nan_images())
  with pytest.raises(checkify.JaxRuntimeError, match='images hold non-finite values'):
    error.throw()


def test_check_finite_field_of_the_classifier():
  checked = _classifier(check_finite=True)
  variables = _shapes(checked, jnp.zeros((1, 32, 32, 3)))  # never read: the check comes first
  with pytest.raises(ValueError, match=r'non-finite value.*index \(0, 5, 7, 1\)'):
    checked.apply(variables, _nan_images())
  # Traced, the check is staged for checkify.
  _, logits = jax.eval_shape(checkify.checkify(checked.apply, errors=checkify.user_checks),
                             variables, _nan_images())
  assert logits.shape == (2, 3)
