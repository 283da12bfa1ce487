"""The backbone from a config block, and pretrained weights loaded into a larger model.

What a user's own model (a Scenic model, any Flax model) needs to hold a CvT backbone:

    backbone = build_backbone(config.model.backbone)     # ml_collections, dict or None
    ...
    class MyModel(PretrainedBackboneInit, nn.Module):    # `init` loads the weights
      backbone: CvTBackbone
      num_classes: int
      pretrained: str = ''                               # a converted or released file

    variables = load_backbone_weights(variables, 'cvt-13.msgpack', backbone)
    train_state = load_backbone_into_train_state(train_state, 'cvt-13.msgpack', backbone)

A config block holds `CvTBackbone` fields (`dtype` and `param_dtype` may be strings such as
'bfloat16', `spec` a dict of `CvTSpec` fields) plus the loading settings `pretrained` (path;
'' or None for none) and `keep_cls_token`. A misspelled key is an error naming the closest
field. Nothing here imports ml_collections or Scenic: config blocks are read through
`to_dict()` or as mappings, train states through `.params`, `.model_state` and `.replace`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import core as flax_core
from flax import linen as nn

from cvt_backbone.weights.converted import load_pretrained
from cvt_backbone.cvt import CvTBackbone, CvTSpec, check_keys

# Settings of a backbone config block that say how to load weights, not how to build it.
LOADING_KEYS = ('pretrained', 'keep_cls_token')
_DTYPE_FIELDS = ('dtype', 'param_dtype')
_FIELDS = tuple(f.name for f in dataclasses.fields(CvTBackbone) if f.name not in ('parent', 'name'))


def _as_dict(config: Any) -> dict[str, Any]:
  if config is None:
    return {}
  if hasattr(config, 'to_dict'):  # ml_collections.ConfigDict / FrozenConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f'A backbone config must be a mapping or a ConfigDict; got '
                    f'{type(config).__name__}.')
  return dict(config)


def _dtype(value: Any, key: str) -> Any:
  if not isinstance(value, str):
    return value
  try:
    return jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f'config {key}={value!r} is not a dtype name such as "float32" or '
                     '"bfloat16".') from e


def build_backbone(config: Any = None, **overrides: Any) -> CvTBackbone:
  """A `CvTBackbone` from a config block (e.g. `config.model.backbone`).

  Args:
    config: a ConfigDict, a mapping or None (defaults: CvT-13), holding any
      `CvTBackbone` field and the loading keys `pretrained` and `keep_cls_token`
      (read by `pretrained_settings`, ignored here).
    **overrides: fields that win over the config's (e.g. `bn_axis_name='batch'`).

  Returns:
    The backbone module (not initialised).

  Raises:
    ValueError: an unknown key (naming the closest field) or a bad dtype name.
  """
  settings = {**_as_dict(config), **overrides}
  check_keys(settings, _FIELDS + LOADING_KEYS, 'CvTBackbone')
  fields = {}
  for key, value in settings.items():
    if key in LOADING_KEYS:
      continue
    if key in _DTYPE_FIELDS:
      value = _dtype(value, key)
    elif key == 'spec' and isinstance(value, Mapping):
      value = CvTSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    elif key == 'out_features' and isinstance(value, list):
      value = tuple(value)
    fields[key] = value
  return CvTBackbone(**fields)


def pretrained_settings(config: Any) -> tuple[str, bool]:
  """`(pretrained path or '', keep_cls_token)` of a backbone config block."""
  settings = _as_dict(config)
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
  """`variables` with the backbone subtree at `path` replaced by a checkpoint's weights.

  Strict: the checkpoint must be of the backbone's variant, and the loaded tree must have
  the shapes of the subtree it replaces (both listed otherwise).

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` of the whole model.
    pretrained: a converted `.msgpack`, a released `.pth` / `.safetensors` file, a
      Hugging Face folder, or in-memory weights (a state_dict, or `{'params',
      'batch_stats'}` of a backbone or a classifier).
    backbone: the `CvTBackbone` module at `path`.
    path: module names from the root to the backbone (`()` if the model is the backbone).
    keep_cls_token: see `load_pretrained`.
    rng: initialises what the checkpoint lacks (`out_norm_*` layers).

  Returns:
    A new variables dict; other subtrees are unchanged.
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
  """A Scenic `TrainState` (`params`, `model_state`) with the backbone loaded.

  `pretrained` is what `load_backbone_weights` takes: a file, a folder or in-memory
  weights. The optimizer state is left as it is: call this before the first step (Scenic project
  trainers do so in `model.init_from_train_state`).
  """
  model_state = flax_core.unfreeze(train_state.model_state or {})
  variables = {'params': flax_core.unfreeze(train_state.params), **model_state}
  variables = load_backbone_weights(variables, pretrained, backbone, path=path,
                                    keep_cls_token=keep_cls_token)
  params = variables.pop('params')
  return train_state.replace(params=params, model_state={**model_state, **variables})


class PretrainedBackboneInit:
  """Mixin for a Flax module with a `backbone` submodule: `init` loads pretrained weights.

  Trainers that only call `model.init(...)` (Scenic's `classification_trainer`, any
  trainer that knows nothing of CvT) then start from the checkpoint. The module declares
  the fields `pretrained: str = ''` (no loading when empty) and optionally
  `keep_cls_token: bool = True`; `BACKBONE_PATH` names the backbone's place.

      class MySegmenter(PretrainedBackboneInit, nn.Module):
        backbone: CvTBackbone
        pretrained: str = ''

  A missing file raises `FileNotFoundError`, a checkpoint of another variant
  `CheckpointMismatchError`: never a silent start from scratch.

  The initialisation itself is compiled as one program when the positional inputs are
  arrays (Scenic's `initialize_model` calls `init` eagerly, op by op: 17.5 s instead of
  6.7 for CvT-tiny + UPerNet, 14.7 instead of 9.2 for CvT-13 + SegFormer on 2 CPU cores,
  `benchmarks/init_time.py`); the checkpoint is read outside it, so its arrays are not
  compiled in as constants.
  """

  BACKBONE_PATH: ClassVar[tuple[str, ...]] = ('backbone',)

  @nn.nowrap
  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
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
    """Scenic's `init_from_train_state` hook: `train_state` with its backbone loaded.

    Args:
      train_state: a Scenic `TrainState` (`params`, `model_state`) of this module.
      restored_train_state: a restored Scenic `TrainState` whose params hold a CvT backbone:
        this module's (`params['backbone']`), a `CvTBackbone`'s or a `CvT` classifier's.
        None: load `self.pretrained` instead.

    Returns:
      `train_state` with the backbone's params and batch statistics replaced, checked
      strictly (variant and every shape); unchanged when there is nothing to load.

    Raises:
      FileNotFoundError: `pretrained` is set but no such file exists.
      CheckpointMismatchError: weights of another variant or shape.
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
