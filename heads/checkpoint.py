"""PyTorch state dicts of heads -> Flax variables, and a strict merge into an initialised tree.

The heads name their sub-modules after the Hugging Face modules (`lateral_convs.0.conv` is
`lateral_convs_0/conv`), so conversion is a rename plus layout changes: conv weights
(O, I, kh, kw) -> kernels (kh, kw, I, O); linear (out, in) -> (in, out); norm weights ->
`scale`; BatchNorm running statistics -> `batch_stats`. Pure functions on numpy arrays: no
torch import, safe to run twice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

_SKIPPED_LEAVES = ('num_batches_tracked',)


def module_path(torch_path: str) -> str:
  """Default renaming: list indices join their list's name, `'convs.0.conv'` -> `'convs_0/conv'`."""
  return re.sub(r'\.(\d+)', r'_\1', torch_path).replace('.', '/')


def torch_to_flax(
    state_dict: Mapping[str, Any],
    rename: Callable[[str], str | None] = module_path,
) -> dict[str, dict[str, Any]]:
  """Converts conv, linear and norm weights of a PyTorch state dict to Flax variables.

  Args:
    state_dict: `{'a.b.weight': array}`; torch tensors must be converted to numpy first
      (`{k: v.numpy() for k, v in sd.items()}`).
    rename: maps a PyTorch module path (`'a.b'`) to a Flax one (`'a/b'`), or None to drop it.

  Returns:
    `{'params': {...}, 'batch_stats': {...}}` nested dicts of numpy arrays (`batch_stats` is
    omitted when there are no running statistics).
  """
  variables: dict[str, dict[str, Any]] = {}
  for key, value in state_dict.items():
    torch_path, _, leaf = key.rpartition('.')
    if leaf in _SKIPPED_LEAVES:
      continue
    path = rename(torch_path)
    if path is None:
      continue
    value = np.asarray(value)
    if leaf == 'weight':
      collection = 'params'
      if value.ndim == 4:
        name, value = 'kernel', value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:
        name, value = 'kernel', value.T
      elif value.ndim == 1:
        name = 'scale'
      else:
        raise ValueError(f'Cannot convert {key!r} with shape {value.shape}.')
    elif leaf == 'bias':
      collection, name = 'params', 'bias'
    elif leaf == 'running_mean':
      collection, name = 'batch_stats', 'mean'
    elif leaf == 'running_var':
      collection, name = 'batch_stats', 'var'
    else:
      raise ValueError(f'Do not know how to convert {key!r}.')
    node = variables.setdefault(collection, {})
    for part in path.split('/'):
      node = node.setdefault(part, {})
    if name in node:
      raise ValueError(f'{key!r} maps to {collection}/{path}/{name}, which is already set.')
    node[name] = np.ascontiguousarray(value)
  return variables


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(_flatten(value, path))
    else:
      flat[path] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def merge_variables(
    init_variables: Mapping[str, Any], loaded: Mapping[str, Any]
) -> dict[str, Any]:
  """Replaces every leaf of freshly initialised variables with the loaded one.

  Fails loudly, listing the keys missing on each side and any shape mismatches, rather than
  silently keeping random weights. Collections of `init_variables` absent from `loaded`
  entirely are an error too.

  Args:
    init_variables: e.g. `module.init(...)`, a sub-tree of it, or its shapes alone
      (`jax.eval_shape(module.init, ...)`: nothing is initialised just to be overwritten).
    loaded: the same structure, e.g. from `torch_to_flax`.

  Returns:
    A tree shaped like `init_variables` holding the loaded values (cast to the init dtypes).
  """
  init_flat = _flatten(init_variables)
  loaded_flat = _flatten(loaded)
  missing = sorted(set(init_flat) - set(loaded_flat))
  unexpected = sorted(set(loaded_flat) - set(init_flat))
  mismatched = [
      f'{k}: init {tuple(np.shape(init_flat[k]))} vs loaded {tuple(np.shape(loaded_flat[k]))}'
      for k in sorted(set(init_flat) & set(loaded_flat))
      if tuple(np.shape(init_flat[k])) != tuple(np.shape(loaded_flat[k]))]
  if missing or unexpected or mismatched:
    raise ValueError(
        'Loaded variables do not match the model.\n'
        f'  missing from the checkpoint ({len(missing)}): {missing}\n'
        f'  not in the model ({len(unexpected)}): {unexpected}\n'
        f'  shape mismatches ({len(mismatched)}): {mismatched}')
  return _unflatten({k: np.asarray(loaded_flat[k]).astype(_dtype(v))
                     for k, v in init_flat.items()})


def _dtype(x: Any) -> np.dtype:
  dtype = getattr(x, 'dtype', None)
  return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype
