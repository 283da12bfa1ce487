"""Training under faults: a failing evaluation, damaged checkpoints, two runs, a full disk,
a diverging run.

One in-process run (module fixture) trains the tiny synthetic config to step 4 with
checkpoints at 2 and 4 and an evaluation that fails at step 4; copies of its workdir are
damaged in different ways and restored in-process. The full-disk and diverging-run tests
launch training subprocesses.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from projects.cvt_segmentation import models
from projects.cvt_segmentation.data import builder
from projects.training import app, checkpoints, loop, workdir_lock

from . import trainer_support as support

pytestmark = [
    # The reads still pending when a damaged checkpoint fails to restore end unawaited
    # (see checkpoints._drop_async_io_noise); collected in each test by `collect_reads`.
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
    pytest.mark.filterwarnings('ignore:coroutine .* was never awaited:RuntimeWarning'),
]

OVERRIDES = {'num_training_steps': 4, 'checkpoint_steps': 2, 'log_eval_steps': 4,
             'log_summary_steps': 2}


@pytest.fixture(autouse=True)
def collect_reads():
  yield
  gc.collect()  # here, where the warnings above are ignored, not in a later test


class BadValidationMask(Exception):
  """What a validation mask with labels out of range raises in the evaluation."""


class FailingEvaluation:
  """Fails on its first call, as a bad validation mask does; records when it ran."""

  scalars = ('mIoU',)

  def __init__(self, workdir: Path):
    self.workdir = workdir
    self.calls = []

  def __call__(self, variables):
    # What the evaluation saw of the checkpoint of its step, which is saved first.
    self.calls.append(sorted(p.name for p in (self.workdir / 'checkpoints').iterdir()))
    raise BadValidationMask('validation mask 3 has label 9, the dataset has 6 classes')

  def describe(self, summary):
    return ''


class NoEvaluation:
  scalars = ()

  def __call__(self, variables):
    return {}

  def describe(self, summary):
    return ''


def _train(workdir, evaluation, **overrides):
  config = support.tiny_config(**{**OVERRIDES, **overrides})
  dataset = app.build_dataset(builder.get_dataset, config, checkpoints.latest_step(workdir) or 0)
  model = models.get_model_cls(config.model_name)(config, dataset.meta_data)
  return loop.train(rng=jax.random.PRNGKey(config.rng_seed), config=config, model=model,
                    dataset=dataset, workdir=str(workdir), writer=support.RecordingWriter(),
                    evaluation=evaluation)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with the checkpoints of steps 2 and 4, and what its evaluation raised."""
  workdir = tmp_path_factory.mktemp('trained')
  evaluation = FailingEvaluation(workdir)
  with pytest.raises(BadValidationMask) as raised:
    _train(workdir, evaluation)
  return workdir, evaluation, raised.value


def _copy(trained, tmp_path) -> Path:
  copy = tmp_path / 'workdir'
  shutil.copytree(trained[0], copy)
  return copy


def _data_files(workdir: Path, step: int) -> list[Path]:
  """The array data files of a checkpoint (how the arrays are spread over them varies)."""
  files = sorted((workdir / 'checkpoints' / str(step) / 'state').rglob('d/*'))
  assert files, f'no data files in checkpoint {step} of {workdir}'
  return files


def _truncate(workdir: Path, step: int) -> None:
  for path in _data_files(workdir, step):
    os.truncate(path, path.stat().st_size // 8)


def _flip_a_stored_weight(workdir: Path, step: int, original: Path) -> None:
  """Flips one bit of one stored weight of checkpoint `step`, its recorded checksums untouched.

  What a bit flip on a disk does and nothing but the checksum can see: the checkpoint still
  decodes, only that weight's value changes. The state is restored, the lowest mantissa bit
  of one float of its largest parameter is flipped (the value stays finite), and the state
  item alone is written again by orbax in place of the original. (Flipping bytes inside the
  files was data-dependent: orbax compresses the arrays with zstd and keeps small values
  inside its index nodes, behind their own CRC, so a weight's raw bytes may not be there.)
  """
  del original
  abstract, _ = _abstract_state()
  item = workdir / 'checkpoints' / str(step) / 'state'
  with checkpoints.manager(workdir) as mngr:
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  params, treedef = jax.tree.flatten(state.variables['params'])
  largest = max(range(len(params)), key=lambda i: params[i].size)
  bits = np.array(params[largest]).view(np.uint32).copy()
  bits.reshape(-1)[bits.size // 2] ^= 1
  params[largest] = jax.numpy.asarray(bits.view(np.float32))
  state = state.replace(variables={**state.variables,
                                   'params': jax.tree.unflatten(treedef, params)})
  shutil.rmtree(item)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(item, state)


def _abstract_state():
  config = support.tiny_config(**OVERRIDES)
  dataset = app.build_dataset(builder.get_dataset, config)
  model = models.get_model_cls(config.model_name)(config, dataset.meta_data)
  state = jax.eval_shape(
      lambda rng: loop.initial_state(config, model, dataset.meta_data, rng)[0],
      jax.random.PRNGKey(0))
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ('data',)), P())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          state)
  return abstract, checkpoints.model_metadata(config, dataset.meta_data['num_classes'])


def _restore_latest(workdir):
  abstract, metadata = _abstract_state()
  with checkpoints.manager(workdir) as mngr:
    return checkpoints.restore_latest(mngr, abstract, metadata)[:2]


def _inference_variables(workdir):
  return models.restore_for_inference(support.tiny_config(**OVERRIDES), workdir)[1]


# --- A: the checkpoint is saved before the evaluation -------------------------------------


def test_failing_evaluation_leaves_its_steps_checkpoint_complete(trained):
  workdir, evaluation, raised = trained
  assert isinstance(raised, BadValidationMask)
  assert len(evaluation.calls) == 1  # the evaluation of step 4 only
  # The save of step 4 had started when the evaluation ran, and completed after it failed.
  assert any(name.startswith('4') for name in evaluation.calls[0]), evaluation.calls
  assert checkpoints.latest_step(workdir) == 4
  step, state = _restore_latest(workdir)
  assert step == 4 and int(state.step) == 4


# --- B: damaged checkpoints -----------------------------------------------------------------


def test_truncated_latest_checkpoint_is_skipped_and_training_resumes(trained, tmp_path, caplog):
  """Resumes from step 2 to the same step-4 variables, after naming what it skipped."""
  workdir = _copy(trained, tmp_path)
  _truncate(workdir, 4)
  # And what a run killed (or out of space) while writing step 6 leaves: no checkpoint.
  shutil.copytree(workdir / 'checkpoints' / '2', workdir / 'checkpoints' / '6.orbax-checkpoint-tmp')
  assert checkpoints.latest_step(workdir) == 4
  caplog.set_level(logging.WARNING, logger='projects.training.checkpoints')
  state, _ = _train(workdir, NoEvaluation())
  skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith('skipping')]
  assert len(skipped) == 1 and '\n' not in skipped[0], skipped
  assert skipped[0].startswith(f'skipping checkpoint {workdir / "checkpoints" / "4"}: '
                               'cannot be read (ValueError: '), skipped[0]
  assert int(state.step) == 4
  # The damaged folder is kept aside, the step written again: resuming repeated the run.
  # The unfinished save is removed (the run holds the workdir: no other save is underway).
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4', '4.corrupt']
  resumed, original = _inference_variables(workdir), _inference_variables(trained[0])
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(original), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_failed_read_leaves_no_noise_on_stderr(trained, tmp_path):
  """One warning line, not the tens of thousands of lines of orbax's abandoned reads.

  When one stored array cannot be read, orbax abandons the other reads: each of their
  coroutines and futures reports its exception and TensorStore spec when collected (seen
  on stderr in a plain process; pytest would turn them into warnings, hence a subprocess).
  """
  workdir = _copy(trained, tmp_path)
  largest = max(_data_files(workdir, 4), key=lambda p: p.stat().st_size)
  os.truncate(largest, 1000)
  code = ('import gc, pathlib\n'
          'from tests.projects.test_training_faults import _restore_latest\n'
          f'step, _ = _restore_latest(pathlib.Path({str(workdir)!r}))\n'
          'gc.collect()\n'
          'print("restored", step)\n')
  done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        timeout=300, cwd=support.REPO, env=support.subprocess_env())
  assert done.returncode == 0 and 'restored 2' in done.stdout, done.stderr[-3000:]
  assert 'skipping checkpoint' in done.stderr
  assert 'Exception ignored' not in done.stderr, done.stderr[:3000]
  assert 'never retrieved' not in done.stderr, done.stderr[:3000]


def test_flipped_bytes_fail_the_checksum(trained, tmp_path, caplog):
  workdir = _copy(trained, tmp_path)
  _flip_a_stored_weight(workdir, 4, trained[0])
  # Evaluation restores the variables alone: verified with their own checksum, and an
  # error naming the steps that could be used instead.
  with pytest.raises(checkpoints.CheckpointCorruptError, match='checksum mismatch') as error:
    _inference_variables(workdir)
  message = str(error.value)
  assert '\n' not in message and str(workdir / 'checkpoints' / '4') in message
  assert 'Other checkpoints: steps 2' in message
  _inference_variables(workdir / 'checkpoints' / '2')
  # Resuming skips it for step 2.
  caplog.set_level(logging.WARNING, logger='projects.training.checkpoints')
  step, state = _restore_latest(workdir)
  assert step == 2 and int(state.step) == 2
  assert f'skipping checkpoint {workdir / "checkpoints" / "4"}: checksum mismatch' in caplog.text


def test_truncated_checkpoint_for_inference_is_one_clear_error(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate(workdir, 4)
  with pytest.raises(checkpoints.CheckpointCorruptError) as error:
    _inference_variables(workdir)
  message = str(error.value)
  assert '\n' not in message and len(message) < 1000, message
  assert message.startswith(f'The checkpoint at {workdir / "checkpoints" / "4"} is corrupt: '
                            'it cannot be read (ValueError: ')


def test_no_checkpoint_restores_is_an_error_listing_each(trained, tmp_path):
  """Checkpoints exist but none restores: an error, never a silent start from scratch."""
  workdir = _copy(trained, tmp_path)
  _truncate(workdir, 4)
  (workdir / 'checkpoints' / '2' / 'metadata' / 'metadata').write_text('{"model_na')
  with pytest.raises(checkpoints.CheckpointCorruptError) as error:
    _train(workdir, NoEvaluation())
  message = str(error.value)
  assert '\n' not in message
  assert 'none of its 2 checkpoints can be restored' in message
  assert f'{workdir / "checkpoints" / "4"}: cannot be read (ValueError: ' in message
  assert f'{workdir / "checkpoints" / "2"}: cannot be read (JSONDecodeError' in message
  assert 'Move or remove these folders' in message
  # Nothing was renamed or overwritten.
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4']


def test_checkpoint_without_checksums_restores(trained, tmp_path, caplog):
  """Checkpoints written before checksums existed restore, unverified."""
  workdir = _copy(trained, tmp_path)
  path = workdir / 'checkpoints' / '4' / 'metadata' / 'metadata'
  saved = json.loads(path.read_text())
  assert set(saved[checkpoints.CHECKSUMS]) == {'state', 'variables'}
  del saved[checkpoints.CHECKSUMS]
  path.write_text(json.dumps(saved))
  caplog.set_level(logging.DEBUG, logger='projects.training.checkpoints')
  step, _ = _restore_latest(workdir)
  assert step == 4
  _inference_variables(workdir)
  assert caplog.text.count('no checksum recorded') == 2


def test_variables_of_another_shape_are_a_mismatch_not_damage(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  abstract, metadata = _abstract_state()
  params = abstract.variables['params']
  bias = params['decode_head']['classifier']['bias']
  params['decode_head']['classifier']['bias'] = jax.ShapeDtypeStruct(
      (bias.shape[0] + 1,), bias.dtype, sharding=bias.sharding)
  with checkpoints.manager(workdir) as mngr:
    with pytest.raises(checkpoints.CheckpointMismatchError, match='classifier'):
      checkpoints.restore_latest(mngr, abstract, metadata)


def test_checksums_cover_values_dtypes_and_shapes():
  a = {'w': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.zeros(3, np.float32)}
  base = checkpoints.tree_checksum(a)
  assert base.startswith('sha256:') and base == checkpoints.tree_checksum(dict(a))
  changed = [{**a, 'w': a['w'].reshape(3, 2)}, {**a, 'w': a['w'].astype(np.int32)},
             {**a, 'b': a['b'] + np.float32(1e-7)}, {'w': a['w']}]
  assert len({base, *map(checkpoints.tree_checksum, changed)}) == 5
  state = {'variables': {'params': a, 'batch_stats': {}}, 'opt': np.ones(2)}
  sums = checkpoints.state_checksums(state)
  assert sums == {'state': checkpoints.tree_checksum(state),
                  'variables': checkpoints.tree_checksum({'params': a, 'batch_stats': {}})}


class FailedSaver:
  """An orbax manager whose background write of step 6 ran out of space."""

  directory = Path('/data/run/checkpoints')
  closed = False

  def wait_until_finished(self):
    raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.0.count/0" in OCDBT database at local file '
        '"/data/run/checkpoints/6.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/'
        '": Failed to write 3391488 bytes to file 5: No space left on device '
        "[os_error_code='28']")

  def reload(self):
    pass

  def latest_step(self):
    return 4

  def close(self):
    self.closed = True


def test_failed_background_write_is_one_line_naming_the_intact_checkpoint(caplog):
  with pytest.raises(checkpoints.CheckpointWriteError) as error:
    checkpoints.wait(FailedSaver())
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('Writing the checkpoint of step 6 in /data/run/checkpoints failed: '
                            'No space left on device (ValueError: RESOURCE_EXHAUSTED')
  assert message.endswith('The checkpoint of step 4 is complete and intact; rerun with enough '
                          'space to resume from it.')
  # While another error stops the run, the failed write is logged, not raised over it.
  saver = FailedSaver()
  checkpoints.close(saver, raise_errors=False)
  assert saver.closed and 'No space left on device' in caplog.text


# --- C: one run per workdir -------------------------------------------------------------------


def _try_lock_in_subprocess(workdir) -> subprocess.CompletedProcess:
  code = ('import sys; from projects.training import workdir_lock\n'
          'try:\n  workdir_lock.acquire(sys.argv[1])\n'
          'except workdir_lock.WorkdirInUseError as e:\n  print(e); sys.exit(3)\n')
  return subprocess.run([sys.executable, '-c', code, str(workdir)], cwd=support.REPO,
                        env=support.subprocess_env(), capture_output=True, text=True,
                        timeout=60)


def test_second_run_in_a_workdir_fails_at_once_naming_the_holder(tmp_path):
  workdir = tmp_path / 'run'
  with workdir_lock.hold(workdir):
    proc = _try_lock_in_subprocess(workdir)
    assert proc.returncode == 3, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f'workdir {workdir} is in use by pid {os.getpid()} on host '
                           f'{socket.gethostname()} since 20'), line
    assert line.endswith('; wait for it or use another --workdir') and 'pytest' in line
    # The training loop takes the lock before anything else (model, checkpoints).
    with pytest.raises(workdir_lock.WorkdirInUseError, match='is in use by pid'):
      loop.train(rng=None, config=None, model=None, dataset=None, workdir=str(workdir),
                 writer=None, evaluation=None)
  # Released: the next run takes it.
  assert _try_lock_in_subprocess(workdir).returncode == 0


def test_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = tmp_path / 'run'
  code = textwrap.dedent('''
      import sys, time
      from projects.training import workdir_lock
      workdir_lock.acquire(sys.argv[1])
      print('held', flush=True)
      time.sleep(120)
  ''')
  holder = subprocess.Popen([sys.executable, '-c', code, str(workdir)], cwd=support.REPO,
                            env=support.subprocess_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirInUseError, match=f'in use by pid {holder.pid} '):
      workdir_lock.acquire(workdir)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  assert (workdir / '.lock').exists()  # the file stays, the lock does not
  lock = workdir_lock.acquire(workdir)
  assert json.loads((workdir / '.lock').read_text())['pid'] == os.getpid()
  lock.release()


# --- D: a full disk ---------------------------------------------------------------------------


def _can_mount_tmpfs(where: Path) -> str | None:
  """Why a private tmpfs cannot be mounted here, or None."""
  if sys.platform != 'linux' or not shutil.which('unshare'):
    return 'needs Linux and unshare(1)'
  where.mkdir()
  mount = f'mount -t tmpfs -o size=64k tmpfs {where}'
  probe = subprocess.run(['unshare', '-rm', 'sh', '-c', mount], capture_output=True, text=True)
  if probe.returncode:
    return f'cannot mount a tmpfs in a user namespace: {probe.stderr.strip()[:200]}'
  return None


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
def test_full_disk_keeps_the_previous_checkpoint_and_a_rerun_resumes(trained, tmp_path):
  """A tmpfs that holds one checkpoint but not two: the run of 4 steps fails at step 4."""
  mount, kept = tmp_path / 'mnt', tmp_path / 'kept'
  reason = _can_mount_tmpfs(mount)
  if reason:
    pytest.skip(reason)
  one_checkpoint = sum(p.stat().st_size for p in (trained[0] / 'checkpoints' / '2').rglob('*')
                       if p.is_file())
  size_kb = one_checkpoint * 3 // 2 // 1024
  script = ('mount -t tmpfs -o size="$1"k tmpfs "$2" || exit 99\n'
            '"$3" -m tests.projects.trainer_support "$2/w" "$4"; rc=$?\n'
            'cp -a "$2/w" "$5"; exit $rc\n')
  proc = subprocess.run(
      ['unshare', '-rm', 'sh', '-c', script, 'sh', str(size_kb), str(mount), sys.executable,
       json.dumps(OVERRIDES), str(kept)],
      cwd=support.REPO, env=support.subprocess_env(), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode not in (0, 99), proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('projects.training.checkpoints.CheckpointWriteError: No space left '
                         'for the checkpoint of step 4'), proc.stderr[-3000:]
  assert 'The checkpoint of step 2 is complete and intact' in last
  # The error, not hundreds of lines of orbax's writer threads.
  assert len(proc.stderr.splitlines()) < 60, proc.stderr[-3000:]
  assert 'step 4: validation' not in proc.stdout

  # The previous checkpoint is whole, and nothing else passes for a checkpoint.
  assert sorted(p.name for p in (kept / 'checkpoints').iterdir()) == ['2']
  assert checkpoints.latest_step(kept) == 2
  assert _restore_latest(kept)[0] == 2

  # With room again, the run resumes from step 2.
  resumed = support.run_training_subprocess(kept, OVERRIDES)
  assert min(resumed) > 2, resumed
  assert checkpoints.latest_step(kept) == 4


# --- E: a diverging run -----------------------------------------------------------------------


def _finite_steps(workdir: Path) -> dict[int, bool]:
  """Each complete checkpoint's step: whether every float of its state is finite."""
  abstract, _ = _abstract_state()
  finite = {}
  with checkpoints.manager(workdir, create=False) as mngr:
    for step in mngr.all_steps():
      state = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))['state']
      finite[step] = all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state)
                         if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact))
  return finite


def test_diverging_run_stops_naming_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
  """lr 1e6: the loss is NaN from step 3. Before, the run went on to exit 0 with a validation
  table, saving NaN checkpoints at 4, 6 and 8 that rotated the finite one of step 2 away."""
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'projects.cvt_segmentation.main',
       '--config=projects/cvt_segmentation/configs/synthetic_demo.py:runlocal',
       f'--workdir={workdir}', '--config.optimizer.base_lr=1e6',
       '--config.num_training_steps=8', '--config.log_summary_steps=4'],
      cwd=support.REPO, env={**support.subprocess_env(), 'PYTHONPATH': str(support.REPO)},
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Final validation' not in proc.stdout
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert errors[0].startswith('error: Training diverged at step 3: the loss is nan'), errors
  assert f'the checkpoint of step 2 in {workdir / "checkpoints"} is the last' in errors[0]
  # Nothing non-finite was saved, and the finite checkpoint of step 2 is still there.
  assert _finite_steps(workdir) == {2: True}


def _save_unchecked(workdir: Path, step: int, state, metadata) -> None:
  """Writes `state` as checkpoint `step` as versions before the finiteness check did."""
  shutil.rmtree(workdir / 'checkpoints' / str(step))
  metadata = {**metadata, checkpoints.CHECKSUMS: checkpoints.state_checksums(state)}
  with checkpoints.manager(workdir) as mngr:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            metadata=ocp.args.JsonSave(metadata)))


def test_resume_skips_a_non_finite_checkpoint_and_says_so(trained, tmp_path, capsys):
  workdir = _copy(trained, tmp_path)
  step, state = _restore_latest(workdir)
  assert step == 4
  nan_params = jax.tree.map(lambda x: x * np.nan, state.variables['params'])
  _, metadata = _abstract_state()
  _save_unchecked(workdir, 4, state.replace(variables={**state.variables, 'params': nan_params}),
                  metadata)
  capsys.readouterr()
  state, _ = _train(workdir, NoEvaluation())
  out = capsys.readouterr().out
  line = next(line for line in out.splitlines() if line.startswith('Resuming'))
  resumed = re.escape(f'Resuming from the checkpoint of step 2 in {workdir / "checkpoints"} ')
  assert re.fullmatch(resumed + r'\(step 4 skipped: non-finite parameters \((\d+) of \1 values\)\)',
                      line), line
  assert int(state.step) == 4
  # Set aside under its own name; the step trained again from step 2 is finite.
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['2', '4',
                                                                         '4.non-finite']
  assert _finite_steps(workdir) == {2: True, 4: True}


def test_a_non_finite_state_is_never_saved(tmp_path):
  state = {'variables': {'params': {'w': np.array([1.0, np.inf], np.float32)}}}
  with checkpoints.manager(tmp_path) as mngr:
    with pytest.raises(FloatingPointError, match='step 7 .*non-finite parameters'):
      checkpoints.save(mngr, 7, state, {})
  assert not list((tmp_path / 'checkpoints').iterdir())


def test_metadata_a_checkpoint_predates_is_not_checked_but_what_it_records_is():
  # Detection checkpoints written before the category map was recorded still resume.
  from projects.training.checkpoints import CheckpointMismatchError, _check_metadata

  expected = {'model_name': 'cvt_atss', 'num_classes': 3, 'category_ids': [1, 5, 90]}
  _check_metadata({'model_name': 'cvt_atss', 'num_classes': 3}, expected, 'ckpt')
  with pytest.raises(CheckpointMismatchError, match=r'category_ids: checkpoint \[1, 5\] vs'):
    _check_metadata({**expected, 'category_ids': [1, 5]}, expected, 'ckpt')


def test_a_non_finite_checkpoint_for_inference_is_refused_naming_the_others(trained, tmp_path):
  # Written by a version that saved diverged runs: evaluate and predict would score NaNs.
  workdir = _copy(trained, tmp_path)
  _, state = _restore_latest(workdir)
  nan_params = jax.tree.map(lambda x: x * np.nan, state.variables['params'])
  _, metadata = _abstract_state()
  _save_unchecked(workdir, 4, state.replace(variables={**state.variables, 'params': nan_params}),
                  metadata)
  with pytest.raises(checkpoints.CheckpointNonFiniteError) as error:
    _inference_variables(workdir)
  assert re.fullmatch(
      re.escape(f'The checkpoint at {workdir / "checkpoints" / "4"} cannot be used: its '
                'variables have non-finite parameters (') + r'(\d+) of \1 values\)\. '
      + re.escape(f'Other checkpoints: steps 2 (pass one folder, e.g. '
                  f'{workdir / "checkpoints" / "2"}, to use it).'), str(error.value)), error.value
