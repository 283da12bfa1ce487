"""Segment image files: palette PNG masks and side-by-side overlays.

  python -m projects.cvt_segmentation.predict \\
      --config projects/cvt_segmentation/configs/ade20k.py:variant=13 \\
      --checkpoint workdirs/demo/checkpoints --output masks \\
      photos/ more/*.jpg one.png [--palette auto] [--scales 0.75,1.0,1.25 --flip] \\
      [--overwrite] [--strict]

For every input image `<stem>.<ext>` it writes `OUTPUT/<stem>_mask.png` (mode 'P': pixel
values are class indices, the palette colours them) and `OUTPUT/<stem>_overlay.png` (the
input and the input blended with the coloured mask, side by side), both at the input's
size. Images go through the evaluation pipeline (`inference.segment_image`: keep-ratio
resize to the dataset's test scale, ImageNet normalization, whole or sliding-window
inference, optional multi-scale / flip TTA, logits resized back to the original size).

Inputs are files, folders (searched recursively; outputs keep the sub-folders) and glob
patterns. Missing paths, unreadable or non-image files, and images whose outputs exist
(without --overwrite) are reported by name and skipped; with --strict they are errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from projects.cvt_segmentation import cli, palettes
from projects.cvt_segmentation.inference import LogitsFn, make_logits_fn, segment_image
from projects.input_files import (  # noqa: F401  (PredictError and read_image: this API)
    InputImage,
    PredictError,
    check_image_header,
    collect_inputs,
    read_image,
)

MASK_SUFFIX = '_mask.png'
OVERLAY_SUFFIX = '_overlay.png'


def output_paths(output_dir: str, stem: str) -> tuple[str, str]:
  """`(mask path, overlay path)` of an output stem."""
  base = os.path.join(output_dir, stem)
  return base + MASK_SUFFIX, base + OVERLAY_SUFFIX


def _report(message: str, progress_bar: Any) -> None:
  if progress_bar is not None:
    progress_bar.write(f'skipped {message}', file=sys.stderr)
  else:
    print(f'skipped {message}', file=sys.stderr)


def predict_images(
    logits_fn: LogitsFn,
    images: Sequence[InputImage],
    output_dir: str,
    *,
    palette: np.ndarray,
    settings: cli.InferenceSettings | None = None,
    test_scale: Sequence[int] | None = None,
    num_classes: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
    alpha: float = 0.5,
) -> dict:
  """Segments `images` and writes their masks and overlays.

  Args:
    logits_fn: `images [B, h, w, 3] -> logits [B, h, w, K]`.
    images: inputs from `collect_inputs`.
    output_dir: folder of the outputs (created).
    palette: `[K, 3]` uint8 class colours.
    settings: inference mode and TTA (default: whole image, single scale).
    test_scale: `(long, short)` resize limits before inference, or None.
    num_classes: expected K (checked against the model), or None.
    overwrite: replace existing outputs; otherwise images whose outputs exist are skipped
      (an error with `strict`), checked before any inference.
    strict: raise `PredictError` on the first problem instead of skipping.
    progress: show a tqdm progress bar.
    alpha: mask weight in the overlay blend.

  Returns:
    `{'written': [(input, mask, overlay)], 'skipped': [message], 'existing': [message]}`:
    unreadable inputs in 'skipped', inputs whose outputs exist in 'existing'.
  """
  settings = settings or cli.InferenceSettings()
  written, skipped, existing_outputs, todo = [], [], [], []
  for item in images:
    mask_path, overlay_path = output_paths(output_dir, item.stem)
    existing = [p for p in (mask_path, overlay_path) if os.path.exists(p)]
    if existing and not overwrite:
      message = f'{item.path}: output exists ({", ".join(existing)}); pass --overwrite'
      if strict:
        raise PredictError(message)
      existing_outputs.append(message)
      _report(message, None)
      continue
    todo.append((item, mask_path, overlay_path))
  bar = None
  iterator = todo
  if progress:
    from tqdm import tqdm

    bar = tqdm(todo, desc='predict', unit='img')
    iterator = bar
  for item, mask_path, overlay_path in iterator:
    try:
      image = read_image(item.path)
    except PredictError as e:
      if strict:
        raise
      skipped.append(str(e))
      _report(str(e), bar)
      continue
    labels = segment_image(
        logits_fn, image, scales=settings.scales, flip=settings.flip, test_scale=test_scale,
        num_classes=num_classes, **settings.infer_kwargs(),
    )
    os.makedirs(os.path.dirname(mask_path) or '.', exist_ok=True)
    palettes.mask_image(labels, palette).save(mask_path)
    Image.fromarray(palettes.overlay_image(image, labels, palette, alpha)).save(overlay_path)
    written.append((item.path, mask_path, overlay_path))
  if bar is not None:
    bar.close()
  return {'written': written, 'skipped': skipped, 'existing': existing_outputs}


def _model_num_classes(logits_fn: LogitsFn) -> int:
  """K of a model whose config does not say: one forward pass on a small blank image."""
  probe = np.zeros((1, 64, 64, 3), np.float32)
  return int(np.shape(logits_fn(probe))[-1])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m projects.cvt_segmentation.predict',
      description='Segment images: palette PNG masks and side-by-side overlays.',
  )
  cli.add_common_flags(parser)
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
  parser.add_argument('--palette', choices=palettes.PALETTE_NAMES, default='auto',
                      help="mask colours (auto: the config's dataset)")
  parser.add_argument('--alpha', type=float, default=0.5, help='mask weight in the overlay')
  parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  parser.add_argument('--strict', action='store_true',
                      help='fail on the first missing, unreadable or existing file')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, model_loader: cli.ModelLoader | None = None) -> int:
  """Command-line entry point; returns the exit status.

  Args:
    argv: arguments (default `sys.argv[1:]`).
    model_loader: replaces `models.restore_for_inference` (tests inject models).

  Returns:
    0 on success (skipped inputs are reported on stderr), 1 on an error or when no image
    could be read, 2 on bad arguments (argparse).
  """
  args = parse_args(argv)
  try:
    images, problems = collect_inputs(args.inputs, exclude_dir=args.output)
    for message in problems:
      if args.strict:
        raise PredictError(message)
      _report(message, None)
    if not images:
      raise PredictError('no input files found')
    if args.strict:  # fail on a non-image before loading the model
      for item in images:
        check_image_header(item.path)
    config = cli.load_config(args.config)
    settings = cli.inference_settings(config, args)
    scale = cli.test_scale(config, args.test_scale)
    model, variables = cli.load_model(config, args.checkpoint, model_loader)
    logits_fn = make_logits_fn(model, variables)
    num_classes = cli.expected_num_classes(config) or _model_num_classes(logits_fn)
    dataset_name = cli.config_get(config, 'dataset_name')
    palette = palettes.get_palette(args.palette, num_classes, dataset_name)
    summary = predict_images(
        logits_fn, images, args.output, palette=palette, settings=settings, test_scale=scale,
        num_classes=num_classes, overwrite=args.overwrite, strict=args.strict,
        progress=not args.no_progress, alpha=args.alpha,
    )
  except (PredictError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  skipped = len(summary['skipped']) + len(summary['existing']) + len(problems)
  print(f'{len(summary["written"])} images segmented into {args.output}'
        + (f', {skipped} skipped' if skipped else ''), file=sys.stderr)
  failed = not summary['written'] and not summary['existing']
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
