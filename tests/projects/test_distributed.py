"""Multi-process training through jax.distributed: real processes on localhost (gloo)."""

from __future__ import annotations

import re
import subprocess
import sys

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


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(tmp_path):
  two = _two_processes(tmp_path / 'two', 4, eval_every=4)
  out, err = two.communicate(timeout=600)
  assert two.returncode == 0, err[-3000:]
  # Process 0 alone prints and writes TensorBoard events; the other stays quiet.
  assert out.count('Final validation') == 1 and out.count('step 4/4') == 1
  assert len(list((tmp_path / 'two').glob('events.out.tfevents*'))) == 1
  # One process of 4 devices, never interrupted, for 6 steps: its step-4 validation and
  # checkpoint are those of the 2-process run.
  one = _one_process(tmp_path / 'uninterrupted', 6, eval_every=4)
  assert _validation_at(out, 4) == _validation_at(one, 4)
  _assert_same(_params(tmp_path / 'two'),
               _params(tmp_path / 'uninterrupted' / 'checkpoints' / '4'))

  # The 2-process checkpoint restores in a 1-process run, which continues to the
  # parameters of the run that was never interrupted.
  _one_process(tmp_path / 'two', 6)
  assert checkpoints.latest_step(tmp_path / 'two') == 6
  _assert_same(_params(tmp_path / 'two'), _params(tmp_path / 'uninterrupted'))


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

