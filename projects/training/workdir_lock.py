"""One training run per workdir: an exclusive `flock` on `WORKDIR/.lock` for the whole run.

Two runs in one workdir overwrite each other's checkpoint folders and both crash. Process 0
holds the lock from before checkpoints are read until the last is written; a second run
fails at once with `WorkdirInUseError` naming the holder recorded in the file (pid, host,
start, command). The kernel releases a `flock` when its process dies, even by SIGKILL, so
no stale lock remains. Standard library only (no JAX import to check it).
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
  """Takes the lock of `workdir` (created if missing) without waiting, or raises
  `WorkdirInUseError`. Remote workdirs and filesystems without `flock` go unlocked."""
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
