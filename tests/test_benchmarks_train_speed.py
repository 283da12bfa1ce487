"""benchmarks/train_speed.py run as a user runs it, at a tiny size (cvt-tiny, 64x64 batch 2).

The subprocess run uses the SegFormer head, whose step compiles fastest; the UPerNet models
of both sides are checked by their parameter counts (the issue's 44,543,340 at CvT-13).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'train_speed.py'

pytest.importorskip('torch')
pytest.importorskip('transformers')


def _load_benchmark():
  if str(SCRIPT.parent) not in sys.path:  # as when run: its folder on sys.path (for workers)
    sys.path.insert(0, str(SCRIPT.parent))
  spec = importlib.util.spec_from_file_location('train_speed', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tiny_run_prints_both_sides_with_equal_parameter_counts(tmp_path):
  out = tmp_path / 'results.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--variant', 'cvt-tiny', '--sizes', '64x2', '--steps', '1',
       '--warmup', '0', '--heads', 'segformer', '--json', str(out)],
      capture_output=True, text=True, timeout=300)
  print(proc.stdout, proc.stderr)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert any('64x64 b2' in line and 'ours (JAX)' in line and line.rstrip().endswith(
      tuple('0123456789')) for line in lines), 'no ours row with its ratios'
  assert any('64x64 b2' in line and 'HF + PyTorch' in line for line in lines)
  assert 'GFLOP/s' in lines[0]
  # CvT-tiny + SegFormer 256 over 150 classes, the same on both sides.
  assert 'SegFormer parameters: ours 359,414, PyTorch 359,414: the same' in lines

  results = json.loads(out.read_text())
  ours, ref = results['rows']
  assert (ours['impl'], ref['impl']) == ('ours (JAX)', 'HF + PyTorch')
  assert ours['params'] == ref['params'] == 359_414
  assert ours['param_parts'] == ref['param_parts']
  for row in (ours, ref):
    assert len(row['times']) == 1 and row['median_s'] > 0 and row['peak_rss_gb'] > 0.1
    # Cross-entropy over 150 classes from random weights: about ln(150) x 1.4 = 7.
    assert 3 < row['first_loss'] < 15
  assert ours['speed_ratio'] == pytest.approx(ref['median_s'] / ours['median_s'])
  assert ours['rss_ratio'] == pytest.approx(ours['peak_rss_gb'] / ref['peak_rss_gb'])
  assert ours['compile_s'] > 0 and results['matmul_peak_gflops'] > 0


@pytest.mark.parametrize('variant,expected', [('cvt-13', 44_543_340), ('cvt-tiny', 21_912_972)])
def test_upernet_models_of_both_sides_have_the_same_parameters(variant, expected):
  import jax

  from projects.cvt_segmentation import models

  benchmark = _load_benchmark()
  config = benchmark.ours_config('upernet', variant)
  meta = {'input_shape': (1, 64, 64, 3), 'num_classes': benchmark.NUM_CLASSES}
  model = models.get_model_cls(config.model_name)(config, meta)
  shapes = jax.eval_shape(lambda: model.init_variables(jax.random.PRNGKey(0), (1, 64, 64, 3)))
  ours = {name: benchmark._count(tree) for name, tree in shapes['params'].items()}
  reference = benchmark.build_reference('upernet', variant)
  theirs = {name: sum(p.numel() for p in module.parameters())
            for name, module in reference.named_children()}
  assert ours == theirs
  assert sum(ours.values()) == expected


@pytest.mark.parametrize('flag,value,message', [
    ('--sizes', '512x0', 'expected SIZE[xBATCH] items such as 512x2,256x8'),
    ('--sizes', '512,,256', 'separated by commas'),
    ('--heads', 'upernet,deeplab', 'unknown head deeplab; expected some of'),
    ('--variant', 'cvt-99', "Unknown CvT variant 'cvt-99'"),
])
def test_bad_arguments_name_what_was_expected(flag, value, message, capsys):
  benchmark = _load_benchmark()
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main([flag, value])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_semantic_fpn_has_no_reference_model():
  benchmark = _load_benchmark()
  with pytest.raises(ValueError, match="No Hugging Face reference for head 'semantic_fpn'"):
    benchmark.build_reference('semantic_fpn', 'cvt-tiny')
