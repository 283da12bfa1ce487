"""A process of a 2-process run killed: the run stops, and a restart with a slow peer resumes.

Apart from tests/projects/test_distributed.py so that the suite's two workers run these two
multi-minute scenarios side by side (`pytest -n 2 --dist loadfile` keeps a file on one worker).
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from projects.training import checkpoints

from . import trainer_support as support
from .test_distributed import _two_processes


def _children(pid: int) -> list[int]:
  path = f'/proc/{pid}/task/{pid}/children'
  with open(path) as f:
    return [int(p) for p in f.read().split()]


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='needs /proc (Linux)')
def test_a_killed_process_stops_the_run_and_a_restart_resumes(tmp_path):
  workdir = tmp_path / 'run'
  launcher = _two_processes(workdir, 400, start_new_session=True)
  try:
    deadline = time.monotonic() + 300
    while checkpoints.latest_step(workdir) is None:
      assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()
      time.sleep(1)
    children = _children(launcher.pid)
    assert len(children) == 2
    run = support.descendants(launcher.pid)  # the processes and their loader workers
    os.kill(children[1], signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = launcher.communicate(timeout=60)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  assert time.monotonic() - killed_at < 30
  assert launcher.returncode != 0
  assert 'process 1 of 2 exited with code -9; stopping the others' in err
  support.assert_processes_end(run)

  saved = checkpoints.latest_step(workdir)
  restart = _two_processes(workdir, saved + 2, slow_peer=True)
  out, err = restart.communicate(timeout=600)
  assert restart.returncode == 0, err[-3000:]
  first = int(re.findall(r'step (\d+)/', out)[0])
  assert first > saved  # resumed, not restarted from scratch
  assert checkpoints.latest_step(workdir) == saved + 2
