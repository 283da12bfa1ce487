"""Command-line inputs of the tools: files, folders and glob patterns, each with an output stem."""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from collections.abc import Callable, Sequence

_GLOB_CHARS = ('*', '?', '[')


class PredictError(Exception):
  """A problem with an input or output that --strict turns into a failure."""


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One input file and its output stem (a path relative to the output folder, no suffix)."""

  path: str
  stem: str


def expand_inputs(inputs: Sequence[str],
                  exclude_dir: str | None = None) -> tuple[list[tuple[str, str]], list[str]]:
  """`(path, stem)` of the files `inputs` name, and one problem per path that names none.

  Folders are walked recursively (hidden entries skipped) and their files keep their
  sub-folder in the stem (`folder/a/b.png` -> `a/b`); a file named directly or by a pattern
  keeps its base name. Duplicate files and files under `exclude_dir` (the output folder)
  are left out; stems may clash.
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

  def add(path: str) -> None:
    if os.path.isdir(path):
      add_folder(path)
    elif os.path.isfile(path):
      found.append((path, os.path.splitext(os.path.basename(path))[0]))

  for item in inputs:
    if os.path.isdir(item) or os.path.isfile(item):
      add(item)
    elif any(c in item for c in _GLOB_CHARS):
      matches = sorted(glob.glob(item, recursive=True))
      if not matches:
        problems.append(f'{item}: no file matches this pattern')
      for path in matches:
        add(path)
    elif re.fullmatch(r'[0-9.]+', item):
      # `--crop-size 512 1024`: argparse hands the second number on as an input.
      problems.append(f'{item}: no such file or folder (a number: lists of numbers are '
                      f'written with commas, such as --crop-size 512,1024)')
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


def collect_inputs(
    inputs: Sequence[str], exclude_dir: str | None = None,
    fail: Callable[[str], None] | None = None, *, notes: list[str] | None = None,
) -> tuple[list[InputImage], list[str]]:
  """`(inputs, problems)` of `expand_inputs`, with unique stems.

  A clash (`a.jpg`, `a.png`) gets the extension (`a_png`); with `notes` (cvt-extract's
  way) stems are compared case-insensitively, numbered `_2`, `_3`, ... and each renaming
  noted. With `fail`, each problem is passed to it, and no input at all is a `PredictError`.
  """
  found, problems = expand_inputs(inputs, exclude_dir)
  for message in problems if fail is not None else ():
    fail(message)
  if fail is not None and not found:
    raise PredictError('no input files found')
  key = str.casefold if notes is not None else str
  images, taken = [], {}  # key(stem) -> the path that has it
  for path, stem in found:
    unique = stem
    if notes is None and unique in taken:
      unique = f'{stem}_{os.path.splitext(path)[1].lstrip(".").lower() or "file"}'
    base, k = unique, 2
    while key(unique) in taken:
      unique, k = f'{base}_{k}', k + 1
    if notes is not None and unique != stem:
      notes.append(f'{path} and {taken[key(stem)]} share the output name {stem!r}; '
                   f'writing {path} as {unique!r}')
    taken[key(unique)] = path
    images.append(InputImage(path, unique))
  return images, problems
