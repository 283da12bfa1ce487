"""Contract and behaviour tests of the CvT backbone and classifier."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_backbone import CvT, CvTBackbone, count_params
from cvt_backbone.cvt import VARIANTS
from cvt_backbone.kernels import attention as attention_lib
from cvt_backbone.kernels import depthwise as depthwise_lib

OFFICIAL_PARAM_COUNTS = {'cvt-13': 19_997_480, 'cvt-21': 31_622_696, 'cvt-w24': 277_196_392}
# The official output sizes: n1 = floor((n+1)/4), n2 = ceil(n1/2), n3 = ceil(n2/2).
SIZES = [(224, 224), (250, 250), (513, 513), (225, 301)]
EXPECTED = {
    (224, 224): [(56, 56), (28, 28), (14, 14)],
    (250, 250): [(62, 62), (31, 31), (16, 16)],
    (513, 513): [(128, 128), (64, 64), (32, 32)],
    (225, 301): [(56, 75), (28, 38), (14, 19)],
}


def _formula(n: int) -> list[int]:
  n1 = (n + 1) // 4
  n2 = -(-n1 // 2)
  return [n1, n2, -(-n2 // 2)]


@functools.cache
def _tiny_variables(**kwargs):
  model = CvTBackbone(variant='cvt-tiny', **kwargs)
  return jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))


def _images(shape=(2, 64, 64, 3), seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize('variant', sorted(VARIANTS))
@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_contract_every_variant(variant, size):
  """Names, channels, strides and exact sizes, traced with eval_shape (no compute)."""
  model = CvTBackbone(variant=variant)
  images = jax.ShapeDtypeStruct((2, *size, 3), jnp.float32)

  def forward(x):
    variables = model.init(jax.random.PRNGKey(0), x)
    return model.apply(variables, x)

  out = jax.eval_shape(forward, images)
  assert list(out) == ['stage1', 'stage2', 'stage3']
  assert [info['name'] for info in model.feature_info] == list(out)
  assert model.output_strides == {'stage1': 4, 'stage2': 8, 'stage3': 16}
  expected_sizes = EXPECTED[size]
  assert expected_sizes == [tuple(hw) for hw in zip(_formula(size[0]), _formula(size[1]), strict=True)]
  assert list(model.output_sizes(*size).values()) == expected_sizes
  for (name, feature), hw in zip(out.items(), expected_sizes, strict=True):
    channels = model.output_channels[name]
    assert feature.shape == (2, *hw, channels)
    assert feature.dtype == jnp.float32
    assert model.output_shapes(*size)[name] == (*hw, channels)


@pytest.mark.parametrize('variant', sorted(OFFICIAL_PARAM_COUNTS))
def test_official_parameter_counts(variant):
  model = CvT.from_variant(variant, num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count_params(shapes['params']) == OFFICIAL_PARAM_COUNTS[variant]
  # BatchNorm running statistics are buffers, not parameters.
  assert 'batch_stats' in shapes


def test_tiny_runs_finite_at_odd_size():
  model = CvTBackbone(variant='cvt-tiny')
  images = _images((1, 97, 131, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  out = jax.jit(model.apply)(variables, images)
  assert {k: v.shape for k, v in out.items()} == {
      'stage1': (1, 24, 33, 16), 'stage2': (1, 12, 17, 32), 'stage3': (1, 6, 9, 48)}
  assert all(bool(jnp.isfinite(v).all()) for v in out.values())


def test_no_positional_embedding_and_cls_only_in_last_stage():
  params = _tiny_variables()['params']
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = ['/'.join(str(k.key) for k in path) for path, _ in flat]
  assert not any('pos' in n for n in names)
  assert [n for n in names if 'cls_token' in n] == ['stage2/cls_token']


@pytest.mark.parametrize('selection, expected', [
    (('stage1', 'stage3'), ('stage1', 'stage3')),
    ((-1,), ('stage3',)),
    ((0, -2), ('stage1', 'stage2')),
    ((2, 'stage3'), ('stage3',)),
])
def test_out_features_selection(selection, expected):
  model = CvTBackbone(variant='cvt-tiny', out_features=selection)
  assert model.out_names == expected
  out = jax.jit(model.apply)(_tiny_variables(), _images())
  assert tuple(out) == expected
  assert [info['name'] for info in model.feature_info] == list(expected)


def test_out_norm_and_cls_token():
  model = CvTBackbone(variant='cvt-tiny', out_norm=True, return_cls_token=True)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), _images())
  assert {'out_norm_stage1', 'out_norm_stage2', 'out_norm_stage3'} <= set(variables['params'])
  out = jax.jit(model.apply)(variables, _images())
  assert out['cls_token'].shape == (2, 48)
  # Freshly initialised LayerNorm: zero mean, unit variance over channels.
  np.testing.assert_allclose(out['stage2'].mean(-1), 0.0, atol=1e-5)
  # The cls token is never part of the maps: they have exactly h*w positions.
  assert out['stage3'].shape == (2, 4, 4, 48)


def test_train_vs_eval_batchnorm():
  model = CvTBackbone(variant='cvt-tiny', drop_path_rate=0.0)
  variables = _tiny_variables()
  images = _images()
  eval_out, eval_state = model.apply(variables, images, mutable=['batch_stats'])
  train_out, train_state = model.apply(variables, images, train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables['batch_stats'],
                         train_state['batch_stats'])
  assert all(jax.tree.leaves(changed)), 'train mode must update every BatchNorm running stat'
  unchanged = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), variables['batch_stats'],
                           eval_state['batch_stats'])
  assert all(jax.tree.leaves(unchanged)), 'eval mode must not touch running stats'
  assert float(jnp.abs(train_out['stage3'] - eval_out['stage3']).max()) > 1e-3
  # norm_eval: BatchNorm keeps running statistics in train mode.
  frozen_bn = CvTBackbone(variant='cvt-tiny', drop_path_rate=0.0, norm_eval=True)
  out, state = frozen_bn.apply(variables, images, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(out['stage3'], eval_out['stage3'])
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   variables['batch_stats'], state['batch_stats']))


def test_drop_path_needs_dropout_rng_in_train_only():
  model = CvTBackbone(variant='cvt-tiny', drop_path_rate=0.5, norm_eval=True)
  variables = _tiny_variables()
  images = _images((8, 64, 64, 3))
  with pytest.raises(Exception, match='dropout'):
    model.apply(variables, images, train=True)
  a = model.apply(variables, images, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  b = model.apply(variables, images, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert float(jnp.abs(a['stage3'] - b['stage3']).max()) > 1e-4
  # Stage 3 is the only one with drop path (official rates 0/0/rate).
  np.testing.assert_array_equal(a['stage2'], b['stage2'])
  # Eval needs no rng and is deterministic.
  e1 = model.apply(variables, images)
  e2 = model.apply(variables, images, rngs={'dropout': jax.random.PRNGKey(3)})
  np.testing.assert_array_equal(e1['stage3'], e2['stage3'])


@pytest.mark.parametrize('with_cls', [False, True])
@pytest.mark.parametrize('implementation, chunk', [('chunked', 7), ('chunked', 64), ('fused', None)])
def test_attention_implementations_equal_plain(with_cls, implementation, chunk):
  key = jax.random.PRNGKey(0)
  kq, kk, kv = jax.random.split(key, 3)
  q_len, kv_len = 12 * 10 + with_cls, 6 * 5 + with_cls
  q = jax.random.normal(kq, (2, q_len, 3, 16))
  k = jax.random.normal(kk, (2, kv_len, 3, 16))
  v = jax.random.normal(kv, (2, kv_len, 3, 16))
  scale = 48**-0.5
  plain = attention_lib.attention(q, k, v, scale=scale, implementation='plain')
  other = attention_lib.attention(q, k, v, scale=scale, implementation=implementation,
                                  chunk_size=chunk)
  assert float(jnp.abs(plain - other).max()) <= 1e-5


@pytest.mark.parametrize('per_head', [True, False])
@pytest.mark.parametrize('kv_len', [40, 37])
def test_key_blocks_online_softmax_equals_plain(monkeypatch, per_head, kv_len):
  """Key blocks (flash-style) kick in at 4 blocks of keys: shrink the block to test them."""
  monkeypatch.setattr(attention_lib, 'KEY_BLOCK', 8)
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  q = jax.random.normal(keys[0], (2, 29, 2, 8)) * 3
  k = jax.random.normal(keys[1], (2, kv_len, 2, 8)) * 3
  v = jax.random.normal(keys[2], (2, kv_len, 2, 8))

  def loss(q, k, v, chunk):
    out = attention_lib._multi_head(q, k, v, 0.5, chunk, per_head)
    return jnp.sum(out * jnp.cos(out)), out

  (_, plain), grads_plain = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, None)
  (_, blocked), grads_blocked = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, 6)
  assert float(jnp.abs(plain - blocked).max()) <= 1e-5
  for a, b in zip(grads_plain, grads_blocked, strict=True):
    assert float(jnp.abs(a - b).max()) <= 1e-4


@pytest.mark.parametrize('chunk', [None, 5, 64])
def test_per_head_and_batched_layouts_agree(chunk):
  """CPU maps over (batch, head) pairs; other backends batch them: same numbers."""
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  q = jax.random.normal(keys[0], (2, 41, 3, 8))
  k = jax.random.normal(keys[1], (2, 11, 3, 8))
  v = jax.random.normal(keys[2], (2, 11, 3, 8))
  per_head = attention_lib._multi_head(q, k, v, 0.3, chunk, per_head=True)
  batched = attention_lib._multi_head(q, k, v, 0.3, chunk, per_head=False)
  reference = jax.nn.dot_product_attention(q, k, v, scale=0.3)
  assert float(jnp.abs(per_head - batched).max()) <= 1e-6
  assert float(jnp.abs(per_head - reference).max()) <= 1e-5


@pytest.mark.parametrize('implementation', ['chunked', 'fused'])
def test_model_attention_implementations_agree(implementation):
  """Through the whole model: stage 1 has no cls token, stage 3 has one."""
  images = _images((1, 80, 72, 3))
  variables = _tiny_variables()
  plain = jax.jit(CvTBackbone(variant='cvt-tiny', attention='plain').apply)(variables, images)
  other_model = CvTBackbone(variant='cvt-tiny', attention=implementation, attention_chunk_size=50)
  other = jax.jit(other_model.apply)(variables, images)
  for name in plain:
    assert float(jnp.abs(plain[name] - other[name]).max()) <= 1e-5, name


def test_auto_attention_chunks_large_inputs():
  pick = functools.partial(attention_lib.choose_implementation, backend='cpu', dtype=jnp.float32)
  assert pick(1, 1, 3136, 784) == 'plain'
  # 1024x2048 stage 1: 131,072 queries over 32,768 keys.
  assert pick(1, 1, 131_072, 32_768) == 'chunked'
  gpu = attention_lib.choose_implementation(1, 1, 131_072, 32_768, jnp.bfloat16, backend='gpu')
  assert gpu == 'fused'
  chunk = attention_lib.chunk_size_for_budget(1, 1, 32_768, 256 * 2**20)
  assert attention_lib.SOFTMAX_BUFFERS * attention_lib.logits_bytes(1, 1, chunk, 32_768) <= 256 * 2**20


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('size', [(9, 9), (10, 7)])
def test_depthwise_slices_equal_conv(stride, size):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, *size, 5))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 1, 5))
  a = depthwise_lib.depthwise_conv2d(x, kernel, stride=stride, padding=1, implementation='slices')
  b = depthwise_lib.depthwise_conv2d(x, kernel, stride=stride, padding=1, implementation='conv')
  assert a.shape == b.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 5)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_bf16_compute_fp32_params():
  model = CvTBackbone(variant='cvt-tiny', dtype=jnp.bfloat16)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), _images())
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, _images())
  for feature in out.values():
    assert feature.dtype == jnp.bfloat16
    assert bool(jnp.isfinite(feature.astype(jnp.float32)).all())
  ref = jax.jit(CvTBackbone(variant='cvt-tiny').apply)(variables, _images())
  # bf16 has 8 bits of mantissa: same features up to rounding.
  assert float(jnp.abs(out['stage3'].astype(jnp.float32) - ref['stage3']).mean()) < 0.05


def _grad_norms(model, variables, images):
  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, images, train=True,
                         mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)})
    return sum(jnp.sum(v**2) for v in out.values())

  grads = jax.jit(jax.grad(loss))(variables['params'])
  return {name: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(tree)))
          for name, tree in grads.items()}


def test_frozen_stages_get_zero_gradients():
  variables = _tiny_variables()
  norms = _grad_norms(CvTBackbone(variant='cvt-tiny', frozen_stages=2), variables, _images())
  assert norms['stage0'] == 0.0 and norms['stage1'] == 0.0
  assert norms['stage2'] > 0.0
  norms = _grad_norms(CvTBackbone(variant='cvt-tiny'), variables, _images())
  assert all(v > 0.0 for v in norms.values())


def test_remat_same_values_and_gradients():
  variables = _tiny_variables()
  images = _images()
  plain = _grad_norms(CvTBackbone(variant='cvt-tiny'), variables, images)
  remat = _grad_norms(CvTBackbone(variant='cvt-tiny', remat=True), variables, images)
  for name in plain:
    np.testing.assert_allclose(remat[name], plain[name], rtol=1e-5)


@pytest.mark.parametrize('images, error', [
    (jnp.zeros((64, 64, 3)), 'NHWC'),
    (jnp.zeros((1, 3, 64, 64)), 'channels last'),
    (jnp.zeros((1, 64, 64, 3), jnp.int32), 'floating-point'),
    (jnp.zeros((1, 15, 64, 3)), 'at least 16x16'),
])
def test_bad_images(images, error):
  with pytest.raises((ValueError, TypeError), match=error):
    CvTBackbone(variant='cvt-tiny').init(jax.random.PRNGKey(0), images)


def test_bad_names():
  with pytest.raises(ValueError, match="Unknown CvT variant 'cvt-99'.*cvt-13"):
    _ = CvTBackbone(variant='cvt-99').feature_info
  with pytest.raises(ValueError, match="Unknown output 'stage4'.*stage1"):
    _ = CvTBackbone(variant='cvt-tiny', out_features=('stage4',)).out_names
  with pytest.raises(ValueError, match='Output index 3 out of range'):
    _ = CvTBackbone(variant='cvt-tiny', out_features=(3,)).out_names
  with pytest.raises(ValueError, match="Unknown attention implementation 'flash'"):
    CvTBackbone(variant='cvt-tiny', attention='flash').init(jax.random.PRNGKey(0), _images())


def test_variant_name_aliases():
  for name in ('CvT-13', 'cvt_13', '13'):
    assert CvTBackbone(variant=name).resolved_spec == VARIANTS['cvt-13']


def test_classifier_head_and_backbone_share_stage_params():
  classifier = CvT.from_variant('cvt-tiny', num_classes=7)
  variables = jax.jit(classifier.init)(jax.random.PRNGKey(0), _images())
  assert set(variables['params']) == {'stage0', 'stage1', 'stage2', 'norm', 'head'}
  logits = jax.jit(classifier.apply)(variables, _images())
  assert logits.shape == (2, 7)
  backbone_tree = jax.tree.map(jnp.shape, _tiny_variables()['params'])
  classifier_tree = jax.tree.map(jnp.shape, variables['params'])
  for stage in ('stage0', 'stage1', 'stage2'):
    assert backbone_tree[stage] == classifier_tree[stage]
