"""One contract test over every head: logits at the input size, finite, gradients everywhere.

Each head runs inside a `Segmentor` on the stand-in conv backbone and on the tiny CvT
backbone (once `cvt_backbone.CvTBackbone` exists), at input sizes whose stage maps are not
multiples of each other (97x131 -> 24x33/12x17/6x9, 250 -> 62/31/16, 513 -> 128/64/32), in
train mode (batch statistics, dropout) and eval mode.

To keep this fast on CPU, the backbone's forward and backward pass are compiled and run once
per (backbone, size) and shared by all heads: the chain rule is split at the feature maps.
`Segmentor.decode` (neck, heads, resize) gives the head gradients and the gradients of the
feature maps; the backbone's VJP turns the latter into the backbone gradients. This is the
same gradient as differentiating `Segmentor.__call__` end to end (checked in
test_segmentor.py). Head widths are small; default widths are covered by the registry tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads import Segmentor, build_head
from heads.resampling import resize_bilinear
from tests.heads.stand_in import FAST_COMPILE, StandInBackbone, cvt_backbone_class

NUM_CLASSES = 3
SIZES = [(64, 64), (97, 131), (250, 250), (513, 513)]
HEADS = ['fpn+semantic_fpn', 'upernet+fcn', 'segformer', 'linear']
# Batch of 2: BatchNorm over the 1x1 pooled map of UPerNet's PPM needs two values per channel.
BATCH = 2


def segmentor_kwargs(head: str, feature_info) -> dict:
  """Segmentor keyword arguments per head under test (FPN is the neck of Semantic FPN)."""
  if head == 'fpn+semantic_fpn':
    return dict(neck=build_head('fpn', feature_info=feature_info, out_channels=16),
                decode_head=build_head('semantic_fpn', num_classes=NUM_CLASSES, channels=16))
  if head == 'upernet+fcn':
    return dict(
        decode_head=build_head('upernet', feature_info=feature_info, num_classes=NUM_CLASSES,
                               channels=16),
        auxiliary_head=build_head('fcn', feature_info=feature_info, in_features=['stage3'],
                                  num_classes=NUM_CLASSES, channels=8))
  return dict(decode_head=build_head(head, feature_info=feature_info, num_classes=NUM_CLASSES,
                                     **({'channels': 16} if head == 'segformer' else {})))


def _compile(fn, *args, fast: bool = True):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE if fast else None)


@functools.cache
def _backbone(kind: str):
  """The backbone module and its variables (initialised once; they do not depend on size)."""
  if kind == 'stand_in':
    backbone = StandInBackbone()
  else:
    pytest.importorskip('cvt_backbone')
    cls = cvt_backbone_class()
    if cls is None:
      pytest.skip('cvt_backbone.CvTBackbone does not exist yet')
    # No stochastic depth: a dropped branch would (rightly) get no gradient in that step.
    backbone = cls(variant='cvt-tiny', drop_path_rate=0.0)
  key, images = jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  init = functools.partial(backbone.init, train=False)
  return backbone, _compile(init, key, images)(key, images)


@functools.cache
def _backbone_pass(kind: str, size: tuple[int, int]):
  """Train-mode features `{name: [2, H_i, W_i, C_i]}` at `size` and the backbone gradient.

  Returns:
    `(features, backward)` where `backward(feature_grads)` is the backbone's parameter
    gradient, compiled once per size.
  """
  backbone, variables = _backbone(kind)
  state = {k: v for k, v in variables.items() if k != 'params'}
  images = jax.random.normal(jax.random.key(1), (BATCH, *size, 3))

  def forward(params):
    features, _ = backbone.apply({'params': params, **state}, images, train=True,
                                 mutable=['batch_stats'], rngs={'dropout': jax.random.key(2)})
    return features

  features, vjp = _compile(lambda p: jax.vjp(forward, p), variables['params'])(
      variables['params'])
  # The backward runs once per head; at 513 px XLA's full optimisation pays for itself (CvT:
  # 2.5 s instead of 5 s per run, for 1.5 s more compile time). Not at smaller sizes.
  apply_vjp = _compile(lambda vjp, g: vjp(g)[0], vjp, features,
                       fast=size[0] * size[1] < 512 * 512)
  return features, functools.partial(apply_vjp, vjp)


@functools.cache
def _model_and_head_variables(kind: str, head: str):
  backbone, _ = _backbone(kind)
  model = Segmentor(backbone=backbone, **segmentor_kwargs(head, backbone.feature_info))
  features, _ = _backbone_pass(kind, SIZES[0])
  key = jax.random.key(3)
  init = functools.partial(model.init, method=Segmentor.decode, size=SIZES[0], train=False)
  return model, _compile(init, key, features)(key, features)


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
@pytest.mark.parametrize('head', HEADS)
@pytest.mark.parametrize('backbone_kind', ['stand_in', 'cvt'])
def test_logits_at_input_size_finite_and_gradients_reach_every_parameter(
    backbone_kind, head, size):
  features, backbone_backward = _backbone_pass(backbone_kind, size)
  model, variables = _model_and_head_variables(backbone_kind, head)
  state = {k: v for k, v in variables.items() if k != 'params'}

  def train_loss(params, features):
    outputs, _ = model.apply({'params': params, **state}, features, size, train=True,
                             method=Segmentor.decode, mutable=['batch_stats'],
                             rngs={'dropout': jax.random.key(4)})
    weights = jax.random.normal(jax.random.key(5), outputs['logits'].shape)
    full_size = [outputs[name] for name in ('logits', 'aux_logits') if name in outputs]
    return sum(jnp.sum(logits * weights) for logits in full_size), outputs

  def step(params, features):
    (head_grads, feature_grads), train_outputs = jax.grad(
        train_loss, argnums=(0, 1), has_aux=True)(params, features)
    eval_outputs = model.apply({'params': params, **state}, features, size, train=False,
                               method=Segmentor.decode)
    return head_grads, feature_grads, train_outputs, eval_outputs

  head_grads, feature_grads, train_outputs, eval_outputs = _compile(
      step, variables['params'], features)(variables['params'], features)
  backbone_grads = backbone_backward(feature_grads)

  full_size = {'logits', 'aux_logits'} if head == 'upernet+fcn' else {'logits'}
  # Train mode adds each head's logits before the resize, for a loss that resizes them.
  assert set(train_outputs) == full_size | {name.replace('logits', 'head_logits')
                                            for name in full_size}
  assert set(eval_outputs) == {'logits'}
  for mode, outputs in (('train', train_outputs), ('eval', eval_outputs)):
    for name in full_size & set(outputs):
      assert outputs[name].shape == (BATCH, *size, NUM_CLASSES), (mode, name)
      assert np.isfinite(np.asarray(outputs[name])).all(), (mode, name)
  for name in full_size:
    head_logits = train_outputs[name.replace('logits', 'head_logits')]
    assert head_logits.shape[0] == BATCH and head_logits.shape[-1] == NUM_CLASSES
    np.testing.assert_allclose(resize_bilinear(head_logits, size), train_outputs[name],
                               rtol=1e-5, atol=1e-5)

  grads = {'backbone': backbone_grads, **head_grads}
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  no_gradient = [jax.tree_util.keystr(path) for path, g in flat
                 if not np.any(np.asarray(g) != 0) or not np.isfinite(np.asarray(g)).all()]
  assert not no_gradient, f'no (finite) gradient reaches {no_gradient}'
