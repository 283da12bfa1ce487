"""Pretrained CvT weights loaded into a larger model: a variables subtree, a Scenic train state,
or `init` itself (`PretrainedBackboneInit`). A backbone config block's `pretrained` (a path;
'' for none) and `keep_cls_token` say what to load. No ml_collections or Scenic import: train
states are read through `.params`, `.model_state` and `.replace`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import core as flax_core
from flax import linen as nn

from cvt_backbone.cvt import CvTBackbone, config_dict
from cvt_backbone.weights.converted import load_pretrained


def pretrained_settings(config: Any) -> tuple[str, bool]:
  """`(pretrained path or '', keep_cls_token)` of a backbone config block."""
  settings = config_dict(config)
  return str(settings.get('pretrained') or ''), bool(settings.get('keep_cls_token', True))


def _subtree(tree: Mapping[str, Any], path: Sequence[str], where: str) -> Any:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      found = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
      raise KeyError(f'{where} has no {"/".join(path)!r} subtree to load the backbone into '
                     f'(no {key!r}; found {found}).')
    tree = tree[key]
  return tree


def _replace_subtree(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
  tree = dict(flax_core.unfreeze(tree))
  if len(path) == 1:
    tree[path[0]] = value
  else:
    tree[path[0]] = _replace_subtree(tree[path[0]], path[1:], value)
  return tree


def _check_pretrained_path(pretrained: str | os.PathLike) -> None:
  if not os.path.exists(pretrained):
    raise FileNotFoundError(
        f'Pretrained backbone weights {str(pretrained)!r} not found (config.model.backbone.'
        'pretrained): give a file written by cvt-convert, a released .pth/.safetensors file '
        'or a Hugging Face model folder, or set it to "" to train from scratch.')


def load_backbone_weights(variables: Mapping[str, Any],
                          pretrained: str | os.PathLike | Mapping[str, Any],
                          backbone: CvTBackbone, *, path: Sequence[str] = ('backbone',),
                          keep_cls_token: bool = True,
                          rng: jax.Array | None = None) -> dict[str, Any]:
  """`variables` with the `backbone` subtree at `path` (module names) replaced, strictly.

  `pretrained` is what `load_pretrained` reads: a converted or released file, a Hugging Face
  folder or in-memory weights (of a backbone or a classifier).
  """
  if not isinstance(pretrained, Mapping):
    _check_pretrained_path(pretrained)
  loaded = load_pretrained(backbone, pretrained, keep_cls_token=keep_cls_token, rng=rng)
  path = tuple(path)
  out = dict(variables)
  for collection, tree in loaded.items():
    if collection not in variables:
      raise KeyError(f'The model has no {collection!r} collection for the backbone\'s; '
                     f'collections: {sorted(variables)}.')
    if not path:
      current, out[collection] = variables[collection], tree
    else:
      current = _subtree(variables[collection], path, f'variables[{collection!r}]')
      out[collection] = _replace_subtree(variables[collection], path, tree)
    want, got = _leaf_shapes(flax_core.unfreeze(current)), _leaf_shapes(tree)
    if want != got:
      differences = sorted(set(want.items()) ^ set(got.items()))
      listed = '; '.join(f'{p} {s} ({"model" if want.get(p) == s else "loaded"})'
                         for p, s in differences[:6])
      raise ValueError(f'The subtree at {"/".join(path) or "the root"} in {collection!r} does '
                       f'not have the structure of the backbone {backbone.variant!r} '
                       f'({len(differences)} differences): {listed}.')
  return out


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): tuple(jnp.shape(leaf)) for p, leaf in flat}


def load_backbone_into_train_state(train_state: Any,
                                   pretrained: str | os.PathLike | Mapping[str, Any],
                                   backbone: CvTBackbone, *,
                                   path: Sequence[str] = ('backbone',),
                                   keep_cls_token: bool = True) -> Any:
  """A Scenic `TrainState` with the backbone loaded; call it before the first step (the
  optimizer state is left as it is)."""
  model_state = flax_core.unfreeze(train_state.model_state or {})
  variables = {'params': flax_core.unfreeze(train_state.params), **model_state}
  variables = load_backbone_weights(variables, pretrained, backbone, path=path,
                                    keep_cls_token=keep_cls_token)
  params = variables.pop('params')
  return train_state.replace(params=params, model_state={**model_state, **variables})


class PretrainedBackboneInit:
  """Mixin for a Flax module with a `backbone`: `init` loads the weights of `self.pretrained`.

  Trainers that only call `model.init` (Scenic's) then start from the checkpoint. The module
  declares `pretrained: str = ''` and optionally `keep_cls_token`; `BACKBONE_PATH` is the
  backbone's place. A missing file or another variant is an error, never a silent start.
  """

  BACKBONE_PATH: ClassVar[tuple[str, ...]] = ('backbone',)

  @nn.nowrap
  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
    # One compiled program when the inputs are arrays (Scenic's `initialize_model` runs
    # `init` op by op: 17.5 s instead of 6.7 for CvT-tiny + UPerNet on 2 CPU cores,
    # benchmarks/init_time.py); the checkpoint is read outside it, not compiled in.
    init = super().init
    if args and all(isinstance(a, (jax.Array, np.ndarray)) for a in args):
      init = jax.jit(functools.partial(init, **kwargs))
      kwargs = {}
    return self.load_pretrained_backbone(init(rngs, *args, **kwargs))

  @nn.nowrap
  def load_pretrained_backbone(self, variables: Mapping[str, Any]) -> Any:
    """`variables` with the backbone from `self.pretrained` (unchanged when it is empty)."""
    if not getattr(self, 'pretrained', ''):
      return variables
    loaded = load_backbone_weights(
        flax_core.unfreeze(variables), self.pretrained, self.backbone, path=self.BACKBONE_PATH,
        keep_cls_token=getattr(self, 'keep_cls_token', True))
    return flax_core.freeze(loaded) if isinstance(variables, flax_core.FrozenDict) else loaded

  @nn.nowrap
  def load_into_train_state(self, train_state: Any, restored_train_state: Any = None) -> Any:
    """Scenic's `init_from_train_state` hook: `train_state` with its backbone loaded, strictly.

    From `restored_train_state` (this module's, a `CvTBackbone`'s or a `CvT`'s), else from
    `self.pretrained`; unchanged when there is nothing to load.
    """
    if restored_train_state is None:
      source = getattr(self, 'pretrained', '')
      if not source:
        return train_state
    else:
      params = restored_train_state.params
      state = dict(restored_train_state.model_state or {})
      if 'backbone' in params:
        params = params['backbone']
        state = {k: v['backbone'] for k, v in state.items() if 'backbone' in v}
      source = {'params': params, **state}
    return load_backbone_into_train_state(train_state, source, self.backbone,
                                          path=self.BACKBONE_PATH,
                                          keep_cls_token=getattr(self, 'keep_cls_token', True))
