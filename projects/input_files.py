"""Expanding command-line inputs (files, folders, glob patterns) into files, for the CLIs."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

_GLOB_CHARS = ('*', '?', '[')


def expand_inputs(inputs: Sequence[str],
                  exclude_dir: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
  """Files named by `inputs`, each with the output stem it would have.

  Folders are walked recursively (hidden files and folders skipped) and their files keep
  their relative sub-folder in the stem (`folder/a/b.png` -> `a/b`); a file named directly
  or matched by a pattern keeps its base name. Files are not opened here. Stems may clash:
  callers decide how to make them unique.

  Args:
    inputs: paths, folders and glob patterns (`**` for recursion).
    exclude_dir: files under this folder are skipped (the output folder).

  Returns:
    `(files, problems)`: `(path, stem)` in input order without duplicate files, and one
    message per path that does not exist or pattern that matches nothing.
  """
  problems: list[str] = []
  found: list[tuple[str, str]] = []
  exclude = os.path.join(os.path.realpath(exclude_dir), '') if exclude_dir else None

  def add_folder(folder: str) -> None:
    for dirpath, dirnames, filenames in os.walk(folder):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for name in sorted(f for f in filenames if not f.startswith('.')):
        path = os.path.join(dirpath, name)
        found.append((path, os.path.splitext(os.path.relpath(path, folder))[0]))

  def add_file(path: str) -> None:
    found.append((path, os.path.splitext(os.path.basename(path))[0]))

  for item in inputs:
    if os.path.isdir(item):
      add_folder(item)
    elif os.path.isfile(item):
      add_file(item)
    elif any(c in item for c in _GLOB_CHARS):
      matches = sorted(glob.glob(item, recursive=True))
      if not matches:
        problems.append(f'{item}: no file matches this pattern')
      for path in matches:
        if os.path.isdir(path):
          add_folder(path)
        elif os.path.isfile(path):
          add_file(path)
    else:
      problems.append(f'{item}: no such file or folder')

  files, seen = [], set()
  for path, stem in found:
    real = os.path.realpath(path)
    if real in seen or (exclude and real.startswith(exclude)):
      continue
    seen.add(real)
    files.append((path, stem))
  return files, problems
