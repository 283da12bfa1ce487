"""The TensorBoard metric writer of runs without Scenic: event files, and no TensorFlow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.scenic_support import SNAPSHOT

from . import trainer_support as support


def _event_files(logdir) -> list[Path]:
  return sorted(Path(logdir).glob('events.out.tfevents.*'))


def _read_events(logdir):
  """The event files of `logdir` as TensorBoard reads them."""
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
                                  event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


def _scalars(acc) -> dict[str, list[tuple[int, float]]]:
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def test_scalars_images_and_texts_read_back_in_tensorboard(tmp_path):
  from projects.training import metric_writer

  writer = metric_writer.create_default_writer(tmp_path)
  writer.write_scalars(1, {'train/loss': 2.5, 'train/lr': np.float32(0.001)})
  writer.write_scalars(3, {'train/loss': np.asarray(1.25)})
  writer.write_scalars(3, {'valid/mIoU': 0.5})
  writer.write_images(3, {'pred': np.zeros((2, 8, 6, 3), np.uint8)})
  writer.write_texts(3, {'note': 'hello'})
  writer.write_histograms(3, {'weights': np.arange(10.0)})
  writer.flush()
  writer.close()

  assert len(_event_files(tmp_path)) == 1
  acc = _read_events(tmp_path)
  assert _scalars(acc) == {
      'train/loss': [(1, 2.5), (3, 1.25)],
      'train/lr': [(1, pytest.approx(0.001))],
      'valid/mIoU': [(3, 0.5)],
  }
  images = {tag: acc.Images(tag) for tag in acc.Tags()['images']}
  assert sorted(images) == ['pred/0', 'pred/1']
  assert (images['pred/0'][0].step, images['pred/0'][0].width,
          images['pred/0'][0].height) == (3, 6, 8)
  text = acc.Tensors('note')[0]
  assert text.step == 3 and text.tensor_proto.string_val == [b'hello']
  assert acc.Histograms('weights')[0].histogram_value.num == 10


def test_other_processes_write_no_event_files(tmp_path):
  from projects.training import metric_writer

  writer = metric_writer.create_default_writer(tmp_path, just_logging=True)
  writer.write_scalars(1, {'train/loss': 2.5})
  writer.close()
  assert _event_files(tmp_path) == []


def test_a_run_without_scenic_imports_no_tensorflow(tmp_path):
  """`main` without Scenic, then: TensorFlow not imported, the scalars in TensorBoard."""
  env = support.subprocess_env()
  # The Scenic snapshot off the path (conftest puts it there for subprocesses).
  env['PYTHONPATH'] = os.pathsep.join(
      p for p in env['PYTHONPATH'].split(os.pathsep) if Path(p) != SNAPSHOT)
  driver = (
      'import json, runpy, sys\n'
      f'sys.argv = ["main", "--config={support.REPO}/projects/cvt_segmentation/configs/'
      f'synthetic_demo.py:runlocal", "--workdir={tmp_path}", "--config.num_training_steps=2"]\n'
      'try:\n'
      '  runpy.run_module("projects.cvt_segmentation.main", run_name="__main__")\n'
      'except SystemExit as exit:\n'
      '  if exit.code:\n'
      '    raise\n'
      'from projects.training.scenic_compat import scenic_available\n'
      'print(json.dumps({"scenic": scenic_available(),'
      ' "tensorflow": "tensorflow" in sys.modules, "clu": "clu" in sys.modules}))\n')
  proc = subprocess.run([sys.executable, '-c', driver], cwd=support.REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  imported = json.loads(proc.stdout.strip().splitlines()[-1])
  if imported['scenic']:
    pytest.skip('Scenic is installed: every run goes through scenic.app')
  assert not imported['tensorflow'], 'TensorFlow was imported by a run without Scenic'
  assert not imported['clu'], 'clu (only in the scenic extra) was imported by a run without Scenic'
  # TensorFlow's start-up notices (oneDNN, absl::InitializeLog) are gone with it.
  assert 'oneDNN' not in proc.stderr and 'InitializeLog' not in proc.stderr, proc.stderr[-2000:]
  assert len(_event_files(tmp_path)) == 1
  scalars = _scalars(_read_events(tmp_path))
  assert [step for step, _ in scalars['train/loss']] == [2]
  assert np.isfinite(scalars['train/loss'][0][1])
  assert [step for step, _ in scalars['valid/mIoU']] == [2]
