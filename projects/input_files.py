"""Input files of the tools and datasets: expanding command-line inputs, reading images.

`expand_inputs` / `collect_inputs` turn files, folders and glob patterns into input files
with unique output stems; `read_image` reads a photo as a viewer shows it (EXIF orientation
applied), `read_stored_image` a dataset image as stored (annotations refer to those pixels).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One input file and the output name stem (relative to the output folder)."""

  path: str
  stem: str


class PredictError(Exception):
  """A problem with an input or output that --strict turns into a failure."""


def collect_inputs(
    inputs: Sequence[str], exclude_dir: str | None = None
) -> tuple[list[InputImage], list[str]]:
  """Expands files, folders and globs into input files with unique output stems.

  Folders are walked recursively (hidden files and folders skipped) and their files keep
  their relative sub-folder in the stem; a file given directly (or matched by a glob)
  keeps its base name. Files are not opened here: non-images are found when read. Stems
  that clash (`a.jpg` and `a.png`) get their extension appended (`a_png`).

  Args:
    inputs: paths, folders and glob patterns.
    exclude_dir: skip files under this folder (the output folder).

  Returns:
    `(images, problems)`: the inputs in order, without duplicates, and one message per
    path that does not exist or pattern that matches nothing.
  """
  found, problems = expand_inputs(inputs, exclude_dir)
  images, stems = [], set()
  for path, stem in found:
    if stem in stems:
      stem = f'{stem}_{os.path.splitext(path)[1].lstrip(".").lower() or "file"}'
    base, k = stem, 2
    while stem in stems:
      stem, k = f'{base}_{k}', k + 1
    stems.add(stem)
    images.append(InputImage(path, stem))
  return images, problems


def read_image(path: str) -> np.ndarray:
  """Reads an image file as uint8 RGB `[H, W, 3]`, applying its EXIF orientation.

  OpenCV's `imread` (mmcv's reader) applies the EXIF orientation too, so the mask lines up
  with the image as viewers show it.

  Raises:
    PredictError: the file is not an image PIL can read.
  """
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert('RGB'))
  except UnidentifiedImageError:
    raise PredictError(f'{path}: not an image file') from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise PredictError(f'{path}: unreadable image ({e})') from None


def check_image_header(path: str) -> None:
  """Raises `PredictError` unless PIL recognises `path` as an image (reads the header only)."""
  try:
    with Image.open(path):
      pass
  except UnidentifiedImageError:
    raise PredictError(f'{path}: not an image file') from None
  except OSError as e:
    raise PredictError(f'{path}: unreadable image ({e})') from None


def read_stored_image(path: str) -> np.ndarray:
  """Reads a dataset image as uint8 RGB `[H, W, 3]` in its stored pixel order.

  No EXIF orientation is applied: dataset annotations (masks, COCO boxes and sizes) refer to
  the stored pixels.
  """
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))
