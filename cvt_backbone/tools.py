"""What every command-line tool shares, kept in the lowest layer that has one (`cvt-convert`).

The help formatter and image sides, files (and JSON) written whole or not at all, the refusal
to write over an input, and the sha256 of a file; the training library and the projects' tools (`projects.tools`) build on these. Standard
library only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import math
import numbers
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, BinaryIO


class HelpFormatter(argparse.HelpFormatter):
  """Appends '(default: X)' to an option's help unless it says its default already.

  Options without a meaningful default (None, False flags, required ones) get nothing.
  """

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ''
    default = action.default
    if ('default' in text or not action.option_strings or action.required
        or default is None or default is False or default is argparse.SUPPRESS
        or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
      return text
    if isinstance(default, (tuple, list)):
      default = ','.join(str(v) for v in default)
    return f'{text} (default: {default})'.replace('%', '%%') if text else f'(default: {default})'


def at_least(minimum: int, unit: str = 'pixels') -> Callable[[str], int]:
  """An argparse type: an integer of at least `minimum` (an image side: CvT's MIN_INPUT_SIZE)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      value = minimum - 1
    if value < minimum:
      raise argparse.ArgumentTypeError(
          f'expected an integer of at least {minimum} ({unit}), got {text!r}')
    return value

  return parse


def check_apart(outputs: Iterable[str | os.PathLike],
                inputs: Mapping[str | os.PathLike, str]) -> None:
  """Refuses, before anything is written, outputs that are inputs: whatever the flags, a tool
  never writes over what it reads.

  Args:
    outputs: the paths to be written.
    inputs: `{path: what it is}` ('the source weights file'); missing ones are skipped.

  Raises:
    ValueError: "OUT is WHAT [PATH]: ..." for an output that is an input file (by its path, a
      symbolic or a hard link) or lies inside an input folder.
  """
  files, folders = {}, {}
  for path, what in inputs.items():
    try:
      st = os.stat(path)
    except OSError:
      continue  # The tool that reads it reports it.
    if os.path.isdir(path):
      folders[os.path.join(os.path.realpath(path), '')] = path, what
    else:
      files[st.st_dev, st.st_ino] = path, what
  for output in outputs:
    try:
      st = os.stat(output)
      found, where = files.get((st.st_dev, st.st_ino)), 'is'
    except OSError:
      found = None
    if found is None and folders:
      real = os.path.realpath(output)
      found, where = next((v for f, v in folders.items() if real.startswith(f)), None), 'lies in'
    if found is not None:
      path, what = found
      named = '' if os.fspath(path) == os.fspath(output) else f' {path}'
      raise ValueError(f'{output} {where} {what}{named}: an output never replaces an input, '
                       'even with --overwrite; give another output path')


class OutputWriteError(OSError):
  """Writing an output failed (disk full, folder gone, permissions); names the file."""


def _write_error(path: str, error: OSError) -> OutputWriteError:
  folder = os.path.dirname(path) or '.'
  reason = error.strerror or str(error)
  if error.errno in (errno.EEXIST, errno.ENOTDIR) and os.path.exists(folder) and (
      not os.path.isdir(folder)):
    reason = f'{folder} is a file, not a folder'
  result = OutputWriteError(f'cannot write {path}: {reason}')
  result.errno = error.errno
  return result


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Calls `write(file)` on a temporary file beside `path`, syncs it and renames it to `path`.

  A run killed at any point leaves the previous file or the whole new one, never a part
  under the final name (the temporary file is removed on errors). Creates the folder.

  Raises:
    OutputWriteError: "cannot write PATH: reason" (e.g. no space left on device).
  """
  path = os.fspath(path)
  folder = os.path.dirname(path) or '.'
  try:
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  except OSError as e:
    raise _write_error(path, e) from e
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())  # On disk before the rename: a crash cannot leave an empty file.
    os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files.
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    if isinstance(e, OSError) and not isinstance(e, OutputWriteError):
      raise _write_error(path, e) from e
    raise
  return path


def write_json(value: Any, path: str | os.PathLike) -> str:
  """Writes `value` as indented JSON atomically, NaN as null (a metric of an empty class)."""
  text = json.dumps(_nan_to_none(value), indent=2, allow_nan=False) + '\n'
  return write_atomically(path, lambda f: f.write(text.encode()))


def _nan_to_none(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _nan_to_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_nan_to_none(v) for v in value]
  return value


def file_sha256(path: str | os.PathLike) -> str:
  """The sha256 of a file's bytes, as hex."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def is_int(value: Any) -> bool:
  """Python and numpy integers; not bools, not floats such as 2.0."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def exit_with_parent(parent: int | None = None) -> None:
  """Ends this process as soon as the process `parent` (default: the current parent) has ended.

  A parent that the OOM killer, a preemption, a timeout or `kill -9` ends cannot stop its
  workers, which then ran on, holding cores or a GPU's memory; a worker sees its parent change.
  (Linux's PR_SET_PDEATHSIG would not do: it fires when the parent's thread ends, and Grain
  starts workers from threads.)
  """
  parent = os.getppid() if parent is None else parent

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, name='exit-with-parent', daemon=True).start()
