"""Segmentor: return convention, stable variable names, compile-once, norms and dropout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads import LinearHead, Segmentor, build_head
from heads.conv_module import ConvModule, group_count
from tests.heads.stand_in import FAST_COMPILE, StandInBackbone

SIZE = (64, 80)


def _upernet_segmentor(**kwargs) -> Segmentor:
  backbone = StandInBackbone()
  info = backbone.feature_info
  return Segmentor(
      backbone=backbone,
      decode_head=build_head('upernet', num_classes=3, channels=8, feature_info=info),
      auxiliary_head=build_head('fcn', num_classes=3, channels=8, in_features=['stage3'],
                                feature_info=info),
      **kwargs)


@functools.cache
def _initialised():
  model = _upernet_segmentor()
  images = jax.random.normal(jax.random.key(0), (2, *SIZE, 3))
  init = jax.jit(model.init, compiler_options=FAST_COMPILE)
  return model, images, init(jax.random.key(1), images)


def test_return_convention_and_variable_names():
  model, images, variables = _initialised()
  assert set(variables) == {'params', 'batch_stats'}
  assert set(variables['params']) == {'backbone', 'decode_head', 'auxiliary_head'}
  # The auxiliary head is initialised in eval mode too: one variable tree for both modes.
  train_init = jax.eval_shape(functools.partial(model.init, train=True), jax.random.key(1),
                              images)
  assert (jax.tree_util.tree_structure(train_init['params'])
          == jax.tree_util.tree_structure(variables['params']))

  eval_out = jax.jit(model.apply, compiler_options=FAST_COMPILE)(variables, images)
  assert set(eval_out) == {'logits'} and eval_out['logits'].shape == (2, *SIZE, 3)

  train_out, updates = jax.jit(
      functools.partial(model.apply, train=True, mutable=['batch_stats']),
      compiler_options=FAST_COMPILE)(variables, images, rngs={'dropout': jax.random.key(2)})
  assert set(train_out) == {'logits', 'aux_logits', 'head_logits', 'aux_head_logits'}
  assert train_out['aux_logits'].shape == (2, *SIZE, 3)
  assert train_out['head_logits'].shape[::3] == (2, 3)
  assert set(updates['batch_stats']) == set(variables['batch_stats'])

  no_aux = Segmentor(StandInBackbone(), LinearHead(num_classes=3))
  out, _ = jax.eval_shape(functools.partial(no_aux.init_with_output, train=True),
                          jax.random.key(0), images)
  assert set(out) == {'logits', 'head_logits'}


def test_neck_outputs_join_the_backbone_features():
  backbone = StandInBackbone()
  fpn = build_head('fpn', feature_info=backbone.feature_info, out_channels=8)
  model = Segmentor(
      backbone=backbone, neck=fpn,
      decode_head=build_head('semantic_fpn', num_classes=3, channels=8,
                             feature_info=fpn.feature_info),
      # The auxiliary head reads a backbone level while the decode head reads the FPN.
      auxiliary_head=build_head('fcn', num_classes=3, channels=8, in_features=['stage3']))
  images = jnp.zeros((1, *SIZE, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert set(variables['params']) == {'backbone', 'neck', 'decode_head', 'auxiliary_head'}


def test_jitted_segmentor_compiles_once_per_input_shape():
  model, images, variables = _initialised()
  traces = []

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def predict(variables, images):
    traces.append(images.shape)  # runs only while tracing
    return model.apply(variables, images)['logits']

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def train_logits(variables, images, key):
    traces.append(('train', images.shape))
    out, _ = model.apply(variables, images, train=True, mutable=['batch_stats'],
                         rngs={'dropout': key})
    return out['logits']

  predict(variables, images)
  predict(variables, images + 1.0)  # new values, same shape: no retrace
  train_logits(variables, images, jax.random.key(0))
  train_logits(variables, images * 2, jax.random.key(1))
  assert traces == [images.shape, ('train', images.shape)]
  assert predict._cache_size() == 1 and train_logits._cache_size() == 1
  predict(variables, images[:1])  # a new shape compiles once more
  assert len(traces) == 3


def test_end_to_end_gradient_equals_the_split_used_by_the_contract_test():
  model, images, variables = _initialised()
  params, state = variables['params'], {'batch_stats': variables['batch_stats']}
  apply = functools.partial(model.apply, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(3)})

  def loss(out):
    return sum(jnp.sum(v * jnp.cos(jnp.arange(v.size).reshape(v.shape))) for v in out.values())

  full = jax.jit(jax.grad(lambda p: loss(apply({'params': p, **state}, images)[0])),
                 compiler_options=FAST_COMPILE)(params)

  def backbone(p):
    return model.backbone.apply({'params': p, 'batch_stats': state['batch_stats']['backbone']},
                                images, train=True, mutable=['batch_stats'])[0]

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def split(params):
    features, vjp = jax.vjp(backbone, params['backbone'])
    heads = {k: v for k, v in params.items() if k != 'backbone'}

    def head_loss(heads, features):
      return loss(apply({'params': heads, **state}, features, SIZE, method=Segmentor.decode)[0])

    head_grads, feature_grads = jax.grad(head_loss, argnums=(0, 1))(heads, features)
    return {'backbone': vjp(feature_grads)[0], **head_grads}

  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(full)[0],
                          jax.tree_util.tree_leaves(split(params)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_dropout_only_in_train_mode():
  model, images, variables = _initialised()

  @functools.partial(jax.jit, static_argnames='train', compiler_options=FAST_COMPILE)
  def logits(key, train):
    out = model.apply(variables, images, train=train, mutable=['batch_stats'],
                      rngs={'dropout': key})[0]
    return out['logits']

  assert not np.allclose(logits(jax.random.key(0), True), logits(jax.random.key(1), True))
  np.testing.assert_array_equal(logits(jax.random.key(0), False),
                                logits(jax.random.key(1), False))


def test_align_corners_changes_only_the_final_resize():
  model, images, variables = _initialised()

  def apply(segmentor):
    return jax.jit(segmentor.apply, compiler_options=FAST_COMPILE)(variables, images)['logits']

  half_pixel = apply(model)
  corners = apply(_upernet_segmentor(align_corners=True))
  assert corners.shape == half_pixel.shape
  assert not np.allclose(corners, half_pixel)
  # Both resize the same low-resolution logits: corner pixels agree exactly.
  np.testing.assert_allclose(corners[:, 0, 0], half_pixel[:, 0, 0], atol=1e-6)


@functools.cache
def _stand_in_features():
  backbone = StandInBackbone()
  images = jax.random.normal(jax.random.key(2), (2, 64, 64, 3))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def features(images):
    return backbone.apply(backbone.init(jax.random.key(0), images), images)

  return backbone.feature_info, features(images)


@pytest.mark.parametrize('norm', ['batch', 'group', 'layer', 'none'])
def test_every_norm_choice_in_every_head(norm):
  info, features = _stand_in_features()
  for name in ('semantic_fpn', 'upernet', 'fcn', 'segformer', 'linear'):
    head = build_head(name, num_classes=3, norm=norm, feature_info=info,
                      **({} if name == 'linear' else {'channels': 8}),
                      **({'in_features': ['stage3']} if name == 'fcn' else {}))
    # Traced, not compiled: the variable tree shows which norm every conv got.
    variables = jax.eval_shape(head.init, jax.random.key(0), features)
    norms = {k for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
             for k in (p.key for p in path) if k.endswith('_norm')}
    assert norms == (set() if norm == 'none' else {f'{norm}_norm'}), name
    assert ('batch_stats' in variables) == (norm == 'batch'), name

  # And one head runs, in train mode, with each norm.
  head = build_head('semantic_fpn', num_classes=3, norm=norm, channels=8, feature_info=info)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(features):
    variables = head.init(jax.random.key(0), features)
    return head.apply(variables, features, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.key(1)})[0]

  assert np.isfinite(np.asarray(run(features))).all()


def test_group_norm_adapts_its_group_count():
  assert group_count(256, 32) == 32
  assert group_count(48, 32) == 24
  assert group_count(20, 32) == 20
  assert group_count(60, 32) == 30


def test_batch_norm_statistics_across_devices_with_axis_name():
  """Under a mapped axis, batch statistics cover all devices' examples, as SyncBatchNorm."""
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3)) * 3 + 1
  local = ConvModule(4, 1, norm='batch')
  synced = ConvModule(4, 1, norm='batch', axis_name='devices')
  variables = jax.jit(local.init, compiler_options=FAST_COMPILE)(jax.random.key(1), x)

  def run(module, x):
    return module.apply(variables, x, train=True, mutable=['batch_stats'])

  whole, whole_stats = run(local, x)
  # Two "devices" with two examples each, mapped like pmap/shard_map would.
  per_device, per_device_stats = jax.vmap(lambda x: run(synced, x), axis_name='devices')(
      x.reshape(2, 2, 5, 5, 3))
  np.testing.assert_allclose(per_device.reshape(whole.shape), whole, atol=1e-5)
  np.testing.assert_allclose(per_device_stats['batch_stats']['batch_norm']['mean'][0],
                             whole_stats['batch_stats']['batch_norm']['mean'], atol=1e-6)
  # Without the axis name each device would normalise with its own statistics.
  unsynced, _ = jax.vmap(lambda x: run(local, x))(x.reshape(2, 2, 5, 5, 3))
  assert not np.allclose(unsynced.reshape(whole.shape), whole, atol=1e-3)

