"""Evaluate a segmentation checkpoint: mIoU, aAcc and mAcc exactly as mmsegmentation.

  python -m projects.cvt_segmentation.evaluate \\
      --config projects/cvt_segmentation/configs/ade20k.py:variant=13 \\
      --checkpoint workdirs/demo/checkpoints [--mode slide --crop-size 512 --stride 341] \\
      [--scales 0.5,0.75,1.0,1.25,1.5,1.75 --flip] [--output results.json] [--overwrite]

Predictions are scored at the original label resolution: one integer confusion matrix
over the whole validation split (`metrics`), ignoring label 255. Single-scale evaluation
runs the `EvalLoader` batches (`inference.evaluate_dataset`, also what the trainer's
periodic evaluation calls); with test-time augmentation every original image goes through
`inference.segment_image` (`evaluate_examples`). Results are printed as a per-class table,
then written as JSON (atomically).

The output path is checked (free unless --overwrite, and writable) before the data and the
model are loaded. Exit status: 0 on success; 1 on an error, one `error:` line on stderr (a
write error after the evaluation comes after the printed table); 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from projects import output_files
from projects.cvt_segmentation import cli, metrics
from projects.cvt_segmentation.inference import (  # noqa: F401  (evaluate_dataset re-exported)
    LogitsFn,
    evaluate_dataset,
    make_logits_fn,
    segment_image,
)

IGNORE_INDEX = metrics.IGNORE_INDEX


def _progress(iterable: Iterable, enabled: bool, total: int | None, desc: str, unit: str):
  if not enabled:
    return iterable
  from tqdm import tqdm

  return tqdm(iterable, total=total, desc=desc, unit=unit)


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
    logits_fn: LogitsFn,
    source: Any,
    num_classes: int,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    test_scale: Sequence[int] | None = None,
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
    num_threads: int = 2,
    **infer_kwargs: Any,
) -> np.ndarray:
  """Confusion matrix over original examples with test-time augmentation.

  Each `source[i]` (`{'image': uint8 [H, W, 3], 'label': [H, W]}`, as the dataset
  sources return) is segmented by `inference.segment_image` (resize into `test_scale`
  times each ratio, normalize, infer, optional flip, probabilities averaged at the
  original size) and counted against its label.

  Args:
    logits_fn: `images [B, h, w, 3] -> logits [B, h, w, K]`.
    source: random-access split (`len` and `[i]`).
    num_classes: K.
    scales: TTA ratios.
    flip: flip TTA.
    test_scale: `(long, short)` single-scale test resize limits, or None.
    ignore_index: label value to skip.
    progress: show a progress bar.
    num_threads: threads reading examples ahead.
    **infer_kwargs: `mode`, `crop_size`, `stride`, `min_size`, `pad_to_crop`.

  Returns:
    int64 `[K, K]` confusion matrix.
  """
  cm = np.zeros((num_classes, num_classes), np.int64)
  n = len(source)
  for item in _progress(_prefetch(source.__getitem__, n, num_threads), progress, n, 'eval', 'img'):
    label = np.asarray(item['label'])
    pred = segment_image(
        logits_fn, item['image'], scales=scales, flip=flip, output_size=label.shape,
        test_scale=test_scale, num_classes=num_classes, **infer_kwargs,
    )
    cm += metrics.confusion_matrix(label, pred, num_classes, ignore_index=ignore_index)
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


# build_loaders arguments that evaluation sets itself (exact per-image shapes).
_EVAL_OVERRIDES = ('eval_pad_shape', 'eval_label_pad_shape', 'eval_size_divisor', 'test_scale')


def default_output_path(checkpoint: str, dataset_name: str, settings: cli.InferenceSettings) -> str:
  """`<checkpoint dir>/eval_<dataset>_<mode>[_ms][_flip].json`."""
  tag = f'{dataset_name}_{settings.mode}'
  if tuple(settings.scales) != (1.0,):
    tag += '_ms'
  if settings.flip:
    tag += '_flip'
  folder = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(checkpoint) or '.'
  return os.path.join(folder, f'eval_{tag}.json')


def run_evaluation(
    config: Any,
    checkpoint: str,
    *,
    settings: cli.InferenceSettings,
    output: str | None = None,
    overwrite: bool = False,
    test_scale: tuple[int, int] | None | str = 'config',
    batch_size: int = 1,
    max_examples: int | None = None,
    num_threads: int = 2,
    progress: bool = True,
    model_loader: cli.ModelLoader | None = None,
    print_table: bool = True,
) -> dict:
  """Evaluates `checkpoint` on the validation split of `config`; writes and returns the report.

  Args:
    config: experiment config (`dataset_name`, `dataset_configs`, `eval`).
    checkpoint: checkpoint directory.
    settings: inference mode and TTA.
    output: JSON path; None: `default_output_path(...)`.
    overwrite: replace an existing output file (else FileExistsError, before any work).
    test_scale: single-scale resize limits; 'config' reads the config (mmseg's default).
    batch_size: eval batch size (equal-size examples are inferred together).
    max_examples: evaluate only the first examples (quick checks).
    num_threads: data loading threads.
    progress: show a progress bar.
    model_loader: replaces `models.restore_for_inference`.
    print_table: print the per-class table to stdout.

  Returns:
    The `metrics.metrics_report` dict (with the confusion matrix, so that results of
    several runs can be summed) plus `dataset`, `checkpoint`, `num_examples`, `inference`
    settings and `output` path.
  """
  from projects.cvt_segmentation.data import EvalLoader, build_loaders

  name = cli.config_get(config, 'dataset_name')
  if name is None:
    raise ValueError('the config has no dataset_name')
  output = output or default_output_path(checkpoint, name, settings)
  # Free and writable before any work: a bad path must not cost the evaluation.
  output_files.check_outputs([output], overwrite)
  if test_scale == 'config':
    test_scale = cli.test_scale(config)
  dataset_kwargs = cli.as_dict(cli.config_get(config, 'dataset_configs'))
  dataset_kwargs.pop('start_step', None)
  for key in _EVAL_OVERRIDES:
    dataset_kwargs.pop(key, None)
  _, loader, meta = build_loaders(
      name, batch_size=batch_size, eval_batch_size=batch_size, num_threads=num_threads,
      eval_size_divisor=1, test_scale=test_scale, **dataset_kwargs,
  )
  if max_examples is not None:
    loader = EvalLoader(
        _Head(loader.source, max_examples), loader.transform, batch_size=batch_size,
        size_divisor=1, num_threads=num_threads,
    )
  num_classes, class_names = meta['num_classes'], meta['class_names']
  model, variables = cli.load_model(config, checkpoint, model_loader)
  logits_fn = make_logits_fn(model, variables)
  if settings.tta:
    cm = evaluate_examples(
        logits_fn, loader.source, num_classes, scales=settings.scales, flip=settings.flip,
        test_scale=test_scale, progress=progress, num_threads=num_threads,
        **settings.infer_kwargs(),
    )
  else:
    cm = evaluate_dataset(
        logits_fn, loader, num_classes, progress=progress, **settings.infer_kwargs()
    )
  report = metrics.metrics_report(cm, class_names, include_confusion_matrix=True)
  report.update(
      dataset=name,
      checkpoint=checkpoint,
      num_examples=loader.num_examples,
      inference=dict(dataclasses.asdict(settings), test_scale=test_scale),
      output=output,
  )
  if print_table:  # before writing: a write error (a full disk) must not lose the numbers
    print(metrics.per_class_table(cm, class_names))
  output_files.write_json(report, output)
  if print_table:
    print(f'results written to {output}')
  return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m projects.cvt_segmentation.evaluate',
      description='mIoU / aAcc / mAcc of a checkpoint on the validation split (mmseg protocol).',
  )
  cli.add_common_flags(parser)
  parser.add_argument('--output', default=None,
                      help='JSON results path (default: <checkpoint>/eval_<dataset>_<mode>.json)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
  parser.add_argument('--batch-size', type=int, default=1,
                      help='eval batch size; equal-size images are inferred together')
  parser.add_argument('--max-examples', type=int, default=None,
                      help='evaluate only the first N examples')
  parser.add_argument('--num-threads', type=int, default=2, help='data loading threads')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, model_loader: cli.ModelLoader | None = None) -> int:
  """Command-line entry point; returns the exit status (errors print one clear line)."""
  args = parse_args(argv)
  try:
    config = cli.load_config(args.config)
    settings = cli.inference_settings(config, args)
    scale = cli.test_scale(config, args.test_scale) if args.test_scale else 'config'
    report = run_evaluation(
        config, args.checkpoint, settings=settings, output=args.output,
        overwrite=args.overwrite, test_scale=scale, batch_size=args.batch_size,
        max_examples=args.max_examples, num_threads=args.num_threads,
        progress=not args.no_progress, model_loader=model_loader,
    )
  except (OSError, ValueError) as e:  # OSError: missing files, unwritable or full outputs
    print(f'error: {e}', file=sys.stderr)
    return 1
  del report
  return 0


if __name__ == '__main__':
  sys.exit(main())
