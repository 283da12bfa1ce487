"""The fine-tuning optimizer: schedule, weight-decay mask, layer-wise lr decay, accumulation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from projects.cvt_segmentation.configs import common
from projects.training import optim


def _params():
  backbone = {
      'stage0': {'patch_embed': {'proj': {'kernel': jnp.ones((7, 7, 3, 4)), 'bias': jnp.ones(4)}},
                 'blocks_0': {'norm1': {'scale': jnp.ones(4)},
                              'attn': {'proj_q': {'kernel': jnp.ones((4, 4))}}}},
      'stage1': {'patch_embed': {'proj': {'kernel': jnp.ones((3, 3, 4, 4))}},
                 'blocks_0': {'mlp': {'fc1': {'kernel': jnp.ones((4, 8))}}},
                 'blocks_1': {'mlp': {'fc1': {'kernel': jnp.ones((4, 8))}}}},
      'stage2': {'cls_token': jnp.ones((1, 1, 4)),
                 'blocks_0': {'mlp': {'fc2': {'kernel': jnp.ones((8, 4))}}}},
  }
  return {'backbone': backbone, 'decode_head': {'classifier': {'kernel': jnp.ones((1, 1, 4, 3)),
                                                               'bias': jnp.ones(3)}}}


def test_warmup_then_poly():
  schedule = optim.warmup_poly_schedule(1e-3, total_steps=100, warmup_steps=10,
                                        warmup_ratio=1e-6, power=1.0)
  np.testing.assert_allclose(schedule(0), 1e-9, rtol=1e-3)
  np.testing.assert_allclose(schedule(5), 1e-3 * (1e-6 + (1 - 1e-6) * 0.5), rtol=1e-5)
  np.testing.assert_allclose(schedule(10), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(schedule(55), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(schedule(100), 0.0, atol=1e-12)


def test_no_weight_decay_on_norms_biases_and_cls_token():
  mask = optim.weight_decay_mask(_params())
  backbone = mask['backbone']
  assert backbone['stage0']['patch_embed']['proj'] == {'kernel': True, 'bias': False}
  assert backbone['stage0']['blocks_0']['norm1']['scale'] is False
  assert backbone['stage0']['blocks_0']['attn']['proj_q']['kernel'] is True
  assert backbone['stage2']['cls_token'] is False
  assert mask['decode_head']['classifier'] == {'kernel': True, 'bias': False}


def test_layer_wise_lr_decay_and_head_multiplier():
  # depths (1, 2, 1), read from the tree: 4 blocks, layer ids 1..4, embedding 0.
  assert optim.stage_depths(_params()['backbone']) == (1, 2, 1)
  mult = optim.lr_multipliers(_params(), layer_decay=0.5, head_lr_mult=10.0)
  b = mult['backbone']
  assert b['stage0']['patch_embed']['proj']['kernel'] == 0.5**5  # id 0
  assert b['stage0']['blocks_0']['norm1']['scale'] == 0.5**4  # id 1
  assert b['stage1']['patch_embed']['proj']['kernel'] == 0.5**4  # with the block before it
  assert b['stage1']['blocks_1']['mlp']['fc1']['kernel'] == 0.5**2  # id 3
  assert b['stage2']['blocks_0']['mlp']['fc2']['kernel'] == 0.5**1  # id 4, the last block
  assert mult['decode_head']['classifier']['kernel'] == 10.0


def _config(**optimizer):
  config = common.base_config('cvt_upernet', 'synthetic')
  config.optimizer.update(optimizer)
  return config


@pytest.mark.parametrize('accumulation', [1, 2])
def test_accumulation_updates_every_k_micro_steps(accumulation):
  params = _params()
  tx, _ = optim.make_optimizer(_config(accumulation_steps=accumulation, warmup_steps=0,
                                       grad_clip_norm=1.0),
                               params, total_steps=10)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params)
  moved = optax.global_norm(updates) > 0
  assert bool(moved) == (accumulation == 1)
  updates, state = tx.update(grads, state, params)
  assert float(optax.global_norm(updates)) > 0


def test_config_optimizer_is_complete():
  config = common.base_config('cvt_upernet', 'synthetic')
  assert isinstance(config.optimizer, ml_collections.ConfigDict)
  tx, schedule = optim.make_optimizer(config, _params(), total_steps=10_000)
  assert float(schedule(config.optimizer.warmup_steps)) == pytest.approx(
      config.optimizer.base_lr)


def test_warmup_then_step_decay_as_mmdet_1x():
  schedule = optim.warmup_step_schedule(1e-4, decay_steps=(80, 110), decay_factor=0.1,
                                        warmup_steps=10, warmup_ratio=1e-3)
  np.testing.assert_allclose(schedule(0), 1e-7, rtol=1e-5)
  np.testing.assert_allclose(schedule(5), 1e-4 * (1e-3 + (1 - 1e-3) * 0.5), rtol=1e-5)
  np.testing.assert_allclose([schedule(s) for s in (10, 79, 80, 109, 110, 119)],
                             [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6], rtol=1e-5)


def test_unknown_schedule_is_an_error():
  config = common.base_config('cvt_upernet', 'synthetic')
  with config.unlocked():
    config.optimizer.schedule = 'cosine'
  with pytest.raises(ValueError, match="'poly' or 'step'"):
    optim.make_optimizer(config, _params(), 100)


@pytest.mark.parametrize('variant', ['cvt-tiny', 'cvt-13'])
def test_stage_depths_of_a_real_backbone_are_its_spec(variant):
  from cvt_backbone import CvTBackbone

  backbone = CvTBackbone(variant)
  params = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  assert optim.stage_depths(params['params']) == backbone.resolved_spec.depths
