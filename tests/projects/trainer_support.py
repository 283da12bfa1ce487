"""Small training runs for the trainer tests, in-process or as a subprocess.

As a script it trains the synthetic demo config (runlocal) with JSON overrides and
prints the recorded scalars as JSON on its last line:

  python -m tests.projects.trainer_support WORKDIR '{"num_training_steps": 3}'
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def tiny_config(arg: str = 'runlocal', **overrides: Any):
  from projects.cvt_segmentation.configs import synthetic_demo

  config = synthetic_demo.get_config(arg)
  with config.unlocked():
    for key, value in overrides.items():
      target = config
      *parents, leaf = key.split('.')
      for parent in parents:
        target = target[parent]
      target[leaf] = value
  return config


class RecordingWriter:
  """A clu-style metric writer that keeps every scalar."""

  def __init__(self):
    self.scalars: dict[int, dict[str, float]] = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})

  def flush(self):
    pass

  def close(self):
    pass


def run_training(config, workdir: str | os.PathLike) -> dict[int, dict[str, float]]:
  import jax

  from projects.cvt_segmentation import models, trainer
  from projects.cvt_segmentation.data import builder
  from projects.training import app

  writer = RecordingWriter()
  dataset = app.build_dataset(builder.get_dataset, config)

  trainer.train(rng=jax.random.PRNGKey(config.rng_seed), config=config,
                model_cls=models.get_model_cls(config.model_name), dataset=dataset,
                workdir=str(workdir), writer=writer)
  return writer.scalars


def subprocess_env(**extra: str) -> dict[str, str]:
  env = dict(os.environ, **extra)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  return env


def descendants(pid: int) -> list[int]:
  """The processes `pid` started, and those they started (Linux /proc)."""
  found, todo = [], [pid]
  while todo:
    for path in glob.glob(f'/proc/{todo.pop()}/task/*/children'):
      try:
        with open(path) as f:
          children = [int(c) for c in f.read().split()]
      except OSError:  # ended meanwhile
        continue
      found += children
      todo += children
  return found


def _running(pid: int) -> str | None:
  """`pid`'s command line while it runs (not ended, not a zombie), else None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
        return None
    with open(f'/proc/{pid}/cmdline') as f:
      return f.read().replace('\0', ' ')[:200]
  except OSError:
    return None


def assert_processes_end(pids: list[int], seconds: float = 10.0) -> None:
  """Every process of `pids` ends within `seconds` (their parent was killed: none may linger)."""
  deadline = time.monotonic() + seconds
  while (left := {p: c for p in pids if (c := _running(p))}) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not left, f'processes left running after their parent was killed: {left}'


def run_training_subprocess(workdir, overrides: dict[str, Any], **env: str):
  proc = subprocess.run(
      [sys.executable, '-m', 'tests.projects.trainer_support', str(workdir),
       json.dumps(overrides)], cwd=REPO, env=subprocess_env(**env), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main_error(config: str, workdir, project: str = 'cvt_segmentation') -> tuple[str, str]:
  """`(the one error: line, stderr)` of a project's main that must fail as a user's mistake:
  status 1, no traceback."""
  proc = subprocess.run(
      [sys.executable, '-m', f'projects.{project}.main', f'--config={config}',
       f'--workdir={workdir}'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr[-3000:]
  return errors[0], proc.stderr


# --- tiny dataset folders in the real layouts -------------------------------------------


def _save(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _image_and_label(rng: np.random.Generator, size: tuple[int, int], classes: list[int]):
  h, w = size
  label = np.full((h, w), classes[0], np.uint8)
  label[h // 4: 3 * h // 4, w // 3:] = classes[1]
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  image[label == classes[1]] = (200, 30, 30)
  return image, label


def make_ade20k(root: Path, size=(72, 96), per_split=2) -> Path:
  rng = np.random.default_rng(0)
  base = root / 'ADEChallengeData2016'
  for split in ('training', 'validation'):
    for i in range(per_split):
      # Raw ADE20K labels: 0 = "other" (ignored), 1..150 the classes.
      image, label = _image_and_label(rng, size, [0, 13 + i])
      _save(base / 'images' / split / f'ADE_{split}_{i:08d}.jpg', image)
      _save(base / 'annotations' / split / f'ADE_{split}_{i:08d}.png', label)
  return base


def make_cityscapes(root: Path, size=(64, 128), per_split=2) -> Path:
  rng = np.random.default_rng(1)
  for split, city in (('train', 'aachen'), ('val', 'frankfurt')):
    for i in range(per_split):
      stem = f'{city}_{i:06d}_000019'
      # labelIds 7 (road -> train id 0) and 26 (car -> 13).
      image, label = _image_and_label(rng, size, [7, 26])
      _save(root / 'leftImg8bit' / split / city / f'{stem}_leftImg8bit.png', image)
      _save(root / 'gtFine' / split / city / f'{stem}_gtFine_labelIds.png', label)
  return root


if __name__ == '__main__':
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  scalars = run_training(tiny_config(**overrides), workdir)
  print(json.dumps(scalars))
