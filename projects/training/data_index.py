"""Facts about dataset files (image sizes, mask label values), cached across runs.

Keyed by each file's path, size and `st_mtime_ns`, so a second run re-reads only changed or
new files (ns mtimes on ext4, xfs, tmpfs). A folder's index is
`$XDG_CACHE_HOME/cvt-dense/index/<name>-<hash>.json` (default `~/.cache`), never inside the
dataset folder (often shared or read-only); written atomically, and rebuilt when unreadable.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from cvt_backbone.tools import write_atomically

logger = logging.getLogger(__name__)

# How thoroughly a dataset is checked when built (`dataset_configs.validate`): 'full' also
# decodes what only pixels can tell (truncated or damaged images, segmentation masks' label
# values; once, then cached); 'headers' reads file headers only (existence, sizes, modes);
# 'none' checks what listing the files already tells (pairs, existence).
VALIDATE_MODES = ('full', 'headers', 'none')


def check_validate(mode: str) -> str:
  """`mode` if it is one of `VALIDATE_MODES`, else a ValueError naming them."""
  if mode not in VALIDATE_MODES:
    raise ValueError(f'validate must be one of {VALIDATE_MODES}, got {mode!r}')
  return mode
_FORMAT = 'cvt-dense file index'
_VERSION = 1


def cache_dir() -> str:
  """The user cache folder of cvt-dense: `$XDG_CACHE_HOME/cvt-dense` or `~/.cache/cvt-dense`."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'cvt-dense')


def index_path(folder: str) -> str:
  """The index file of `folder` in the user cache (module docstring)."""
  real = os.path.realpath(folder)
  digest = hashlib.sha1(real.encode()).hexdigest()[:16]
  name = f'{os.path.basename(real) or "root"}-{digest}.json'
  return os.path.join(cache_dir(), 'index', name)


def read_header(path: str, decode: bool = False) -> dict:
  """`{'height', 'width', 'mode'}` of an image file from its header; with `decode` every pixel
  is decoded too (a truncated or damaged file raises) and the facts say `'decoded': True`."""
  from PIL import Image

  with Image.open(path) as im:
    facts = {'height': im.height, 'width': im.width, 'mode': im.mode}
    if decode:
      im.load()
      facts['decoded'] = True
  return facts


def describe_error(what: str, path: str, error: Exception) -> str:
  """'<what> <path> does not exist' or 'cannot read <what> <path>: <reason>'."""
  if isinstance(error, FileNotFoundError):
    return f'{what} {path} does not exist'
  reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
  return f'cannot read {what} {path}: {reason}'


def _read_entries(path: str) -> dict[str, dict]:
  """The entries of the index file `path`; {} if it is missing or not a valid index."""
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    logger.warning('Ignoring the unreadable dataset index %s (%s); it will be rebuilt.', path, e)
    return {}
  files = data.get('files') if isinstance(data, dict) else None
  if (not isinstance(files, dict) or data.get('format') != _FORMAT
      or data.get('version') != _VERSION):
    logger.warning('Ignoring %s: not a version %d %s; it will be rebuilt.', path, _VERSION,
                   _FORMAT)
    return {}
  return {k: v for k, v in files.items()
          if isinstance(v, dict) and isinstance(v.get('info'), dict)}


class FileIndex:
  """Per-file facts of the files under `folder`, valid while a file's size and mtime hold."""

  def __init__(self, folder: str):
    self.folder = os.path.abspath(folder)
    self.path = index_path(self.folder)
    self._entries = _read_entries(self.path)
    self._changed: dict[str, dict] = {}

  def _key(self, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), self.folder)

  def lookup(self, path: str, stat: os.stat_result) -> dict | None:
    """The facts stored for `path` if its size and mtime are those in `stat`, else None."""
    entry = self._entries.get(self._key(path))
    if entry and entry.get('size') == stat.st_size and entry.get('mtime_ns') == stat.st_mtime_ns:
      return entry['info']
    return None

  def store(self, path: str, stat: os.stat_result, info: dict) -> None:
    """Records `info` (JSON-serialisable) for `path` as it is in `stat`."""
    entry = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns, 'info': info}
    self._entries[self._key(path)] = entry
    self._changed[self._key(path)] = entry

  def save(self) -> str | None:
    """Writes the new facts merged into the index on disk (keeping other processes'
    entries); returns the file written, or None. A failure only costs a rescan: logged."""
    if not self._changed:
      return None
    target = self.path
    files = {**_read_entries(target), **self._changed}
    text = json.dumps({'format': _FORMAT, 'version': _VERSION, 'files': files},
                      separators=(',', ':'))
    try:
      write_atomically(target, lambda f: f.write(text.encode()))
    except OSError as e:
      logger.warning('Could not write the dataset index %s (%s); the next run checks the '
                     'files again.', target, e)
      return None
    self._changed = {}
    return target


def probe_files(index: FileIndex, paths: Sequence[str], probe: Callable[[str], dict],
                usable: Callable[[dict], bool] = lambda info: True,
                num_threads: int | None = None) -> list[dict | Exception]:
  """Per path, `probe(path)` (JSON-able facts) or the exception it raised, from `index` where
  cached facts are valid and `usable`; probed in a thread pool (PIL and numpy release the
  GIL). New facts are stored in `index`, not saved."""
  results: list[Any] = [None] * len(paths)
  todo = []
  for k, path in enumerate(paths):
    try:
      stat = os.stat(path)
    except OSError as e:
      results[k] = e
      continue
    cached = index.lookup(path, stat)
    if cached is not None and usable(cached):
      results[k] = cached
    else:
      todo.append((k, path, stat))
  if not todo:
    return results
  if len(todo) > 100:
    logger.info('Checking %d files under %s (once: the results are cached in %s).',
                len(todo), index.folder, index.path)

  def run(item: tuple[int, str, os.stat_result]) -> tuple[int, Any]:
    k, path, stat = item
    try:
      info = probe(path)
    except Exception as e:  # noqa: BLE001 - reported with the file by the caller
      return k, e
    index.store(path, stat, info)
    return k, info

  workers = num_threads or min(32, (os.cpu_count() or 1) + 4)
  if len(todo) == 1 or workers <= 1:
    done = map(run, todo)
  else:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      done = list(pool.map(run, todo))
  for k, value in done:
    results[k] = value
  return results


def probe_images(index: FileIndex, paths: Sequence[str], mode: str,
                 num_threads: int | None = None) -> list[dict | Exception]:
  """`probe_files` with `read_header`, decoding every image in `mode` 'full'.

  The decode finds what a header hides (a file cut short by a copy); it costs about 1 ms per
  640x480 JPEG and 40 ms per 2048x1024 PNG on one core, once: the facts are cached.
  """
  if mode == 'full':
    return probe_files(index, paths, functools.partial(read_header, decode=True),
                       lambda info: info.get('decoded', False), num_threads)
  return probe_files(index, paths, read_header, num_threads=num_threads)

