"""Attention progress: `attention(progress=...)` and `attention.progress_hook` over a backbone."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_backbone.cvt import CvTBackbone
from cvt_backbone.kernels import attention as attention_lib


def _qkv(batch=1, q_len=40, kv_len=12, heads=2, head_dim=4, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, heads, head_dim)).astype(np.float32)
  k = rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32)
  v = rng.standard_normal((batch, kv_len, heads, head_dim)).astype(np.float32)
  return q, k, v


PER_HEAD = jax.default_backend() == 'cpu'  # One (batch, head) pair at a time (attention.py).


def _units(q_len, chunk_size, pairs):
  """Units of work of one layer: query chunks, per pair on CPU (chunks `pairs` times longer)."""
  if chunk_size is None:
    return pairs if PER_HEAD else 1
  if PER_HEAD:
    return pairs * math.ceil(q_len / (chunk_size * pairs))
  return math.ceil(q_len / chunk_size)


@pytest.mark.parametrize('implementation,chunk_size', [('chunked', 16), ('plain', None)])
def test_progress_counts_every_unit_once_and_changes_nothing(implementation, chunk_size):
  q, k, v = _qkv(batch=2, q_len=200)
  calls = []
  run = lambda progress: jax.jit(lambda q, k, v: attention_lib.attention(
      q, k, v, scale=0.5, implementation=implementation, chunk_size=chunk_size,
      progress=progress))(q, k, v)
  plain = run(None)
  reported = run(lambda done, total: calls.append((done, total)))
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(reported), np.asarray(plain))
  total = _units(200, chunk_size, pairs=2 * 2)
  assert total > 1
  assert sorted(calls) == [(i, total) for i in range(1, total + 1)]


def test_fused_reports_the_layer():
  calls = []
  q, k, v = _qkv()
  jax.jit(lambda q, k, v: attention_lib.attention(
      q, k, v, scale=0.5, implementation='fused',
      progress=lambda *a: calls.append(a)))(q, k, v).block_until_ready()
  jax.effects_barrier()
  assert calls == [(1, 1)]


def _hooked(backbone, fn):
  """`backbone.apply` traced under `progress_hook(fn)`."""
  def apply(variables, images):
    with attention_lib.progress_hook(fn):
      return backbone.apply(variables, images)
  return apply


def _lowered(apply, backbone, images):
  variables = jax.eval_shape(backbone.init, jax.random.key(0), images)
  return jax.jit(apply).lower(variables, images).as_text()


def test_backbone_program_without_progress_has_no_callback():
  images = jnp.zeros((1, 64, 48, 3))
  backbone = CvTBackbone(variant='cvt-tiny', attention='chunked', attention_chunk_size=32)
  default = _lowered(backbone.apply, backbone, images)
  hooked = _lowered(_hooked(backbone, lambda *a: None), backbone, images)
  assert 'callback' not in default
  assert 'callback' in hooked


def test_backbone_reports_stage_block_and_chunks():
  """cvt-tiny (depths 1, 1, 2; heads 1, 2, 3) at 64x48, chunks of 32 queries."""
  events = []
  images = jnp.asarray(np.random.default_rng(1).standard_normal((1, 64, 48, 3)), jnp.float32)
  kwargs = dict(variant='cvt-tiny', attention='chunked', attention_chunk_size=32)
  plain = CvTBackbone(**kwargs)
  variables = jax.jit(plain.init)(jax.random.key(0), images)
  expected = jax.jit(plain.apply)(variables, images)
  got = jax.jit(_hooked(plain, lambda *a: events.append(a)))(variables, images)
  jax.effects_barrier()
  for name in expected:
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), name)
  # Layers are numbered in trace order: the blocks, stage by stage.
  order = [(0, 0), (1, 0), (2, 0), (2, 1)]
  events = [(*order[layer], done, total) for layer, done, total in events]
  # Stage 1: 16x12 = 192 queries; stage 2: 8x6 = 48; stage 3: 4x3 + cls = 13.
  queries, heads = {0: 192, 1: 48, 2: 13}, {0: 1, 1: 2, 2: 3}
  layers = set(order)
  assert {(s, b) for s, b, _, _ in events} == layers
  for stage, block in layers:
    mine = sorted(e[2:] for e in events if e[:2] == (stage, block))
    total = _units(queries[stage], 32, heads[stage])
    assert mine == [(i, total) for i in range(1, total + 1)], (stage, block, mine)
