"""benchmarks/device_check.sh --smoke run as a user runs it: CPU, cvt-tiny, tiny sizes, the
kernels that 'auto' picks on a GPU.

It runs as on the GPU machine (the repository on PYTHONPATH, no Scenic snapshot), and every
package its workers import must be one that machine has: jax, flax, optax, orbax, torch,
transformers, tensorboard and what they require, or a wheel the run carries (ml_collections).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'benchmarks' / 'device_check.sh'
GPU_MACHINE = ('jax', 'flax', 'optax', 'orbax-checkpoint', 'torch', 'transformers',
               'tensorboard')
CARRIED_WHEELS = ('ml-collections',)
BENCHMARKS = ('device_check', 'train_speed', 'workers')  # modules of benchmarks/, by name
OWN_MODULES = ('cvt_backbone', 'heads', 'projects', *BENCHMARKS)
# (part, input, dtype, attention) of every table row, in order. The kernels chosen as on a GPU:
# 'auto' is 'fused' in bfloat16, XLA's reference of it on a CPU.
ROWS = [('train', '64x64  b2', 'bfloat16', 'fused(XLA)'),
        ('forward', '64x64  b2', 'bfloat16', 'fused(XLA)'),
        ('forward', '96x96  b1', 'bfloat16', 'fused(XLA)'),
        ('forward', '64x64  b2', 'float32', 'plain'),
        ('forward', '96x96  b1', 'float32', 'plain')]

pytest.importorskip('torch')
pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  folder = tmp_path_factory.mktemp('device_check')
  (folder / 'imports').mkdir()
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO),
             DEVICE_CHECK_IMPORTS=str(folder / 'imports'))
  proc = subprocess.run([str(SCRIPT), '--smoke', '--output', str(folder / 'results.json')],
                        capture_output=True, text=True, env=env, timeout=900)
  print(proc.stdout, proc.stderr)
  return proc, folder


def test_smoke_run_measures_every_row_on_both_sides(smoke):
  proc, folder = smoke
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  start = lines.index(next(line for line in lines if line.startswith('part ')))
  cells = [[cell.strip() for cell in line.split('|')]
           for line in lines[start + 2:start + 2 + len(ROWS)]]
  assert [(c[0], c[1], c[2], c[3]) for c in cells] == [
      (part, size.strip(), dtype, attention) for part, size, dtype, attention in ROWS]
  for row in cells:  # img/s, MFU %, compile s, torch img/s and the ratio are numbers
    for cell in (row[4], row[5], row[7], row[8], row[9].rstrip('x')):
      assert float(cell) > 0, row
  assert re.fullmatch(rf'{len(ROWS)} rows, 0 errors, \d+ s', lines[start + 2 + len(ROWS)])

  results = json.loads((folder / 'results.json').read_text())
  assert results['errors'] == [] and results['mode'] == 'smoke'
  assert results['platform'] == 'cpu' and results['peaks']['float32']['flops'] > 0
  rows = results['rows']
  assert [(r['part'], r['dtype'], r['attention']) for r in rows] == [
      (part, dtype, attention) for part, _, dtype, attention in ROWS]
  for row in rows:
    assert 'error' not in row and 'error' not in row['torch'], row
    assert row['images_per_s'] > 0 and row['torch']['images_per_s'] > 0
    assert row['mfu'] > 0 and row['torch']['mfu'] > 0 and row['cudnn_fmha_calls'] == 0
  train = rows[0]
  # Cross-entropy over 150 classes from random weights: about ln(150) x 1.4 = 7.
  assert 3 < train['first_loss'] < 15 and math.isfinite(train['last_loss'])
  assert train['params'] == train['torch']['params'] == 21_912_972  # cvt-tiny + UPerNet


def _canonical(name: str) -> str:
  return re.sub(r'[-_.]+', '-', name).lower()


def _requirement_closure(names) -> set[str]:
  """The distributions `names` install: themselves and their requirements, recursively."""
  from packaging.requirements import Requirement

  seen, stack = set(), list(names)
  while stack:
    name = _canonical(stack.pop())
    if name in seen:
      continue
    seen.add(name)
    try:
      requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
      continue
    for text in requires:
      requirement = Requirement(text)
      if requirement.marker is None or requirement.marker.evaluate({'extra': ''}):
        stack.append(requirement.name)
  return seen


def _own_imports(modules) -> set[str]:
  """The top-level names that this repository's modules among `modules` import (anywhere in
  their source: also the imports inside functions)."""
  names = set()
  for module in modules:
    parts = module.split('.')
    if parts[0] not in OWN_MODULES:
      continue
    path = (REPO / 'benchmarks' if parts[0] in BENCHMARKS else REPO).joinpath(*parts)
    path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {alias.name.split('.')[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and not node.level:
        names.add(node.module.split('.')[0])
  return names


def test_workers_import_only_what_the_gpu_machine_has(smoke):
  """Every package the code of this repository imports while the workers run (libraries'
  own optional imports, such as torch's of optree, are theirs to handle)."""
  _, folder = smoke
  records = list((folder / 'imports').glob('*.json'))
  assert len(records) == 3  # the device + training row, PyTorch's rows, the forward rows
  loaded = {name for record in records for name in json.loads(record.read_text())}
  imported = {name.split('.')[0] for name in loaded} & _own_imports(loaded)
  assert {'jax', 'flax', 'optax', 'orbax', 'torch', 'transformers', 'ml_collections'} <= imported
  distributions = metadata.packages_distributions()
  allowed = _requirement_closure(GPU_MACHINE) | set(CARRIED_WHEELS)
  lacking = sorted(
      f'{name} ({", ".join(distributions.get(name, ["no distribution"]))})'
      for name in imported - set(sys.stdlib_module_names) - set(OWN_MODULES)
      if not {_canonical(d) for d in distributions.get(name, [])} & allowed)
  assert not lacking, f'the workers import packages the GPU machine lacks: {lacking}'


def test_a_killed_run_leaves_no_worker_and_no_output(tmp_path):
  """A run ended by kill -9 (a timeout, a preemption) cannot stop its worker, which would hold
  the GPU on: the worker ends by itself, and no partial JSON is left."""
  from tests.projects import trainer_support as support

  out = tmp_path / 'results.json'
  run = subprocess.Popen([str(SCRIPT), '--smoke', '--output', str(out)], cwd=REPO,
                         env=support.subprocess_env(PYTHON=sys.executable),
                         stdout=subprocess.PIPE, text=True)
  try:
    for line in run.stdout:  # The device row comes from the first worker.
      if 'device:' in line:
        break
    workers = support.descendants(run.pid)
    assert workers, 'no worker process was running'
  finally:
    run.kill()
    run.wait(timeout=30)
  support.assert_processes_end(workers)
  assert list(tmp_path.iterdir()) == []
