"""Output files of the tools: checked before the work, written atomically, with their records.

Every output the tools write carries a provenance record of its input and settings, stored
inside the file (a PNG text chunk, the `.npz` zip comment, the safetensors header, a JSON
report's `RECORD_KEY` entry) so that one atomic rename writes both. The README's "Existing
outputs" is the policy `output_state`, `plan_inputs` and `report_state` apply: the same input
and settings are already done; another input, other settings or no readable record is a
conflict, kept until --overwrite. An output that is one of the tool's inputs is refused
whatever the flags (`check_apart`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cvt_backbone import tools
from cvt_backbone.tools import check_apart, file_sha256, write_atomically

RECORD_KEY = 'cvt-dense provenance'
RECORD_FORMAT = 1
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the IEND chunk: length 0, type, CRC


class RecordError(ValueError):
  """An output file has no readable provenance record (the message says why)."""


# --- checking output places ----------------------------------------------------------------


def check_writable(paths: Sequence[str]) -> None:
  """Fails before any work unless files can be created at every path (a probe file is
  made and removed in the nearest existing folder; folders are created only when writing).

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


# --- writing -------------------------------------------------------------------------------


def write_json(value: Any, path: str | os.PathLike,
               record: Mapping[str, Any] | None = None) -> str:
  """Writes `value` as indented JSON atomically, NaN as null, `record` as its `RECORD_KEY`."""
  if record is not None:
    if not isinstance(value, Mapping):
      raise TypeError(f'a record needs a JSON object, got {type(value).__name__}')
    value = {**value, RECORD_KEY: dict(record)}
  return tools.write_json(value, path)


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
  """`{'path': absolute path, 'size': bytes, 'sha256': hex}` of an input file (OSError if
  unreadable)."""
  return {'path': os.path.abspath(path), 'size': os.path.getsize(path),
          'sha256': file_sha256(path)}


def make_record(tool: str, source: Mapping[str, Any], settings: Mapping[str, Any],
                data: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """`{'format', 'tool', 'input': source, 'settings', 'data'}` as JSON reads it back.

  `settings` are what change the output (compared on reruns); `data` is kept, not compared.
  """
  record = {'format': RECORD_FORMAT, 'tool': tool, 'input': dict(source),
            'settings': dict(settings)}
  if data is not None:
    record['data'] = dict(data)
  return json.loads(encode_record(record))


def encode_record(record: Mapping[str, Any]) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'), allow_nan=False)


def model_settings(config_spec: str | None, checkpoint: str) -> dict[str, Any]:
  """The model an output comes from: the config (`path.py[:arg]`, the path made absolute)
  and the checkpoint (its folder and step, so a workdir and its checkpoints folder agree)."""
  from projects.training import checkpoints

  config = None
  if config_spec:
    path, sep, arg = config_spec.partition(':')
    config = os.path.abspath(path) + sep + arg
  return {'config': config, 'checkpoint': checkpoints.identity(checkpoint)}


def model_inputs(config_spec: str | None, checkpoint: str) -> dict[str, str]:
  """What the trained-model tools read, as `check_apart` takes it: the config file and the
  checkpoints folder (`WORKDIR/checkpoints`; reports go beside it)."""
  from projects.training import checkpoints

  inputs = {config_spec.partition(':')[0]: 'the config file'} if config_spec else {}
  folder, _ = checkpoints.locate(checkpoint)
  if folder.name == 'checkpoints':
    inputs[str(folder)] = 'the checkpoints folder'
  return inputs


def report_path(checkpoint: str, tag: str, suffix: str = '.json') -> str:
  """`WORKDIR/eval_<tag>[_step<S>]<suffix>` of an evaluation report, S the step evaluated.

  `checkpoint` is a workdir, its checkpoints folder (the latest step) or a step folder; the
  step in the name makes a later checkpoint's evaluation a new report, not a conflict.
  """
  from projects.training import checkpoints

  path = pathlib.Path(checkpoint).absolute()
  if path.name.isdigit() and path.parent.name == 'checkpoints':  # a step folder, even unfinished
    folder, step = path.parent, path.name
  else:
    folder, step = checkpoints.locate(path)
  if folder.name == 'checkpoints':
    folder = folder.parent
  return os.path.join(folder, f'eval_{tag}{"" if step is None else f"_step{step}"}{suffix}')


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


_READERS = {'.json': _json_record, '.png': _png_record, '.npz': _npz_record,
            '.safetensors': _safetensors_record}


def read_record(path: str | os.PathLike) -> dict[str, Any]:
  """The provenance record of an output file, which must be complete (a PNG ends with IEND,
  a zip with its directory, a safetensors file is as long as its header says).

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


# --- the policy: already done, conflict, overwrite -------------------------------------------


@dataclasses.dataclass(frozen=True)
class OutputState:
  """'todo', 'done' (skip) or 'conflict' (keep the outputs, fail with `message`), and the
  records read from existing outputs."""

  status: str
  message: str = ''
  records: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


def _short(record: Mapping[str, Any]) -> str:
  source = record.get('input', {})
  return f'{source.get("path")} (sha256 {str(source.get("sha256"))[:12]}...)'


def _flat(value: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(value, Mapping):
    return {prefix[:-1]: value}
  return {k: v for key, item in value.items() for k, v in _flat(item, f'{prefix}{key}.').items()}


def _short_json(value: Any, limit: int = 100) -> str:
  """`value` as JSON, its middle cut out when long (the ends of paths tell them apart)."""
  text = json.dumps(value)
  half = (limit - 3) // 2
  return text if len(text) <= limit else f'{text[:half]}...{text[-half:]}'


def _mismatch(path: str, found: Mapping[str, Any], expected: Mapping[str, Any],
              values: bool) -> str | None:
  """Why `found` is not the record `expected` at `path`, or None when it is the same.

  With `values`, settings that differ are named with the value found and this run's.
  """
  a, b = found.get('input', {}), expected['input']
  if (a.get('sha256'), a.get('size')) != (b['sha256'], b['size']):
    return f'{path} belongs to {_short(found)}, not to {_short(expected)}'
  if values and found.get('tool') == expected['tool']:
    old, new = _flat(found['settings']), _flat(expected['settings'])
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if keys:
      return f'{path} holds another evaluation of {b["path"]}: ' + ', '.join(
          f'{k} {_short_json(old.get(k))} (this run: {_short_json(new.get(k))})' for k in keys)
    return None
  keys = sorted(k for k in set(found['settings']) | set(expected['settings'])
                if found['settings'].get(k) != expected['settings'].get(k))
  if found.get('tool') != expected['tool']:
    keys.insert(0, f'made by {found.get("tool")}')
  if keys:
    return f'{path} was made from {b["path"]} with other settings ({", ".join(keys)})'
  return None


def _conflict(message: str, records: Mapping[str, Any] | None = None) -> OutputState:
  return OutputState('conflict', f'{message}; pass --overwrite to replace it', records or {})


def output_state(outputs: Mapping[str, Mapping[str, Any]], overwrite: bool, *,
                 values: bool = False) -> OutputState:
  """Whether one input, `{output path: the record it would get}`, is to be written, done, or
  in conflict; `values` names differing settings with their values."""
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
    problem = _mismatch(path, records[path], outputs[path], values)
    if problem:
      problems.append(problem)
  if problems:
    more = f' (and {len(problems) - 1} more output{"s" * (len(problems) > 2)})' if (
        len(problems) > 1) else ''
    return _conflict(f'{problems[0]}{more}', records)
  return OutputState('done' if len(present) == len(outputs) else 'todo', '', records)


def report_state(path: str, record: Mapping[str, Any], overwrite: bool, *,
                 results: str | None = None, values: bool = False) -> OutputState:
  """`output_state` of an evaluation report, and of its `results` file if it has one.

  A results file (COCO's bare list) has no record of its own: the report's record keeps its
  size and sha256 under `data['results']`. It must be that file; without its report it
  cannot be told from another evaluation's (a conflict); a finished evaluation whose
  results file is gone is done again.
  """
  if overwrite:
    return OutputState('todo')
  if results is not None and os.path.isdir(results):
    return OutputState('conflict', f'{results} is a folder; expected a file path')
  state = output_state({path: record}, False, values=values)
  if results is None or state.status == 'conflict':
    return state
  if state.status == 'todo':  # no report
    if os.path.lexists(results):
      return _conflict(f'{results} exists without its metrics file {path} (a COCO results file '
                       "has no record of its own: it may be another evaluation's)")
    return state
  if not os.path.lexists(results):
    return OutputState('todo', '', state.records)
  stored = (state.records[path].get('data') or {}).get('results') or {}
  try:
    found = describe_input(results)
  except OSError as e:
    return _conflict(f'{results} cannot be read ({e.strerror or e})')
  if (found['size'], found['sha256']) != (stored.get('size'), stored.get('sha256')):
    return _conflict(
        f'{results} is not the results file {path} records ({found["size"]:,} bytes, sha256 '
        f'{found["sha256"][:12]}...; expected {stored.get("size") or 0:,} bytes, sha256 '
        f'{str(stored.get("sha256"))[:12]}...)')
  return state


@dataclasses.dataclass(frozen=True)
class Planned:
  """An input to do or already done, with the record each of its outputs gets."""

  item: Any
  records: dict[str, dict[str, Any]]
  state: OutputState


def plan_inputs(items: Iterable[Any], outputs: Callable[[Any], Mapping[str, Mapping[str, Any]]],
                tool: str, overwrite: bool, fail: Callable[[str], None], *,
                check: Callable[[str], None] | None = None,
                say: Callable[[str], None] | None = None,
                inputs: Mapping[str, str] | None = None) -> tuple[list[Planned], list[Planned]]:
  """`(todo, done)` of the tools of many inputs (`items` with a `.path`), before any work.

  `outputs(item)` gives `{output path: settings}`. An output that is an item or one of the
  other `inputs` (`check_apart`) is a ValueError. An input that cannot be read (an
  OSError, or `check` raised a ValueError naming it) or whose outputs are in conflict goes
  to `fail`; `say` prints the "already done" lines (default stderr).
  """
  planned = [(item, outputs(item)) for item in items]
  check_apart((path for _, paths in planned for path in paths),
              {**{item.path: 'the input' for item, _ in planned}, **(inputs or {})})
  todo, done = [], []
  for item, paths in planned:
    try:
      if check is not None:
        check(item.path)
      source = describe_input(item.path)
    except OSError as e:
      fail(f'{item.path}: cannot read ({e.strerror or e})')
      continue
    except ValueError as e:
      fail(str(e))
      continue
    records = {path: make_record(tool, source, settings) for path, settings in paths.items()}
    state = output_state(records, overwrite)
    if state.status == 'conflict':
      fail(f'{item.path}: {state.message}')
    elif state.status == 'done':
      line = f'{item.path}: already done ({next(iter(records))})'
      print(line, file=sys.stderr) if say is None else say(line)
      done.append(Planned(item, records, state))
    else:
      todo.append(Planned(item, records, state))
  return todo, done
