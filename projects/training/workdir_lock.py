"""One training run per workdir: an exclusive `flock` on `WORKDIR/.lock` for the whole run.

Two runs writing checkpoints into one workdir overwrite each other's temporary folders
and both crash, and the run that was about to finish loses its last checkpoint. The
training loop therefore holds this lock (process 0 of a multi-process run; the other
processes share its workdir by design) from before it restores or creates checkpoints
until its last checkpoint is written. A second run fails at once with
`WorkdirInUseError`, whose one-line message names the holder recorded in the lock file:
pid, host, start time and command line.

The kernel releases a `flock` when the process holding it dies, even by SIGKILL, so a
killed run never leaves a stale lock behind: the file may remain, the lock does not.
Standard library only, so a second process can check the lock without importing JAX.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = '.lock'


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir; the message names it and what to do."""


class WorkdirLock:
  """A held lock on a workdir; `release()` (or leaving `hold`) lets it go."""

  def __init__(self, path: Path, fd: int | None):
    self.path = path
    self._fd = fd  # None: the filesystem has no flock, nothing is held.

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      # Emptied while still held, so a later reader never takes old details for a holder.
      os.ftruncate(fd, 0)
    except OSError:
      pass
    finally:
      os.close(fd)  # closing the only descriptor releases the flock


def _holder_record() -> dict[str, Any]:
  argv = getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv]
  command = shlex.join(argv)
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'since': time.strftime('%Y-%m-%d %H:%M:%S'),
          'command': command if len(command) <= 300 else command[:297] + '...'}


def _read_holder(fd: int) -> dict[str, Any] | None:
  # The holder writes its record just after taking the lock: a reader that comes in
  # between sees an empty file, so look again briefly.
  for _ in range(20):
    try:
      text = os.pread(fd, 64 * 1024, 0).decode('utf-8', 'replace')
      record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
      record = None
    if isinstance(record, dict):
      return record
    time.sleep(0.05)
  return None


def _describe(record: dict[str, Any] | None) -> str:
  if record is None:
    return 'another process (its details are not recorded in the lock file)'
  pid, host = record.get('pid', '?'), record.get('host', '?')
  since = str(record.get('since', '?'))[:16]  # to the minute
  text = f'pid {pid} on host {host} since {since} ({record.get("command", "?")})'
  if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
    # A child it started inherited the descriptor and outlives it.
    text += f' (pid {pid} has exited; a process it started still holds the lock)'
  return text


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def acquire(workdir: str | os.PathLike) -> WorkdirLock:
  """Takes the lock of `workdir` (created if missing) without waiting.

  Remote workdirs (`gs://...`) and filesystems without `flock` are not locked: a warning
  says so and the run goes on unprotected, as before this lock existed.

  Raises:
    WorkdirInUseError: another process holds it; the message names that process.
  """
  if '://' in str(workdir):
    log.info('Workdir %s is not a local path: not locked against a second run.', workdir)
    return WorkdirLock(Path(str(workdir)), None)
  directory = Path(workdir).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise WorkdirInUseError(
        f'workdir {directory} is in use by {_describe(holder)}; wait for it or use another '
        '--workdir') from None
  except OSError as error:
    os.close(fd)
    if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
      log.warning('Cannot lock %s (%s): a second run in this workdir would not be stopped.',
                  path, error.strerror)
      return WorkdirLock(path, None)
    raise
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(_holder_record()) + '\n').encode(), 0)
  return WorkdirLock(path, fd)


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[WorkdirLock]:
  """`acquire(workdir)` for the duration of a `with` block."""
  lock = acquire(workdir)
  try:
    yield lock
  finally:
    lock.release()
