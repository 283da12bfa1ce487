"""Command-line plumbing shared by `evaluate` and `predict`: configs, models, inference flags.

Configs are Python files with `get_config(arg=None)` returning an `ml_collections.ConfigDict`
(Scenic / big_vision style), named as `path/to/config.py` or `path/to/config.py:arg`. The
keys read here: `dataset_name`, `dataset_configs` (keyword arguments of `build_loaders`),
and `eval` with `mode` ('whole' | 'slide'), `crop_size`, `stride`, `scales`, `flip` (and
optionally `min_size`, `pad_to_crop`); command-line flags override `eval`. Also
`eval_batch_size` (`evaluate`'s default batch size, as the trainer's evaluation) and the
dataset's class names (`class_names`: which classes `predict`'s overlays leave unpainted).

Flags take lists the way every tool of the projects does (`projects.tools.command_line`):
comma-separated, `--crop-size 512,1024 --stride 341,682 --scales 0.5,1.0,1.5
--test-scale 2048,512`, and `--help` says where each default comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from projects.tools import command_line
from projects.cvt_segmentation.configs.common import load_config  # noqa: F401
from projects.cvt_segmentation.inference import DEFAULT_MIN_SIZE, MODES
from projects.tools.output_files import check_output_free  # noqa: F401  (the tools' API)
from projects.training.configs import as_dict, config_get  # noqa: F401

# `model_loader(config, checkpoint_dir) -> (flax_model, variables)`.
ModelLoader = Callable[[Any, str], tuple[Any, Any]]
# Classes of the datasets whose size the config does not spell out.
_DATASET_NUM_CLASSES = {'ade20k': 150, 'cityscapes': 19}


def load_model(config: Any, checkpoint: str, model_loader: ModelLoader | None = None):
  """`(flax_model, variables)` restored from `checkpoint` for `config`.

  Args:
    config: the experiment config.
    checkpoint: checkpoint directory.
    model_loader: replaces `models.restore_for_inference` (tests inject models).

  Returns:
    `(flax_model, variables)`; `flax_model.apply(variables, images, train=False)` gives
    logits `[B, H, W, K]` (or `{'logits': ...}`).
  """
  if model_loader is None:
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    # Imported here: the checkpoint module pulls in the trainer's dependencies.
    from projects.cvt_segmentation.models import restore_for_inference

    model_loader = restore_for_inference
  return model_loader(config, checkpoint)


def expected_num_classes(config: Any) -> int | None:
  """Number of classes the config implies, or None when only the model can tell."""
  for value in (
      config_get(config, 'num_classes'),
      config_get(config_get(config, 'model'), 'num_classes'),
      config_get(config_get(config, 'dataset_configs'), 'num_classes'),
  ):
    if value is not None:
      return int(value)
  return _DATASET_NUM_CLASSES.get(config_get(config, 'dataset_name'))


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """How to infer: mode, windows and test-time augmentation (see `inference`).

  Attributes:
    mode: 'whole' or 'slide'.
    crop_size: slide window `(h, w)`.
    stride: slide stride `(h, w)`.
    scales: TTA resize ratios; `(1.0,)` is single scale.
    flip: add horizontally flipped inference.
    min_size: pad smaller images / windows to this size for the model.
    pad_to_crop: pad slide windows smaller than the crop to the crop size.
  """

  mode: str = 'whole'
  crop_size: tuple[int, int] | None = None
  stride: tuple[int, int] | None = None
  scales: tuple[float, ...] = (1.0,)
  flip: bool = False
  min_size: int = DEFAULT_MIN_SIZE
  pad_to_crop: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f'unknown inference mode {self.mode!r}; expected one of {MODES}')
    if self.mode == 'slide' and (self.crop_size is None or self.stride is None):
      raise ValueError("mode 'slide' needs crop_size and stride (config.eval or flags)")
    if not self.scales or any(s <= 0 for s in self.scales):
      raise ValueError(f'scales must be positive ratios, got {self.scales}')

  @property
  def tta(self) -> bool:
    """Whether test-time augmentation is on (several scales, another scale, or flip)."""
    return tuple(self.scales) != (1.0,) or self.flip

  def infer_kwargs(self) -> dict:
    """Keyword arguments of `inference.infer_logits`."""
    return dict(
        mode=self.mode, crop_size=self.crop_size, stride=self.stride, min_size=self.min_size,
        pad_to_crop=self.pad_to_crop,
    )


def _hw(value: Any) -> tuple[int, int] | None:
  if value is None:
    return None
  if isinstance(value, int):
    return value, value
  value = tuple(int(v) for v in value)
  return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def test_scale_flag(text: str) -> tuple[int, int] | str:
  """`--test-scale`: 'LONG,SHORT' such as '2048,512' -> (long, short), or 'none'."""
  if text.strip().lower() == 'none':
    return 'none'
  try:
    values = tuple(int(p) for p in text.split(','))
  except ValueError:
    values = ()
  if len(values) != 2 or min(values) <= 0:
    raise argparse.ArgumentTypeError(
        f"expected LONG,SHORT (two positive integers such as 2048,512) or 'none', got {text!r}")
  return values


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """--config, --checkpoint and the inference flags (None: take the config's value).

  Lists are comma-separated (`projects.tools.command_line`): `--crop-size 512,1024`,
  `--scales 0.5,1.0,1.5`, `--test-scale 2048,512`.
  """
  parser.add_argument('--config', required=True, metavar='CONFIG.py[:ARG]',
                      help='the experiment config, path/to/config.py or path/to/config.py:arg')
  parser.add_argument('--checkpoint', required=True, metavar='DIR',
                      help='a training workdir, its checkpoints folder (the latest step) or one '
                           'step folder in it')
  parser.add_argument('--mode', choices=MODES, default=None,
                      help="whole-image or sliding-window inference (default: the config's "
                           'eval.mode)')
  parser.add_argument('--crop-size', type=command_line.sizes, default=None, metavar='H,W',
                      help="slide window, H,W or one size for a square (default: the config's "
                           'eval.crop_size)')
  parser.add_argument('--stride', type=command_line.sizes, default=None, metavar='H,W',
                      help="slide stride, H,W or one size (default: the config's eval.stride)")
  parser.add_argument('--scales', type=command_line.floats, default=None, metavar='R,R,...',
                      help='test-time augmentation: resize ratios such as 0.5,0.75,1.0,1.25,1.5,'
                           "1.75 whose predictions are averaged (default: the config's "
                           'eval.scales)')
  parser.add_argument('--flip', action=argparse.BooleanOptionalAction, default=None,
                      help='test-time augmentation: also infer the mirrored image (default: the '
                           "config's eval.flip)")
  parser.add_argument('--min-size', type=int, default=None, metavar='N',
                      help='pad smaller inputs and windows to N pixels for the model (default: '
                           f"the config's eval.min_size, else {DEFAULT_MIN_SIZE})")
  parser.add_argument('--test-scale', type=test_scale_flag, default=None,
                      metavar='LONG,SHORT|none',
                      help='resize each image to fit LONG x SHORT (keeping its ratio) before '
                           "inference, or 'none' to keep its size (default: the config's "
                           "dataset_configs.test_scale, else the dataset's mmseg value)")


def inference_settings(config: Any, args: argparse.Namespace | None = None) -> InferenceSettings:
  """`config.eval` overridden by the flags that were given."""
  ev = config_get(config, 'eval')
  values = dict(
      mode=config_get(ev, 'mode', 'whole'),
      crop_size=_hw(config_get(ev, 'crop_size')),
      stride=_hw(config_get(ev, 'stride')),
      scales=tuple(float(s) for s in config_get(ev, 'scales', (1.0,))),
      flip=bool(config_get(ev, 'flip', False)),
      min_size=int(config_get(ev, 'min_size', DEFAULT_MIN_SIZE)),
      pad_to_crop=bool(config_get(ev, 'pad_to_crop', False)),
  )
  if args is not None:
    flags = dict(
        mode=args.mode, crop_size=args.crop_size, stride=args.stride,
        scales=args.scales, flip=args.flip, min_size=args.min_size,
    )
    values.update({k: v for k, v in flags.items() if v is not None})
  return InferenceSettings(**values)


def test_scale(config: Any, flag: tuple[int, int] | str | None = None
               ) -> tuple[int, int] | None:
  """The single-scale test resize: the flag, else `dataset_configs.test_scale`, else mmseg's.

  Args:
    config: the experiment config.
    flag: `--test-scale` (`test_scale_flag`'s `(long, short)` or 'none', or the text
      'LONG,SHORT'); None: the config's.

  Returns:
    `(long, short)`, or None to keep the images' size.
  """
  from projects.cvt_segmentation.data import resolve_test_scale

  if isinstance(flag, str):
    try:
      flag = test_scale_flag(flag)
    except argparse.ArgumentTypeError as e:
      raise ValueError(f'--test-scale: {e}') from None
  if flag is not None:
    return None if flag == 'none' else (int(flag[0]), int(flag[1]))
  dataset_configs = as_dict(config_get(config, 'dataset_configs'))
  # An explicit None (keep the size) differs from an absent key (the dataset's default).
  value = dataset_configs.get('test_scale', 'default')
  return resolve_test_scale(config_get(config, 'dataset_name'), value)


def eval_batch_size(config: Any, flag: int | None = None) -> int:
  """`--batch-size` if given, else the config's `eval_batch_size` (the trainer's), else 1."""
  value = flag if flag is not None else config_get(config, 'eval_batch_size', 1)
  if int(value) < 1:
    raise ValueError(f'the evaluation batch size must be positive, got {value}')
  return int(value)


def class_names(config: Any, num_classes: int) -> tuple[str, ...] | None:
  """The class names of the config's dataset, without reading its files; None if unknown.

  Synthetic: 'background' then shapes; ADE20K and Cityscapes: their tables; folder
  datasets: `dataset_configs.class_names`.
  """
  from projects.cvt_segmentation import data

  name = config_get(config, 'dataset_name')
  names = None
  if name == 'synthetic':
    names = data.synthetic_class_names(num_classes)
  elif name == 'ade20k':
    names = data.ADE20K_CLASSES
  elif name == 'cityscapes':
    names = data.CITYSCAPES_CLASSES
  else:
    names = config_get(config_get(config, 'dataset_configs'), 'class_names')
  if names is None or len(names) != num_classes:
    return None
  return tuple(str(n) for n in names)
