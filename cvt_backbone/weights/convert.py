"""CvT and head weights from PyTorch layouts to Flax variables, and the strict merge into a model.

Pure functions on in-memory arrays (no file access, no torch). Official CvT keys
(`stage0.blocks.3.attn.conv_proj_q.bn.running_mean`) and Hugging Face ones
(`cvt.encoder.stages.0.layers.3.attention.attention.convolution_projection_query...`) are
renamed to one Flax path each, then moved to the Flax layout (`torch_leaf`):
conv (O, I/g, kh, kw) -> kernel (kh, kw, I/g, O), linear (out, in) -> kernel (in, out),
norm weight -> scale, BN running_mean / running_var -> batch_stats mean / var.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cvt_backbone.cvt import VARIANTS, CvTBackbone, CvTSpec

OFFICIAL = 'official'
HUGGING_FACE = 'hugging_face'
FLAX = 'flax'

# Keys of wrapped checkpoints ({'state_dict': ..., 'epoch': ...}) searched for the weights.
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'model_state', 'model_state_dict')

# Parameters a checkpoint never holds and a model may have.
_OUT_NORM = re.compile(r'params/out_norm_[^/]+/')
_CLS_TOKEN = re.compile(r'params/stage\d+/cls_token')
_HEAD = 'params/head/'


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or converted (corrupt file, not a CvT, ...)."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint that does not fit the model it is loaded into (weights or a training state)."""

  def __init__(self, summary: str | None = None, *, missing: Iterable[str] = (),
               unexpected: Iterable[str] = (),
               mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
               hints: Iterable[str] = ()):
    self.missing = list(missing)
    self.unexpected = list(unexpected)
    self.mismatched = list(mismatched)
    lines = [summary or 'The checkpoint does not fit the model:']
    if self.missing:
      lines.append(f'  missing from the checkpoint ({len(self.missing)}):')
      lines += [f'    {key}' for key in self.missing]
    if self.unexpected:
      lines.append(f'  unexpected in the checkpoint ({len(self.unexpected)}):')
      lines += [f'    {key}' for key in self.unexpected]
    if self.mismatched:
      lines.append(f'  shape mismatches ({len(self.mismatched)}), checkpoint vs model:')
      lines += [f'    {key}: {tuple(c)} vs {tuple(m)}' for key, c, m in self.mismatched]
    lines += [f'  hint: {hint}' for hint in hints]
    super().__init__('\n'.join(lines))


# Axes of a Flax array taken from the PyTorch tensor: `flax = np.transpose(torch, perm)`.
_CONV_PERM = (2, 3, 1, 0)
_DENSE_PERM = (1, 0)
Perm = tuple[int, ...] | None


def torch_leaf(key: str, value: np.ndarray) -> tuple[str, str, np.ndarray, Perm] | None:
  """One PyTorch leaf -> (collection, Flax leaf name, array in Flax layout, perm), by ndim."""
  leaf = key.rpartition('.')[2]
  if leaf == 'num_batches_tracked':
    return None  # A training counter; Flax BatchNorm has no equivalent.
  if leaf in ('running_mean', 'running_var'):
    return 'batch_stats', leaf.removeprefix('running_'), value, None
  if leaf == 'bias':
    return 'params', 'bias', value, None
  if leaf != 'weight':
    raise ValueError(f'Do not know how to convert {key!r}.')
  if value.ndim == 4:
    return 'params', 'kernel', np.transpose(value, _CONV_PERM), _CONV_PERM
  if value.ndim == 2:
    return 'params', 'kernel', np.transpose(value), _DENSE_PERM
  if value.ndim == 1:
    return 'params', 'scale', value, None
  raise ValueError(f'Cannot convert {key!r} with shape {value.shape}.')


def module_path(torch_path: str) -> str:
  """`'convs.0.conv'` -> `'convs_0/conv'`: list indices join their list's name."""
  return re.sub(r'\.(\d+)', r'_\1', torch_path).replace('.', '/')


def torch_to_flax(state_dict: Mapping[str, Any],
                  rename: Callable[[str], str | None] = module_path) -> dict[str, dict[str, Any]]:
  """A PyTorch state dict of numpy arrays -> `{'params': ..., 'batch_stats': ...}`.

  `rename` maps a PyTorch module path (`'a.b'`) to a Flax one (`'a/b'`), or None to drop it.
  """
  flat = {}
  for key, value in state_dict.items():
    torch_path = key.rpartition('.')[0]
    entry = torch_leaf(key, np.asarray(value))
    path = None if entry is None else rename(torch_path)
    if path is None:
      continue
    collection, name, array, _ = entry
    target = (collection, *path.split('/'), name)
    if target in flat:
      raise ValueError(f'{key!r} maps to {"/".join(target)}, which is already set.')
    flat[target] = np.ascontiguousarray(array)
  return traverse_util.unflatten_dict(flat)


_HF_LAYER = r'encoder\.stages\.(\d+)\.layers\.(\d+)\.'
# 'query' / 'key' / 'value' -> 'q' / 'k' / 'v': the first letter is captured.
_HF_QKV = r'([qkv])(?:uery|ey|alue)'
_BN_LEAF = r'(weight|bias|running_mean|running_var|num_batches_tracked)'
_HF_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    (r'encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.(weight|bias)',
     r'stage\1.patch_embed.proj.\2'),
    (r'encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.normalization\.(weight|bias)',
     r'stage\1.patch_embed.norm.\2'),
    (r'encoder\.stages\.(\d+)\.cls_token', r'stage\1.cls_token'),
    (_HF_LAYER + r'layernorm_before\.(weight|bias)', r'stage\1.blocks.\2.norm1.\3'),
    (_HF_LAYER + r'layernorm_after\.(weight|bias)', r'stage\1.blocks.\2.norm2.\3'),
    (_HF_LAYER + rf'attention\.attention\.convolution_projection_{_HF_QKV}'
     r'\.convolution_projection\.convolution\.weight',
     r'stage\1.blocks.\2.attn.conv_proj_\3.conv.weight'),
    (_HF_LAYER + rf'attention\.attention\.convolution_projection_{_HF_QKV}'
     rf'\.convolution_projection\.normalization\.{_BN_LEAF}',
     r'stage\1.blocks.\2.attn.conv_proj_\3.bn.\4'),
    (_HF_LAYER + rf'attention\.attention\.projection_{_HF_QKV}\.(weight|bias)',
     r'stage\1.blocks.\2.attn.proj_\3.\4'),
    (_HF_LAYER + r'attention\.output\.dense\.(weight|bias)', r'stage\1.blocks.\2.attn.proj.\3'),
    (_HF_LAYER + r'intermediate\.dense\.(weight|bias)', r'stage\1.blocks.\2.mlp.fc1.\3'),
    (_HF_LAYER + r'output\.dense\.(weight|bias)', r'stage\1.blocks.\2.mlp.fc2.\3'),
    (r'layernorm\.(weight|bias)', r'norm.\1'),
    (r'classifier\.(weight|bias)', r'head.\1'),
))

# Every key of an official state_dict (cls_cvt.py; Dropout/Rearrange have no state).
_OFFICIAL_KEYS = tuple(re.compile(pattern) for pattern in (
    r'stage\d+\.patch_embed\.(proj|norm)\.(weight|bias)',
    r'stage\d+\.cls_token',
    r'stage\d+\.blocks\.\d+\.norm[12]\.(weight|bias)',
    r'stage\d+\.blocks\.\d+\.attn\.conv_proj_[qkv]\.conv\.weight',
    rf'stage\d+\.blocks\.\d+\.attn\.conv_proj_[qkv]\.bn\.{_BN_LEAF}',
    r'stage\d+\.blocks\.\d+\.attn\.proj(_[qkv])?\.(weight|bias)',
    r'stage\d+\.blocks\.\d+\.mlp\.fc[12]\.(weight|bias)',
    r'(norm|head)\.(weight|bias)',
))

_HF_MARK = re.compile(r'(cvt\.)?encoder\.stages\.\d+\.')
_OFFICIAL_MARK = re.compile(r'(module\.)?stage\d+\.')


def _is_array(value: Any) -> bool:
  return hasattr(value, 'shape') and hasattr(value, 'dtype')


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
  """The weights inside `{'state_dict': ..., 'epoch': ...}`-style training checkpoints."""
  while not any(_is_array(v) for v in state_dict.values()):
    inner = next((state_dict[k] for k in _WRAPPER_KEYS
                  if isinstance(state_dict.get(k), Mapping)), None)
    if inner is None:
      break
    state_dict = inner
  return state_dict


def _is_flax(state_dict: Mapping[str, Any]) -> bool:
  if isinstance(state_dict.get('params'), Mapping):
    return True
  return bool(state_dict) and all(
      isinstance(k, str) and k.startswith(('params/', 'batch_stats/')) for k in state_dict)


def _preview(keys: Iterable[str], limit: int = 8) -> str:
  keys = list(keys)
  shown = ', '.join(keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def detect_naming(state_dict: Mapping[str, Any]) -> str:
  """'official', 'hugging_face' or 'flax' (converted); CheckpointError for another model."""
  state_dict = _unwrap(state_dict)
  if _is_flax(state_dict):
    return FLAX
  keys = [k for k in state_dict if isinstance(k, str)]
  hf = any(_HF_MARK.match(k) for k in keys)
  official = any(_OFFICIAL_MARK.match(k) for k in keys)
  if hf and official:
    raise CheckpointError('The state_dict mixes official (stage0...) and Hugging Face '
                          '(cvt.encoder.stages...) CvT key names; convert one at a time.')
  if hf:
    return HUGGING_FACE
  if official:
    return OFFICIAL
  raise CheckpointError(
      f'This is not a CvT state_dict: none of its {len(keys)} keys follow the official '
      f"('stage0.patch_embed.proj.weight', ...) or Hugging Face "
      f"('cvt.encoder.stages.0.embedding...', ...) naming. Its keys: {_preview(keys)}.")


def hf_to_official(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """A Hugging Face CvT state_dict (`CvtForImageClassification`, `CvtModel`), official names."""
  names = _hf_official_names(state_dict)
  unknown = [key for key in state_dict if key not in names]
  if unknown:
    raise CheckpointError(f'Unexpected keys in a Hugging Face CvT state_dict ({len(unknown)}): '
                          f'{_preview(unknown)}.')
  return {names[key]: value for key, value in state_dict.items()}


def _hf_official_names(state_dict: Mapping[str, Any]) -> dict[str, str]:
  """Hugging Face key -> official key, for the keys that follow a renaming rule."""
  names = {}
  for key in state_dict:
    bare = key.removeprefix('cvt.')
    for pattern, replacement in _HF_RULES:
      if pattern.fullmatch(bare):
        names[key] = pattern.sub(replacement, bare)
        break
  return names


def _flax_entry(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray, Perm] | None:
  """One official key -> (Flax path with its collection, array in Flax layout, perm)."""
  *modules, leaf = key.split('.')
  # 'blocks.3' is one Flax module, 'blocks_3'.
  path = tuple(re.sub(r'blocks\.(\d+)', r'blocks_\1', '.'.join(modules)).split('.'))
  if leaf == 'cls_token':
    ndim = 3
  elif leaf != 'weight' or modules[-1] in ('norm', 'norm1', 'norm2', 'bn'):
    ndim = 1
  else:
    ndim = 4 if modules[-1] == 'conv' or modules[-2:] == ['patch_embed', 'proj'] else 2
  if value.ndim != ndim and leaf != 'num_batches_tracked':
    raise CheckpointError(f'{key} has shape {value.shape}; a CvT has {ndim}-D tensors there.')
  if leaf == 'cls_token':
    return ('params', *path, 'cls_token'), value, None
  entry = torch_leaf(key, value)
  if entry is None:
    return None
  collection, name, array, perm = entry
  return (collection, *path, name), array, perm


def official_name(path: str) -> tuple[str, tuple[int, ...] | None]:
  """A '/'-joined Flax path -> (official key, perm): `_flax_entry` backwards, for messages."""
  collection, *modules, leaf = path.split('/')
  name = '.'.join(re.sub(r'^blocks_(\d+)$', r'blocks.\1', m) for m in modules)
  if collection == 'batch_stats':
    return f'{name}.running_{leaf}', None
  if leaf == 'kernel':
    conv = modules[-1] == 'conv' or modules[-2:] == ['patch_embed', 'proj']
    return f'{name}.weight', _CONV_PERM if conv else _DENSE_PERM
  return (f'{name}.{leaf}' if leaf != 'scale' else f'{name}.weight'), None


def source_shape(shape: Iterable[int], perm: tuple[int, ...] | None) -> tuple[int, ...]:
  """The shape in the source file of a Flax array of `shape` (undoing the transposition)."""
  shape = tuple(int(d) for d in shape)
  if perm is None or len(perm) != len(shape):
    return shape
  out = [0] * len(shape)
  for axis, source_axis in enumerate(perm):
    out[source_axis] = shape[axis]
  return tuple(out)


def _copy_converted(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  if isinstance(state_dict.get('params'), Mapping):
    flat = traverse_util.flatten_dict(
        {c: v for c, v in state_dict.items() if c in ('params', 'batch_stats')})
  else:
    flat = {tuple(k.split('/')): v for k, v in state_dict.items()}
  return {path: np.asarray(value) for path, value in flat.items()}


# Where each converted array comes from: '/'-joined Flax path -> (source key, transposition).
Sources = dict[str, tuple[str, tuple[int, ...] | None]]


def convert_with_sources(state_dict: Mapping[str, Any], *, backbone: bool = False
                         ) -> tuple[dict[str, dict[str, Any]], Sources]:
  """`convert_state_dict`, plus each array's source key and perm (for messages)."""
  state_dict = _unwrap(state_dict)
  naming = detect_naming(state_dict)
  sources: Sources = {}
  if naming == FLAX:
    flat = _copy_converted(state_dict)
    sources = {'/'.join(path): ('/'.join(path), None) for path in flat}
  else:
    original = {}
    if naming == HUGGING_FACE:
      original = {official: key for key, official in _hf_official_names(state_dict).items()}
      state_dict = hf_to_official(state_dict)
    elif all(k.startswith('module.') for k in state_dict):
      # Saved from a DistributedDataParallel wrapper.
      original = {k.removeprefix('module.'): k for k in state_dict}
      state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    unknown = [k for k in state_dict if not any(p.fullmatch(k) for p in _OFFICIAL_KEYS)]
    if unknown:
      raise CheckpointError(f'Unexpected keys in an official CvT state_dict ({len(unknown)}): '
                            f'{_preview(unknown)}.')
    flat = {}
    for key, value in state_dict.items():
      entry = _flax_entry(key, np.asarray(value))
      if entry is not None:
        path, array, perm = entry
        flat[path] = array
        sources['/'.join(path)] = (original.get(key, key), perm)
  if backbone:
    flat = {path: v for path, v in flat.items()
            if not (path[0] == 'params' and path[1] in ('norm', 'head'))}
    sources = {p: s for p, s in sources.items() if tuple(p.split('/')) in flat}
  variables = traverse_util.unflatten_dict(flat)
  variables.setdefault('params', {})
  variables.setdefault('batch_stats', {})
  return variables, sources


def convert_state_dict(state_dict: Mapping[str, Any], *,
                       backbone: bool = False) -> dict[str, dict[str, Any]]:
  """A CvT state_dict of any naming -> `{'params': ..., 'batch_stats': ...}` of numpy arrays.

  Official or Hugging Face names, a `module.` prefix or a `{'state_dict': ...}` wrapper;
  converted variables (nested or '/'-flattened) come back as they are. `backbone` drops the
  classifier (`norm`, `head`). Raises CheckpointError listing keys that are not a CvT's.
  """
  return convert_with_sources(state_dict, backbone=backbone)[0]


# What the shapes of a checkpoint determine; the rest (strides, heads, drop path)
# is taken from the matching variant.
_SHAPE_FIELDS = ('embed_dims', 'depths', 'mlp_ratios', 'patch_sizes', 'kernel_qkv',
                 'cls_token', 'qkv_bias')
# What must agree between a checkpoint and a model (heads are invisible in the shapes
# and checked only where the checkpoint records them).
STRUCTURAL_FIELDS = _SHAPE_FIELDS + ('num_heads',)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a checkpoint holds, from its shapes: a known variant's spec (`variant` None: a custom
  one), the classifier's class count (0: no head), final LayerNorm and input channels."""

  spec: CvTSpec
  variant: str | None
  num_classes: int
  has_norm: bool
  in_chans: int

  @property
  def name(self) -> str:
    return self.variant or 'custom'


def describe_spec(spec: CvTSpec) -> str:
  """'dims (64, 192, 384), depths (1, 2, 10), heads (1, 3, 6)' for error messages."""
  return f'dims {spec.embed_dims}, depths {spec.depths}, heads {spec.num_heads}'


def variant_of(spec: CvTSpec) -> str | None:
  """The name of the known variant with the same structure as `spec`, or None."""
  for name, known in VARIANTS.items():
    if all(getattr(known, f) == getattr(spec, f) for f in STRUCTURAL_FIELDS):
      return name
  return None


def _blocks(stage: Mapping[str, Any]) -> list[int]:
  return sorted(int(m.group(1)) for k in stage if (m := re.fullmatch(r'blocks_(\d+)', k)))


@dataclasses.dataclass(frozen=True)
class _Shapes:
  """What the shapes of a checkpoint say, before the heads are known."""

  fields: dict[str, Any]  # _SHAPE_FIELDS -> per-stage tuples (qkv_bias: one bool)
  num_classes: int
  has_norm: bool
  in_chans: int


def _read_shapes(variables: Mapping[str, Any]) -> _Shapes:
  params = variables['params']
  stages = sorted(int(m.group(1)) for k in params if (m := re.fullmatch(r'stage(\d+)', k)))
  if not stages or stages != list(range(len(stages))):
    raise CheckpointError(f'The checkpoint has stages {stages}; a CvT has stage0, stage1, ...')
  fields = {f: [] for f in _SHAPE_FIELDS}
  in_chans = 0
  try:
    for i in stages:
      stage = params[f'stage{i}']
      kernel = stage['patch_embed']['proj']['kernel']  # [k, k, I, O]
      dim = int(kernel.shape[-1])
      in_chans = in_chans or int(kernel.shape[2])
      blocks = _blocks(stage)
      if blocks != list(range(len(blocks))) or not blocks:
        raise CheckpointError(f'stage{i} has blocks {blocks}; expected blocks_0 .. blocks_N.')
      first = stage['blocks_0']
      fields['embed_dims'].append(dim)
      fields['depths'].append(len(blocks))
      fields['mlp_ratios'].append(first['mlp']['fc1']['kernel'].shape[1] / dim)
      fields['patch_sizes'].append(int(kernel.shape[0]))
      fields['kernel_qkv'].append(int(first['attn']['conv_proj_q']['conv']['kernel'].shape[0]))
      fields['cls_token'].append('cls_token' in stage)
      fields['qkv_bias'].append('bias' in first['attn']['proj_q'])
  except KeyError as e:
    raise CheckpointError(f'Incomplete CvT checkpoint: no {e} where expected.') from None
  shape_fields = {f: tuple(v) for f, v in fields.items()}
  shape_fields['qkv_bias'] = all(fields['qkv_bias'])
  head = params.get('head', {})
  num_classes = int(head['bias'].shape[0]) if 'bias' in head else 0
  return _Shapes(shape_fields, num_classes, 'norm' in params, in_chans)


def _known_variant(shape_fields: Mapping[str, Any],
                   heads: tuple[int, ...] | None) -> tuple[str, CvTSpec] | None:
  for name, known in VARIANTS.items():
    if all(getattr(known, f) == v for f, v in shape_fields.items()) and (
        heads is None or heads == known.num_heads):
      return name, known
  return None


def _custom_spec(shape_fields: Mapping[str, Any], heads: tuple[int, ...]) -> CvTSpec:
  n = len(shape_fields['embed_dims'])
  strides = tuple(4 if i == 0 else 2 for i in range(n))
  return CvTSpec(
      num_heads=heads,
      patch_strides=strides,
      # The official rule, (7, 4) -> 2 and (3, 2) -> 1.
      patch_paddings=tuple((k - s + 1) // 2
                           for k, s in zip(shape_fields['patch_sizes'], strides, strict=True)),
      stride_q=(1,) * n, stride_kv=(2,) * n,
      drop_path_rates=(0.0,) * (n - 1) + (0.1,),
      **shape_fields)


def _closest_variant_hint(shape_fields: Mapping[str, Any], in_chans: int) -> str:
  """' Its widths are those of cvt-tiny but not its ...': a damaged file may look custom."""
  closest = None
  for name, known in VARIANTS.items():
    if known.embed_dims != shape_fields['embed_dims']:
      continue
    differences = [f'{f} {v} ({name}: {getattr(known, f)})'
                   for f, v in shape_fields.items() if getattr(known, f) != v]
    if in_chans != 3:
      differences.append(f'in_chans {in_chans} ({name}: 3)')
    if closest is None or len(differences) < len(closest[1]):
      closest = (name, differences)
  if closest is None:
    return ''
  name, differences = closest
  return (f' Its widths are those of {name} but not its ' + ', '.join(differences)
          + f': if it should be {name}, the file is damaged or was edited.')


def infer_architecture(state_dict: Mapping[str, Any], *,
                       num_heads: Iterable[int] | None = None) -> Architecture:
  """The architecture of a checkpoint (any naming, or converted variables), from its shapes.

  Heads are in no shape: those of the matching known variant, else `num_heads`, else the
  official head width of 64.
  """
  shapes = _read_shapes(convert_state_dict(state_dict))
  heads = tuple(int(h) for h in num_heads) if num_heads is not None else None
  common = dict(num_classes=shapes.num_classes, has_norm=shapes.has_norm,
                in_chans=shapes.in_chans)
  known = _known_variant(shapes.fields, heads)
  if known is not None:
    return Architecture(spec=known[1], variant=known[0], **common)
  dims = shapes.fields['embed_dims']
  if heads is None:
    if any(d % 64 for d in dims):
      raise CheckpointError(
          f'Cannot infer the heads of a custom CvT with dims {dims} (not multiples of the '
          'official head width 64); pass num_heads (--num-heads).'
          + _closest_variant_hint(shapes.fields, shapes.in_chans))
    heads = tuple(d // 64 for d in dims)
  return Architecture(spec=_custom_spec(shapes.fields, heads), variant=None, **common)


def expected_shapes(spec: CvTSpec, *, in_chans: int = 3, num_classes: int = 0,
                    has_norm: bool = False) -> dict[str, tuple[int, ...]]:
  """Shape of every variable of a CvT of `spec` (and its classifier's), by '/'-joined path."""
  size = 32
  while size < 2**16:  # The smallest power of two every stage of `spec` accepts.
    try:
      spec.output_sizes(size, size)
      break
    except ValueError:
      size *= 2
  model = CvTBackbone(spec=spec, in_chans=in_chans)
  tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, in_chans)))
  shapes = {path: tuple(leaf.shape)
            for path, leaf in traverse_util.flatten_dict(tree, sep='/').items()}
  dim = spec.embed_dims[-1]
  if has_norm:
    shapes.update({'params/norm/scale': (dim,), 'params/norm/bias': (dim,)})
  if num_classes:
    shapes.update({'params/head/kernel': (dim, num_classes), 'params/head/bias': (num_classes,)})
  return shapes


def _shape_problems(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                    sources: Sources) -> list[str]:
  def label(key: str, path: str) -> str:
    return path if key == path else f'{key} ({path})'

  lines = []
  for path, shape in found.items():
    key, perm = sources.get(path, (path, None))
    if path not in expected:
      lines.append(f'unexpected: {label(key, path)}, shape {source_shape(shape, perm)}')
    elif tuple(shape) != tuple(expected[path]):
      lines.append(f'{label(key, path)}: found {source_shape(shape, perm)}, '
                   f'expected {source_shape(expected[path], perm)}')
  for path, shape in expected.items():
    if path not in found:
      key, perm = official_name(path)
      lines.append(f'missing: {label(key, path)}, expected {source_shape(shape, perm)}')
  return lines


def check_converted(variables: Mapping[str, Any], sources: Sources | None = None, *,
                    num_heads: Iterable[int] | None = None) -> Architecture:
  """The architecture of converted variables, after checking every array's shape against it.

  `infer_architecture` reads a few shapes; a damaged or edited file would convert and then
  fit no model. Each array is compared with the inferred spec's model and with the known
  variants of the same widths and depths; the closest is reported (CheckpointError naming
  each differing, missing and unexpected tensor by its `sources` name, in source layout).
  """
  sources = sources or {}
  shapes = _read_shapes(variables)
  found = {path: tuple(np.shape(leaf))
           for path, leaf in traverse_util.flatten_dict(dict(variables), sep='/').items()}
  counts = dict(in_chans=shapes.in_chans, num_classes=shapes.num_classes,
                has_norm=shapes.has_norm)
  known = _known_variant(shapes.fields, None)
  n = len(shapes.fields['embed_dims'])
  inferred = known or ('custom', _custom_spec(shapes.fields, (1,) * n))  # Heads change no shape.
  # Known variants of the same widths and depths first: on a tie they are the likelier intent.
  candidates = {name: spec for name, spec in VARIANTS.items()
                if (spec.embed_dims, spec.depths)
                == (shapes.fields['embed_dims'], shapes.fields['depths'])}
  candidates.setdefault(*inferred)
  best = None
  for name, spec in candidates.items():
    problems = _shape_problems(found, expected_shapes(spec, **counts), sources)
    if not problems:
      best = None
      break
    if best is None or len(problems) < len(best[2]):
      best = (name, spec, problems)
  if best is not None:
    name, spec, problems = best
    described = f'{name} ({describe_spec(spec)})' if name != 'custom' else (
        f'the custom CvT its other shapes imply (dims {spec.embed_dims}, depths '
        f'{spec.depths}, patch sizes {spec.patch_sizes}, kernel_qkv {spec.kernel_qkv})')
    count = '1 tensor does' if len(problems) == 1 else f'{len(problems)} tensors do'
    raise CheckpointError(
        f'{count} not fit {described}; the checkpoint is damaged or '
        'was edited (shapes as stored in the source file):\n'
        + '\n'.join(f'  {line}' for line in problems))
  return infer_architecture(variables, num_heads=num_heads)


def spec_differences(expected: CvTSpec, found: CvTSpec,
                     fields: Iterable[str] = STRUCTURAL_FIELDS) -> list[str]:
  """'depths: (1, 2, 10) vs (1, 4, 16)' for each structural field that differs."""
  return [f'{f}: {getattr(expected, f)} vs {getattr(found, f)}' for f in fields
          if getattr(expected, f) != getattr(found, f)]


@dataclasses.dataclass
class LoadReport:
  """What `merge_variables` kept at init and discarded, by '/'-joined path: why."""

  kept_init: dict[str, str] = dataclasses.field(default_factory=dict)
  discarded: dict[str, str] = dataclasses.field(default_factory=dict)


def merge_variables(fresh: Mapping[str, Any], loaded: Mapping[str, Any], *,
                    drop_head: bool = False, keep_cls_token: bool = True,
                    ) -> tuple[dict[str, Any], LoadReport]:
  """Strictly merges loaded weights (a CvT's, a head's) into a model's fresh variables.

  Every model variable must come from `loaded` (`convert_state_dict`, `torch_to_flax`) with
  its shape and every loaded array must be used, or CheckpointMismatchError lists each
  missing, unexpected and mismatched one. Except: `out_norm_*` LayerNorms (in no checkpoint)
  keep their init; `drop_head` keeps a fresh `params/head`; `keep_cls_token=False` discards
  the cls token. `fresh` may be shapes only (`jax.eval_shape`): leaves kept at init come
  back as `ShapeDtypeStruct`s. Returns the merged variables (in the model's dtypes) and a report.
  """
  model = traverse_util.flatten_dict(dict(fresh), sep='/')
  ckpt = traverse_util.flatten_dict(dict(loaded), sep='/')
  merged, report = {}, LoadReport()
  unexpected, mismatched, hints = [], [], []

  def dropped(path: str) -> str | None:
    if drop_head and path.startswith(_HEAD):
      return 'classifier head dropped (drop_head=True)'
    if not keep_cls_token and _CLS_TOKEN.fullmatch(path):
      return 'cls token discarded (keep_cls_token=False)'
    return None

  for path, value in ckpt.items():
    if why := dropped(path):
      report.discarded[path] = why
    elif path not in model:
      unexpected.append(path)
      if _CLS_TOKEN.fullmatch(path):
        hints.append('the model has no cls token there; keep_cls_token=False discards it.')
    elif np.shape(value) != tuple(model[path].shape):
      mismatched.append((path, np.shape(value), tuple(model[path].shape)))
      if path.startswith(_HEAD):
        hints.append('a different class count? drop_head=True keeps a fresh head.')
    else:
      merged[path] = np.asarray(value, dtype=model[path].dtype)
  missing, shape_mismatch = [], {path for path, _, _ in mismatched}
  for path, target in model.items():
    if path in merged or path in shape_mismatch:
      continue
    why = dropped(path) or (
        'backbone output norm; not part of CvT checkpoints' if _OUT_NORM.match(path) else None)
    if why:
      report.kept_init[path] = why
      merged[path] = target
    else:
      missing.append(path)
      if path.startswith(_HEAD):
        hints.append('a checkpoint without a head? drop_head=True keeps a fresh head.')
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing=missing, unexpected=unexpected, mismatched=mismatched,
                                  hints=dict.fromkeys(hints))
  return traverse_util.unflatten_dict(merged, sep='/'), report


if __name__ == '__main__':
  import sys  # A library module, not the tool.

  print('cvt_backbone.weights.convert is the conversion library, not a command; run '
        '`cvt-convert SRC OUT` or `python -m cvt_backbone convert SRC OUT` (--help for the '
        'options).', file=sys.stderr)
  sys.exit(2)
