"""benchmarks/input_pipeline.py run as a user runs it, tiny: 4 images, batches of 2, 0.3 s."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'input_pipeline.py'


def test_tiny_run_reports_both_sides_and_ends_with_the_ratio(tmp_path):
  out = tmp_path / 'results.json'
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), '--images', '4', '--seconds', '0.3', '--repeats', '1',
       '--batch', '2', '--json', str(out)],
      capture_output=True, text=True, timeout=300)
  print(proc.stdout, proc.stderr)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert re.fullmatch(r'per-core ratio ours/reference: \d+\.\d\d', lines[-1])
  assert 'load average' in lines[0]
  results = json.loads(out.read_text())
  speeds = results['images_per_s_per_core']
  assert speeds['ours'] > 0 and speeds['reference'] > 0
  assert lines[-1].endswith(f'{speeds["ours"] / speeds["reference"]:.2f}')
