"""Multi-process training through jax.distributed: real processes on localhost (gloo)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs import synthetic_demo
from projects.training import checkpoints, launch

from . import trainer_support as support

CONFIG = 'projects/cvt_segmentation/configs/synthetic_demo.py:runlocal'


# Process 1 starts 40 s after process 0 (past gloo's 30 s connection window), as a process
# compiling on a busy machine does: a slow peer must not kill the run.
SLOW_PEER = """
import runpy, sys, time
from projects.training import launch
initialize = launch.initialize
def slow_initialize(*args):
  started = initialize(*args)
  time.sleep(40 if '--process_id=1' in sys.argv else 0)
  return started
launch.initialize = slow_initialize
runpy.run_module('projects.cvt_segmentation.main', run_name='__main__')
"""


def _main(workdir, steps: int, *extra: str, eval_every: int = 100,
          slow_peer: bool = False) -> list[str]:
  # A constant rate after warmup (poly power 0): the schedule then does not depend on
  # num_training_steps, so a run extended from 4 to 6 steps can equal one of 6 from the start.
  main = ['-c', SLOW_PEER] if slow_peer else ['-m', 'projects.cvt_segmentation.main']
  return [sys.executable, *main, f'--config={CONFIG}',
          f'--workdir={workdir}', '--config.batch_size=8', f'--config.num_training_steps={steps}',
          f'--config.log_eval_steps={eval_every}', '--config.optimizer.power=0.0', *extra]


def _two_processes(workdir, steps: int, eval_every: int = 100, slow_peer: bool = False,
                   **popen) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'projects.training.launch', '--num_processes', '2',
         '--devices_per_process', '2', '--',
         *_main(workdir, steps, eval_every=eval_every, slow_peer=slow_peer)]
  return subprocess.Popen(cmd, cwd=support.REPO, env=support.subprocess_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _one_process(workdir, steps: int, eval_every: int = 100) -> str:
  proc = subprocess.run(_main(workdir, steps, eval_every=eval_every), cwd=support.REPO, capture_output=True, text=True,
                        timeout=600, env=support.subprocess_env(
                            XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _validation_at(stdout: str, step: int) -> str:
  return re.findall(rf'^step {step}: validation .*$', stdout, re.M)[-1]


def _params(workdir):
  _, variables = models.restore_for_inference(synthetic_demo.get_config('runlocal'), workdir)
  return variables


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    # Gradients are summed across processes by gloo in another order than within one
    # process; after Adam's normalisation that leaves float32 rounding differences.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-4)


def _children(pid: int) -> list[int]:
  path = f'/proc/{pid}/task/{pid}/children'
  with open(path) as f:
    return [int(p) for p in f.read().split()]


@pytest.mark.slow  # minutes: left out by -m "not slow"
@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='needs /proc (Linux)')
def test_two_processes_killed_and_restarted_train_as_one_and_restore_in_one(tmp_path):
  """A killed process stops the run; a restart with a slow peer resumes it and trains as one
  process of 4 devices does; its checkpoint restores in and continues in one process."""
  workdir = tmp_path / 'two'
  launcher = _two_processes(workdir, 400, start_new_session=True)
  try:
    deadline = time.monotonic() + 300
    while checkpoints.latest_step(workdir) is None:
      assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
      time.sleep(1)
    children = _children(launcher.pid)
    assert len(children) == 2
    run = support.descendants(launcher.pid)  # the processes and their loader workers
    os.kill(children[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=60)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert time.monotonic() - killed_at < 30
  assert launcher.returncode != 0
  assert 'process 1 of 2 exited with code -9; stopping the others' in err
  support.assert_processes_end(run)

  saved = checkpoints.latest_step(workdir)
  end = saved + 2
  restart = _two_processes(workdir, end, eval_every=end, slow_peer=True)
  out, err = restart.communicate(timeout=600)
  assert restart.returncode == 0, err[-3000:]
  first = int(re.findall(r'step (\d+)/', out)[0])
  assert first > saved  # resumed, not restarted from scratch
  assert checkpoints.latest_step(workdir) == end
  # Process 0 alone prints and writes TensorBoard events (a file per run); the other stays
  # quiet.
  assert out.count('Final validation') == 1 and out.count(f'step {end}/{end}') == 1
  assert len(list(workdir.glob('events.out.tfevents*'))) == 2
  # One process of 4 devices, never interrupted, 2 steps further: its validation and
  # checkpoint of step `end` are those of the 2-process run.
  one = _one_process(tmp_path / 'uninterrupted', end + 2, eval_every=end)
  assert _validation_at(out, end) == _validation_at(one, end)
  _assert_same(_params(workdir), _params(tmp_path / 'uninterrupted' / 'checkpoints' / str(end)))

  # The 2-process checkpoint restores in a 1-process run, which continues to the
  # parameters of the run that was never interrupted.
  _one_process(workdir, end + 2)
  assert checkpoints.latest_step(workdir) == end + 2
  _assert_same(_params(workdir), _params(tmp_path / 'uninterrupted'))


@pytest.mark.parametrize('num_examples', [5, 8])
def test_processes_evaluate_every_example_once(num_examples):
  from projects.cvt_segmentation.data import EvalLoader, EvalTransform, SyntheticSegmentation

  src = SyntheticSegmentation(num_classes=4, image_size=(8, 8), num_examples=num_examples,
                              split='validation')
  seen = []
  for p in range(2):
    loader = EvalLoader(src, EvalTransform(), batch_size=4, process_index=p, process_count=2)
    for batch in loader.iterate():
      seen += [img for img, real in zip(batch['inputs'], batch['batch_mask'], strict=True) if real]
  whole = [b['inputs'][i] for b in EvalLoader(src, EvalTransform(), batch_size=4).iterate()
           for i in np.flatnonzero(b['batch_mask'])]
  assert len(seen) == num_examples
  key = lambda x: x.tobytes()
  assert sorted(map(key, seen)) == sorted(map(key, whole))


@pytest.mark.parametrize('args, env, message', [
    (dict(num_processes=2), {}, 'needs --coordinator_address'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=2), {}, r'not in \[0, 2\)'),
    (dict(num_processes=0), {}, 'must be >= 1'),
    (dict(coordinator_address='h:1', num_processes=2, process_id=0),
     {launch.HEARTBEAT_TIMEOUT: '1m'}, "CVT_DISTRIBUTED_HEARTBEAT_TIMEOUT must be a positive "
     "whole number of seconds, got '1m'"),
])
def test_bad_distributed_settings(args, env, message, monkeypatch):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(ValueError, match=message):
    launch.initialize(**args)


def test_a_bad_distributed_setting_is_one_error_line(tmp_path):
  cluster = ['--coordinator_address=127.0.0.1:1', '--num_processes=2', '--process_id=0']
  proc = subprocess.run(_main(tmp_path, 2, *cluster), cwd=support.REPO,
                        capture_output=True, text=True, timeout=300,
                        env=support.subprocess_env(**{launch.INIT_TIMEOUT: '0'}))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: CVT_DISTRIBUTED_INIT_TIMEOUT must be a positive whole number of seconds, got '0'.")


def test_one_process_is_left_alone(monkeypatch):
  monkeypatch.delenv('SLURM_NTASKS', raising=False)
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES', raising=False)
  assert launch.initialize() is False
  assert launch.initialize(num_processes=1) is False

