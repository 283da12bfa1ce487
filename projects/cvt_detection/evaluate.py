"""Evaluate a detection checkpoint: COCO box AP on the validation split, as mmdet's CocoMetric.

  python -m projects.cvt_detection.evaluate \\
      --config=projects/cvt_detection/configs/synthetic_demo.py:runlocal \\
      --checkpoint=workdirs/cvt_detection_demo [--batch-size 8] \\
      [--score-threshold 0.05] [--max-detections 100] \\
      [--results results.json] [--metrics metrics.json] [--overwrite]

The validation split of the config's dataset goes through the evaluation loader of training
(`builder.build_loaders`: keep-ratio resize to `dataset_configs.scale`, padding to a few fixed
canvases) and `evaluation.detect_batches` (the jitted model and post-processing of
`DetectionModel.predict_fn`, with `config.eval`: pre_nms_topk, score_threshold, iou_threshold,
max_detections; flags override the last two and the rest of `config.eval` stays). The
detections are scored by `coco_eval.evaluate_boxes` against the split's annotations, so the
numbers are those of the trainer's periodic evaluation.

The COCO table is printed first, then two files are written: the detections in COCO results
format (`--results`, for the COCO server or `coco_eval.evaluate_boxes` later) and the metrics
(`--metrics`: AP, AP50, AP75, APs, APm, APl, AR..., per_class, and how they were obtained).
By default both go next to the checkpoints, `eval_<dataset>[_step<N>]_{results,metrics}.json`.
Existing outputs are replaced only with --overwrite; both paths are checked (free and
writable) before the model is loaded; a write error after the evaluation (a full disk) comes
after the printed table. Exit status: 0 on success, 1 on an error (one `error:` line on
stderr), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from projects.cvt_detection import coco_eval, evaluation, models
from projects.cvt_detection.configs import common as _settings  # noqa: F401  (registers its keys)
from projects.output_files import OutputWriteError, check_outputs, write_json
from projects.training.checkpoints import CheckpointMismatchError
from projects.training.configs import as_dict, config_get, load_config

# Errors a user can cause (paths, config, checkpoint, a full disk): one line on stderr and
# exit status 1.
USER_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
               OutputWriteError, ValueError, CheckpointMismatchError)


def with_eval_settings(config: Any, **overrides: Any) -> Any:
  """A copy of `config` whose `config.eval` takes the `overrides` that are not None.

  Args:
    config: the experiment config (a ConfigDict, possibly locked).
    **overrides: `score_threshold` in [0, 1], `max_detections` >= 1 (None: keep the config's).

  Returns:
    The config itself when nothing is overridden, else an updated copy.
  """
  overrides = {k: v for k, v in overrides.items() if v is not None}
  score = overrides.get('score_threshold')
  if score is not None and not 0 <= score <= 1:
    raise ValueError(f'score threshold must be in [0, 1], got {score}')
  most = overrides.get('max_detections')
  if most is not None and most < 1:
    raise ValueError(f'max detections must be at least 1, got {most}')
  if not overrides:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if config.get('eval') is None:
      config.eval = {}
    for key, value in overrides.items():
      config.eval[key] = value
  return config


def load_detector(config: Any, checkpoint: str,
                  num_classes: int) -> tuple[evaluation.PredictFn, dict[str, Any]]:
  """The jitted `predict` of a trained checkpoint and its variables.

  Args:
    config: the training config; `config.eval` sets the post-processing.
    checkpoint: a workdir, its `checkpoints` folder or one step folder in it.
    num_classes: the dataset's classes (the checkpoint must have as many).

  Returns:
    `(predict, variables)`: `predict(variables, images [B, H, W, 3], image_size [B, 2],
    scale_factor [B, 2])` -> `{'boxes' [B, D, 4] original pixels, 'scores' [B, D],
    'classes' [B, D], 'valid' [B, D]}` (`DetectionModel.predict_fn`).
  """
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
  model_name = config_get(config, 'model_name')
  if model_name is None:
    raise ValueError('the config has no model_name')
  flax_model, variables = models.restore_for_inference(config, checkpoint,
                                                       num_classes=num_classes)
  model = models.get_model_cls(model_name)(config, {'num_classes': num_classes})
  model.flax_model = flax_model  # the restored one: no pretrained file to read
  return model.predict_fn(), variables


# --- evaluation ---------------------------------------------------------------------------


def default_output_paths(checkpoint: str, dataset_name: str) -> tuple[str, str]:
  """`(results, metrics)` paths beside the checkpoints folder of `checkpoint`.

  `WORKDIR`, `WORKDIR/checkpoints` -> `WORKDIR/eval_<dataset>_{results,metrics}.json`;
  a step folder `WORKDIR/checkpoints/N` -> `WORKDIR/eval_<dataset>_stepN_...json`.
  """
  path = Path(checkpoint).absolute()
  tag = dataset_name
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    tag, path = f'{dataset_name}_step{path.name}', path.parent.parent
  elif path.name == 'checkpoints':
    path = path.parent
  return (str(path / f'eval_{tag}_results.json'), str(path / f'eval_{tag}_metrics.json'))


def _progress(batches: Iterable[dict], enabled: bool, total: int) -> Iterable[dict]:
  if not enabled:
    return batches
  from tqdm import tqdm

  return tqdm(batches, total=total, desc='evaluate', unit='batch', file=sys.stderr)


def run_evaluation(
    config: Any,
    checkpoint: str,
    *,
    results_path: str | None = None,
    metrics_path: str | None = None,
    overwrite: bool = False,
    batch_size: int | None = None,
    score_threshold: float | None = None,
    max_detections: int | None = None,
    progress: bool = True,
    print_fn: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Evaluates `checkpoint` on the validation split of `config`; prints, writes, returns.

  Args:
    config: experiment config (`model_name`, `model`, `dataset_name`, `dataset_configs`,
      `eval`, `eval_batch_size`).
    checkpoint: a workdir, its `checkpoints` folder or one step folder.
    results_path: COCO results json; None: `default_output_paths(...)[0]`.
    metrics_path: metrics json; None: `default_output_paths(...)[1]`.
    overwrite: replace existing outputs (else FileExistsError, before any work).
    batch_size: images per batch; None: `config.eval_batch_size`.
    score_threshold: overrides `config.eval.score_threshold`.
    max_detections: overrides `config.eval.max_detections`.
    progress: show a progress bar on stderr.
    print_fn: prints the table and the written paths; None prints nothing.

  Returns:
    The metrics written to `metrics_path`: `evaluate_boxes`'s numbers (fractions, NaN where
    a size range has no ground truth) and `per_class`, plus `dataset`, `checkpoint`,
    `num_images`, `num_detections`, `eval` (the post-processing settings), `results` and
    `metrics` (the paths).
  """
  from projects.cvt_detection.data import builder

  name = config_get(config, 'dataset_name')
  if name is None:
    raise ValueError('the config has no dataset_name')
  default_results, default_metrics = default_output_paths(checkpoint, name)
  results_path = results_path or default_results
  metrics_path = metrics_path or default_metrics
  config = with_eval_settings(config, score_threshold=score_threshold,
                              max_detections=max_detections)
  if batch_size is None:
    batch_size = int(config_get(config, 'eval_batch_size', 1))
  if batch_size < 1:
    raise ValueError(f'batch size must be at least 1, got {batch_size}')
  check_outputs([results_path, metrics_path], overwrite)
  if not os.path.exists(checkpoint):  # before reading the dataset, which may take a while
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')

  dataset_kwargs = as_dict(config_get(config, 'dataset_configs'))
  dataset_kwargs.pop('start_step', None)
  _, loader, meta = builder.build_loaders(
      name, batch_size=batch_size, eval_batch_size=batch_size, with_train=False,
      dtype_str=config_get(config, 'data_dtype_str', 'float32'), **dataset_kwargs)
  predict, variables = load_detector(config, checkpoint, meta['num_classes'])

  batches = _progress(loader.iterate(), progress, loader.num_batches)
  detections = evaluation.detect_batches(predict, variables, batches)
  results = evaluation.to_results(detections, meta['label_to_category_id'])
  metrics = coco_eval.evaluate_boxes(meta['ground_truth'], results)
  metrics.update(
      dataset=name,
      checkpoint=checkpoint,
      num_images=int(len(detections['image_id'])),
      num_detections=len(results),
      eval=dict(models.DETECT_DEFAULTS, **as_dict(config_get(config, 'eval'))),
      results=results_path,
      metrics=metrics_path,
  )
  if print_fn is not None:
    print_fn(f'COCO box metrics (%), {metrics["num_images"]} images of {name!r}, '
             f'{len(results)} detections:')
    print_fn(coco_eval.format_table(metrics))
  coco_eval.write_results_json(results, results_path)
  write_json(metrics, metrics_path)
  if print_fn is not None:
    print_fn(f'results written to {results_path}')
    print_fn(f'metrics written to {metrics_path}')
  return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m projects.cvt_detection.evaluate',
      description='COCO box AP of a detection checkpoint on the validation split.',
  )
  parser.add_argument('--config', required=True, help='path/to/config.py[:arg]')
  parser.add_argument('--checkpoint', required=True,
                      help='workdir, its checkpoints folder, or one step folder')
  parser.add_argument('--batch-size', type=int, default=None,
                      help='images per batch (default: the config\'s eval_batch_size)')
  parser.add_argument('--score-threshold', type=float, default=None,
                      help='drop detections below this score (default: config.eval)')
  parser.add_argument('--max-detections', type=int, default=None,
                      help='detections kept per image (default: config.eval)')
  parser.add_argument('--results', default=None,
                      help='COCO results json (default: <workdir>/eval_<dataset>_results.json)')
  parser.add_argument('--metrics', default=None,
                      help='metrics json (default: <workdir>/eval_<dataset>_metrics.json)')
  parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
  parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (errors print one clear line)."""
  args = parse_args(argv)
  try:
    config = load_config(args.config)
    run_evaluation(
        config, args.checkpoint, results_path=args.results, metrics_path=args.metrics,
        overwrite=args.overwrite, batch_size=args.batch_size,
        score_threshold=args.score_threshold, max_detections=args.max_detections,
        progress=not args.no_progress,
    )
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
