"""Training checkpoints: orbax, atomic, resumable, and checked against the model they restore into.

Layout: `WORKDIR/checkpoints/<step>/{state,metadata}`. Orbax writes each step
to a temporary folder and renames it when complete, so a run killed at any
point leaves either a whole checkpoint or a temporary folder that is ignored:
resuming always starts from the latest complete one. `metadata` records the
model name, class count and backbone, and restoring into another model is an
error naming what differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint written by another model than the one restoring it."""


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir).absolute() / 'checkpoints'


def manager(workdir: str | os.PathLike, max_to_keep: int = 3,
            create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The step of the latest complete checkpoint in `workdir`, or None."""
  if not checkpoint_dir(workdir).is_dir():
    return None
  with manager(workdir, create=False) as mngr:
    return mngr.latest_step()


def model_metadata(config: Any, num_classes: int) -> dict[str, Any]:
  """What a checkpoint must agree on with the model restoring it."""
  backbone = config.model.backbone
  return {'model_name': config.model_name, 'num_classes': int(num_classes),
          'backbone_variant': backbone.variant}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def _check_shapes(expected_tree: Any, found_tree: Any, where: Any) -> None:
  expected, found = _shapes(expected_tree), _shapes(found_tree)
  if expected != found:
    diff = sorted(set(expected.items()) ^ set(found.items()))[:6]
    raise CheckpointMismatchError(
        f'The checkpoint at {where} does not fit this model\'s variables; first differences '
        f'(path, shape): {diff}')


def _saved_metadata(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  saved = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
  return dict(saved.metadata or {})


def _check_metadata(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Any) -> None:
  differences = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
  if differences:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}'
                       for k, (a, b) in differences.items())
    raise CheckpointMismatchError(
        f'The checkpoint at {where} was written by another model ({detail}). Use another '
        '--workdir, or the config it was trained with.')


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         metadata: Mapping[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          metadata=ocp.args.JsonSave(dict(metadata))))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            metadata: Mapping[str, Any]) -> Any:
  """Restores `step` into the structure of `abstract_state` after checking `metadata`."""
  where = checkpoint_dir(mngr.directory.parent) / str(step)
  _check_metadata(_saved_metadata(mngr, step), metadata, where)
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except (ValueError, KeyError, TypeError) as error:
    raise CheckpointMismatchError(
        f'The checkpoint at {where} does not fit this model\'s variables: {error}') from error
  state = restored.state
  _check_shapes(abstract_state, state, where)
  return state


def restore_for_inference(config: Any, checkpoint: str | os.PathLike, *, model_cls: Any,
                          num_classes: int | None = None) -> tuple[Any, dict[str, Any]]:
  """The flax model of `config` and its trained variables, for `apply(v, x, train=False)`.

  Args:
    config: the training config (`config.model_name`, `config.model`, dataset).
    checkpoint: a workdir, its `checkpoints` folder, or one step folder in it.
    model_cls: the project's model class for `config.model_name`, built as
      `model_cls(config, {'num_classes': K})` with a `flax_model` whose `pretrained`
      field names the backbone file `init` would load.
    num_classes: the class count; by default the checkpoint's.

  Returns:
    (flax_model, {'params': ..., 'batch_stats': ...}).
  """
  path = Path(checkpoint).absolute()
  step = None
  if path.name.isdigit() and (path / 'state').exists():
    step, path = int(path.name), path.parent
  if path.name != 'checkpoints' and (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  if not path.is_dir():
    raise FileNotFoundError(f'No checkpoint folder at {checkpoint}.')
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No complete checkpoint in {path}.')
    saved = _saved_metadata(mngr, step)
    classes = num_classes or saved.get('num_classes')
    _check_metadata(saved, model_metadata(config, classes), path / str(step))
    model = model_cls(config, {'num_classes': classes})
    # The checkpoint holds every weight: the backbone's pretrained file (which `init`
    # would read) is neither needed nor required to exist here.
    flax_model = model.flax_model.clone(pretrained='')
    shape = (1, 64, 64, 3)
    abstract = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0),
                                                      np.zeros(shape, np.float32)))
    abstract_state = {'params': abstract['params'],
                      'batch_stats': abstract.get('batch_stats', {})}
    # Only the variables: the optimizer state is not needed (and may be large).
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={'variables': abstract_state},
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      {'variables': abstract_state}),
            partial_restore=True)))
    variables = restored.state['variables']
  _check_shapes(abstract_state, variables, path / str(step))
  return flax_model, variables
