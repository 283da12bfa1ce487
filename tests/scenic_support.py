"""The real Scenic for the tests: an installed one, else the snapshot beside the checkout.

google-research/scenic is not on PyPI, so CI uses the snapshot of its core library at
`../shared/third_party/scenic` (relative to the repository root). `use_snapshot()` puts it
on `sys.path` and `PYTHONPATH` (for subprocesses) when no Scenic is importable; tests that
need Scenic carry `requires_scenic`, which skips only when neither is there, and says so.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from projects.training.scenic_compat import scenic_available

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = REPO.parent / 'shared' / 'third_party' / 'scenic'


def use_snapshot() -> None:
  if scenic_available() or not (SNAPSHOT / 'scenic' / 'model_lib').is_dir():
    return
  sys.path.insert(0, str(SNAPSHOT))
  os.environ['PYTHONPATH'] = os.pathsep.join(
      filter(None, [str(SNAPSHOT), os.environ.get('PYTHONPATH')]))


requires_scenic = pytest.mark.skipif(
    not scenic_available() and not SNAPSHOT.is_dir(),
    reason=f'google-research/scenic is not importable and there is no snapshot at {SNAPSHOT} '
           '(it is not on PyPI: install the `scenic` extra or put a checkout on PYTHONPATH)')
