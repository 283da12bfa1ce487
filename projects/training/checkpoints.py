"""Training checkpoints: orbax, atomic, verified, resumable, checked against their model.

`WORKDIR/checkpoints/<step>/{state,metadata}`; orbax renames a step's folder once complete,
so a killed run leaves a whole checkpoint or an ignored temporary folder. `metadata`
records the model (restoring into another is a `CheckpointMismatchError`) and sha256
checksums of the state and of the variables alone: a checkpoint damaged later is a
`CheckpointCorruptError`, and resuming skips it for the newest that verifies, renaming it
`<step>.corrupt`. A save that cannot fit (a full disk) is a `CheckpointWriteError`. A state
holding NaN or inf is never saved (`NonFiniteStateError`); one saved by an older version is
skipped on resume like a damaged one, and set aside as `<step>.non-finite`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from cvt_backbone.weights.convert import CheckpointMismatchError

log = logging.getLogger(__name__)

CHECKSUMS = 'checksums'  # the metadata entry: {'state': 'sha256:...', 'variables': ...}


class CheckpointCorruptError(ValueError):
  """A checkpoint that cannot be read, or whose arrays differ from those saved; `reason`
  says why in one line (also the end of the message)."""

  suffix = '.corrupt'  # resuming skips it and renames it `<step>.corrupt`

  def __init__(self, message: str, reason: str):
    super().__init__(message)
    self.reason = reason


class CheckpointNonFiniteError(CheckpointCorruptError):
  """A checkpoint whose state holds NaN or inf (a diverged run, saved by an older version)."""

  suffix = '.non-finite'


class NonFiniteStateError(FloatingPointError):
  """Training produced a NaN or inf loss, gradient or state: the run stops, nothing of it saved."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. no space left); earlier ones are intact."""


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
  return Path(workdir).absolute() / 'checkpoints'


def manager(workdir: str | os.PathLike, max_to_keep: int = 3,
            create: bool = True) -> ocp.CheckpointManager:
  """The checkpoint manager of `workdir`; `create`: the training run's, which writes and
  removes unfinished saves (safe: the run holds `workdir_lock`)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         cleanup_tmp_directories=create)
  _drop_async_io_noise()
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The step of the latest complete checkpoint in `workdir`, or None."""
  if not checkpoint_dir(workdir).is_dir():
    return None
  with manager(workdir, create=False) as mngr:
    return mngr.latest_step()


def model_metadata(config: Any, num_classes: int,
                   meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What a checkpoint must agree on with the model restoring it; with the dataset's `meta`
  also its category map where it has one (detection: `category_ids`, `class_names`), which
  evaluation and prediction read back (`saved_metadata`)."""
  backbone = config.model.backbone
  metadata = {'model_name': config.model_name, 'num_classes': int(num_classes),
              'backbone_variant': backbone.variant}
  if meta and 'category_ids' in meta:  # lists: what JSON reads back
    metadata.update(category_ids=[int(c) for c in meta['category_ids']],
                    class_names=[str(n) for n in meta['class_names']])
  return metadata


# --- checksums ----------------------------------------------------------------------------


def _local(leaf: Any) -> Any:
  """This process's full copy of a replicated array (the state is replicated by `loop`; a
  sharded state would need per-shard checksums)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable:
      leaf = leaf.addressable_data(0)
  return leaf


def _host(tree: Any) -> Any:
  return jax.device_get(jax.tree.map(_local, tree))


def _leaf_record(leaf: Any) -> bytes:
  """dtype, shape and sha256 of one array's bytes (C order)."""
  array = np.ascontiguousarray(leaf)
  digest = hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()
  return f'{array.dtype.name}{array.dtype.str}{array.shape}{digest};'.encode()


def _combine(records: Sequence[bytes]) -> str:
  return 'sha256:' + hashlib.sha256(b''.join(records)).hexdigest()


def tree_checksum(tree: Any) -> str:
  """sha256 over every leaf's dtype, shape and bytes, in tree order (`'sha256:<hex>'`).

  Not the paths: orbax may restore dataclasses as dicts holding the same arrays.
  """
  return _combine([_leaf_record(leaf) for leaf in jax.tree.leaves(_host(tree))])


def inference_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """The collections `restore_for_inference` restores, and that its checksum covers."""
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def _variables_of(state: Any) -> Mapping[str, Any] | None:
  variables = state.get('variables') if isinstance(state, Mapping) else getattr(
      state, 'variables', None)
  return variables if isinstance(variables, Mapping) and 'params' in variables else None


def _non_finite(host_state: Any) -> str | None:
  """What of a host copy of a training state is NaN or inf (`non-finite parameters (3 of 8
  values)`, else the rest of the `state`), or None."""
  variables = _variables_of(host_state)
  for what, tree in (('parameters', variables and variables['params']), ('state', host_state)):
    floats = [np.asarray(x) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(np.asarray(x).dtype, jnp.inexact)]
    bad = sum(int(np.count_nonzero(~np.isfinite(x))) for x in floats)
    if bad:
      return f'non-finite {what} ({bad} of {sum(x.size for x in floats)} values)'
  return None


def state_checksums(state: Any) -> dict[str, str]:
  """`{'state': ..., 'variables': ...}` checksums of a training state, each array hashed once."""
  host = _host(state)
  records = {id(leaf): _leaf_record(leaf) for leaf in jax.tree.leaves(host)}
  checksums = {'state': _combine([records[id(leaf)] for leaf in jax.tree.leaves(host)])}
  variables = _variables_of(host)
  if variables is not None:
    checksums['variables'] = _combine(
        [records[id(leaf)] for leaf in jax.tree.leaves(inference_variables(variables))])
  return checksums


def _verify(saved: Mapping[str, Any], key: str, tree: Any, where: Any) -> None:
  expected = (saved.get(CHECKSUMS) or {}).get(key)
  if expected is None:
    log.debug('Checkpoint %s: no checksum recorded (written before checksums were); '
              'restored unverified.', where)
    return
  found = tree_checksum(tree)
  if found != expected:
    reason = (f'checksum mismatch: the restored {key} hash to {found[:19]}..., the '
              f'checkpoint recorded {expected[:19]}... (its files changed after saving)')
    raise CheckpointCorruptError(f'The checkpoint at {where} is corrupt: {reason}', reason)


# --- reading and writing ------------------------------------------------------------------


def _root_cause(error: BaseException) -> BaseException:
  # Orbax wraps tensorstore's one-line error in an `Exception` whose message dumps the
  # whole TensorStore spec; the cause says what is wrong in one line.
  seen = set()
  while error.__cause__ is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__
  return error


# Tensorstore reports a failed system call inside a long message; its code says what failed.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def _one_line(error: BaseException, limit: int = 400) -> str:
  """`Type: first line` of the error's root cause, led by the OS error it reports if any."""
  root = _root_cause(error)
  lines = str(root).strip().splitlines()
  text = f'{type(root).__name__}: {lines[0] if lines else ""}'.rstrip(': ')
  code = _OS_ERROR_CODE.search(str(root))
  if code:
    text = f'{os.strerror(int(code.group(1)))} ({text})'
  return text if len(text) <= limit else text[:limit - 4] + '...)'


def _from_orbax(error: BaseException | None) -> bool:
  """Whether `error` (or the error it was raised from) was raised inside orbax."""
  while error is not None:
    tb = error.__traceback__
    while tb is not None:
      if _ORBAX_DIR in tb.tb_frame.f_code.co_filename:
        return True
      tb = tb.tb_next
    error = error.__cause__ or error.__context__
  return False


_ORBAX_DIR = os.path.dirname(os.path.dirname(ocp.__file__))  # .../site-packages/orbax


class _OrbaxFutureNoise(logging.Filter):
  """Drops asyncio's '(Gathering)Future exception was never retrieved' of orbax's reads."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    # 'Future exception was never retrieved', also '_GatheringFuture exception ...'.
    first_line = str(record.msg).split('\n', 1)[0]
    return not ('exception was never retrieved' in first_line and _from_orbax(error))


def _drop_async_io_noise() -> None:
  """Stops the noise a failed orbax read or write leaves on stderr.

  When one array's tensorstore I/O fails, orbax abandons the others, whose coroutines and
  futures fail when collected: tens of thousands of lines burying the one error raised.
  Unraisable exceptions from orbax, the two shutdown messages and asyncio's reports of
  orbax futures are dropped; everything else is reported as before.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_async_io_noise', False):
    return
  noise = ((RuntimeError, 'Event loop is closed'),
           (ImportError, 'Python is likely shutting down'))

  def hook(unraisable: Any) -> None:
    value = unraisable.exc_value
    if (any(isinstance(value, kind) and text in str(value) for kind, text in noise)
        or _from_orbax(value)):
      return
    previous(unraisable)

  hook.drops_async_io_noise = True
  sys.unraisablehook = hook
  logging.getLogger('asyncio').addFilter(_OrbaxFutureNoise())


def _corrupt(where: Any, error: BaseException) -> CheckpointCorruptError:
  reason = f'cannot be read ({_one_line(error)})'
  return CheckpointCorruptError(f'The checkpoint at {where} is corrupt: it {reason}', reason)


def _step_dir(mngr: ocp.CheckpointManager, step: int) -> Path:
  return Path(str(mngr.directory)) / str(step)


def _dir_bytes(path: Path) -> int:
  """Bytes allocated to the files under `path` (what they take on the disk)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        stat = os.lstat(os.path.join(root, name))
      except OSError:
        continue
      total += getattr(stat, 'st_blocks', 0) * 512 or stat.st_size
  return total


def _complete_step(mngr: ocp.CheckpointManager) -> int | None:
  try:
    mngr.reload()
    return mngr.latest_step()
  except Exception:  # noqa: BLE001  (only completes an error message)
    return None


def _write_error(mngr: ocp.CheckpointManager, what: str) -> CheckpointWriteError:
  previous = _complete_step(mngr)
  intact = ('No earlier checkpoint exists.' if previous is None else
            f'The checkpoint of step {previous} is complete and intact; rerun with enough '
            'space to resume from it.')
  return CheckpointWriteError(f'{what}. {intact}')


def _check_free_space(mngr: ocp.CheckpointManager, step: int) -> None:
  """Refuses a save that cannot fit, measured by the previous checkpoint of the same state
  (out of space inside orbax's writer threads is hundreds of lines of tracebacks)."""
  previous = mngr.latest_step()
  directory = Path(str(mngr.directory))
  if previous is None or '://' in str(mngr.directory):
    return
  try:
    needed = _dir_bytes(directory / str(previous))
    free = shutil.disk_usage(directory).free
  except OSError:
    return
  if free < needed:
    raise _write_error(
        mngr, f'No space left for the checkpoint of step {step} in {directory}: it needs about '
        f'{needed / 1e6:.1f} MB (as much as step {previous}\'s), {free / 1e6:.1f} MB are free')


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the asynchronous save in progress; its failure is a `CheckpointWriteError`."""
  try:
    mngr.wait_until_finished()
  except Exception as error:  # noqa: BLE001  (any failure of the writer threads)
    step = re.search(r'/(\d+)\.orbax-checkpoint-tmp', str(_root_cause(error)))
    what = f'the checkpoint of step {step.group(1)}' if step else 'a checkpoint'
    raise _write_error(mngr, f'Writing {what} in {mngr.directory} failed: '
                             f'{_one_line(error, 300)}') from error


def close(mngr: ocp.CheckpointManager, *, raise_errors: bool = True) -> None:
  """Waits for the last save and closes `mngr`; never leaves a checkpoint half-written.

  `raise_errors=False` while another error propagates: a failed save is then only logged.
  """
  try:
    wait(mngr)
  except CheckpointWriteError as error:
    if raise_errors:
      raise
    log.error('%s', error)
  finally:
    mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         metadata: Mapping[str, Any]) -> None:
  """Starts saving `state` as `step` with `metadata` and its checksums; orbax writes in the
  background. `CheckpointWriteError`: the previous save failed, or this one cannot fit;
  `NonFiniteStateError`: `state` holds NaN or inf (never saved, never rotated over a finite
  checkpoint)."""
  host = _host(state)
  problem = _non_finite(host)
  if problem:
    raise NonFiniteStateError(
        f'Refusing to save the checkpoint of step {step} in {mngr.directory}: its state has '
        f'{problem}.')
  wait(mngr)
  _check_free_space(mngr, step)
  # Hashed from the same values orbax copies; committed atomically with the checkpoint.
  metadata = {**metadata, CHECKSUMS: state_checksums(host)}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          metadata=ocp.args.JsonSave(metadata)))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, 'shape', None) or np.shape(leaf))
          for path, leaf in flat}


def _check_shapes(expected_tree: Any, found_tree: Any, where: Any) -> None:
  expected, found = _shapes(expected_tree), _shapes(found_tree)
  if expected != found:
    diff = sorted(set(expected.items()) ^ set(found.items()))[:6]
    raise CheckpointMismatchError(
        f'The checkpoint at {where} does not fit this model\'s variables; first differences '
        f'(path, shape): {diff}')


def _saved_metadata(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The checkpoint's JSON metadata; unreadable: `CheckpointCorruptError`."""
  try:
    saved = mngr.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    metadata = saved.metadata
  except Exception as error:  # noqa: BLE001  (any unreadable file is a damaged checkpoint)
    raise _corrupt(_step_dir(mngr, step), error) from error
  if metadata is not None and not isinstance(metadata, Mapping):
    reason = f'its metadata is not a JSON object: {str(metadata)[:80]!r}'
    raise CheckpointCorruptError(
        f'The checkpoint at {_step_dir(mngr, step)} is corrupt: {reason}', reason)
  return dict(metadata or {})


def _check_metadata(saved: Mapping[str, Any], expected: Mapping[str, Any], where: Any) -> None:
  # A key the checkpoint does not record predates it (the category map came later): not checked.
  differences = {k: (saved[k], v) for k, v in expected.items() if saved.get(k, v) != v}
  if differences:
    detail = ', '.join(f'{k}: checkpoint {a!r} vs config {b!r}'
                       for k, (a, b) in differences.items())
    raise CheckpointMismatchError(
        f'The checkpoint at {where} was written by another model ({detail}). Use another '
        '--workdir, or the config it was trained with.')


def _check_saved_shapes(mngr: ocp.CheckpointManager, step: int, abstract_variables: Any,
                        where: Any) -> None:
  """After a failed restore: a mismatch if the shapes the checkpoint records differ from the
  model's (else the caller reports damage)."""
  try:
    saved = ocp.StandardCheckpointHandler().metadata(_step_dir(mngr, step) / 'state')
    saved_variables = saved.tree['variables']
  except Exception:  # noqa: BLE001  (unreadable metadata: damage, reported by the caller)
    return
  _check_shapes(abstract_variables, inference_variables(saved_variables), where)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            metadata: Mapping[str, Any]) -> Any:
  """Restores `step` into the structure of `abstract_state`, checked (`metadata`, shapes),
  verified (checksums) and finite (else `CheckpointNonFiniteError`)."""
  where = _step_dir(mngr, step)
  saved = _saved_metadata(mngr, step)
  _check_metadata(saved, metadata, where)
  try:
    restored = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  except Exception as error:  # noqa: BLE001  (tensorstore reports damage as several types)
    variables = _variables_of(abstract_state)
    if variables is not None:
      _check_saved_shapes(mngr, step, inference_variables(variables), where)
    raise _corrupt(where, error) from error
  state = restored.state
  _check_shapes(abstract_state, state, where)
  host = _host(state)
  _verify(saved, 'state', host, where)
  problem = _non_finite(host)
  if problem:
    raise CheckpointNonFiniteError(
        f'The checkpoint at {where} cannot be resumed from: its state has {problem}', problem)
  return state


def _set_aside(mngr: ocp.CheckpointManager,
               skipped: Sequence[tuple[int, CheckpointCorruptError]]) -> None:
  """Renames skipped checkpoints `<step><error.suffix>` (`4.corrupt`, `4.non-finite`; kept
  for inspection, orbax ignores them)."""
  if jax.process_index() == 0:
    for step, error in skipped:
      source = _step_dir(mngr, step)
      target = source.with_name(f'{step}{error.suffix}')
      n = 1
      while target.exists():
        n += 1
        target = source.with_name(f'{step}{error.suffix}{n}')
      source.rename(target)
      log.warning('Moved the %s checkpoint %s to %s.', error.suffix[1:], source, target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('checkpoints: corrupt ones set aside')
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any,
                   metadata: Mapping[str, Any]) -> tuple[int, Any, list[tuple[int, str]]]:
  """The newest checkpoint that restores, verifies and is finite: `(step, state, skipped)`,
  `(0, None, [])` if none; `skipped`: `(step, reason)` of each newer one.

  Damaged or non-finite ones are skipped (`skipping checkpoint <path>: <reason>`) and set
  aside once an older one restores; another model's are never skipped. None restoring is a
  `CheckpointCorruptError` listing each: training from scratch is the user's decision.
  """
  skipped: list[tuple[int, CheckpointCorruptError]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state = restore(mngr, step, abstract_state, metadata)
    except CheckpointCorruptError as error:
      log.warning('skipping checkpoint %s: %s', _step_dir(mngr, step), error.reason)
      skipped.append((step, error))
      continue
    if skipped:
      _set_aside(mngr, skipped)
    return step, state, [(s, error.reason) for s, error in skipped]
  if not skipped:
    return 0, None, []
  listing = '; '.join(f'{_step_dir(mngr, s)}: {error.reason}' for s, error in skipped)
  reason = f'none of its {len(skipped)} checkpoints can be restored'
  raise CheckpointCorruptError(
      f'Cannot resume in {mngr.directory}: {reason} ({listing}). Move or remove these '
      'folders to train from scratch, or restore them from a backup.', reason)


def locate(checkpoint: str | os.PathLike) -> tuple[Path, int | None]:
  """The checkpoints folder and step of a workdir, its `checkpoints` folder or a step folder.

  The step is that folder's, else the latest complete one (`N`; not `N.corrupt` nor
  unfinished folders), else None.
  """
  path = Path(checkpoint).absolute()
  if path.name.isdigit() and (path / 'state').exists():
    return path.parent, int(path.name)
  if path.name != 'checkpoints' and (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  steps = [int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()] if (
      path.is_dir()) else []
  return path, max(steps, default=None)


def identity(checkpoint: str | os.PathLike) -> dict[str, Any]:
  """`{'path', 'step'}` of the weights `checkpoint` names (`locate`), as outputs record it."""
  path, step = locate(checkpoint)
  return {'path': str(path), 'step': step}


def saved_metadata(checkpoint: str | os.PathLike) -> dict[str, Any]:
  """The metadata saved with the checkpoint `checkpoint` names (`locate`)."""
  path, step = locate(checkpoint)
  if step is None:
    raise FileNotFoundError(f'No complete checkpoint in {path}.')
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    return _saved_metadata(mngr, step)


def restore_for_inference(config: Any, checkpoint: str | os.PathLike, *, model_cls: Any,
                          num_classes: int | None = None) -> tuple[Any, dict[str, Any]]:
  """`(flax_model, {'params', 'batch_stats'})` of `config` from a trained checkpoint.

  `checkpoint` as `locate`; `model_cls(config, {'num_classes': K})` builds the model
  (`num_classes`: by default the checkpoint's). A damaged checkpoint's error names the
  other steps that could be used instead (never picked silently).
  """
  path, step = locate(checkpoint)
  if not path.is_dir():
    raise FileNotFoundError(f'No checkpoint folder at {checkpoint}.')
  _drop_async_io_noise()
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
    if step is None:
      raise FileNotFoundError(f'No complete checkpoint in {path}.')
    try:
      return _restore_variables(mngr, step, config, model_cls, num_classes)
    except CheckpointCorruptError as error:
      others = sorted((s for s in mngr.all_steps() if s != step), reverse=True)
      if others:
        hint = (f' Other checkpoints: steps {", ".join(map(str, others))} (pass one folder, '
                f'e.g. {path / str(others[0])}, to use it).')
        raise type(error)(str(error) + hint, error.reason) from error
      raise


def _restore_variables(mngr: ocp.CheckpointManager, step: int, config: Any, model_cls: Any,
                       num_classes: int | None) -> tuple[Any, dict[str, Any]]:
  where = _step_dir(mngr, step)
  saved = _saved_metadata(mngr, step)
  classes = num_classes or saved.get('num_classes')
  _check_metadata(saved, model_metadata(config, classes), where)
  model = model_cls(config, {'num_classes': classes})
  # The checkpoint holds every weight: the backbone's pretrained file (which `init`
  # would read) is neither needed nor required to exist here.
  flax_model = model.flax_model.clone(pretrained='')
  shape = (1, 64, 64, 3)
  abstract = jax.eval_shape(lambda: flax_model.init(jax.random.PRNGKey(0),
                                                    np.zeros(shape, np.float32)))
  abstract_state = inference_variables(abstract)
  # Only the variables: the optimizer state is not needed (and may be large).
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item={'variables': abstract_state},
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      {'variables': abstract_state}),
            partial_restore=True)))
  except Exception as error:  # noqa: BLE001  (tensorstore reports damage as several types)
    _check_saved_shapes(mngr, step, abstract_state, where)
    raise _corrupt(where, error) from error
  variables = restored.state['variables']
  _check_shapes(abstract_state, variables, where)
  _verify(saved, 'variables', variables, where)
  problem = _non_finite({'variables': variables})
  if problem:  # saved by a version that kept diverged runs: its scores would be NaN
    raise CheckpointNonFiniteError(
        f'The checkpoint at {where} cannot be used: its variables have {problem}.', problem)
  return flax_model, variables
