"""Evaluate a segmentation checkpoint: mIoU, aAcc and mAcc exactly as mmsegmentation.

  python -m projects.cvt_segmentation.evaluate --config CONFIG.py --checkpoint WORKDIR \\
      [--mode slide --crop-size 512,512 --stride 341,341] [--scales 0.5,...,1.75 --flip]

Predictions are scored at the original label resolution (one integer confusion matrix over
the split, label 255 ignored); single-scale evaluation is the trainer's (`evaluate_dataset`).
The JSON report follows the tools' output policy (`projects.tools.output_files`).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from projects.cvt_segmentation import metrics
from projects.cvt_segmentation.configs.common import load_config
from projects.cvt_segmentation.inference import (  # noqa: F401  (evaluate_dataset re-exported)
    DEFAULT_MIN_SIZE,
    MODES,
    InferenceSettings,
    LogitsFn,
    config_test_scale,
    evaluate_dataset,
    inference_settings,
    make_logits_fn,
    segment_image,
)
from projects.tools import command_line, output_files
from projects.tools.progress import Progress
from projects.training.configs import as_dict, config_get

IGNORE_INDEX = metrics.IGNORE_INDEX
TOOL = 'cvt_segmentation.evaluate'
# `model_loader(config, checkpoint_dir) -> (flax_model, variables)`.
ModelLoader = Callable[[Any, str], tuple[Any, Any]]
# build_loaders arguments that evaluation sets itself (exact per-image shapes).
_EVAL_OVERRIDES = ('eval_pad_shape', 'eval_label_pad_shape', 'eval_size_divisor', 'test_scale')
# dataset_configs keys that do not change an evaluation (training augmentation, loading).
_NOT_EVALUATED = ('start_step', 'crop_size', 'scale', 'ratio_range', 'cat_max_ratio',
                  'flip_prob', 'photometric', 'num_threads', 'num_workers', 'pixel_batch_mask',
                  'validate', *_EVAL_OVERRIDES)


def load_model(config: Any, checkpoint: str, model_loader: ModelLoader | None = None):
  """`(flax_model, variables)` of `checkpoint`; `model_loader` replaces
  `models.restore_for_inference` (tests inject models)."""
  if model_loader is None:
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    # Imported here: the checkpoint module pulls in the trainer's dependencies.
    from projects.cvt_segmentation.models import restore_for_inference

    model_loader = restore_for_inference
  return model_loader(config, checkpoint)


def _prefetch(fn: Callable[[int], Any], n: int, num_threads: int = 2, ahead: int = 4) -> Iterator:
  """`fn(0), ..., fn(n - 1)` in order, computed by threads at most `ahead` items early."""
  with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
    pending = collections.deque()
    for i in range(n):
      pending.append(pool.submit(fn, i))
      if len(pending) > ahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def evaluate_examples(
    logits_fn: LogitsFn, source: Any, num_classes: int, *, scales: Sequence[float] = (1.0,),
    flip: bool = False, test_scale: Sequence[int] | None = None, ignore_index: int = IGNORE_INDEX,
    progress: bool = False, num_threads: int = 2, **infer_kwargs: Any) -> np.ndarray:
  """int64 `[K, K]` confusion matrix of `segment_image` (test-time augmentation) over the
  original examples of `source` (`{'image': uint8 [H, W, 3], 'label': [H, W]}`)."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  n = len(source)
  with Progress(n, 'evaluate', 'img', enabled=progress) as bar:
    for i, item in enumerate(_prefetch(source.__getitem__, n, num_threads)):
      label = np.asarray(item['label'])
      bar.start_item(f'{item.get("name", f"#{i + 1}")} {label.shape[1]}x{label.shape[0]}')
      pred = segment_image(
          logits_fn, item['image'], scales=scales, flip=flip, output_size=label.shape,
          test_scale=test_scale, num_classes=num_classes, **infer_kwargs)
      cm += metrics.confusion_matrix(label, pred, num_classes, ignore_index=ignore_index)
      bar.update()
  return cm


class _Head:
  """The first `n` examples of a source."""

  def __init__(self, source: Any, n: int):
    self.source, self.n = source, min(n, len(source))
    self.num_classes = source.num_classes
    self.class_names = source.class_names

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


def evaluation_record(config_file: str, config: Any, checkpoint: str,
                      settings: InferenceSettings, test_scale: Sequence[int] | None,
                      max_examples: int | None) -> dict:
  """The report's record: the config file is the input; the settings are what changes the
  numbers (not the batch size or threads: equal-size images are inferred unpadded)."""
  dataset_configs = {k: v for k, v in as_dict(config_get(config, 'dataset_configs')).items()
                     if k not in _NOT_EVALUATED}
  dataset = {'name': config_get(config, 'dataset_name'), 'configs': dataset_configs}
  recorded = {
      **output_files.model_settings(config_file, checkpoint),
      'dataset': json.loads(json.dumps(dataset, default=str)),
      'inference': dataclasses.asdict(settings),
      'test_scale': None if test_scale is None else list(test_scale),
      'max_examples': max_examples,
  }
  source = output_files.describe_input(config_file.partition(':')[0])
  return output_files.make_record(TOOL, source, recorded)


def print_report(report: Mapping[str, Any]) -> None:
  """The per-class table and summary of a report (a stored one too) on stdout."""
  cm = report.get('confusion_matrix')
  if cm is not None:
    names = [row['class'] for row in report.get('per_class', [])] or None
    print(metrics.per_class_table(np.asarray(cm, np.int64), names))
  else:
    print('  '.join(f'{k} {report.get(k)}' for k in ('aAcc', 'mIoU', 'mAcc')))


def run_evaluation(
    config: Any, checkpoint: str, *, config_file: str, settings: InferenceSettings,
    output: str | None = None, overwrite: bool = False,
    test_scale: tuple[int, int] | None | str = 'config', batch_size: int | None = None,
    max_examples: int | None = None, num_threads: int = 2, progress: bool = True,
    model_loader: ModelLoader | None = None, print_table: bool = True) -> dict:
  """Evaluates `checkpoint` on the validation split of `config`; writes and returns the report
  (`metrics.metrics_report` with the confusion matrix, `dataset`, `checkpoint`,
  `num_examples`, `inference`, `output`; a stored report of the same evaluation is returned
  with `already_evaluated`, not redone).

  `config_file` (`path.py[:arg]`) is the report's recorded input; `test_scale` 'config'
  reads the config's; FileExistsError when `output` holds another evaluation.
  """
  from projects.cvt_segmentation.data import EvalLoader, build_loaders

  name = config_get(config, 'dataset_name')
  if name is None:
    raise ValueError('the config has no dataset_name')
  if max_examples is not None and max_examples < 1:
    raise ValueError(f'--max-examples must be a positive number of examples, got {max_examples}')
  if model_loader is None and not os.path.exists(checkpoint):
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
  if test_scale == 'config':
    test_scale = config_test_scale(config)
  batch_size = int(config_get(config, 'eval_batch_size', 1) if batch_size is None else batch_size)
  if batch_size < 1:
    raise ValueError(f'the evaluation batch size must be positive, got {batch_size}')
  if output is None:
    tag = (f'{name}_{settings.mode}' + '_ms' * (tuple(settings.scales) != (1.0,))
           + '_flip' * settings.flip + ('' if max_examples is None else f'_first{max_examples}'))
    output = output_files.report_path(checkpoint, tag)
  output_files.check_apart([output], output_files.model_inputs(config_file, checkpoint))
  record = evaluation_record(config_file, config, checkpoint, settings, test_scale, max_examples)
  # Decided before any work: a done or conflicting report, or a bad path, costs nothing.
  state = output_files.report_state(output, record, overwrite, values=True)
  if state.status == 'conflict':
    raise FileExistsError(state.message)
  if state.status == 'done':
    with open(output) as f:
      report = json.load(f)
    if print_table:
      step = record['settings']['checkpoint']['step']
      print(f'{output}: already evaluated (the same config, checkpoint'
            f'{"" if step is None else f" step {step}"} and settings); pass --overwrite to '
            'evaluate again', file=sys.stderr)
      print_report(report)
    return {**report, 'already_evaluated': True}
  output_files.check_writable([output])
  dataset_kwargs = as_dict(config_get(config, 'dataset_configs'))
  for key in ('start_step', *_EVAL_OVERRIDES):
    dataset_kwargs.pop(key, None)
  _, loader, meta = build_loaders(
      name, batch_size=batch_size, eval_batch_size=batch_size, num_threads=num_threads,
      eval_size_divisor=1, test_scale=test_scale, **dataset_kwargs)
  if max_examples is not None:
    loader = EvalLoader(
        _Head(loader.source, max_examples), loader.transform, batch_size=batch_size,
        size_divisor=1, num_threads=num_threads)
  num_classes, class_names = meta['num_classes'], meta['class_names']
  model, variables = load_model(config, checkpoint, model_loader)
  logits_fn = make_logits_fn(model, variables)
  if settings.tta:
    cm = evaluate_examples(
        logits_fn, loader.source, num_classes, scales=settings.scales, flip=settings.flip,
        test_scale=test_scale, progress=progress, num_threads=num_threads,
        **settings.infer_kwargs())
  else:
    cm = evaluate_dataset(
        logits_fn, loader, num_classes, progress=progress, **settings.infer_kwargs()
    )
  report = metrics.metrics_report(cm, class_names, include_confusion_matrix=True)
  report.update(dataset=name, checkpoint=checkpoint, num_examples=loader.num_examples,
                inference=dict(dataclasses.asdict(settings), test_scale=test_scale), output=output)
  if print_table:  # before writing: a write error (a full disk) must not lose the numbers
    print(metrics.per_class_table(cm, class_names))
  output_files.write_json(report, output, record)
  if print_table:
    print(f'results written to {output}')
  return {**report, output_files.RECORD_KEY: record}


def _test_scale_flag(text: str) -> tuple[int, int] | str:
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


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
  """--config, --checkpoint and the inference flags of evaluate and predict (None: the config's)."""
  command_line.add_model_flags(parser)
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
  parser.add_argument('--test-scale', type=_test_scale_flag, default=None,
                      metavar='LONG,SHORT|none',
                      help='resize each image to fit LONG x SHORT (keeping its ratio) before '
                           "inference, or 'none' to keep its size (default: the config's "
                           "dataset_configs.test_scale, else the dataset's mmseg value)")


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
  """The inference flags as `inference_settings` overrides."""
  return {k: getattr(args, k) for k in ('mode', 'crop_size', 'stride', 'scales', 'flip',
                                        'min_size')}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'python -m projects.cvt_segmentation.evaluate',
      'mIoU / aAcc / mAcc of a checkpoint on the validation split of its config (the '
      'mmsegmentation protocol), printed as a per-class table and written as JSON.')
  add_inference_flags(parser)
  parser.add_argument(
      '--output', default=None, metavar='FILE.json',
      help='the JSON report (default: eval_<dataset>_<mode>[_ms][_flip][_first<N>]_step<S>.json '
           'beside the checkpoints folder, S the step evaluated)')
  parser.add_argument(
      '--batch-size', type=int, default=None, metavar='N',
      help="images inferred together when they have the same size (default: the config's "
           'eval_batch_size, else 1)')
  parser.add_argument('--max-examples', type=int, default=None, metavar='N',
                      help='evaluate only the first N examples (a quick check, reported as '
                           '..._first<N>_...json)')
  parser.add_argument('--num-threads', type=int, default=2, metavar='N',
                      help='data loading threads')
  command_line.add_output_flags(parser, per_input=False)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, model_loader: ModelLoader | None = None) -> int:
  """Command-line entry point; returns the exit status (errors print one `error:` line)."""
  args = parse_args(argv)
  try:
    config = load_config(args.config)
    run_evaluation(
        config, args.checkpoint, config_file=args.config,
        settings=inference_settings(config, **flag_settings(args)), output=args.output,
        overwrite=args.overwrite, test_scale=config_test_scale(config, args.test_scale),
        batch_size=args.batch_size, max_examples=args.max_examples,
        num_threads=args.num_threads, progress=not args.no_progress, model_loader=model_loader)
  except (OSError, ValueError) as e:  # OSError: missing files, unwritable or full outputs
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
