"""The backbone exported by `jax.export` with symbolic batch, height and width (any size)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from cvt_backbone.cvt import CvTBackbone
from cvt_backbone.kernels import attention as attention_lib


def _symbolic_images():
  b, h, w = export.symbolic_shape('b, h, w', constraints=('h >= 16', 'w >= 16'))
  return jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)


@functools.cache
def _variables():
  """Random cvt-tiny variables, one tree for every attention setting, from one compile (op by
  op the init compiles a few hundred small programs)."""
  return jax.jit(CvTBackbone(variant='cvt-tiny').init)(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 64, 64, 3)))


def test_auto_attention_of_symbolic_sizes_is_chunked():
  b, q, k = export.symbolic_shape('b, q, k')
  assert attention_lib.choose_implementation(b, 2, q, k, jnp.float32, backend='cpu') == 'chunked'
  assert attention_lib.choose_implementation(b, 2, q, k, jnp.bfloat16, backend='gpu') == 'fused'
  assert attention_lib.choose_implementation(1, 2, 64, 16, jnp.float32, backend='cpu') == 'plain'


@pytest.mark.parametrize('attention', ['auto', 'plain'])
def test_the_exported_backbone_runs_at_any_size_as_the_jitted_one(attention):
  model = CvTBackbone(variant='cvt-tiny', attention=attention)
  variables = _variables()
  apply = jax.jit(lambda x: model.apply(variables, x))
  exported = export.deserialize(export.export(apply)(_symbolic_images()).serialize())
  if attention == 'auto':  # Query blocks of one (batch, head) pair over key blocks: loops.
    assert 'stablehlo.while' in exported.mlir_module()
  for shape in [(1, 97, 131, 3), (2, 16, 40, 3)]:
    images = jax.random.normal(jax.random.PRNGKey(1), shape)
    got, want = exported.call(images), apply(images)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5, err_msg=name)


def test_an_image_under_the_minimum_is_refused_naming_the_constraint():
  model = CvTBackbone(variant='cvt-tiny', attention='plain')
  variables = _variables()
  exported = export.export(jax.jit(lambda x: model.apply(variables, x)))(_symbolic_images())
  with pytest.raises(ValueError, match='h >= 16'):
    exported.call(jnp.zeros((1, 8, 40, 3)))


def test_without_the_minimum_as_a_constraint_the_export_says_what_to_add():
  model = CvTBackbone(variant='cvt-tiny', attention='plain')
  variables = _variables()
  b, h, w = export.symbolic_shape('b, h, w')
  with pytest.raises(ValueError, match="constraints=.*'h >= 16', 'w >= 16'"):
    export.export(jax.jit(lambda x: model.apply(variables, x)))(
        jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
