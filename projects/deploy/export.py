"""`cvt-export`: a trained model or a converted backbone as a file that runs without this package.

  cvt-export --config=CONFIG.py --checkpoint=WORKDIR [--format F] --output PATH [--logits]
  cvt-export --backbone=cvt-13.msgpack [--format F] --output PATH

`F`: `stablehlo` (`jax.export` serialized, read by `jax.export.deserialize`), `savedmodel` (a
TensorFlow SavedModel folder, `serving_default`, by `jax2tf`) or `onnx` (`jax2onnx`). Batch,
height and width are symbolic unless `--static`. `PATH.json` describes the artifact. Both are
written atomically; an existing one is kept unless --overwrite (docs/export.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from cvt_backbone.cvt import MIN_INPUT_SIZE
from cvt_backbone.tools import check_apart, file_sha256, write_atomically
from projects.deploy import serving
from projects.tools import command_line, output_files
from projects.training import image_ops

FORMATS = ('stablehlo', 'savedmodel', 'onnx')
INPUT_NAME = 'images'
METADATA_FORMAT = 1


# --- the model ----------------------------------------------------------------------------


def _project(config_spec: str) -> str:
  """'segmentation' or 'detection', by the config's model name."""
  from projects.cvt_detection.models import MODELS as DETECTORS
  from projects.cvt_segmentation.models import MODELS as SEGMENTERS
  from projects.training.configs import load_config

  name = load_config(config_spec).get('model_name')
  if name in SEGMENTERS:
    return 'segmentation'
  if name in DETECTORS:
    return 'detection'
  raise ValueError(f'config {config_spec.partition(":")[0]} has model_name {name!r}; expected a '
                   f'segmentation ({", ".join(sorted(SEGMENTERS))}) or detection '
                   f'({", ".join(sorted(DETECTORS))}) model')


def _folder_sha256(folder: str) -> str:
  """sha256 over `relative path NUL sha256 LF` of every file in `folder`, in path order."""
  lines = sorted(f'{os.path.relpath(os.path.join(root, name), folder)}\0'
                 f'{file_sha256(os.path.join(root, name))}\n'
                 for root, _, names in os.walk(folder) for name in names)
  return hashlib.sha256(''.join(lines).encode()).hexdigest()


def _checkpoint_record(checkpoint: str) -> dict[str, Any]:
  from projects.training import checkpoints

  folder, step = checkpoints.locate(checkpoint)
  saved = checkpoints.saved_metadata(checkpoint)
  return {'path': str(folder / str(step)), 'step': step,
          'sha256': _folder_sha256(str(folder / str(step))),
          'sha256_of': 'every file in the step folder: sha256 of the sorted lines '
                       '"<relative path>\\0<file sha256>\\n"',
          'variables_checksum': (saved.get('checksums') or {}).get('variables')}


def load_trained(config_spec: str, checkpoint: str, *, logits: bool = False
                 ) -> serving.Servable:
  """The servable of a segmentation or detection run, its checkpoint chosen as `evaluate`."""
  from projects.training import checkpoints
  from projects.training.configs import config_get

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
  project = _project(config_spec)
  saved = checkpoints.saved_metadata(checkpoint)
  source = {'config': os.path.abspath(config_spec.partition(':')[0]),
            'config_arg': config_spec.partition(':')[2] or None,
            'model_name': saved.get('model_name'), 'backbone_variant':
            saved.get('backbone_variant'), 'checkpoint': _checkpoint_record(checkpoint)}
  if project == 'segmentation':
    from projects.cvt_segmentation import models, palettes
    from projects.cvt_segmentation.configs.common import load_config
    from projects.cvt_segmentation.inference import config_test_scale
    from projects.cvt_segmentation.predict import class_names

    config = load_config(config_spec)
    flax_model, variables = models.restore_for_inference(config, checkpoint)
    k = int(saved['num_classes'])
    scale = config_test_scale(config)
    names = class_names(config, k)
    palette = palettes.get_palette('auto', k, config_get(config, 'dataset_name'))
    return serving.segmentation(flax_model, variables, logits=logits, metadata={
        **source, 'num_classes': k, 'class_names': None if names is None else list(names),
        'palette': np.asarray(palette).tolist(),
        'test_scale': None if scale is None else list(scale),
        'size_note': 'the artifact runs at the size it is given; predict first resizes an '
                     'image to test_scale (long, short side; keep ratio) when set'})
  if logits:
    raise ValueError('--logits is for segmentation models; this config is a detector')
  from projects.cvt_detection import models
  from projects.cvt_detection.configs.common import load_config

  config = load_config(config_spec)
  names, ids = saved.get('class_names'), saved.get('category_ids')
  flax_model, variables = models.restore_for_inference(config, checkpoint)
  model = models.get_model_cls(config.model_name)(config, {'num_classes':
                                                           int(saved['num_classes'])})
  model.flax_model = flax_model
  settings = dict(models.DETECT_DEFAULTS, **dict(config_get(config, 'eval') or {}))
  return serving.detection(model, variables, dtype=config_get(config, 'data_dtype_str',
                                                               'float32'), metadata={
      **source, 'num_classes': int(saved['num_classes']), 'class_names': names,
      'category_ids': ids, 'max_detections': settings['max_detections'],
      'postprocess': settings, 'size_divisor': serving.DETECTION_SIZE_DIVISOR,
      'size_note': 'the artifact runs at the size it is given (padded inside to a multiple '
                   'of size_divisor); predict first resizes an image into the config\'s scale'})


def load_backbone(path: str) -> serving.Servable:
  from cvt_backbone.weights.converted import load_backbone as load
  from cvt_backbone.weights.converted import load_converted

  model, variables = load(path)
  _, saved = load_converted(path)
  return serving.backbone(model, variables, metadata={
      'weights': {**output_files.describe_input(path), 'sha256_of': 'the file'},
      'variant': saved.get('variant'), 'source': saved.get('source')})


# --- the formats --------------------------------------------------------------------------


def to_stablehlo(servable: serving.Servable, spec: jax.ShapeDtypeStruct) -> bytes:
  """`jax.export` of the servable, variables inside, serialized."""
  return jax.export.export(jax.jit(servable.bound()))(spec).serialize()


def to_onnx(servable: serving.Servable, spec: jax.ShapeDtypeStruct) -> bytes:
  from projects.deploy.onnx import to_onnx as convert  # jax2onnx: the `export` extra

  return convert(servable.bound(), spec, input_name=INPUT_NAME)


def _polymorphic_shape(spec: jax.ShapeDtypeStruct) -> str:
  return '(' + ', '.join(str(d) for d in spec.shape) + ')'


def write_savedmodel(servable: serving.Servable, spec: jax.ShapeDtypeStruct,
                     folder: str) -> None:
  """A SavedModel in `folder`: `serving_default(images)` -> the outputs, by `jax2tf` (native
  serialization: StableHLO in an XlaCallModule op), the variables as tf.Variables."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  from heads.detection import nms

  constraints = (f'h >= {MIN_INPUT_SIZE}', f'w >= {MIN_INPUT_SIZE}') if any(
      not isinstance(d, int) for d in spec.shape[1:3]) else ()
  converted = jax2tf.convert(servable.apply, with_gradient=False,
                             polymorphic_shapes=[None, _polymorphic_shape(spec)],
                             polymorphic_constraints=constraints)
  module = tf.Module()
  module.params = tf.nest.map_structure(
      tf.Variable, jax.tree.map(np.asarray, jax.device_get(servable.variables)))
  shape = [d if isinstance(d, int) else None for d in spec.shape]
  # Checked here: a wrong channel count would otherwise fail inside the XLA call, unnamed.
  module.serve = tf.function(
      lambda images: converted(module.params, tf.ensure_shape(images, shape)), autograph=False)
  with nms.sorted_top_k():  # traced here
    signature = module.serve.get_concrete_function(
        tf.TensorSpec(shape, tf.as_dtype(spec.dtype), name=INPUT_NAME))
  tf.saved_model.save(module, folder, signatures={'serving_default': signature})
  # TensorFlow's StableHLO may be older than jax's: run it once before it is kept.
  probe = np.zeros([d if isinstance(d, int) else 32 for d in spec.shape], spec.dtype)
  try:
    tf.saved_model.load(folder).signatures['serving_default'](**{INPUT_NAME: tf.constant(probe)})
  except tf.errors.OpError as e:
    reason = next((line.strip() for line in str(e).splitlines() if 'error:' in line),
                  str(e).splitlines()[0])
    raise ValueError(f'the SavedModel does not run in TensorFlow {tf.__version__} (jax '
                     f'{jax.__version__} wrote StableHLO it cannot read): {reason}') from None


# --- writing ------------------------------------------------------------------------------


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def write_folder(path: str, write: Callable[[str], None]) -> None:
  """`write(folder)` into a temporary folder beside `path`, then renamed to `path` (an existing
  `path` is moved aside first and removed after: a crash leaves it under `.NAME.*.old`)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  old = None
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes folders private; outputs are ordinary folders.
    write(tmp)
    if os.path.lexists(path):
      old = tmp[:-len('.tmp')] + '.old'
      os.replace(path, old)
    os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    if old is not None and not os.path.lexists(path):
      os.replace(old, path)
    raise
  if old is not None:
    _remove(old)


def write_artifact(path: str, fmt: str, servable: serving.Servable,
                   spec: jax.ShapeDtypeStruct) -> None:
  if fmt == 'savedmodel':
    write_folder(path, lambda folder: write_savedmodel(servable, spec, folder))
    return
  data = to_stablehlo(servable, spec) if fmt == 'stablehlo' else to_onnx(servable, spec)
  if os.path.isdir(path):  # an older savedmodel replaced by a file (--overwrite)
    write_folder(path, lambda folder: None)
    os.rmdir(path)
  write_atomically(path, lambda f: f.write(data))


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def describe(servable: serving.Servable, fmt: str, spec: jax.ShapeDtypeStruct
             ) -> dict[str, Any]:
  """`PATH.json`: what the artifact takes and gives, where it comes from, what made it."""
  dims = [d if isinstance(d, int) else str(d) for d in spec.shape]
  symbolic = [str(d) for d in spec.shape[:3] if not isinstance(d, int)]
  packages = ['jax', 'jaxlib', 'flax', 'cvt-dense'] + {
      'savedmodel': ['tensorflow', 'tensorflow-cpu'],
      'onnx': ['jax2onnx', 'onnx']}.get(fmt, [])
  return {
      'format_version': METADATA_FORMAT, 'kind': servable.kind, 'format': fmt,
      'input': {
          'name': INPUT_NAME, 'dtype': servable.input_dtype, 'shape': dims,
          'layout': 'NHWC [batch, height, width, channels]', 'channels': 'RGB',
          'symbolic_dims': symbolic, 'min_size': MIN_INPUT_SIZE,
          'normalization_inside': servable.normalized_inside,
          'normalization': {'mean': list(image_ops.IMAGENET_MEAN),
                            'std': list(image_ops.IMAGENET_STD),
                            'formula': '(x - mean) / std per channel, x in 0-255',
                            'applied': 'inside' if servable.normalized_inside else
                                       'by the caller'}},
      'outputs': dict(servable.outputs),
      **servable.metadata,
      'exported_with': {p: v for p in packages if (v := _version(p))},
  }


# --- the command --------------------------------------------------------------------------


def static_size(text: str) -> tuple[int | None, int, int]:
  """'HxW' or 'BxHxW' -> (batch or None, h, w)."""
  try:
    values = tuple(int(v) for v in text.lower().split('x'))
  except ValueError:
    values = ()
  if len(values) not in (2, 3) or min(values) < 1 or min(values[-2:]) < MIN_INPUT_SIZE:
    raise argparse.ArgumentTypeError(
        f'expected HxW or BATCHxHxW such as 512x512 or 1x512x512 (sides of at least '
        f'{MIN_INPUT_SIZE} px), got {text!r}')
  return (None, *values) if len(values) == 2 else values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'cvt-export', 'Export a trained segmentation or detection model, or a converted backbone, '
      'as a StableHLO, TensorFlow SavedModel or ONNX artifact that runs without this package, '
      'at any batch size and image size, with PATH.json describing it.',
      epilog='exit status: 0 when exported, 1 on an error, 2 for bad arguments.')
  parser.add_argument('--config', metavar='CONFIG.py[:ARG]',
                      help='the experiment config, path/to/config.py or path/to/config.py:arg')
  parser.add_argument('--checkpoint', metavar='DIR',
                      help='a training workdir, its checkpoints folder (the latest step) or one '
                           'step folder in it')
  parser.add_argument('--backbone', metavar='FILE.msgpack',
                      help='a converted backbone (cvt-convert) instead of --config/--checkpoint')
  parser.add_argument('--format', choices=FORMATS, default='stablehlo',
                      help='stablehlo: a file for jax.export.deserialize; savedmodel: a '
                           'TensorFlow SavedModel folder; onnx: a file for onnxruntime')
  parser.add_argument('--output', required=True, metavar='PATH',
                      help='the artifact (a folder for savedmodel); PATH.json describes it')
  parser.add_argument('--static', type=static_size, metavar='[BATCHx]HxW',
                      help='fix the image size (and the batch): by default both are symbolic, '
                           f'any batch and any height and width of at least {MIN_INPUT_SIZE}')
  parser.add_argument('--logits', action='store_true',
                      help='segmentation: also output the float32 logits [B, H, W, K]')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace an existing artifact and its PATH.json (by default they are '
                           'kept and the export fails)')
  args = parser.parse_args(argv)
  if (args.backbone is None) == (args.config is None and args.checkpoint is None):
    parser.error('give --config and --checkpoint (a trained run) or --backbone (a converted '
                 'backbone), not both')
  if args.backbone is None and (args.config is None or args.checkpoint is None):
    parser.error('a trained run needs both --config and --checkpoint')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status."""
  args = parse_args(argv)
  path = args.output
  meta_path = path + '.json'
  try:
    if args.backbone is not None:
      inputs = {args.backbone: 'the backbone file'}
    else:
      inputs = output_files.model_inputs(args.config, args.checkpoint)
    check_apart([path, meta_path], inputs)
    existing = [p for p in (path, meta_path) if os.path.lexists(p)]
    if existing and not args.overwrite:
      raise FileExistsError(f'{existing[0]} exists; pass --overwrite to replace it')
    output_files.check_writable([meta_path])
    if args.backbone is not None:
      if args.logits:
        raise ValueError('--logits is for segmentation models, not a backbone')
      servable = load_backbone(args.backbone)
    else:
      servable = load_trained(args.config, args.checkpoint, logits=args.logits)
    spec = serving.input_spec(servable, args.static)
    if args.format == 'onnx' and servable.kind == 'detection' and not all(
        isinstance(d, int) for d in spec.shape):
      raise ValueError('a detector exports to ONNX at one size (--static BxHxW, e.g. '
                       '1x512x512): onnxruntime cannot run its NMS loop at symbolic sizes as '
                       'jax2onnx writes it; the stablehlo and savedmodel formats take any size')
    write_artifact(path, args.format, servable, spec)
    output_files.write_json(describe(servable, args.format, spec), meta_path)
  except ImportError as e:
    print(f'error: the {args.format} format needs {e.name or e}, which the export extra '
          'installs: pip install "cvt-dense[export]"', file=sys.stderr)
    return command_line.EXIT_FAILED
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  print(f'exported the {servable.kind} as {args.format} to {path} (input {INPUT_NAME} '
        f'{servable.input_dtype} [{", ".join(str(d) for d in spec.shape)}]); {meta_path} '
        'describes it', file=sys.stderr)
  return command_line.EXIT_OK
