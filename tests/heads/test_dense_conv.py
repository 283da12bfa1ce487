"""`heads.dense_conv`: the CPU convolution with matrix-product gradients equals the library's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads import dense_conv

pytestmark = pytest.mark.usefixtures('highest_precision')


# (batch, height, width, C_in, C_out, kernel, padding, dilation, stride): odd sizes,
# dilation, no padding, 5x5, 1x1 and a strided case (which keeps the library kernel).
CASES = [(2, 9, 11, 5, 7, 3, 1, 1, 1), (1, 8, 13, 4, 6, 3, 2, 2, 1), (2, 10, 7, 3, 5, 1, 0, 1, 1),
         (1, 9, 9, 4, 4, 3, 1, 1, 2), (1, 6, 7, 3, 2, 5, 2, 1, 1), (1, 6, 7, 3, 2, 3, 0, 1, 1)]


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_values_and_both_gradients_equal_the_library_convolution(case):
  n, h, w, c_in, c_out, k, padding, dilation, stride = case
  x = jax.random.normal(jax.random.PRNGKey(0), (n, h, w, c_in))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (k, k, c_in, c_out))

  def loss(implementation):
    return lambda x, kernel: jnp.sum(jnp.sin(dense_conv.conv2d(
        x, kernel, stride=stride, padding=padding, dilation=dilation,
        implementation=implementation)))

  ref_value, ref_grads = jax.value_and_grad(loss('conv'), (0, 1))(x, kernel)
  value, grads = jax.jit(jax.value_and_grad(loss('matmul'), (0, 1)))(x, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-4)
  for got, want in zip(grads, ref_grads, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5)


def test_module_has_flax_conv_parameters_and_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 9, 6))
  ours = dense_conv.Conv(5, 3, padding=1, name='conv')
  flax_conv = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name='conv')
  variables = ours.init(jax.random.PRNGKey(3), x)
  reference = flax_conv.init(jax.random.PRNGKey(3), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, reference)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(reference), strict=True):
    np.testing.assert_array_equal(a, b)  # the same initialisation from the same key
  np.testing.assert_allclose(ours.apply(variables, x), flax_conv.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'fast'.*expected one of"):
    dense_conv.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 1, 1)), implementation='fast')
