"""Detection losses: focal and BCE against optax (when installed) and the paper's formula, GIoU
against NumPy, and the ATSS loss set against a NumPy transcription of mmdet's
`ATSSHead.loss_by_feat`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads.detection.losses import atss_losses, centerness_loss, giou_loss, sigmoid_focal_loss
from tests.heads.test_boxes import _np_giou

jax.config.update('jax_default_matmul_precision', 'highest')
# One compilation per input signature instead of an eager dispatch per op.
_losses = jax.jit(atss_losses, static_argnames='num_classes')


def _np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _np_focal(logits, targets, alpha=0.25, gamma=2.0):
  p = _np_sigmoid(logits.astype(np.float64))
  ce = -(targets * np.log(p) + (1 - targets) * np.log(1 - p))
  p_t = targets * p + (1 - targets) * (1 - p)
  return (alpha * targets + (1 - alpha) * (1 - targets)) * (1 - p_t) ** gamma * ce


@pytest.mark.parametrize('alpha,gamma', [(0.25, 2.0), (0.5, 1.5), (0.25, 0.0)])
def test_focal_loss_equals_optax_and_the_formula(alpha, gamma):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 5)).astype(np.float32)
  targets = (rng.uniform(size=(4, 5)) < 0.3).astype(np.float32)
  loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
  np.testing.assert_allclose(loss, _np_focal(logits, targets, alpha, gamma), rtol=1e-5,
                             atol=1e-7)
  optax = pytest.importorskip('optax')  # the losses once called optax; same values without it
  np.testing.assert_allclose(
      loss, optax.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma), rtol=1e-6)
  soft = rng.uniform(size=(4, 5)).astype(np.float32)
  for fn, expected in (
      (lambda x, t: sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma),
       lambda x, t: optax.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma)),
      (centerness_loss, optax.sigmoid_binary_cross_entropy)):
    np.testing.assert_allclose(fn(logits, soft), expected(logits, soft), rtol=1e-6, atol=1e-7)
    grad, expected_grad = (jax.grad(lambda x, f=f: f(x, soft).sum())(logits)
                           for f in (fn, expected))
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)


def test_giou_and_centerness_losses_match_numpy():
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, 40, (2, 6, 2))
  pred = np.concatenate([xy[0], xy[0] + rng.uniform(1, 30, (6, 2))], -1).astype(np.float32)
  target = np.concatenate([xy[1], xy[1] + rng.uniform(1, 30, (6, 2))], -1).astype(np.float32)
  np.testing.assert_allclose(giou_loss(pred, target),
                             1 - _np_giou(pred.astype(np.float64), target), atol=1e-6)
  logits, targets = rng.normal(size=6).astype(np.float32), rng.uniform(size=6).astype(np.float32)
  p = _np_sigmoid(logits.astype(np.float64))
  np.testing.assert_allclose(centerness_loss(logits, targets),
                             -(targets * np.log(p) + (1 - targets) * np.log(1 - p)), rtol=1e-5)


def _np_atss_losses(cls_logits, box_distances, centerness_logits, points, cls_targets,
                    box_targets, positive):
  """mmdet ATSSHead losses with point-distance boxes, written over the list of positives."""
  num_pos = positive.sum()
  onehot = np.zeros(cls_logits.shape)
  for b, p in zip(*np.nonzero(positive), strict=True):
    onehot[b, p, cls_targets[b, p]] = 1
  loss_cls = _np_focal(cls_logits, onehot).sum() / max(num_pos, 1)
  weights, box_losses, ctr_losses = [], [], []
  for b, p in zip(*np.nonzero(positive), strict=True):
    x, y = points[p].astype(np.float64)
    left, top, right, bottom = box_distances[b, p].astype(np.float64)
    pred = np.array([x - left, y - top, x + right, y + bottom])
    gt = box_targets[b, p].astype(np.float64)
    lr, tb = (x - gt[0], gt[2] - x), (y - gt[1], gt[3] - y)
    weight = np.sqrt(min(lr) / max(lr) * min(tb) / max(tb))
    weights.append(weight)
    box_losses.append(weight * (1 - _np_giou(pred, gt)))
    q = _np_sigmoid(np.float64(centerness_logits[b, p]))
    ctr_losses.append(-(weight * np.log(q) + (1 - weight) * np.log(1 - q)))
  return {'loss_cls': loss_cls, 'loss_box': sum(box_losses) / max(sum(weights), 1.0),
          'loss_centerness': sum(ctr_losses) / max(num_pos, 1), 'num_pos': num_pos}


def _batch(seed, batch=2, num_points=12, num_classes=3):
  rng = np.random.default_rng(seed)
  points = rng.uniform(10, 50, (num_points, 2)).astype(np.float32)
  # Targets contain their points, as assigned positives do.
  lo = points - rng.uniform(1, 10, (batch, num_points, 2))
  hi = points + rng.uniform(1, 10, (batch, num_points, 2))
  positive = rng.uniform(size=(batch, num_points)) < 0.4
  box_targets = np.where(positive[..., None], np.concatenate([lo, hi], -1), 0).astype(np.float32)
  return dict(
      cls_logits=rng.normal(0, 2, (batch, num_points, num_classes)).astype(np.float32),
      box_distances=rng.uniform(0.5, 12, (batch, num_points, 4)).astype(np.float32),
      centerness_logits=rng.normal(size=(batch, num_points)).astype(np.float32),
      points=points,
      cls_targets=np.where(positive, rng.integers(0, num_classes, (batch, num_points)), -1),
      box_targets=box_targets,
      positive=positive)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_atss_losses_match_mmdet_formulas(seed):
  inputs = _batch(seed)
  losses = _losses(**inputs, num_classes=3)
  expected = _np_atss_losses(**inputs)
  assert set(losses) == {'loss_cls', 'loss_box', 'loss_centerness', 'num_pos'}
  for name, value in expected.items():
    np.testing.assert_allclose(losses[name], value, rtol=2e-5, err_msg=name)


def test_padded_images_contribute_nothing():
  inputs = _batch(3, batch=3)
  mask = np.array([1, 0, 1], np.float32)
  masked = _losses(**inputs, num_classes=3, image_mask=mask)
  kept = {k: (v if k == 'points' else v[mask > 0]) for k, v in inputs.items()}
  expected = _losses(**kept, num_classes=3)
  for name in expected:
    np.testing.assert_allclose(masked[name], expected[name], rtol=1e-6, err_msg=name)


def test_no_positives_gives_finite_losses_and_gradients():
  inputs = _batch(4)
  inputs['positive'] = np.zeros_like(inputs['positive'])
  inputs['box_targets'] = np.zeros_like(inputs['box_targets'])

  def total(cls_logits, box_distances, centerness_logits):
    losses = atss_losses(cls_logits, box_distances, centerness_logits, inputs['points'],
                         inputs['cls_targets'], inputs['box_targets'], inputs['positive'], 3)
    return losses['loss_cls'] + losses['loss_box'] + losses['loss_centerness'], losses

  args = [jnp.asarray(inputs[k]) for k in ('cls_logits', 'box_distances', 'centerness_logits')]
  grads, losses = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(*args)
  assert float(losses['num_pos']) == 0 and float(losses['loss_box']) == 0
  assert float(losses['loss_centerness']) == 0
  np.testing.assert_allclose(losses['loss_cls'], _np_focal(inputs['cls_logits'], 0.0).sum(),
                             rtol=1e-5)
  assert all(np.isfinite(g).all() for g in grads)
  np.testing.assert_array_equal(grads[1], 0.0)


def test_gradients_are_finite_with_degenerate_predictions():
  inputs = _batch(5)
  inputs['box_distances'][..., 0::2] = 0  # zero-width predicted boxes
  box_loss = lambda d: atss_losses(**{**inputs, 'box_distances': d}, num_classes=3)['loss_box']
  grad = jax.jit(jax.grad(box_loss))(jnp.asarray(inputs['box_distances']))
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_shape_errors_name_the_argument():
  inputs = _batch(6)
  with pytest.raises(ValueError, match=r'cls_logits \[B, P, 4\]'):
    atss_losses(**inputs, num_classes=4)
  with pytest.raises(ValueError, match='centerness_logits of shape'):
    atss_losses(**{**inputs, 'centerness_logits': inputs['centerness_logits'][:, :3]},
                num_classes=3)
