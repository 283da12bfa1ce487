"""A converted backbone file with random weights, as `cvt-convert --backbone-only` writes one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cvt_backbone import CvTBackbone, get_spec
from cvt_backbone.weights import converted as checkpoint_lib


def write_converted_backbone(path: str | Path, variant: str = 'cvt-tiny',
                             seed: int = 0) -> dict[str, Any]:
  """Writes random backbone weights of `variant` to `path`; returns them (numpy trees).

  Running variances are positive, as real BatchNorm statistics are.
  """
  backbone = CvTBackbone(variant=variant)
  shapes = jax.eval_shape(backbone.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  weights = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  weights['batch_stats'] = jax.tree.map(np.abs, weights['batch_stats'])
  checkpoint_lib.save_converted(path, weights, {
      'variant': variant, 'spec': get_spec(variant).to_dict(),
      'activation': 'quick_gelu', 'num_classes': 0, 'backbone_only': True, 'in_chans': 3,
      'source': {'file': 'random', 'sha256': '', 'naming': 'flax'}, 'converter': 'test'})
  return weights
