"""Command-line plumbing shared by `evaluate` and `predict`: configs, models, inference flags.

Configs are Python files with `get_config(arg=None)` returning an `ml_collections.ConfigDict`
(Scenic / big_vision style), named as `path/to/config.py` or `path/to/config.py:arg`. The
keys read here: `dataset_name`, `dataset_configs` (keyword arguments of `build_loaders`),
and `eval` with `mode` ('whole' | 'slide'), `crop_size`, `stride`, `scales`, `flip` (and
optionally `min_size`, `pad_to_crop`); command-line flags override `eval`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import Any

from projects.cvt_segmentation.configs import common as _settings  # noqa: F401  (registers its keys)
from projects.cvt_segmentation.inference import DEFAULT_MIN_SIZE, MODES
from projects.output_files import check_output_free  # noqa: F401  (the tools' API)
from projects.training.configs import as_dict, config_get, load_config  # noqa: F401

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


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(s) for s in text.replace(',', ' ').split())
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'expected ratios such as 0.5,0.75,1.0, got {text!r}'
    ) from None


def add_common_flags(parser: argparse.ArgumentParser) -> None:
  """--config, --checkpoint and the inference flags (None: take the config's value)."""
  parser.add_argument('--config', required=True, help='path/to/config.py[:arg]')
  parser.add_argument('--checkpoint', required=True, help='checkpoint directory')
  parser.add_argument('--mode', choices=MODES, default=None, help='inference mode')
  parser.add_argument('--crop-size', type=int, nargs='+', default=None, metavar='N',
                      help='slide window: H [W]')
  parser.add_argument('--stride', type=int, nargs='+', default=None, metavar='N',
                      help='slide stride: H [W]')
  parser.add_argument('--scales', type=_floats, default=None,
                      help='TTA ratios, e.g. 0.5,0.75,1.0,1.25,1.5,1.75')
  parser.add_argument('--flip', action=argparse.BooleanOptionalAction, default=None,
                      help='horizontal flip TTA')
  parser.add_argument('--min-size', type=int, default=None,
                      help=f'pad smaller inputs to this size (default {DEFAULT_MIN_SIZE})')
  parser.add_argument('--test-scale', default=None,
                      help="single-scale test resize 'LONG,SHORT', or 'none' to keep the size; "
                           "default: the dataset's")


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
        mode=args.mode, crop_size=_hw(args.crop_size), stride=_hw(args.stride),
        scales=args.scales, flip=args.flip, min_size=args.min_size,
    )
    values.update({k: v for k, v in flags.items() if v is not None})
  return InferenceSettings(**values)


def test_scale(config: Any, flag: str | None = None) -> tuple[int, int] | None:
  """The single-scale test resize: the flag, else `dataset_configs.test_scale`, else mmseg's."""
  from projects.cvt_segmentation.data import resolve_test_scale

  if flag is not None:
    if flag.lower() == 'none':
      return None
    try:
      long, short = (int(v) for v in flag.replace(',', ' ').split())
    except ValueError:
      raise ValueError(f"--test-scale must be 'LONG,SHORT' or 'none', got {flag!r}") from None
    return long, short
  dataset_configs = as_dict(config_get(config, 'dataset_configs'))
  # An explicit None (keep the size) differs from an absent key (the dataset's default).
  value = dataset_configs.get('test_scale', 'default')
  return resolve_test_scale(config_get(config, 'dataset_name'), value)
