"""Output files of the tools: checked before the work, written atomically, traced to their input.

Checking and writing: `check_outputs` and `check_writable` fail at once, naming the path,
when an output cannot be written (or exists, for `check_outputs` without overwrite), so no
inference is lost to a late error. `write_atomically` (and `write_json`, `save_png` on it)
writes under a temporary name beside the destination, syncs it and renames it: a run killed
at any point leaves the previous file or the whole new one, never a part under the final
name. A failed write raises `cvt_backbone.tools.OutputWriteError` ("cannot write PATH: reason").

Provenance records: every output the tools write per input (segmentation masks and overlays,
detection pictures, feature files and their PCA pictures) carries a record of where it
came from, stored inside the file so that it is written by the same atomic rename:

  {'format': 1, 'tool': 'cvt_segmentation.predict',
   'input': {'path': '/abs/a.jpg', 'size': 51234, 'sha256': '...'},
   'settings': {...everything that changes the output: config, checkpoint and step or
                weights hash, inference flags...},
   'data': {...optional, e.g. the detections drawn in a picture}}

- PNG: a compressed text chunk (zTXt) keyed `RECORD_KEY`, before the image data.
- `.npz`: the zip archive's comment, a JSON object of metadata strings with `RECORD_KEY`
  among them (`np.load` ignores it; the arrays are unchanged).
- `.safetensors`: the `RECORD_KEY` entry of the header's `__metadata__`.
- `.json` (the evaluation reports): the object's `RECORD_KEY` entry.

`read_record` reads one back and also checks that the file is complete (a PNG ends with
its IEND chunk, a zip with its central directory, a safetensors file is as long as its
header says), so a truncated file never passes as done.

Reruns (`output_state`): without --overwrite, an input is skipped as "already done" when
every one of its outputs exists and records the same input content (size and sha256:
a file moved or renamed is still the same input) with the same tool and settings. An input
is written when none or only some of its outputs exist and those are its own. An output that
records another input, other settings, or has no readable record (a 0-byte or truncated
file left by an older version, any file the tools did not write) is a conflict: it is kept,
reported with what it is and what was expected, and the input counts as failed. The tools
cannot tell a damaged file of theirs from someone else's file, and they never replace a
file they did not write unless told: --overwrite replaces it (and redoes every input).

Exit status of the tools (segmentation and detection `predict` and `evaluate`,
`cvt-extract`): 0 when every input was done or skipped as already done; 1 when any input
failed (missing, unreadable, not an image, too small, an output conflict) or on an error
(bad config or checkpoint, unwritable output place, a write error), with one `error:` or
`failed`/`skipped` line per problem on stderr; 2 on bad arguments (argparse). The other
inputs are still done after a failed one; `--strict` (segmentation and detection predict, cvt-extract)
stops at the first failure instead, before any work when it can be found by checking.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

from cvt_backbone.tools import file_sha256, write_atomically

RECORD_KEY = 'cvt-dense provenance'
RECORD_FORMAT = 1
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the IEND chunk: length 0, type, CRC


class RecordError(ValueError):
  """An output file has no readable provenance record (the message says why)."""


# --- checking output places ----------------------------------------------------------------


def check_output_free(paths: Sequence[str], overwrite: bool) -> None:
  """Raises FileExistsError naming the existing `paths` unless `overwrite`."""
  existing = [p for p in paths if os.path.exists(p)]
  if existing and not overwrite:
    raise FileExistsError(
        f'output exists: {", ".join(existing)} (pass --overwrite to replace it)'
    )


def check_writable(paths: Sequence[str]) -> None:
  """Fails before any work unless files can be created at every path.

  A probe file is created and removed in the nearest existing folder of each path
  (folders are created only when writing).

  Raises:
    ValueError: a path is a folder.
    NotADirectoryError: a folder on a path is a file.
    PermissionError: a folder on a path cannot be written.
  """
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(f'output {path} is a folder; expected a file path')
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


def check_outputs(paths: Sequence[str], overwrite: bool) -> None:
  """Fails before any work unless every output path can be written.

  Args:
    paths: files the command will write.
    overwrite: whether existing files may be replaced.

  Raises:
    FileExistsError: a path exists and `overwrite` is False (`check_output_free`).
    ValueError: two outputs are the same file, or a path is a folder.
    NotADirectoryError, PermissionError: see `check_writable`.
  """
  real = [os.path.realpath(p) for p in paths]
  if len(set(real)) != len(real):
    raise ValueError(f'output paths must differ, got {list(paths)}')
  for path in paths:
    if os.path.isdir(path):
      raise ValueError(f'output {path} is a folder; expected a file path')
  check_output_free(paths, overwrite)
  check_writable(paths)


# --- writing -------------------------------------------------------------------------------


def write_json(value: Any, path: str | os.PathLike,
               record: Mapping[str, Any] | None = None) -> str:
  """Writes `value` as indented JSON atomically (`write_atomically`).

  NaN floats (COCO's "no ground truth in this range") are written as null: JSON has no NaN.
  A `record` is stored as the object's `RECORD_KEY` entry (`value` must be a dict then).
  """
  if record is not None:
    if not isinstance(value, Mapping):
      raise TypeError(f'a record needs a JSON object, got {type(value).__name__}')
    value = {**value, RECORD_KEY: dict(record)}
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


def save_png(image: Any, path: str | os.PathLike, record: Mapping[str, Any] | None = None) -> str:
  """Saves a PIL image as PNG atomically, with `record` in a text chunk when given."""
  from PIL import PngImagePlugin

  info = None
  if record is not None:
    info = PngImagePlugin.PngInfo()
    info.add_text(RECORD_KEY, encode_record(record), zip=True)
  return write_atomically(path, lambda f: image.save(f, format='PNG', pnginfo=info))


# --- provenance records ----------------------------------------------------------------------


def describe_input(path: str | os.PathLike) -> dict[str, Any]:
  """`{'path': absolute path, 'size': bytes, 'sha256': hex}` of an input file.

  Raises:
    OSError: the file cannot be read.
  """
  return {'path': os.path.abspath(path), 'size': os.path.getsize(path),
          'sha256': file_sha256(path)}


def make_record(tool: str, source: Mapping[str, Any], settings: Mapping[str, Any],
                data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """A provenance record (see the module docstring), normalised as JSON reads it back.

  Args:
    tool: the writing tool, e.g. 'cvt_segmentation.predict'.
    source: `describe_input` of the input.
    settings: what changes the output (JSON-serialisable; tuples become lists).
    data: optional payload kept with the output and not compared.
  """
  record = {'format': RECORD_FORMAT, 'tool': tool, 'input': dict(source),
            'settings': dict(settings)}
  if data is not None:
    record['data'] = dict(data)
  return json.loads(encode_record(record))


def encode_record(record: Mapping[str, Any]) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'), allow_nan=False)


def config_identity(spec: str) -> str:
  """`path/to/config.py[:arg]` with the path made absolute (the config a record names)."""
  path, sep, arg = spec.partition(':')
  return os.path.abspath(path) + sep + arg


def _describe_size(size: int) -> str:
  return 'empty file (0 bytes)' if size == 0 else f'{size:,} bytes'


def _png_record(path: str, size: int) -> str | None:
  from PIL import Image

  with open(path, 'rb') as f:
    if f.read(8) != b'\x89PNG\r\n\x1a\n':
      raise RecordError(f'not a PNG file ({_describe_size(size)})')
    f.seek(max(0, size - len(_PNG_END)))
    if f.read() != _PNG_END:
      raise RecordError(f'incomplete PNG file ({_describe_size(size)}, no IEND chunk at the end)')
  try:
    with Image.open(path) as im:
      return im.info.get(RECORD_KEY)
  except (OSError, SyntaxError, ValueError) as e:
    raise RecordError(f'unreadable PNG file ({e})') from None


def _npz_record(path: str, size: int) -> str | None:
  try:
    with zipfile.ZipFile(path) as archive:
      comment = archive.comment
  except (zipfile.BadZipFile, OSError) as e:
    raise RecordError(f'incomplete or unreadable .npz file ({_describe_size(size)}: {e})') from None
  if not comment:
    return None
  try:
    return json.loads(comment.decode()).get(RECORD_KEY)
  except (ValueError, AttributeError):
    return None


def _safetensors_record(path: str, size: int) -> str | None:
  try:
    with open(path, 'rb') as f:
      (length,) = struct.unpack('<Q', f.read(8))
      if length > size:
        raise ValueError(f'a header of {length:,} bytes')
      header = json.loads(f.read(length))
    end = max((int(v['data_offsets'][1]) for k, v in header.items() if k != '__metadata__'),
              default=0)
  except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
    raise RecordError(f'incomplete or unreadable safetensors file ({_describe_size(size)}: '
                      f'{e})') from None
  if size != 8 + length + end:
    raise RecordError(f'incomplete safetensors file ({size:,} bytes; its header describes '
                      f'{8 + length + end:,})')
  return (header.get('__metadata__') or {}).get(RECORD_KEY)


def _json_record(path: str, size: int) -> str | None:
  try:
    with open(path, 'rb') as f:
      value = json.loads(f.read())
  except ValueError as e:
    raise RecordError(f'incomplete or unreadable JSON file ({_describe_size(size)}: {e})'
                      ) from None
  if not isinstance(value, dict) or RECORD_KEY not in value:
    return None
  return encode_record(value[RECORD_KEY])


_READERS = {'.json': _json_record, '.png': _png_record, '.npz': _npz_record, '.safetensors': _safetensors_record}


def read_record(path: str | os.PathLike) -> dict[str, Any]:
  """The provenance record of an output file written by the tools.

  Raises:
    RecordError: the file is empty, incomplete, unreadable, of an unknown kind, or has no
      record (written by an older version or by something else); the message says which.
  """
  path = os.fspath(path)
  reader = _READERS.get(os.path.splitext(path)[1].lower())
  if reader is None:
    raise RecordError(f'no provenance record in {os.path.splitext(path)[1] or "such"} files')
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise RecordError(f'unreadable ({e.strerror or e})') from None
  if size == 0:
    raise RecordError('empty file (0 bytes), not written by this version')
  try:
    text = reader(path, size)
  except OSError as e:
    raise RecordError(f'unreadable ({e.strerror or e})') from None
  if text is None:
    raise RecordError('no provenance record (not written by this version of the tools)')
  try:
    record = json.loads(text)
    if not isinstance(record['input']['sha256'], str) or not isinstance(record['settings'], dict):
      raise TypeError('unexpected record fields')
  except (ValueError, KeyError, TypeError) as e:
    raise RecordError(f'unreadable provenance record ({e})') from None
  return record


@dataclasses.dataclass(frozen=True)
class OutputState:
  """What to do with one input, given the outputs that already exist.

  Attributes:
    status: 'todo' (write its outputs), 'done' (every output exists and records this input
      and settings: skip) or 'conflict' (an output is not this input's: keep it, fail).
    message: for a conflict, one line naming the output, what it records and what was
      expected, ending with the --overwrite hint.
    records: the records read from existing outputs (by path), e.g. for data kept in them.
  """

  status: str
  message: str = ''
  records: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def _short(record: Mapping[str, Any]) -> str:
  source = record.get('input', {})
  return f'{source.get("path")} (sha256 {str(source.get("sha256"))[:12]}...)'


def _mismatch(path: str, found: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
  """Why `found` is not the record `expected` at `path`, or None when it is the same."""
  a, b = found.get('input', {}), expected['input']
  if (a.get('sha256'), a.get('size')) != (b['sha256'], b['size']):
    return f'{path} belongs to {_short(found)}, not to {_short(expected)}'
  keys = sorted(k for k in set(found['settings']) | set(expected['settings'])
                if found['settings'].get(k) != expected['settings'].get(k))
  if found.get('tool') != expected['tool']:
    keys.insert(0, f'made by {found.get("tool")}')
  if keys:
    return f'{path} was made from {b["path"]} with other settings ({", ".join(keys)})'
  return None


def output_state(outputs: Mapping[str, Mapping[str, Any]], overwrite: bool) -> OutputState:
  """Decides whether an input is to be written, already done, or in conflict (module doc).

  Args:
    outputs: `{output path: the record it would get}` for one input.
    overwrite: replace existing outputs whatever they record.
  """
  folders = [p for p in outputs if os.path.isdir(p)]
  if folders:
    return OutputState('conflict', f'{folders[0]} is a folder; expected a file path')
  present = [p for p in outputs if os.path.lexists(p)]
  if overwrite or not present:
    return OutputState('todo')
  problems, records = [], {}
  for path in present:
    try:
      records[path] = read_record(path)
    except RecordError as e:
      problems.append(f'{path}: {e}')
      continue
    problem = _mismatch(path, records[path], outputs[path])
    if problem:
      problems.append(problem)
  if problems:
    more = f' (and {len(problems) - 1} more output{"s" * (len(problems) > 2)})' if (
        len(problems) > 1) else ''
    return OutputState('conflict', f'{problems[0]}{more}; pass --overwrite to replace it',
                       records)
  return OutputState('done' if len(present) == len(outputs) else 'todo', '', records)
