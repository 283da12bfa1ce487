"""Detection training as a user runs it: `projects.cvt_detection.main` on a COCO-layout folder.

The folder has COCO's real layout (`train2017/`, `val2017/`, `annotations/instances_*.json`),
a crowd box, an image without boxes and category ids with gaps (1, 3, 90). One run trains,
evaluates and checkpoints; a second, on 4 CPU devices, is killed with SIGKILL after its first
checkpoint and restarted, and must end where the 1-device run ended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection import evaluate, models, predict
from projects.cvt_detection.configs import coco_cvt13_atss_1x
from projects.cvt_detection.data import SyntheticDetection, write_coco
from projects.training import checkpoints

from . import trainer_support as support

CONFIG = 'projects/cvt_detection/configs/coco_cvt13_atss_1x.py:runlocal,data_dir={}'
CATEGORY_IDS = (1, 3, 90)
STEPS = 6


def make_coco_folder(root: Path) -> Path:
  """A tiny COCO 2017 folder: 96x128 synthetic images, a crowd box, an image without boxes."""
  for split, count in (('train2017', 6), ('val2017', 3)):
    source = SyntheticDetection(count, image_size=(96, 128), num_classes=3, split='train'
                                if split == 'train2017' else 'val')
    annotations, image_dir = write_coco(root, source, split=split, category_ids=CATEGORY_IDS)
    gt = json.loads(Path(annotations).read_text())
    # A crowd region over the first image (ignored by training, handled by COCOeval).
    gt['annotations'].append({'id': 10_000, 'image_id': 1, 'category_id': 3,
                              'bbox': [4.0, 4.0, 30.0, 20.0], 'area': 600.0, 'iscrowd': 1})
    # An image without any annotation.
    Image.fromarray(np.full((96, 128, 3), 90, np.uint8)).save(Path(image_dir) / 'empty.png')
    gt['images'].append({'id': 999, 'file_name': 'empty.png', 'height': 96, 'width': 128})
    Path(annotations).write_text(json.dumps(gt))
  return root


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory) -> Path:
  return make_coco_folder(tmp_path_factory.mktemp('coco'))


def _command(workdir: Path, coco_root: Path) -> list[str]:
  # The folder as the config's `data_dir` argument (also settable as a --config. flag).
  return [sys.executable, '-m', 'projects.cvt_detection.main',
          f'--config={CONFIG.format(coco_root)}', f'--workdir={workdir}',
          f'--config.num_training_steps={STEPS}', '--config.batch_size=4',
          '--config.log_summary_steps=1', f'--config.log_eval_steps={STEPS}',
          '--config.checkpoint_steps=2']


def _run(workdir: Path, coco_root: Path, **env: str) -> str:
  proc = subprocess.run(_command(workdir, coco_root), cwd=support.REPO,
                        env=support.subprocess_env(**env), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _losses(stdout: str) -> dict[int, float]:
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r'^step (\d+)/\d+ .* loss=([0-9.e+-]+) ', stdout, re.M)}


def _params(workdir: Path) -> list[np.ndarray]:
  import jax

  config = coco_cvt13_atss_1x.get_config('runlocal')
  _, variables = models.restore_for_inference(config, workdir)
  return [np.asarray(x) for x in jax.tree.leaves(variables)]


@pytest.fixture(scope='module')
def reference(coco_root, tmp_path_factory) -> tuple[Path, str]:
  workdir = tmp_path_factory.mktemp('one_device')
  return workdir, _run(workdir, coco_root)


def test_coco_folder_trains_evaluates_and_checkpoints(reference):
  workdir, stdout = reference
  assert sorted(_losses(stdout)) == list(range(1, STEPS + 1))
  assert all(np.isfinite(v) for v in _losses(stdout).values())
  assert re.search(rf'^step {STEPS}: validation AP [0-9.]+ +AP50 ', stdout, re.M), stdout
  assert 'Final validation (COCO box metrics, %)' in stdout
  # Per-class AP under the annotation file's category names.
  assert all(name in stdout for name in ('rectangle', 'ellipse', 'triangle'))
  assert checkpoints.latest_step(workdir) == STEPS
  assert list(workdir.glob('events.out.tfevents*'))


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
def test_killed_four_device_run_resumes_to_the_one_device_result(reference, coco_root,
                                                                 tmp_path):
  one_dir, one_stdout = reference
  workdir = tmp_path / 'four_devices'
  env = support.subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.Popen(_command(workdir, coco_root), cwd=support.REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '2').is_dir():
    assert proc.poll() is None, 'the run ended before its first checkpoint'
    assert time.time() < deadline, 'no checkpoint after 300 s'
    time.sleep(0.05)
  loader_workers = support.descendants(proc.pid)
  assert loader_workers  # the config's num_workers
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  support.assert_processes_end(loader_workers)  # none left running
  killed_at = checkpoints.latest_step(workdir)
  assert killed_at is not None and killed_at < STEPS

  stdout = _run(workdir, coco_root, XLA_FLAGS='--xla_force_host_platform_device_count=4')
  resumed, reference_losses = _losses(stdout), _losses(one_stdout)
  assert min(resumed) == killed_at + 1, 'the restarted run did not resume from the checkpoint'
  for step, loss in resumed.items():
    np.testing.assert_allclose(loss, reference_losses[step], rtol=1e-3)
  for x, y in zip(_params(workdir), _params(one_dir), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_bad_annotations_stop_the_run_before_training_in_one_line(tmp_path):
  root = make_coco_folder(tmp_path / 'coco')
  annotations = root / 'annotations' / 'instances_val2017.json'
  gt = json.loads(annotations.read_text())
  gt['annotations'][2]['bbox'] = [120.0, 10.0, 30.0, 20.0]  # past the right edge (128 px)
  gt['annotations'][4]['bbox'][2] = -3.0  # negative width
  annotations.write_text(json.dumps(gt))
  workdir = tmp_path / 'work'
  proc = subprocess.run(_command(workdir, root), cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(error) == 1 and str(annotations) in error[0] and '2 of the' in error[0]
  for ann in (gt['annotations'][2], gt['annotations'][4]):
    assert f"annotation {ann['id']} (image {ann['image_id']}" in proc.stderr
  assert checkpoints.latest_step(workdir) is None


def test_rerun_of_the_finished_run_prints_its_recorded_table(reference, coco_root, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(reference[0], workdir)
  stdout = _run(workdir, coco_root)
  assert f'Already trained to step {STEPS}:' in stdout and 'step 1/' not in stdout
  table = reference[1].split('Final validation (COCO box metrics, %):')[1].split('Checkpoints')[0]
  assert f'Final validation (COCO box metrics, %):{table}' in stdout  # per-class rows too


def _without_category_1(annotations: Path) -> None:
  gt = json.loads(annotations.read_text())
  gt['categories'] = [c for c in gt['categories'] if c['id'] != 1]
  gt['annotations'] = [a for a in gt['annotations'] if a['category_id'] != 1]
  annotations.write_text(json.dumps(gt))


def _error_line(stderr: str) -> str:
  assert 'Traceback' not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def test_splits_listing_other_categories_stop_the_run_in_one_line(tmp_path):
  root = make_coco_folder(tmp_path / 'coco')
  val = root / 'annotations' / 'instances_val2017.json'
  _without_category_1(val)  # label 0 would be category 1 in training, 3 in evaluation
  workdir = tmp_path / 'work'
  proc = subprocess.run(_command(workdir, root), cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  train = root / 'annotations' / 'instances_train2017.json'
  assert _error_line(proc.stderr).startswith(
      f'error: {val} does not list category id 1 of {train} (one category map per run')
  assert checkpoints.latest_step(workdir) is None


def test_the_checkpoint_records_the_category_map_evaluate_and_predict_check_it(
    reference, coco_root, tmp_path, capsys):
  workdir = reference[0]
  saved = checkpoints.saved_metadata(workdir)
  assert saved['category_ids'] == list(CATEGORY_IDS)
  assert saved['class_names'] == ['rectangle', 'ellipse', 'triangle']
  # A config whose validation file lists other categories: refused before any inference.
  root = tmp_path / 'coco'
  shutil.copytree(coco_root, root)
  val = root / 'annotations' / 'instances_val2017.json'
  _without_category_1(val)
  config = os.path.join(support.REPO, CONFIG.format(root))
  expected = (f'error: {val} does not list category id 1 of the checkpoint of step {STEPS} in '
              f'{workdir / "checkpoints"} (one category map per run')
  metrics = tmp_path / 'metrics.json'
  assert evaluate.main(['--config', config, '--checkpoint', str(workdir), '--metrics',
                        str(metrics), '--results', str(tmp_path / 'results.json'),
                        '--no-progress']) == 1
  assert _error_line(capsys.readouterr().err).startswith(expected)
  assert not metrics.exists()
  out = tmp_path / 'out'
  assert predict.main(['--config', config, '--checkpoint', str(workdir), '--output', str(out),
                       '--no-progress', str(root / 'val2017' / '000000000001.png')]) == 1
  assert _error_line(capsys.readouterr().err).startswith(expected)
  assert not list(out.glob('*'))


def test_resuming_with_another_category_map_is_refused(reference, coco_root, tmp_path):
  workdir, root = tmp_path / 'work', tmp_path / 'coco'
  shutil.copytree(reference[0], workdir)
  shutil.copytree(coco_root, root)
  for split in ('train2017', 'val2017'):
    annotations = root / 'annotations' / f'instances_{split}.json'
    gt = json.loads(annotations.read_text())
    gt['categories'][0]['name'] = 'square'  # category 1, 'rectangle' in the checkpoint
    annotations.write_text(json.dumps(gt))
  command = _command(workdir, root)
  command[command.index(f'--config.num_training_steps={STEPS}')] = (
      f'--config.num_training_steps={STEPS + 2}')
  proc = subprocess.run(command, cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1
  error = _error_line(proc.stderr)
  assert "class_names: checkpoint ['rectangle', 'ellipse', 'triangle'] vs config ['square', " in (
      error)
  assert checkpoints.latest_step(workdir) == STEPS
