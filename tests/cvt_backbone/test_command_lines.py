"""`python -m cvt_backbone` (the smoke run and `convert`) and `python -m cvt_backbone.weights.convert`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python_m(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *argv], cwd=REPO, capture_output=True, text=True,
                        timeout=300)


def test_help_explains_the_options():
  result = _python_m('cvt_backbone', '--help')
  assert result.returncode == 0, result.stderr
  text = ' '.join(result.stdout.split())
  assert '--variant {cvt-13,cvt-21,cvt-tiny,cvt-w24}' in text and '(default: cvt-13)' in text
  assert 'input image height in pixels (at least 16' in text and '(default: 512)' in text
  assert 'input image width in pixels (at least 16) (default: 768)' in text
  assert 'python -m cvt_backbone convert SRC OUT' in text
  assert result.stderr == ''


def test_too_small_size_is_a_usage_error():
  result = _python_m('cvt_backbone', '--height', '8')
  assert result.returncode == 2
  assert "argument --height: expected an integer of at least 16 (pixels), got '8'" in result.stderr


def test_convert_subcommand_runs_cvt_convert_without_warnings(tmp_path):
  result = _python_m('cvt_backbone', 'convert', '--help')
  assert result.returncode == 0 and result.stdout.startswith('usage: cvt-convert'), result.stderr
  assert result.stderr == ''  # No runpy RuntimeWarning, unlike -m cvt_backbone.weights.converted.
  result = _python_m('cvt_backbone', 'convert', str(tmp_path / 'missing.pth'),
                     str(tmp_path / 'out.msgpack'))
  assert result.returncode == 1
  assert result.stderr.startswith('cvt-convert: error: ')


def test_the_library_module_points_to_the_command():
  result = _python_m('cvt_backbone.weights.convert', '--help')
  assert result.returncode == 2
  assert 'run `cvt-convert SRC OUT` or `python -m cvt_backbone convert SRC OUT`' in result.stderr
