"""Released weight files read into `{name: numpy array}` without PyTorch, by their first bytes.

`.safetensors` (Hugging Face): an 8-byte little-endian header length, a JSON header, raw
buffers. `torch.save` zips (official `.pth`, `pytorch_model.bin`): `data.pkl` read by an
unpickler that only rebuilds tensors, storages and dicts (no code from the file runs), one
record per storage. Legacy non-zip pickles need torch (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import collections
import importlib
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from cvt_backbone.weights.convert import CheckpointError

# safetensors dtype names (safetensors/src/tensor.rs); bfloat16 and float8 from ml_dtypes,
# which jax.numpy re-exports.
_SAFETENSORS_DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': jnp.bfloat16,
    'F8_E4M3': jnp.float8_e4m3fn, 'F8_E5M2': jnp.float8_e5m2,
    'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
    'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16, 'U8': np.uint8, 'BOOL': np.bool_,
}

# torch storage classes (torch/storage.py `_pickle_storage_type`) and dtypes by name.
_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': jnp.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}
_TORCH_DTYPES = {
    'float64': np.float64, 'float32': np.float32, 'float16': np.float16,
    'bfloat16': jnp.bfloat16, 'int64': np.int64, 'int32': np.int32, 'int16': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'bool': np.bool_,
}

_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = 0x80
# Files often taken for weights files: NumPy arrays, HDF5 (Keras, TensorFlow .h5).
_NPY_MAGIC = b'\x93NUMPY'
_HDF5_MAGIC = b'\x89HDF\r\n\x1a\n'
_TEXT_BYTES = frozenset(range(32, 127)) | frozenset(b'\t\n\r')


def _corrupt(path: Path, what: str, error: BaseException | None = None) -> CheckpointError:
  detail = f' ({type(error).__name__}: {error})' if error is not None else ''
  return CheckpointError(f'{path}: truncated or corrupt {what}{detail}.')


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file as numpy arrays (bf16 as `ml_dtypes.bfloat16`)."""
  path = Path(path)
  size = path.stat().st_size
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise _corrupt(path, 'safetensors file', EOFError('no header length'))
    header_len = int.from_bytes(head, 'little')
    if header_len > size - 8:
      raise _corrupt(path, 'safetensors file',
                     EOFError(f'header of {header_len} bytes but the file has {size}'))
    try:
      header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _corrupt(path, 'safetensors header', e) from None
  if not isinstance(header, dict):
    raise _corrupt(path, 'safetensors header', ValueError('not a JSON object'))
  data_start = 8 + header_len
  data = np.memmap(path, dtype=np.uint8, mode='r')
  out = {}
  try:
    for name, info in header.items():
      if name == '__metadata__':
        continue
      dtype = np.dtype(_SAFETENSORS_DTYPES[info['dtype']]).newbyteorder('<')
      shape = tuple(int(d) for d in info['shape'])
      begin, end = (int(x) for x in info['data_offsets'])
      if not 0 <= begin <= end or data_start + end > size:
        raise EOFError(f'{name} lies at bytes {begin}..{end} past the end of the data')
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f'{name}: {end - begin} bytes for shape {shape} {info["dtype"]}')
      raw = data[data_start + begin:data_start + end]
      out[name] = raw.view(dtype).reshape(shape).astype(dtype.newbyteorder('='))
  except (KeyError, TypeError, ValueError, EOFError) as e:
    raise _corrupt(path, 'safetensors file', e) from None
  finally:
    del data
  return out


class _StorageType:
  """Stands for a `torch.*Storage` class in the pickle: only its dtype matters."""

  def __init__(self, name: str):
    self.dtype = np.dtype(_TORCH_STORAGES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...]) -> np.ndarray:
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if any(s == 0 for s in size):
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
  if offset < 0 or last >= storage.size or any(s < 0 for s in stride):
    raise ValueError(f'tensor of size {size}, stride {stride} at offset {offset} does not fit '
                     f'its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks, metadata
  return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype,
                       metadata=None):
  # Untyped (byte) storage reinterpreted as `dtype`; offsets and strides in elements.
  del requires_grad, hooks, metadata
  typed = storage.view(np.uint8).view(np.dtype(dtype).newbyteorder(storage.dtype.byteorder))
  return _rebuild_tensor(typed, offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  del requires_grad, hooks, state
  return data


_ALLOWED_GLOBALS = {
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """`data.pkl` of a torch zip -> numpy arrays; `find_class` resolves only tensor rebuilders,
  storage and dtype names and OrderedDict, so a malicious file cannot run code."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[module, name]
    if module in ('torch', 'torch.storage') and name in _TORCH_STORAGES:
      return _StorageType(name)
    if module == 'torch' and name in _TORCH_DTYPES:
      return _TORCH_DTYPES[name]
    raise pickle.UnpicklingError(
        f'{module}.{name} is not allowed in a weights file (only tensors and dicts are read)')

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      buf = self._archive.read(f'{self._prefix}data/{key}')
      dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
      if len(buf) != int(numel) * dtype.itemsize:
        raise EOFError(f'storage {key} has {len(buf)} bytes; expected {numel} x {dtype}')
      self._storages[key] = np.frombuffer(buf, dtype=dtype)
    return self._storages[key]


def _native(value: Any) -> Any:
  """Arrays in native byte order, nested containers preserved."""
  if isinstance(value, np.ndarray):
    return value.astype(value.dtype.newbyteorder('='), copy=False)
  if isinstance(value, dict):
    return {k: _native(v) for k, v in value.items()}
  return value


def _read_torch_zip(path: Path) -> Any:
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
      pickles = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
      if not pickles:
        raise KeyError('no data.pkl record')
      prefix = pickles[0][:-len('data.pkl')]
      byteorder = 'little'
      if f'{prefix}byteorder' in names:
        byteorder = archive.read(f'{prefix}byteorder').decode()
      with archive.open(pickles[0]) as f:
        obj = _RestrictedUnpickler(f, archive, prefix, byteorder).load()
  except pickle.UnpicklingError as e:
    if 'is not allowed' in str(e):
      raise CheckpointError(f'{path}: {e}.') from None
    raise _corrupt(path, 'PyTorch checkpoint', e) from None
  except (zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError, IndexError,
          AttributeError, UnicodeDecodeError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise _corrupt(path, 'PyTorch checkpoint', e) from None
  return _native(obj)


def _import_torch(path: Path, why: str):
  try:
    return importlib.import_module('torch')
  except ImportError:
    raise CheckpointError(
        f'{path} is {why}, which only PyTorch can read: pip install torch '
        '(the CPU build is enough), or re-save it with a current torch.save or as '
        '.safetensors.') from None


def _torch_to_numpy(value: Any, torch) -> Any:
  if isinstance(value, torch.Tensor):
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
      return value.view(torch.int16).numpy().view(jnp.bfloat16)
    return value.numpy()
  if isinstance(value, dict):
    return {k: _torch_to_numpy(v, torch) for k, v in value.items()}
  return value


def _read_torch_legacy(path: Path) -> Any:
  torch = _import_torch(path, 'a legacy (pre-1.6, non-zip) torch.save pickle')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises many types (RuntimeError, UnpicklingError, EOFError).
    raise _corrupt(path, 'PyTorch checkpoint', e) from None
  return _torch_to_numpy(obj, torch)


def read_torch_checkpoint(path: str | os.PathLike) -> Any:
  """The object of a `torch.save` file with every tensor as a numpy array."""
  path = Path(path)
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic == _ZIP_MAGIC:
    return _read_torch_zip(path)
  if magic[:1] == bytes([_PICKLE_PROTO]):
    return _read_torch_legacy(path)
  raise CheckpointError(f'{path} is not a PyTorch checkpoint (it starts with {magic!r}).')


def _listing(names: list[str], most: int = 5) -> str:
  return ', '.join(names[:most]) + (f', ... ({len(names)} in all)' if len(names) > most else '')


def other_format(path: str | os.PathLike) -> str | None:
  """What a file that is no weights file holds, from its content ('a NumPy .npz archive
  (arrays a, b)', 'a text file', ...); None for weights files, damaged ones included."""
  with open(path, 'rb') as f:
    head = f.read(512)
  if not head:
    return 'an empty file (0 bytes)'
  if head.startswith(_ZIP_MAGIC):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
      return None  # A truncated torch.save zip, as likely as anything else.
    if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
      return None
    if names and all(n.endswith('.npy') for n in names):
      return f'a NumPy .npz archive (arrays {_listing([n[:-4] for n in names])})'
    return f'a zip archive without data.pkl ({_listing(names) or "empty"})'
  if head.startswith(_NPY_MAGIC):
    return 'a NumPy .npy array'
  if head.startswith(_HDF5_MAGIC):
    return 'an HDF5 file (Keras or TensorFlow .h5)'
  if _TEXT_BYTES.issuperset(head):
    return 'a text file'
  return None


def other_format_error(path: Path, expected: str) -> CheckpointError | None:
  """"PATH is <what it is>, not <expected>" for a file of another kind (`other_format`)."""
  found = other_format(path)
  if found is None:
    return None
  hint = ''
  if found.startswith('a NumPy .npz'):
    out = path.with_suffix('.safetensors')
    hint = ('; to convert its arrays (official or Hugging Face names), save them as a '
            f"safetensors file first: safetensors.numpy.save_file(dict(numpy.load('{path}')), "
            f"'{out}'), then cvt-convert {out} {path.with_suffix('.msgpack')}")
  return CheckpointError(f'{path} is {found}, not {expected}{hint}.')


def released_format(path: str | os.PathLike) -> str | None:
  """'PyTorch checkpoint', 'safetensors checkpoint' or None, from the file's first bytes
  (a released file given by mistake, not a damaged converted one)."""
  path = Path(path)
  try:
    with open(path, 'rb') as f:
      head = f.read(9)
  except OSError:
    return None
  if head[:4] == _ZIP_MAGIC:
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
      return None
    if any(n == 'data.pkl' or n.endswith('/data.pkl') for n in names):
      return 'PyTorch checkpoint'
    return None
  # A pickle starts with the PROTO opcode and a protocol number (torch.save uses 2).
  if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
    return 'PyTorch checkpoint'
  if len(head) == 9 and head[8:9] == b'{':
    header_len = int.from_bytes(head[:8], 'little')
    if 8 + header_len <= path.stat().st_size:
      return 'safetensors checkpoint'
  return None


# What a Hugging Face model folder (a `save_pretrained` or hub snapshot) holds, preferred first.
HF_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')


def resolve_weights_file(path: str | os.PathLike) -> Path:
  """`path` itself, or the weights inside a Hugging Face model folder."""
  path = Path(path)
  if path.is_dir():
    for name in HF_WEIGHT_FILES:
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f'{path} is a folder without {" or ".join(HF_WEIGHT_FILES)} '
                            '(sharded checkpoints are not supported).')
  if not path.is_file():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  return path


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """The tensors of a `.safetensors`, `.pth` or `.bin` file or a Hugging Face model folder."""
  path = resolve_weights_file(path)
  other = other_format_error(path, 'a PyTorch checkpoint (.pth, .bin) or a safetensors file')
  if other is not None:
    raise other
  with open(path, 'rb') as f:
    head = f.read(9)
  # safetensors first: its header length may start with any byte, but the header
  # itself starts with '{', which neither a zip nor a pickle has at byte 8.
  if head[8:9] == b'{' or path.suffix == '.safetensors':
    obj = read_safetensors(path)
  elif head[:4] == _ZIP_MAGIC or head[:1] == bytes([_PICKLE_PROTO]):
    obj = read_torch_checkpoint(path)
  else:
    raise CheckpointError(f'{path} is neither a PyTorch checkpoint nor a safetensors file '
                          f'(it starts with {head!r}).')
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state_dict.')
  return obj
