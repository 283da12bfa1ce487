"""`heads.segmentation.loss`: the loss that resizes a head's logits a block of rows at a time
equals resize-then-cross-entropy (`resize_bilinear`, optax), in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from heads import resampling
from heads.segmentation.loss import cross_entropy_sum

pytestmark = pytest.mark.usefixtures('highest_precision')


def _reference(logits, labels, weights, label_smoothing, align_corners):
  full = resampling.resize_bilinear(logits, labels.shape[1:], align_corners=align_corners)
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
  return jnp.sum(optax.softmax_cross_entropy(full, targets) * weights)


# (batch, h, w, labels H, W, classes, label smoothing, align corners, block bytes): odd sizes
# (a 250 px crop gives 63 px maps), blocks that do not divide the rows, a single block, a
# downsampling, and labels at the logits' size.
CASES = [(2, 16, 12, 64, 47, 5, 0.0, False, 4 * 2 * 47 * 5 * 7),
         (1, 63, 40, 250, 161, 3, 0.1, False, 2**20),
         (2, 9, 11, 33, 40, 4, 0.0, True, 4 * 2 * 40 * 4 * 5),
         (1, 20, 20, 13, 17, 6, 0.0, False, 4 * 17 * 6 * 4),
         (2, 10, 8, 10, 8, 4, 0.1, False, 64)]


@pytest.mark.parametrize('case', CASES, ids=lambda c: 'x'.join(map(str, c)))
def test_value_and_gradient_equal_resize_then_cross_entropy(case):
  batch, h, w, height, width, classes, smoothing, corners, block_bytes = case
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((batch, h, w, classes), np.float32) * 3)
  labels = rng.integers(0, classes, (batch, height, width))
  labels[rng.random(labels.shape) < 0.2] = 255
  weights = jnp.asarray((labels != 255).astype(np.float32))
  labels = jnp.asarray(np.where(labels == 255, 0, labels))

  def ours(x):
    return cross_entropy_sum(x, labels, weights, label_smoothing=smoothing,
                             align_corners=corners, block_bytes=block_bytes)

  def reference(x):
    return _reference(x, labels, weights, smoothing, corners)

  value, grad = jax.jit(jax.value_and_grad(ours))(logits)
  want_value, want_grad = jax.value_and_grad(reference)(logits)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


def test_ignored_labels_contribute_nothing():
  logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, 4, 4, 3), np.float32))
  labels = jnp.full((1, 16, 16), 255)
  loss, grad = jax.value_and_grad(
      lambda x: cross_entropy_sum(x, labels, jnp.zeros((1, 16, 16))))(logits)
  assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_bilinear_matrix_is_resize_bilinear():
  x = np.random.default_rng(2).standard_normal((1, 63, 1, 2)).astype(np.float32)
  for out_size, corners in ((250, False), (250, True), (17, False), (63, False)):
    want = resampling.resize_bilinear(jnp.asarray(x), (out_size, 1), align_corners=corners)
    matrix = resampling.bilinear_matrix(63, out_size, align_corners=corners)
    assert matrix.shape == (out_size, 63)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.einsum('oi,nicd->nocd', matrix, x), want, atol=5e-6)


def test_mismatched_batch_is_named():
  with pytest.raises(ValueError, match=r'logits \[B, h, w, K\] for labels \(2, 8, 8\)'):
    cross_entropy_sum(jnp.zeros((1, 4, 4, 3)), jnp.zeros((2, 8, 8), int), jnp.ones((2, 8, 8)))
