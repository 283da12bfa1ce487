"""The seed API, exactly as its users wrote it, with today's jax.tree.* functions."""

import jax
import numpy

from cvt_backbone import CvT


def test_seed_usage_runs_and_prints_parameter_count(capsys):
  v = CvT(
      num_classes=1000,
      s1_emb_dim=64,  # stage 1 - dimension
      s1_emb_kernel=7,  # stage 1 - conv kernel
      s1_emb_stride=4,  # stage 1 - conv stride
      s1_proj_kernel=3,  # stage 1 - attention ds-conv kernel size
      s1_kv_proj_stride=2,  # stage 1 - attention key / value projection stride
      s1_heads=1,  # stage 1 - heads
      s1_depth=1,  # stage 1 - depth
      s1_mlp_mult=4,  # stage 1 - feedforward expansion factor
      s2_emb_dim=192,  # stage 2 - (same as above)
      s2_emb_kernel=3,
      s2_emb_stride=2,
      s2_proj_kernel=3,
      s2_kv_proj_stride=2,
      s2_heads=3,
      s2_depth=2,
      s2_mlp_mult=4,
      s3_emb_dim=384,  # stage 3 - (same as above)
      s3_emb_kernel=3,
      s3_emb_stride=2,
      s3_proj_kernel=3,
      s3_kv_proj_stride=2,
      s3_heads=4,
      s3_depth=10,
      s3_mlp_mult=4,
      dropout=0.,
  )

  key = jax.random.PRNGKey(0)
  img = jax.random.normal(key, (1, 224, 224, 3))

  init_rngs = {'params': jax.random.PRNGKey(1), 'dropout': jax.random.PRNGKey(2)}

  params = v.init(init_rngs, img)
  output = v.apply(params, img, mutable=['batch_stats'], rngs=init_rngs)

  n_params_flax = sum(jax.tree.leaves(jax.tree.map(lambda x: numpy.prod(x.shape), params)))
  print(f'Number of parameters in Flax model: {n_params_flax}')

  logits, state = output
  assert logits.shape == (1, 1000)
  assert bool(jax.numpy.isfinite(logits).all())
  assert set(state) == {'batch_stats'}
  # CvT-13's 19,997,480 parameters (4 heads instead of 6 in stage 3 changes no
  # shape) plus the BatchNorm running statistics counted by the seed snippet.
  n_running_stats = 2 * 3 * (64 * 1 + 192 * 2 + 384 * 10)
  assert n_params_flax == 19_997_480 + n_running_stats
  assert 'Number of parameters in Flax model: 20023208' in capsys.readouterr().out
