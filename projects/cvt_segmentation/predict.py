"""Segment image files: palette PNG masks and side-by-side overlays.

  python -m projects.cvt_segmentation.predict \\
      --config projects/cvt_segmentation/configs/ade20k_cvt13_upernet.py \\
      --checkpoint workdirs/ade20k --output masks \\
      photos/ more/*.jpg one.png [--palette auto] [--scales 0.75,1.0,1.25 --flip] \\
      [--mode slide --crop-size 512,1024 --stride 341,682] [--overwrite] [--strict]

For every input image `<stem>.<ext>` it writes `OUTPUT/<stem>_mask.png` (mode 'P': pixel
values are class indices, the palette colours them) and `OUTPUT/<stem>_overlay.png` (the
input and the input blended with the coloured mask, side by side), both at the input's size.
The overlay leaves the background as it is (pixels of a class named 'background', such as
the synthetic dataset's class 0, so that the photo is not greyed all over);
--paint-background colours it too. Images go through the evaluation pipeline
(`inference.segment_image`: keep-ratio resize to the dataset's test scale, ImageNet
normalization, whole or sliding-window inference, optional multi-scale / flip TTA, logits
resized back to the original size).

Inputs are files, folders (searched recursively; outputs keep the sub-folders) and glob
patterns; two inputs with the same stem (`a.jpg`, `a.png`) get distinct ones (`a`, `a_png`).

Outputs and reruns (`projects.tools.output_files`): both PNGs are written atomically and record,
in a text chunk, the input they came from (absolute path, size, sha256) and the settings
that made them (config, checkpoint folder and step, inference mode and TTA, test scale,
palette; the overlay also its --alpha and --paint-background). A rerun skips an input whose
outputs record the same input and settings ("already done"); an existing output that records
another input (an `a.bmp` after an `a.jpg`), other settings, or nothing (a 0-byte file, a
file of an older version) is kept and reported as a conflict: --overwrite replaces it. The
output place is checked before the model is loaded. Missing paths, unreadable or non-image
files and conflicts are reported by name and the other inputs are still done; --strict stops
at the first. Exit status: 0 when every input was done or already done, 1 when any failed
(or on an error, one `error:` line), 2 on bad arguments. Progress (`projects.tools.progress`) is a
bar on a terminal and a timed line in a log, naming the current image; --no-progress hides
it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from projects.cvt_segmentation import palettes
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
from projects.tools.input_files import InputImage, PredictError, collect_inputs
from projects.tools.progress import Progress
from projects.training.images import ImageError, check_image_header, read_image
from projects.training import checkpoints
from projects.training.configs import config_get, load_config

TOOL = 'cvt_segmentation.predict'
MASK_SUFFIX = '_mask.png'
OVERLAY_SUFFIX = '_overlay.png'


def output_paths(output_dir: str, stem: str) -> tuple[str, str]:
  """`(mask path, overlay path)` of an output stem."""
  base = os.path.join(output_dir, stem)
  return base + MASK_SUFFIX, base + OVERLAY_SUFFIX


def _report(message: str, progress: Progress | None = None, prefix: str = 'skipped') -> None:
  if progress is not None:
    progress.write(f'{prefix} {message}')
  else:
    print(f'{prefix} {message}', file=sys.stderr)


def record_settings(config: str, checkpoint: str, settings: InferenceSettings,
                    test_scale: Sequence[int] | None, palette: str,
                    alpha: float, paint_background: bool = False) -> tuple[dict, dict]:
  """`(mask settings, overlay settings)` recorded in the outputs: what changes them.

  The config and checkpoint (its folder and step), the inference mode and TTA, the test
  resize and the palette name; the overlay also records its blend weight and whether the
  background is painted (`--paint-background`).
  """
  mask = {
      'config': output_files.config_identity(config),
      'checkpoint': checkpoints.identity(checkpoint),
      'inference': dataclasses.asdict(settings),
      'test_scale': None if test_scale is None else list(test_scale),
      'palette': palette,
  }
  return mask, dict(mask, alpha=alpha, paint_background=paint_background)


@dataclasses.dataclass(frozen=True)
class Job:
  """One input to segment: its outputs and the records they get."""

  item: InputImage
  mask_path: str
  overlay_path: str
  mask_record: dict
  overlay_record: dict


def plan_outputs(
    images: Sequence[InputImage],
    output_dir: str,
    settings: tuple[Mapping[str, Any], Mapping[str, Any]],
    *,
    overwrite: bool = False,
    strict: bool = False,
) -> dict[str, list]:
  """Sorts the inputs into those to segment, those already done and those that fail.

  Each input is read once (its sha256) and its header checked; its outputs' records decide
  (`output_files.output_state`): all present and recording this input and settings ->
  done; any recording another input or settings, or none -> a conflict (failed).

  Args:
    images: inputs from `collect_inputs`.
    output_dir: the output folder.
    settings: `record_settings(...)`.
    overwrite: replace existing outputs whatever they record.
    strict: raise `PredictError` on the first failure.

  Returns:
    `{'todo': [Job], 'done': [input path], 'failed': [message]}`.
  """
  mask_settings, overlay_settings = settings
  todo, done, failed = [], [], []
  for item in images:
    mask_path, overlay_path = output_paths(output_dir, item.stem)
    try:
      check_image_header(item.path)
      source = output_files.describe_input(item.path)
    except (ImageError, OSError) as e:
      message = str(e) if isinstance(e, ImageError) else (
          f'{item.path}: cannot read ({e.strerror or e})')
      if strict:
        raise PredictError(message) from None
      failed.append(message)
      _report(message)
      continue
    job = Job(item, mask_path, overlay_path,
              output_files.make_record(TOOL, source, mask_settings),
              output_files.make_record(TOOL, source, overlay_settings))
    state = output_files.output_state(
        {mask_path: job.mask_record, overlay_path: job.overlay_record}, overwrite)
    if state.status == 'conflict':
      message = f'{item.path}: {state.message}'
      if strict:
        raise PredictError(message)
      failed.append(message)
      _report(message)
    elif state.status == 'done':
      done.append(item.path)
      print(f'{item.path}: already done ({mask_path})', file=sys.stderr)
    else:
      todo.append(job)
  return {'todo': todo, 'done': done, 'failed': failed}


def predict_images(
    logits_fn: LogitsFn,
    jobs: Sequence[Job],
    *,
    palette: np.ndarray,
    settings: InferenceSettings | None = None,
    test_scale: Sequence[int] | None = None,
    num_classes: int | None = None,
    strict: bool = False,
    progress: bool = True,
    alpha: float = 0.5,
    transparent: Sequence[int] = (),
) -> dict:
  """Segments the inputs of `jobs` and writes their masks and overlays with their records.

  Args:
    logits_fn: `images [B, h, w, 3] -> logits [B, h, w, K]`.
    jobs: `plan_outputs(...)['todo']`.
    palette: `[K, 3]` uint8 class colours.
    settings: inference mode and TTA (default: whole image, single scale).
    test_scale: `(long, short)` resize limits before inference, or None.
    num_classes: expected K (checked against the model), or None.
    strict: raise `PredictError` on the first unreadable image instead of skipping it.
    progress: show progress (`projects.tools.progress.Progress`: a bar on a terminal, timed
      lines in a log), the current image's name and size beside the count.
    alpha: mask weight in the overlay blend.
    transparent: classes left unblended in the overlay (the background).

  Returns:
    `{'written': [(input, mask, overlay)], 'failed': [message]}`.

  Raises:
    OutputWriteError: an output could not be written (a full disk): the run stops.
  """
  settings = settings or InferenceSettings()
  written, failed = [], []
  with Progress(len(jobs), 'predict', 'img', enabled=progress) as bar:
    for job in jobs:
      try:
        image = read_image(job.item.path)
      except ImageError as e:
        if strict:
          raise
        failed.append(str(e))
        _report(str(e), bar)
        bar.update()
        continue
      bar.start_item(f'{os.path.basename(job.item.path)} {image.shape[1]}x{image.shape[0]}')
      labels = segment_image(
          logits_fn, image, scales=settings.scales, flip=settings.flip, test_scale=test_scale,
          num_classes=num_classes, **settings.infer_kwargs(),
      )
      output_files.save_png(palettes.mask_image(labels, palette), job.mask_path,
                            job.mask_record)
      overlay = palettes.overlay_image(image, labels, palette, alpha, transparent)
      output_files.save_png(Image.fromarray(overlay), job.overlay_path, job.overlay_record)
      written.append((job.item.path, job.mask_path, job.overlay_path))
      bar.update()
  return {'written': written, 'failed': failed}


# Classes of the datasets whose size the config does not spell out.
_DATASET_NUM_CLASSES = {'ade20k': 150, 'cityscapes': 19}


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

  name = config_get(config, 'dataset_name')
  names = {'synthetic': lambda: data.synthetic_class_names(num_classes),
           'ade20k': lambda: data.ADE20K_CLASSES, 'cityscapes': lambda: data.CITYSCAPES_CLASSES,
           }.get(name, lambda: config_get(config_get(config, 'dataset_configs'), 'class_names'))()
  if names is None or len(names) != num_classes:
    return None
  return tuple(str(n) for n in names)


def _model_num_classes(logits_fn: LogitsFn) -> int:
  """K of a model whose config does not say: one forward pass on a small blank image."""
  probe = np.zeros((1, 64, 64, 3), np.float32)
  return int(np.shape(logits_fn(probe))[-1])


def build_parser() -> argparse.ArgumentParser:
  parser = command_line.parser(
      'python -m projects.cvt_segmentation.predict',
      'Segment images: a palette PNG mask and a side-by-side overlay per image.')
  add_inference_flags(parser)
  parser.add_argument('--output', required=True, metavar='DIR',
                      help='output folder: <stem>_mask.png and <stem>_overlay.png per image')
  parser.add_argument('inputs', nargs='+', metavar='INPUT',
                      help='image files, folders (searched recursively) or glob patterns')
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
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None, *, model_loader: ModelLoader | None = None) -> int:
  """Command-line entry point; returns the exit status.

  Args:
    argv: arguments (default `sys.argv[1:]`).
    model_loader: replaces `models.restore_for_inference` (tests inject models).

  Returns:
    0 when every input was segmented or already done; 1 when any input failed (missing,
    unreadable, an output conflict) or on an error; 2 on bad arguments (argparse). See
    `projects.tools.output_files` for the policy.
  """
  args = parse_args(argv)
  try:
    images, problems = collect_inputs(args.inputs, exclude_dir=args.output)
    for message in problems:
      if args.strict:
        raise PredictError(message)
      _report(message)
    if not images:
      raise PredictError('no input files found')
    config = load_config(args.config)
    settings = inference_settings(config, **flag_settings(args))
    scale = config_test_scale(config, args.test_scale)
    plan = plan_outputs(
        images, args.output,
        record_settings(args.config, args.checkpoint, settings, scale, args.palette, args.alpha,
                        args.paint_background),
        overwrite=args.overwrite, strict=args.strict)
    # Before the model: an unwritable place fails in one line, not after the inference.
    output_files.check_writable([p for job in plan['todo']
                                 for p in (job.mask_path, job.overlay_path)])
    summary = {'written': [], 'failed': []}
    if plan['todo']:
      model, variables = load_model(config, args.checkpoint, model_loader)
      logits_fn = make_logits_fn(model, variables)
      num_classes = expected_num_classes(config) or _model_num_classes(logits_fn)
      dataset_name = config_get(config, 'dataset_name')
      palette = palettes.get_palette(args.palette, num_classes, dataset_name)
      transparent = () if args.paint_background else palettes.background_classes(
          class_names(config, num_classes))
      summary = predict_images(
          logits_fn, plan['todo'], palette=palette, settings=settings, test_scale=scale,
          num_classes=num_classes, strict=args.strict, progress=not args.no_progress,
          alpha=args.alpha, transparent=transparent,
      )
  except (PredictError, OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  failed = len(problems) + len(plan['failed']) + len(summary['failed'])
  parts = [f'{len(summary["written"])} images segmented into {args.output}']
  if plan['done']:
    parts.append(f'{len(plan["done"])} already done')
  if failed:
    parts.append(f'{failed} failed')
  print(', '.join(parts), file=sys.stderr)
  return command_line.EXIT_FAILED if failed else command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
