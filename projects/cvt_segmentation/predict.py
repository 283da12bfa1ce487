"""Segment image files: a palette PNG mask and a side-by-side overlay per image.

  python -m projects.cvt_segmentation.predict --config CONFIG.py --checkpoint WORKDIR \\
      --output masks photos/ more/*.jpg [--scales 0.75,1.0,1.25 --flip] [--overwrite]

Images go through the evaluation pipeline (`inference.segment_image`) at their own size;
the overlay leaves the background (classes named 'background') as it is unless
--paint-background. Outputs follow the tools' output policy (`projects.tools.output_files`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from projects.cvt_segmentation import palettes
from projects.cvt_segmentation.configs.common import load_config
from projects.cvt_segmentation.evaluate import (
  ModelLoader,
  add_inference_flags,
  flag_settings,
  load_model,
)
from projects.cvt_segmentation.inference import (
  InferenceSettings,
  LogitsFn,
  config_test_scale,
  inference_settings,
  make_logits_fn,
  segment_image,
)
from projects.tools import command_line, output_files
from projects.tools.input_files import PredictError, collect_inputs
from projects.tools.progress import Progress
from projects.training.configs import config_get
from projects.training.images import ImageError, check_image_header, read_image

TOOL = 'cvt_segmentation.predict'
MASK_SUFFIX = '_mask.png'
OVERLAY_SUFFIX = '_overlay.png'
# Classes of the datasets whose size the config does not spell out.
_DATASET_NUM_CLASSES = {'ade20k': 150, 'cityscapes': 19}


def record_settings(config: str, checkpoint: str, settings: InferenceSettings,
                    test_scale: Sequence[int] | None, palette: str,
                    alpha: float, paint_background: bool = False) -> tuple[dict, dict]:
  """`(mask settings, overlay settings)` recorded in the outputs: what changes them."""
  mask = {
      **output_files.model_settings(config, checkpoint),
      'inference': dataclasses.asdict(settings),
      'test_scale': None if test_scale is None else list(test_scale),
      'palette': palette,
  }
  return mask, dict(mask, alpha=alpha, paint_background=paint_background)


def predict_images(
    logits_fn: LogitsFn, jobs: Sequence[output_files.Planned], *, palette: np.ndarray,
    fail: command_line.Failures, settings: InferenceSettings | None = None,
    test_scale: Sequence[int] | None = None, num_classes: int | None = None, progress: bool = True,
    alpha: float = 0.5, transparent: Sequence[int] = ()) -> list[tuple[str, str, str]]:
  """Segments the inputs of `jobs` (`plan_inputs`) and writes their masks and overlays.

  Returns:
    `(input, mask, overlay)` of each input written; an unreadable one goes to `fail`.

  Raises:
    OutputWriteError: an output could not be written (a full disk): the run stops.
  """
  settings = settings or InferenceSettings()
  written = []
  with Progress(len(jobs), 'predict', 'img', enabled=progress) as bar:
    fail.write = bar.write
    for job in jobs:
      try:
        image = read_image(job.item.path)
      except ImageError as e:
        fail(str(e))
        bar.update()
        continue
      bar.start_item(f'{os.path.basename(job.item.path)} {image.shape[1]}x{image.shape[0]}')
      labels = segment_image(
          logits_fn, image, scales=settings.scales, flip=settings.flip, test_scale=test_scale,
          num_classes=num_classes, **settings.infer_kwargs())
      (mask_path, mask_record), (overlay_path, overlay_record) = job.records.items()
      output_files.save_png(palettes.mask_image(labels, palette), mask_path, mask_record)
      overlay = palettes.overlay_image(image, labels, palette, alpha, transparent)
      output_files.save_png(Image.fromarray(overlay), overlay_path, overlay_record)
      written.append((job.item.path, mask_path, overlay_path))
      bar.update()
  fail.write = None
  return written


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


def class_names(config: Any, num_classes: int) -> tuple[str, ...] | None:
  """The class names of the config's dataset, without reading its files; None if unknown."""
  from projects.cvt_segmentation import data

  names = {'synthetic': lambda: data.synthetic_class_names(num_classes),
           'ade20k': lambda: data.ADE20K_CLASSES, 'cityscapes': lambda: data.CITYSCAPES_CLASSES,
           }.get(config_get(config, 'dataset_name'),
                 lambda: config_get(config_get(config, 'dataset_configs'), 'class_names'))()
  if names is None or len(names) != num_classes:
    return None
  return tuple(str(n) for n in names)


def _model_num_classes(logits_fn: LogitsFn) -> int:
  """K of a model whose config does not say: one forward pass on a small blank image."""
  return int(np.shape(logits_fn(np.zeros((1, 64, 64, 3), np.float32)))[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'python -m projects.cvt_segmentation.predict',
      'Segment images: a palette PNG mask and a side-by-side overlay per image.')
  add_inference_flags(parser)
  command_line.add_inputs(parser, 'output folder: <stem>_mask.png and <stem>_overlay.png per image')
  parser.add_argument('--palette', choices=palettes.PALETTE_NAMES, default='auto',
                      help="mask colours; auto: the palette of the config's dataset (ADE20K's "
                           'for datasets without one)')
  parser.add_argument('--alpha', type=float, default=0.5,
                      help='weight of the class colours in the overlay')
  parser.add_argument('--paint-background', action='store_true',
                      help="colour the background in the overlay too (classes named "
                           "'background', such as the synthetic dataset's class 0); by "
                           'default it is left as it is, so the photo shows through')
  command_line.add_output_flags(parser, per_input=True)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, model_loader: ModelLoader | None = None) -> int:
  """Command-line entry point; returns the exit status (0 all done, 1 any failed, 2 usage)."""
  args = parse_args(argv)
  fail = command_line.Failures(args.strict, PredictError, 'skipped')
  written, done = [], []
  try:
    images, _ = collect_inputs(args.inputs, args.output, fail)
    config = load_config(args.config)
    settings = inference_settings(config, **flag_settings(args))
    scale = config_test_scale(config, args.test_scale)
    mask, overlay = record_settings(args.config, args.checkpoint, settings, scale, args.palette,
                                    args.alpha, args.paint_background)

    def outputs(item):
      base = os.path.join(args.output, item.stem)
      return {base + MASK_SUFFIX: mask, base + OVERLAY_SUFFIX: overlay}

    todo, done = output_files.plan_inputs(
        images, outputs, TOOL, args.overwrite, fail, check=check_image_header,
        inputs=output_files.model_inputs(args.config, args.checkpoint))
    # Before the model: an unwritable place fails in one line, not after the inference.
    output_files.check_writable([p for job in todo for p in job.records])
    if todo:
      model, variables = load_model(config, args.checkpoint, model_loader)
      logits_fn = make_logits_fn(model, variables)
      num_classes = expected_num_classes(config) or _model_num_classes(logits_fn)
      palette = palettes.get_palette(args.palette, num_classes,
                                     config_get(config, 'dataset_name'))
      transparent = () if args.paint_background else palettes.background_classes(
          class_names(config, num_classes))
      written = predict_images(
          logits_fn, todo, palette=palette, fail=fail, settings=settings, test_scale=scale,
          num_classes=num_classes, progress=not args.no_progress, alpha=args.alpha,
          transparent=transparent)
  except (PredictError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  parts = [f'{len(written)} images segmented into {args.output}']
  if done:
    parts.append(f'{len(done)} already done')
  if fail:
    parts.append(f'{len(fail)} failed')
  print(', '.join(parts), file=sys.stderr)
  return command_line.EXIT_FAILED if fail else command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
