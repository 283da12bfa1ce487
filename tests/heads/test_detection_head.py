"""Detection contract: `Detector` (backbone + P3-P7 FPN + `ATSSHead`) shapes, init and order.

Runs on the stand-in conv backbone and on CvT-tiny at input sizes whose pyramid levels are not
multiples of each other (96x80 -> P3 12x10 ... P7 1x1; 100x70 -> 13x9 ... 1x1). Head widths are
small; the default width (256, GroupNorm 32) is checked for its initialisation only.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from heads.atss_head import PRIOR_PROB, ATSSHead, flatten_levels, split_levels
from heads.detection.detector import Detector
from heads.fpn import FPN, detection_fpn
from tests.heads.stand_in import FAST_COMPILE, StandInBackbone, cvt_backbone_class

NUM_CLASSES = 3
BATCH = 2
SIZES = {'stand_in': [(64, 64), (96, 80), (100, 70)], 'cvt': [(64, 64), (100, 70)]}
LEVELS = ('p3', 'p4', 'p5', 'p6', 'p7')
STRIDES = (8, 16, 32, 64, 128)


def _compile(fn, *args):
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def _backbone(kind: str):
  if kind == 'stand_in':
    return StandInBackbone()
  cls = cvt_backbone_class()
  if cls is None:
    pytest.skip('cvt_backbone.CvTBackbone does not exist yet')
  return cls(variant='cvt-tiny')


def _expected_level_shapes(height: int, width: int) -> list[tuple[int, int]]:
  # CvT sizes (stand-in too): stride 4 floor((n + 1) / 4), then every level ceil-halves.
  sizes = [((height + 1) // 4, (width + 1) // 4)]
  for _ in range(1 + len(LEVELS)):
    sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
  return sizes[1:1 + len(LEVELS)]  # P3 (stride 8) to P7.


@functools.cache
def _model_and_variables(kind: str):
  backbone = _backbone(kind)
  model = Detector(backbone=backbone, neck=detection_fpn(backbone.feature_info, out_channels=16),
                   head=ATSSHead(NUM_CLASSES, channels=16, num_convs=2))
  images = jnp.zeros((1, 64, 64, 3))
  key = jax.random.key(0)
  return model, _compile(functools.partial(model.init, train=False), key, images)(key, images)


@pytest.mark.parametrize('kind,size', [(k, s) for k, sizes in SIZES.items() for s in sizes],
                         ids=lambda x: x if isinstance(x, str) else f'{x[0]}x{x[1]}')
def test_outputs_shapes_finite_and_same_structure_in_train_and_eval(kind, size):
  model, variables = _model_and_variables(kind)
  images = jax.random.normal(jax.random.key(1), (BATCH, *size, 3))

  def run(variables, images):
    train, _ = model.apply(variables, images, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(2)})
    return train, model.apply(variables, images, train=False)

  train_out, eval_out = _compile(run, variables, images)(variables, images)

  shapes = model.level_shapes(*size)
  assert list(shapes) == _expected_level_shapes(*size)
  num_points = sum(h * w for h, w in shapes)
  expected = {'cls_logits': (BATCH, num_points, NUM_CLASSES),
              'box_distances': (BATCH, num_points, 4), 'centerness': (BATCH, num_points)}
  assert jax.tree.structure(train_out) == jax.tree.structure(eval_out)
  for mode, out in (('train', train_out), ('eval', eval_out)):
    assert {k: v.shape for k, v in out.items()} == expected, mode
    for name, value in out.items():
      assert value.dtype == jnp.float32, (mode, name)
      assert np.isfinite(np.asarray(value)).all(), (mode, name)
    assert (np.asarray(out['box_distances']) >= 0).all(), mode


def test_initialisation_follows_mmdet_fcos():
  head = ATSSHead(num_classes=80)  # Default width: 256 channels, GroupNorm(32), 4 convs.
  features = {name: jax.random.normal(jax.random.key(i), (1, s, s, 256))
              for i, (name, s) in enumerate(zip(LEVELS, (4, 2, 1, 1, 1), strict=True))}

  def init_and_capture(key, features):
    params = head.init(key, features)['params']
    _, state = head.apply({'params': params}, features, capture_intermediates=True,
                          mutable=['intermediates'])
    return params, state['intermediates']['cls_convs_0']['group_norm']['__call__'][0]

  params, normed = _compile(init_and_capture, jax.random.key(0), features)(
      jax.random.key(0), features)

  # Focal-loss prior: sigmoid(bias) = 0.01 for every class.
  bias = np.asarray(params['conv_cls']['bias'])
  assert bias.shape == (80,)
  np.testing.assert_allclose(bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB), rtol=1e-6)
  np.testing.assert_allclose(jax.nn.sigmoid(bias), PRIOR_PROB, rtol=1e-5)
  # Every conv ~ Normal(0, 0.01), zero biases elsewhere.
  for name in ('cls_convs_0', 'reg_convs_3'):
    kernel = np.asarray(params[name]['conv']['kernel'])
    assert kernel.shape == (3, 3, 256, 256)
    assert abs(kernel.std() - 0.01) < 5e-4 and abs(kernel.mean()) < 5e-4, name
    # GroupNorm after a bias-free conv (mmdet conv_bias='auto'), 32 groups of 8 channels.
    assert set(params[name]) == {'conv', 'group_norm'}
    assert 'bias' not in params[name]['conv']
  for name in ('conv_reg', 'conv_centerness'):
    np.testing.assert_array_equal(params[name]['bias'], 0.0)
    assert abs(np.asarray(params[name]['kernel']).std() - 0.01) < 2e-3
  # One learnable scalar per level, starting at 1.
  for i in range(len(LEVELS)):
    assert params[f'scales_{i}']['scale'].shape == ()
    assert float(params[f'scales_{i}']['scale']) == 1.0
  assert not any(name.startswith('scales_') and int(name[7:]) >= len(LEVELS) for name in params)

  # 32 groups: the P3 GroupNorm output has zero mean over each group of 8 channels.
  groups = np.asarray(normed).reshape(*normed.shape[:3], 32, 8)
  np.testing.assert_allclose(groups.mean(axis=(1, 2, 4)), 0.0, atol=1e-4)


def _count(params, skip_scales: bool = False) -> int:
  return sum(int(np.prod(leaf.shape)) for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0]
             if not (skip_scales and str(path[0].key).startswith('scales_')))


def test_towers_and_predictors_are_shared_across_levels():
  features = {name: jnp.ones((1, 16 >> i, 16 >> i, 8)) for i, name in enumerate(LEVELS)}
  counts = {}
  for num_levels in (1, 3, 5):
    head = ATSSHead(NUM_CLASSES, in_features=LEVELS[:num_levels], strides=STRIDES[:num_levels],
                    channels=8, num_convs=2)
    params = jax.eval_shape(head.init, jax.random.key(0), features)['params']
    counts[num_levels] = _count(params, skip_scales=True)
    # Only the per-level Scale grows with the number of levels.
    assert _count(params) - counts[num_levels] == num_levels
  assert len(set(counts.values())) == 1, counts


def test_flattened_order_is_levels_fine_to_coarse_each_row_major():
  """A point of level l is what the head computes on that level alone, with its scale."""
  rng = np.random.default_rng(0)
  shapes = [(6, 5), (3, 3), (2, 2)]
  features = {name: jnp.asarray(rng.standard_normal((2, *hw, 8)), jnp.float32)
              for name, hw in zip(LEVELS, shapes, strict=False)}
  head = ATSSHead(NUM_CLASSES, in_features=LEVELS[:3], strides=STRIDES[:3], channels=8,
                  num_convs=1)

  def run(features):
    params = head.init(jax.random.key(0), features)['params']
    params = {**params, **{f'scales_{i}': {'scale': jnp.float32(0.5 + i)} for i in range(3)}}
    singles = []
    for level in range(3):
      single = ATSSHead(NUM_CLASSES, in_features=(LEVELS[level],), strides=(STRIDES[level],),
                        channels=8, num_convs=1)
      single_params = {k: v for k, v in params.items() if not k.startswith('scales_')}
      single_params['scales_0'] = params[f'scales_{level}']
      singles.append(single.apply({'params': single_params}, features))
    return head.apply({'params': params}, features), singles

  out, singles = _compile(run, features)(features)
  for level, alone in enumerate(singles):
    for name, value in out.items():
      per_level = split_levels(value, shapes)[level]
      np.testing.assert_allclose(per_level.reshape(alone[name].shape), alone[name],
                                 rtol=1e-5, atol=1e-6, err_msg=f'{name} level {level}')


def test_gradients_reach_every_head_parameter():
  rng = np.random.default_rng(1)
  # Levels of at least 2x2 points: a 1x1 level may (rightly) get no scale gradient when all
  # four of its raw distances start below 0, where the ReLU is flat.
  features = {name: jnp.asarray(rng.standard_normal((2, s, s, 8)), jnp.float32)
              for name, s in zip(LEVELS[:4], (8, 4, 3, 2), strict=True)}
  head = ATSSHead(NUM_CLASSES, in_features=LEVELS[:4], strides=STRIDES[:4], channels=8,
                  num_convs=2)

  def grads(features):
    params = head.init(jax.random.key(0), features)['params']

    def loss(params):
      out = head.apply({'params': params}, features)
      return sum(jnp.sum(v * jax.random.normal(jax.random.key(i), v.shape))
                 for i, v in enumerate(jax.tree.leaves(out)))

    return jax.grad(loss)(params)

  for path, grad in jax.tree_util.tree_flatten_with_path(_compile(grads, features)(features))[0]:
    assert np.abs(np.asarray(grad)).max() > 0, jax.tree_util.keystr(path)


def test_flatten_and_split_levels_are_inverse():
  shapes = [(3, 4), (2, 2), (1, 1)]
  per_level = [jnp.arange(2 * h * w * 2, dtype=jnp.float32).reshape(2, h, w, 2) + 100 * i
               for i, (h, w) in enumerate(shapes)]
  flat = flatten_levels(per_level)
  assert flat.shape == (2, 12 + 4 + 1, 2)
  for a, b in zip(split_levels(flat, shapes), per_level, strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='hold 16 points'):
    split_levels(flat, [(3, 4), (2, 2)])


def test_detection_fpn_builds_p3_to_p7_from_stride_8_and_16_maps():
  cvt_info = [{'name': f'stage{i + 1}', 'num_chs': c, 'reduction': 4 * 2 ** i}
              for i, c in enumerate((64, 192, 384))]
  fpn = detection_fpn(cvt_info)
  assert isinstance(fpn, FPN)
  assert fpn.in_features == ('stage2', 'stage3') and fpn.in_channels == (192, 384)
  assert fpn.out_features == LEVELS and fpn.out_strides == STRIDES
  assert (fpn.extra_type, fpn.extra_source, fpn.relu_before_extra_convs) == (
      'conv', 'input', True)
  assert fpn.out_channels == 256 and fpn.num_extra_levels == 3
  # A ResNet-like backbone (strides 4-32) gets mmdet's FCOS neck: C3-C5, two extra convs.
  resnet_info = cvt_info + [{'name': 'stage4', 'num_chs': 2048, 'reduction': 32}]
  assert detection_fpn(resnet_info).num_extra_levels == 2
  with pytest.raises(ValueError, match='stride-8'):
    detection_fpn([{'name': 'stage3', 'num_chs': 8, 'reduction': 16}])
  with pytest.raises(ValueError, match='double'):
    detection_fpn([{'name': 'a', 'num_chs': 8, 'reduction': 8},
                   {'name': 'b', 'num_chs': 8, 'reduction': 32}])


def test_level_shapes_inside_jit_and_errors():
  model, variables = _model_and_variables('stand_in')

  @jax.jit
  def num_points(images):
    shapes = model.level_shapes(*images.shape[1:3])
    return jnp.zeros((sum(h * w for h, w in shapes),))

  assert num_points(jnp.zeros((1, 96, 80, 3))).shape == (120 + 30 + 9 + 4 + 1,)
  # Also from a bound module (e.g. a loss written as a Detector method).
  assert model.apply(variables, 96, 80, method=Detector.level_shapes) == model.level_shapes(
      96, 80)
  with pytest.raises(ValueError, match='channels-last'):
    model.apply(variables, jnp.zeros((1, 3, 64, 64)))
  with pytest.raises(ValueError, match='5 in_features'):
    ATSSHead(NUM_CLASSES, strides=(8, 16)).init(jax.random.key(0), {})
  with pytest.raises(ValueError, match='same channels'):
    ATSSHead(NUM_CLASSES, in_features=('p3', 'p4'), strides=(8, 16)).init(
        jax.random.key(0), {'p3': jnp.zeros((1, 4, 4, 8)), 'p4': jnp.zeros((1, 2, 2, 16))})
  no_neck = Detector(backbone=model.backbone, head=model.head)
  with pytest.raises(ValueError, match=r"needs feature level\(s\) \['p3'"):
    no_neck.level_shapes(64, 64)


def test_point_coordinates_follow_the_flattened_order():
  atss = pytest.importorskip('heads.detection.atss')
  shapes = [(3, 4), (2, 2), (1, 1)]
  points = np.asarray(atss.anchor_points(shapes, (8, 16, 32)))
  assert points.shape == (17, 2)
  # Row-major within a level, levels fine to coarse: the second point of P3 is one cell to the
  # right, the fifth one row down; P4 starts at index 12 and P5 at 16.
  np.testing.assert_array_equal(points[[0, 1, 4, 12, 16]],
                                [[4, 4], [12, 4], [4, 12], [8, 8], [16, 16]])
