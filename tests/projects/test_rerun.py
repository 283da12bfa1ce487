"""Rerunning a training run: a finished one says so and prints its final numbers.

`main` runs in-process on the tiny synthetic config (2 steps); the reruns reuse its workdir.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from projects.cvt_segmentation import main, trainer
from projects.training import loop

from . import trainer_support as support

STEPS = {'num_training_steps': 2, 'checkpoint_steps': 2, 'log_eval_steps': 2,
         'log_summary_steps': 1}


def _main(workdir, **overrides):
  config = support.tiny_config(**{**STEPS, **overrides})
  writer = support.RecordingWriter()
  summary = main.main(jax.random.PRNGKey(config.rng_seed), config, str(workdir), writer)
  return summary, writer.scalars


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A workdir trained to step 2, and what its run printed and wrote."""
  workdir = tmp_path_factory.mktemp('finished')
  summary, scalars = _main(workdir)
  return workdir, summary, scalars


class CountingEvaluation:
  """Counts its calls; describes like the segmentation evaluation."""

  scalars = ('mIoU', 'aAcc', 'mAcc')

  def __init__(self):
    self.calls = 0

  def __call__(self, variables):
    self.calls += 1
    return {'mIoU': 50.0, 'aAcc': 60.0, 'mAcc': float('nan'), 'confusion': np.eye(2),
            'per_class': {'background': 1.0, 'disc': float('nan')}}

  def describe(self, summary):
    return trainer.describe(summary)


def test_metrics_are_percentages_everywhere(finished):
  workdir, summary, scalars = finished
  recorded = json.loads((workdir / loop.VALIDATION_FILE).read_text())['steps']['2']
  assert set(recorded) == {'mIoU', 'aAcc', 'mAcc'}  # the confusion matrix is not kept
  assert scalars[2]['valid/aAcc'] == pytest.approx(recorded['aAcc'])
  # Percent, as mmsegmentation and `evaluate`: aAcc of an untrained model on 6 classes of
  # mostly background is well above 1 when expressed in percent.
  assert 1 < recorded['aAcc'] <= 100
  assert summary['aAcc'] == pytest.approx(recorded['aAcc'])


def test_rerun_of_a_finished_run_prints_its_recorded_numbers(finished, capsys):
  workdir, summary, _ = finished
  summary_again, scalars = _main(workdir)
  out = capsys.readouterr().out
  assert 'Already trained to step 2:' in out
  assert f'Final validation (%): {trainer.describe(summary)}' in out
  assert 'its validation is recorded in' in out
  assert scalars == {}  # nothing trained or evaluated
  assert summary_again['mIoU'] == pytest.approx(summary['mIoU'])


def test_rerun_without_recorded_numbers_evaluates_the_checkpoint_once(finished, tmp_path,
                                                                      capsys):
  import shutil

  workdir = tmp_path / 'w'
  shutil.copytree(finished[0], workdir)
  (workdir / loop.VALIDATION_FILE).unlink()  # a workdir of an older version
  summary, scalars = _main(workdir)
  out = capsys.readouterr().out
  assert 'No validation of step 2 is recorded; evaluating its checkpoint.' in out
  assert set(scalars) == {2} and 'train/loss' not in scalars[2]
  assert summary['mIoU'] == pytest.approx(finished[1]['mIoU'])
  assert json.loads((workdir / loop.VALIDATION_FILE).read_text())['steps']['2']


def test_longer_schedule_resumes_and_records_each_evaluation(finished, tmp_path, capsys):
  import shutil

  workdir = tmp_path / 'w'
  shutil.copytree(finished[0], workdir)
  _, scalars = _main(workdir, num_training_steps=3, log_eval_steps=1)
  out = capsys.readouterr().out
  assert f'Resuming from the checkpoint of step 2 in {workdir}/checkpoints' in out
  assert min(scalars) == 3
  steps = json.loads((workdir / loop.VALIDATION_FILE).read_text())['steps']
  assert list(steps) == ['2', '3']


def test_checkpoint_of_another_model_is_refused(finished, tmp_path):
  import shutil

  from projects.cvt_segmentation import models
  from projects.training import checkpoints

  workdir = tmp_path / 'w'
  shutil.copytree(finished[0], workdir)  # a cvt_upernet run
  config = support.tiny_config(**STEPS)
  other = support.tiny_config(**STEPS)
  other.model_name = 'cvt_segformer'
  other.model = models.get_model_cls('cvt_segformer').default_model_config()
  other.model.backbone.variant = 'cvt-tiny'
  with pytest.raises(checkpoints.CheckpointMismatchError, match='cvt_upernet.*cvt_segformer'):
    support.run_training(other, workdir)
  with pytest.raises(checkpoints.CheckpointMismatchError, match='model_name'):
    models.restore_for_inference(other, workdir)
  # Evaluation needs the checkpoint only, not the pretrained file the training started from.
  with config.unlocked():
    config.model.backbone.pretrained = str(tmp_path / 'gone.msgpack')
  _, variables = models.restore_for_inference(config, workdir)
  assert 'decode_head' in variables['params']


def test_recorded_summary_keeps_nan_and_per_class_entries(tmp_path):
  evaluation = CountingEvaluation()
  loop._record_validation(str(tmp_path), 7, evaluation(None))
  stored = loop.read_validation(tmp_path)[7]
  assert stored['mIoU'] == 50.0 and math.isnan(stored['mAcc'])
  assert stored['per_class']['background'] == 1.0 and math.isnan(stored['per_class']['disc'])
  assert 'confusion' not in stored
  (tmp_path / loop.VALIDATION_FILE).write_text('{"steps": ')  # damaged: as if never recorded
  assert loop.read_validation(tmp_path) == {}
