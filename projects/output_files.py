"""Output files of the tools: checked before the work, written atomically.

`check_output_free` and `check_outputs` fail at once, naming the path, when an output
exists (without overwrite) or cannot be written, so no inference is lost to a late error;
`write_atomically` (and `write_json` on it) writes under a temporary name and renames.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO


def check_output_free(paths: Sequence[str], overwrite: bool) -> None:
  """Raises FileExistsError naming the existing `paths` unless `overwrite`."""
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(
        f'output exists: {", ".join(existing)} (pass --overwrite to replace it)'
    )


def check_outputs(paths: Sequence[str], overwrite: bool) -> None:
  """Fails before any work unless every output path can be written.

  Args:
    paths: files the command will write.
    overwrite: whether existing files may be replaced.

  Raises:
    FileExistsError: a path exists and `overwrite` is False (`check_output_free`).
    ValueError: two outputs are the same file, or a path is a folder.
    NotADirectoryError: a folder on a path is a file.
    PermissionError: a folder on a path cannot be written (a probe file is created and
      removed in the nearest existing folder; folders are created only when writing).
  """
  real = [os.path.realpath(p) for p in paths]
  if len(set(real)) != len(real):
    raise ValueError(f'output paths must differ, got {list(paths)}')
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(f'output {path} is a folder; expected a file path')
  check_output_free(paths, overwrite)
  for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in paths):
    existing = folder
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise NotADirectoryError(f'cannot write to {folder}: {existing} is a file, not a folder')
    try:
      fd, probe = tempfile.mkstemp(dir=existing, prefix='.write_check.')
    except OSError as e:
      raise PermissionError(f'cannot write to {folder}: {e.strerror or e}') from None
    os.close(fd)
    os.unlink(probe)


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
  """Calls `write(file)` on a temporary file beside `path`, then renames it to `path`.

  A run killed at any point leaves either the previous file or the whole new one, never a
  half-written file under the final name (the temporary one is removed on errors). The
  folder is created if needed.

  Returns:
    `path` as a string.
  """
  path = os.fspath(path)
  folder = os.path.dirname(path) or '.'
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are ordinary files.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return path


def write_json(value: Any, path: str | os.PathLike) -> str:
  """Writes `value` as indented JSON atomically (`write_atomically`).

  NaN floats (COCO's "no ground truth in this range") are written as null: JSON has no NaN.
  """
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
