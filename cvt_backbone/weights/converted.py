"""Converted weight files: their format, `cvt-convert`, and the loaders of CvT models.

A converted file is one msgpack map (`flax.serialization`, no pickle) `{'variables': {'params',
'batch_stats'}, 'metadata': {...}}`: `format`, `format_version`, `variant` (or 'custom'),
`spec`, `activation`, `num_classes` (0: no head), `backbone_only`, `in_chans`, `source`
(`file`, `sha256`, `naming`), `converter` and `checksum` ('sha256:' + `variables_digest`,
checked on every load; version 1 files have none). It is written atomically, after every
tensor's shape was checked against the inferred architecture.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from cvt_backbone.cvt import (
  ACTIVATIONS,
  CvT,
  CvTBackbone,
  CvTSpec,
  canonical_variant_name,
  get_spec,
)
from cvt_backbone.tools import HelpFormatter, check_apart, file_sha256, write_atomically
from cvt_backbone.weights import convert as convert_lib
from cvt_backbone.weights.convert import CheckpointError, CheckpointMismatchError
from cvt_backbone.weights.readers import (
  HF_WEIGHT_FILES,
  other_format_error,
  read_state_dict,
  released_format,
  resolve_weights_file,
)

FORMAT = 'cvt-dense/flax-msgpack'
# 2: metadata 'checksum', required from this version on.
FORMAT_VERSION = 2
_CHECKSUM_PREFIX = 'sha256:'

_logger = logging.getLogger(__name__)

# The spatial size used to initialise models before loading: parameter shapes do not
# depend on it and a small one keeps `init` cheap.
_INIT_SIZE = 32


def _check_destination(path: Path, overwrite: bool) -> None:
  folder = path.parent
  if not folder.is_dir():
    raise FileNotFoundError(f'The output folder {folder} does not exist (writing {path}); '
                            'create it first.')
  if path.is_dir():
    raise IsADirectoryError(f'{path} is a folder; give the output file name.')
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it (overwrite=True '
                          'from Python).')


def variables_digest(variables: Mapping[str, Any]) -> str:
  """sha256 (hex) of a variables tree's paths, dtypes, shapes and bytes (not its order)."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict(dict(variables), sep='/')
  for path in sorted(flat):
    array = np.ascontiguousarray(np.asarray(flat[path]))
    array = array.astype(array.dtype.newbyteorder('='), copy=False)
    digest.update(f'{path}\0{array.dtype.name}\0{array.shape}\0'.encode())
    digest.update(array.reshape(-1).view(np.uint8))  # The buffer itself: no copy.
  return digest.hexdigest()


def save_converted(path: str | os.PathLike, variables: Mapping[str, Any],
                   metadata: Mapping[str, Any], *, overwrite: bool = False) -> Path:
  """Writes variables and metadata (given the format, version and checksum) atomically."""
  path = Path(path)
  variables = {c: dict(v) for c, v in variables.items()}
  tree = {'variables': variables,
          'metadata': {**metadata, 'format': FORMAT, 'format_version': FORMAT_VERSION,
                       'checksum': _CHECKSUM_PREFIX + variables_digest(variables)}}
  data = serialization.msgpack_serialize(tree)
  _check_destination(path, overwrite)
  write_atomically(path, lambda f: f.write(data))
  return path


def _looks_converted(path: Path) -> bool:
  # A converted file starts with a two-entry msgpack map (0x82) whose first key is the
  # fixstr 'metadata' or 'variables' (0xa0 + length, then the bytes).
  with open(path, 'rb') as f:
    return f.read(11).startswith((b'\x82\xa8metadata', b'\x82\xa9variables'))


def _is_converted_file(path: Path) -> bool:
  """By content first (a renamed `.pth` is a `.pth`), else by the `.msgpack` suffix."""
  if released_format(path) is not None:
    return False
  return path.suffix == '.msgpack' or _looks_converted(path)


def _released_file_error(path: Path) -> CheckpointError | None:
  """The error for a released checkpoint given where a converted file is expected."""
  if path.is_dir():
    if not any((path / name).is_file() for name in HF_WEIGHT_FILES):
      return None
    kind, out = 'is a Hugging Face model folder', f'{path.name}.msgpack'
  else:
    kind = released_format(path)
    if kind is None:
      return None
    out = f'{path.stem}.msgpack' if path.suffix != '.msgpack' else f'{path.stem}-converted.msgpack'
    kind = f'is a {kind}'
  return CheckpointError(
      f'{path} {kind}, not a converted file; convert it first: cvt-convert {path} {out} '
      '(load_pretrained and load_backbone_weights also read it as it is).')


def _training_run_error(path: Path) -> CheckpointError | None:
  """The error for a training run's checkpoints (`projects.training`: `checkpoints/<step>/state`)
  given where a converted file is expected."""
  if path.name.isdigit() and (path / 'state').is_dir():
    kind, steps = 'a training checkpoint', [path.name]
  else:
    kind = 'a training checkpoints folder'
    if (path / 'checkpoints').is_dir():
      kind, path_steps = 'a training workdir', path / 'checkpoints'
    else:
      path_steps = path
    steps = sorted((p.name for p in path_steps.iterdir() if p.name.isdigit()
                    and (p / 'state').is_dir()), key=int) if path_steps.is_dir() else []
    if not steps:
      return None
  return CheckpointError(
      f'{path} is {kind} (step{"s" * (len(steps) > 1)} {", ".join(steps)}), not a converted '
      f'file; load the trained model with projects.cvt_segmentation.models.'
      f"restore_for_inference(config, '{path}') (cvt_detection's for a detector), the "
      "backbone's variables under 'backbone' in each collection (variables['params']"
      "['backbone']), or run the project's evaluate or predict with "
      f'--checkpoint {path}.')


def load_converted(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, metadata) of a converted file; CheckpointError for a damaged or other file."""
  path = Path(path)
  released = _released_file_error(path) or (
      _training_run_error(path) if path.is_dir() else
      other_format_error(path, 'a converted file') if path.is_file() else None)
  if released is not None:
    raise released
  if not path.is_file():
    raise FileNotFoundError(f'No converted checkpoint at {path}.')
  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # msgpack raises its own ExtraData/FormatError/ValueError types.
    raise CheckpointError(f'{path}: truncated or corrupt converted checkpoint '
                          f'({type(e).__name__}: {e}).') from None
  metadata = tree.get('metadata') if isinstance(tree, dict) else None
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    raise CheckpointError(f'{path} is not a cvt-convert checkpoint (no {FORMAT!r} metadata).')
  version = metadata.get('format_version', 0)
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise CheckpointError(f'{path} has format version {version!r}; this '
                          f'cvt-dense reads up to {FORMAT_VERSION}. Upgrade cvt-dense.')
  variables = tree.get('variables')
  source = metadata.get('source')
  again = (f'convert it again (cvt-convert '
           f'{source.get("file", "SRC") if isinstance(source, dict) else "SRC"} '
           f'{path.name} --overwrite)')
  if not isinstance(variables, dict):
    raise CheckpointError(f'{path}: no variables; the file is damaged; {again}.')
  checksum = metadata.get('checksum')
  if checksum is None:
    if version >= 2:  # Version 1 files were written before the checksum.
      raise CheckpointError(f'{path}: no checksum in a format version {version} file; the '
                            f'file is damaged; {again}.')
  elif checksum != _CHECKSUM_PREFIX + variables_digest(variables):
    raise CheckpointError(f'{path}: checksum mismatch: the file is damaged; {again}.')
  return variables, metadata


def _hf_config_num_heads(src: Path) -> tuple[int, ...] | None:
  """Heads from a Hugging Face `config.json` beside the weights (shapes do not tell them)."""
  config = src.parent / 'config.json'
  if not config.is_file():
    return None
  try:
    fields = json.loads(config.read_text())
  except (OSError, ValueError):
    return None
  if fields.get('model_type') != 'cvt' or 'num_heads' not in fields:
    return None
  return tuple(int(h) for h in fields['num_heads'])


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *,
                       variant: str | None = None, backbone_only: bool = False,
                       drop_head: bool = False, activation: str = 'quick_gelu',
                       num_heads: Sequence[int] | None = None,
                       overwrite: bool = False) -> dict[str, Any]:
  """A released weight file (`.pth`, `.bin`, `.safetensors`, a Hugging Face folder) -> `out`.

  Args:
    variant: the expected variant, checked against the shapes (None: inferred).
    backbone_only: drop the classifier (final norm and head); `drop_head` only the head.
    activation: recorded for the loaders: 'quick_gelu' (the official training activation)
      or 'gelu' (what Hugging Face `CvtModel` runs).
    num_heads: heads per stage of a custom architecture (known variants and Hugging Face
      folders with a `config.json` do not need it).

  Returns:
    The metadata written.
  """
  out = Path(out)
  src = resolve_weights_file(src)
  inputs = {src: 'the source weights file'}
  if num_heads is None:
    inputs[src.parent / 'config.json'] = 'the Hugging Face config of the source'
  check_apart([out], inputs)
  _check_destination(out, overwrite)  # Fail before reading a large file.
  if activation not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}.')
  if backbone_only and drop_head:
    raise ValueError('backbone_only already drops the head; pass one of them.')
  if released_format(src) is None and _looks_converted(src):
    raise CheckpointError(f'{src} is already converted (a cvt-convert file); load it with '
                          'load_backbone or load_classifier.')
  state_dict = read_state_dict(src)
  naming = convert_lib.detect_naming(state_dict)
  variables, sources = convert_lib.convert_with_sources(state_dict, backbone=backbone_only)
  if num_heads is None:
    num_heads = _hf_config_num_heads(src)
  # Every shape, not only those the architecture is read from: a file that fits no model
  # is refused here, naming its tensors, instead of being written.
  arch = convert_lib.check_converted(variables, sources, num_heads=num_heads)
  if variant is not None:
    name = canonical_variant_name(variant)
    get_spec(name)  # An unknown name fails here, listing the known ones.
    if arch.variant != name:
      raise CheckpointMismatchError(summary=(
          f'{src} holds {arch.name} weights ({convert_lib.describe_spec(arch.spec)}), '
          f'not {name}.'))
  if drop_head:
    variables['params'].pop('head', None)
  metadata = {
      'variant': arch.name,
      'spec': arch.spec.to_dict(),
      'activation': activation,
      'num_classes': 0 if drop_head else arch.num_classes,
      # A Hugging Face `CvtModel` file has no classifier to begin with.
      'backbone_only': backbone_only or not arch.has_norm,
      'in_chans': arch.in_chans,
      'source': {'file': src.name, 'sha256': file_sha256(src), 'naming': naming},
      'converter': 'cvt-dense convert_checkpoint',
  }
  save_converted(out, variables, metadata, overwrite=overwrite)
  return metadata


def _model_spec(model: Any) -> CvTSpec:
  if not isinstance(model, (CvT, CvTBackbone)):
    raise TypeError(f'Expected a CvT or CvTBackbone; got {type(model).__name__}.')
  return model.resolved_spec


def _init(model: CvT | CvTBackbone, rng: jax.Array, paths: Sequence[str] | None = None) -> Any:
  """The model's fresh variables: all as shapes (`paths` None), or the values at `paths`."""
  chans = model.channels if isinstance(model, CvT) else model.in_chans
  images = jnp.zeros((1, _INIT_SIZE, _INIT_SIZE, chans), jnp.float32)
  if paths is None:
    return jax.eval_shape(lambda key: model.init(key, images), rng)

  def init(key):
    flat = traverse_util.flatten_dict(model.init(key, images), sep='/')
    return {path: flat[path] for path in paths}

  # Returning only these leaves lets jit drop the forward pass: about 1 s instead of
  # compiling the whole model (6-15 s on CPU).
  return jax.jit(init)(rng)


def _check_architecture(model: CvT | CvTBackbone, variables: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None, where: str,
                        keep_cls_token: bool) -> None:
  """Names both variants when they differ: clearer than the list of keys that follows."""
  spec = _model_spec(model)
  if metadata is not None:
    found, name = CvTSpec.from_dict(metadata['spec']), metadata['variant']
    fields = convert_lib.STRUCTURAL_FIELDS
  else:
    # Heads are invisible in shapes; take the model's so that only shapes are compared, unless
    # they cannot split the checkpoint's widths (another variant: its own heads then).
    for heads in (spec.num_heads, None):
      try:
        arch = convert_lib.infer_architecture(variables, num_heads=heads)
        break
      except CheckpointError:
        return  # Incomplete checkpoints: the strict merge lists what is missing.
      except ValueError:
        continue
    found, name = arch.spec, arch.name
    fields = tuple(f for f in convert_lib.STRUCTURAL_FIELDS if f != 'num_heads')
  if not keep_cls_token:
    fields = tuple(f for f in fields if f != 'cls_token')
  differences = convert_lib.spec_differences(found, spec, fields)
  if differences:
    model_name = convert_lib.variant_of(spec) or 'a custom CvT'
    hints = []
    if found.cls_token != spec.cls_token:
      hints.append('keep_cls_token=False discards the checkpoint\'s cls token.')
    raise CheckpointMismatchError(hints=hints, summary=(
        f'{where} holds {name} weights ({convert_lib.describe_spec(found)}) but the model is '
        f'{model_name} ({convert_lib.describe_spec(spec)}); checkpoint vs model: '
        + '; '.join(differences) + '.'))


def _load_into(model: CvT | CvTBackbone, variables: Mapping[str, Any],
               metadata: Mapping[str, Any] | None, where: str, *, drop_head: bool,
               keep_cls_token: bool, rng: jax.Array | None,
               activation_chosen: bool = False) -> dict[str, Any]:
  if isinstance(model, CvTBackbone):
    variables = convert_lib.convert_state_dict(variables, backbone=True)
  _check_architecture(model, variables, metadata, where, keep_cls_token)
  if (metadata is not None and not activation_chosen
      and metadata.get('activation') != model.activation):
    warnings.warn(
        f'{where} was converted for activation {metadata.get("activation")!r} but the model '
        f'runs {model.activation!r}. The released weights were trained with quick_gelu; '
        'gelu reproduces Hugging Face outputs.', stacklevel=3)
  rng = jax.random.key(0) if rng is None else rng
  options = dict(drop_head=drop_head, keep_cls_token=keep_cls_token)
  # Shapes only (no compute); initial values only for what the checkpoint lacks.
  merged, report = convert_lib.merge_variables(_init(model, rng), variables, **options)
  if report.kept_init:
    flat = traverse_util.flatten_dict(merged, sep='/')
    flat.update(_init(model, rng, list(report.kept_init)))
    merged = traverse_util.unflatten_dict(flat, sep='/')
    _logger.warning('Loaded %s into %s; %d variables kept at their fresh initialisation:\n%s',
                    where, type(model).__name__, len(report.kept_init),
                    '\n'.join(f'  {p} ({why})' for p, why in report.kept_init.items()))
  if report.discarded:
    _logger.info('Discarded from %s: %s', where, ', '.join(report.discarded))
  return jax.tree_util.tree_map(jnp.asarray, merged)


def load_pretrained(model: CvT | CvTBackbone, source: str | os.PathLike | Mapping[str, Any], *,
                    drop_head: bool = False, keep_cls_token: bool = True,
                    rng: jax.Array | None = None) -> dict[str, Any]:
  """`{'params', 'batch_stats'}` for `model` (`CvT` or `CvTBackbone`) from a checkpoint.

  `source`: a converted file, a released file or Hugging Face folder, or in-memory weights
  of any naming; merged strictly (`merge_variables`). `drop_head` keeps a fresh head;
  `keep_cls_token=False` discards the cls token; `rng` initialises what the checkpoint lacks.
  Warns when a converted file records another activation than the model runs.
  """
  _model_spec(model)
  if isinstance(source, Mapping):
    variables, metadata, where = convert_lib.convert_state_dict(source), None, 'The state_dict'
  else:
    path = resolve_weights_file(source)
    where = str(path)
    if _is_converted_file(path):
      variables, metadata = load_converted(path)
    else:
      variables, metadata = convert_lib.convert_state_dict(read_state_dict(path)), None
  return _load_into(model, variables, metadata, where, drop_head=drop_head,
                    keep_cls_token=keep_cls_token, rng=rng)


def load_backbone(path: str | os.PathLike, *, keep_cls_token: bool = True,
                  rng: jax.Array | None = None,
                  **backbone_kwargs: Any) -> tuple[CvTBackbone, dict[str, Any]]:
  """(`CvTBackbone` built from a converted file's metadata, its variables).

  `backbone_kwargs` are `CvTBackbone` fields; the variant and activation default to the
  file's (an activation given here is intended: no warning).
  """
  variables, metadata = load_converted(path)
  kwargs: dict[str, Any] = dict(activation=metadata['activation'], in_chans=metadata['in_chans'])
  if metadata['variant'] in convert_lib.VARIANTS:
    kwargs['variant'] = metadata['variant']
  else:
    kwargs['spec'] = CvTSpec.from_dict(metadata['spec'])
  kwargs.update(backbone_kwargs)
  model = CvTBackbone(**kwargs)
  return model, _load_into(model, variables, metadata, str(path), drop_head=False,
                           keep_cls_token=keep_cls_token, rng=rng,
                           activation_chosen='activation' in backbone_kwargs)


def _classifier(spec: CvTSpec, variant: str, num_classes: int, **kwargs: Any) -> CvT:
  if variant in convert_lib.VARIANTS:
    return CvT.from_variant(variant, num_classes=num_classes, **kwargs)
  if spec.num_stages == 3:
    model = CvT.from_spec(spec, num_classes, **kwargs)
    if not convert_lib.spec_differences(spec, model.resolved_spec):
      return model
  raise CheckpointError(f'The custom architecture ({convert_lib.describe_spec(spec)}, cls token '
                        f'{spec.cls_token}) is not a CvT classifier; use load_backbone.')


def load_classifier(path: str | os.PathLike, *, num_classes: int | None = None,
                    drop_head: bool = False, rng: jax.Array | None = None,
                    **cvt_kwargs: Any) -> tuple[CvT, dict[str, Any]]:
  """(`CvT` classifier built from a converted file's metadata, its variables).

  `num_classes` defaults to the file's head; another count needs `drop_head=True` (implied
  for files converted with `--drop-head`). `cvt_kwargs` are `CvT` fields.
  """
  variables, metadata = load_converted(path)
  if metadata['backbone_only']:
    raise CheckpointError(f'{path} was converted with --backbone-only and has no classifier; '
                          'use load_backbone, or convert again without --backbone-only.')
  head_in_file = metadata['num_classes']
  if num_classes is None:
    if not head_in_file:
      raise CheckpointError(f'{path} was converted with --drop-head; pass num_classes.')
    num_classes = head_in_file
  kwargs = dict(activation=metadata['activation'], channels=metadata['in_chans'])
  kwargs.update(cvt_kwargs)
  model = _classifier(CvTSpec.from_dict(metadata['spec']), metadata['variant'], num_classes,
                      **kwargs)
  return model, _load_into(model, variables, metadata, str(path),
                           drop_head=drop_head or not head_in_file, keep_cls_token=True, rng=rng,
                           activation_chosen='activation' in cvt_kwargs)


def _heads(text: str) -> tuple[int, ...]:
  try:
    heads = tuple(int(h) for h in text.split(','))
  except ValueError:
    heads = ()
  if not heads or min(heads) < 1:
    raise argparse.ArgumentTypeError(
        f'expected positive integers separated by commas such as 1,3,6, got {text!r}')
  return heads


def main(argv: Sequence[str] | None = None) -> int:
  """`cvt-convert SRC OUT`: a released CvT checkpoint -> a Flax msgpack file."""
  parser = argparse.ArgumentParser(
      prog='cvt-convert',
      description='Convert an official (CvT-13-224x224-IN-1k.pth, ...) or Hugging Face '
      '(microsoft/cvt-13 model.safetensors / pytorch_model.bin) CvT checkpoint to a Flax '
      'msgpack file for cvt_backbone.load_backbone / load_classifier. Every tensor is checked '
      'against the inferred architecture before anything is written.',
      epilog='exit status: 0 when OUT was written, 1 on an error (one "error:" line: a bad or '
      'mismatched checkpoint, OUT exists without --overwrite), 2 for bad arguments. Also run '
      'as `python -m cvt_backbone convert SRC OUT ...`.',
      formatter_class=HelpFormatter)
  parser.add_argument('src', type=Path,
                      help='the .pth, .bin or .safetensors file, or a Hugging Face model folder')
  parser.add_argument('out', type=Path, help='the .msgpack file to write (its folder must exist)')
  parser.add_argument('--variant', help="expected variant ('cvt-13', 'cvt-21', 'cvt-w24'), "
                      'checked against the shapes (default: inferred from them)')
  head = parser.add_mutually_exclusive_group()
  head.add_argument('--backbone-only', action='store_true',
                    help='drop the classifier (final norm and head) for CvTBackbone')
  head.add_argument('--drop-head', action='store_true',
                    help='drop only the head Linear, to fine-tune with another class count')
  parser.add_argument('--activation', choices=sorted(ACTIVATIONS), default='quick_gelu',
                      help='activation recorded for the loaders: quick_gelu (what the weights '
                      'were trained with) or gelu (what Hugging Face runs)')
  parser.add_argument('--num-heads', type=_heads, metavar='H1,H2,H3',
                      help='heads per stage, only for custom architectures (default: those of '
                      'the inferred variant, or of config.json in a Hugging Face folder)')
  parser.add_argument('--overwrite', '--force', dest='overwrite', action='store_true',
                      help='replace OUT if it exists (--force is the old name; by default an '
                      'existing OUT is kept and the exit status is 1)')
  args = parser.parse_args(argv)
  try:
    metadata = convert_checkpoint(
        args.src, args.out, variant=args.variant, backbone_only=args.backbone_only,
        drop_head=args.drop_head, activation=args.activation, num_heads=args.num_heads,
        overwrite=args.overwrite)
  except (CheckpointError, OSError, ValueError) as e:
    print(f'cvt-convert: error: {e}', file=sys.stderr)
    return 1
  head_text = (f'{metadata["num_classes"]}-class head' if metadata['num_classes']
               else 'backbone only' if metadata['backbone_only'] else 'head dropped')
  print(f'Wrote {args.out}: {metadata["variant"]}, {head_text}, activation '
        f'{metadata["activation"]}, from {metadata["source"]["file"]} '
        f'({metadata["source"]["naming"]} names, sha256 {metadata["source"]["sha256"][:12]}...).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
