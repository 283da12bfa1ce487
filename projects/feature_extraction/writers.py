"""Feature files (`.npz`, `.safetensors`) and PCA pictures of feature maps.

Both formats carry string metadata with the provenance record: the safetensors header's
`__metadata__`, or the `.npz` zip comment (`np.load` ignores it). Safetensors files (an
8-byte little-endian header length, a JSON header, the raw little-endian tensors) are
written and read with numpy alone; the `safetensors` package reads them too.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from projects.tools.output_files import RECORD_KEY, encode_record, save_png, write_atomically

FORMATS = ('npz', 'safetensors')
_SAFETENSORS_DTYPES = {'float16': 'F16', 'float32': 'F32', 'float64': 'F64'}
_NUMPY_DTYPES = {v: np.dtype(k).newbyteorder('<') for k, v in _SAFETENSORS_DTYPES.items()}


def feature_path(output_dir: str, stem: str, fmt: str) -> str:
  """`OUTPUT/<stem>.<fmt>`."""
  return os.path.join(output_dir, f'{stem}.{fmt}')


def pca_path(output_dir: str, stem: str, stage: str) -> str:
  """`OUTPUT/<stem>_<stage>_pca.png`."""
  return os.path.join(output_dir, f'{stem}_{stage}_pca.png')


def _safetensors_bytes(f: BinaryIO, tensors: Mapping[str, np.ndarray],
                       metadata: Mapping[str, str]) -> None:
  header: dict[str, object] = {'__metadata__': dict(metadata)} if metadata else {}
  arrays, offset = [], 0
  for name, array in tensors.items():
    dtype = _SAFETENSORS_DTYPES.get(array.dtype.name)
    if dtype is None:
      raise TypeError(f'Cannot write {name} of dtype {array.dtype} as safetensors; '
                      f'expected one of {sorted(_SAFETENSORS_DTYPES)}.')
    array = np.ascontiguousarray(array, array.dtype.newbyteorder('<'))
    header[name] = {'dtype': dtype, 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    arrays.append(array)
    offset += array.nbytes
  raw = json.dumps(header, separators=(',', ':')).encode()
  raw += b' ' * (-len(raw) % 8)  # The reference writer aligns the data to 8 bytes.
  f.write(struct.pack('<Q', len(raw)))
  f.write(raw)
  for array in arrays:
    f.write(array.tobytes())


def _npz_bytes(f: BinaryIO, arrays: Mapping[str, np.ndarray],
               metadata: Mapping[str, str]) -> None:
  """What `np.savez` writes (one `.npy` member per array, uncompressed), plus a comment."""
  with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
    for name, array in arrays.items():
      with archive.open(f'{name}.npy', 'w', force_zip64=True) as member:
        np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    if metadata:
      archive.comment = json.dumps(dict(metadata), separators=(',', ':')).encode()


def write_features(path: str, features: Mapping[str, np.ndarray], fmt: str,
                   metadata: Mapping[str, str] | None = None,
                   record: Mapping[str, Any] | None = None) -> None:
  """Writes `{name: array}` to `path` as `.npz` (uncompressed) or `.safetensors`, atomically,
  with the string `metadata` and the provenance `record` among them."""
  metadata = dict(metadata or {})
  if record is not None:
    metadata[RECORD_KEY] = encode_record(record)
  if fmt == 'npz':
    write_atomically(path, lambda f: _npz_bytes(f, features, metadata))
  elif fmt == 'safetensors':
    write_atomically(path, lambda f: _safetensors_bytes(f, features, metadata or {}))
  else:
    raise ValueError(f'Unknown feature format {fmt!r}; expected one of {FORMATS}.')


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """`(tensors, metadata)` of a safetensors file with float tensors, using numpy only."""
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  metadata = header.pop('__metadata__', {})
  tensors = {}
  for name, entry in header.items():
    start, end = entry['data_offsets']
    tensors[name] = np.frombuffer(data[start:end], _NUMPY_DTYPES[entry['dtype']]).reshape(
        entry['shape'])
  return tensors, metadata


def read_metadata(path: str) -> dict[str, str]:
  """The string metadata of a feature file (empty for an npz file without any)."""
  if path.endswith('.safetensors'):
    return read_safetensors(path)[1]
  with zipfile.ZipFile(path) as archive:
    return json.loads(archive.comment.decode()) if archive.comment else {}


def read_features(path: str) -> dict[str, np.ndarray]:
  """The arrays of a file written by `write_features`, by name."""
  if path.endswith('.safetensors'):
    return read_safetensors(path)[0]
  with np.load(path) as data:
    return {name: data[name] for name in data.files}


def pca_rgb(features: np.ndarray) -> np.ndarray:
  """uint8 `[h, w, 3]`: the first three principal components of one `[h, w, C]` map as R, G, B,
  each min-max scaled to 0-255 (zero when C < 3). Each component's sign is set to make its
  largest loading positive, which keeps colours stable."""
  h, w, c = features.shape
  x = features.reshape(-1, c).astype(np.float32)
  x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
  covariance = (x.T.astype(np.float64) @ x.astype(np.float64)) / max(1, len(x) - 1)
  _, vectors = np.linalg.eigh(covariance)  # Ascending eigenvalues.
  components = vectors[:, ::-1][:, :3]
  signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(components.shape[1])])
  projected = x @ (components * signs).astype(np.float32)
  low, high = projected.min(axis=0), projected.max(axis=0)
  scaled = (projected - low) / np.where(high > low, high - low, 1)
  rgb = np.zeros((len(x), 3), np.uint8)
  rgb[:, :scaled.shape[1]] = np.round(scaled * 255).astype(np.uint8)
  return rgb.reshape(h, w, 3)


def write_pca(path: str, features: np.ndarray, stride: int,
              record: Mapping[str, Any] | None = None) -> None:
  """Saves `pca_rgb(features)` as a PNG, each position a `stride` x `stride` block (about the
  model input's size, so every stage's picture overlays it; no colour is invented)."""
  rgb = pca_rgb(features)
  rgb = np.repeat(np.repeat(rgb, stride, axis=0), stride, axis=1)
  save_png(Image.fromarray(rgb), path, record)
