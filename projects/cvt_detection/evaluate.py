"""Evaluate a detection checkpoint: COCO box AP on the validation split, as mmdet's CocoMetric.

  python -m projects.cvt_detection.evaluate \\
      --config=projects/cvt_detection/configs/synthetic_demo.py:runlocal \\
      --checkpoint=workdirs/cvt_detection_demo [--batch-size 8] \\
      [--score-threshold 0.05] [--max-detections 100] \\
      [--results results.json] [--metrics metrics.json] [--overwrite] [--no-progress]

The validation split of the config's dataset goes through the evaluation loader of training
(`builder.build_loaders`: keep-ratio resize to `dataset_configs.scale`, padding to a few fixed
canvases) and `evaluation.detect_batches` (the jitted model and post-processing of
`DetectionModel.predict_fn`, with `config.eval`: pre_nms_topk, score_threshold, iou_threshold,
max_detections; flags override the last two and the rest of `config.eval` stays). The
detections are scored by `coco_eval.evaluate_boxes` against the split's annotations, so the
numbers are those of the trainer's periodic evaluation. Progress (`projects.tools.progress`) is
shown per batch on stderr: a bar on a terminal, a timed line in a log.

The COCO table is printed first (in percent; the files keep COCO's fractions in [0, 1], as
pycocotools and mmdet), then two files are written: the detections in COCO results format
(`--results`, for the COCO server or `coco_eval.evaluate_boxes` later) and the metrics
(`--metrics`: AP, AP50, AP75, APs, APm, APl, AR..., per_class, and how they were obtained).
By default both go next to the checkpoints, named by the dataset and the checkpoint step
evaluated, `eval_<dataset>_step<N>_{results,metrics}.json`, so the evaluation of a later
checkpoint of the same workdir is a new pair of files, not a conflict.

Outputs and reruns (`projects.tools.output_files`): the metrics file carries the provenance
record (its `RECORD_KEY` entry): the evaluated data (the validation annotation file's size
and sha256; for the generated synthetic set, its settings), the config, the checkpoint
(`checkpoints.identity`: folder and step), the dataset settings and `config.eval` with the
flags, and in its data the results file's size and sha256. The results file holds no record
of its own: COCO's format makes it a bare list. A rerun whose metrics file records the same
data, checkpoint and settings, with its results file unchanged beside it, prints "already
evaluated" and the stored table, and exits 0 without loading the data or the model (a
missing results file is made again). A metrics file of another checkpoint or other
settings, one without a readable record (0 bytes, an older version's), a results file that
is not the one the metrics record, or a results file without its metrics file is kept:
one `error:` line, exit 1, until --overwrite. The batch size is not a setting (it changes
the speed, not the detections). Both paths are checked before the model is loaded; a write
error after the evaluation (a full disk) comes after the printed table. Exit status: 0 when
evaluated or already evaluated, 1 on an error (one `error:` line on stderr), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from projects.tools import command_line
from projects.tools import output_files
from projects.cvt_detection import coco_eval, evaluation, models
from projects.cvt_detection.configs.common import load_config
from projects.tools.output_files import check_writable, write_json
from projects.tools.progress import Progress
from projects.training import checkpoints
from projects.training.configs import as_dict, config_get

TOOL = 'cvt_detection.evaluate'

# Errors a user can cause (paths, config, checkpoint, a full disk, an output conflict): one
# line on stderr and exit status 1. The checkpoint errors are ValueErrors.
USER_ERRORS = (OSError, ValueError)


class OutputConflictError(FileExistsError):
  """An existing output is not this evaluation's (another checkpoint or settings, unreadable)."""


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


# --- outputs and their records ------------------------------------------------------------


def val_annotation_file(name: str, dataset_configs: dict[str, Any]) -> str:
  """The validation annotations of a COCO-format dataset (as `builder.build_loaders`)."""
  if name == 'coco':
    if not dataset_configs.get('data_dir'):
      raise ValueError("dataset 'coco' needs dataset_configs.data_dir, the folder holding "
                       'annotations/instances_val2017.json')
    return os.path.join(dataset_configs['data_dir'], 'annotations', 'instances_val2017.json')
  if not dataset_configs.get('val_annotations'):
    raise ValueError("dataset 'coco_format' needs dataset_configs.val_annotations (its "
                     'categories name the classes)')
  return dataset_configs['val_annotations']


def default_output_paths(checkpoint: str, dataset_name: str) -> tuple[str, str]:
  """`(results, metrics)` paths beside the checkpoints folder, named by the step evaluated.

  `WORKDIR` or `WORKDIR/checkpoints` (the latest step N, `checkpoints.locate`) and a step
  folder `WORKDIR/checkpoints/N` -> `WORKDIR/eval_<dataset>_stepN_{results,metrics}.json`;
  without any step (nothing to evaluate) `WORKDIR/eval_<dataset>_...json`.
  """
  path = Path(checkpoint).absolute()
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    step, path = path.name, path.parent.parent
  else:
    step = checkpoints.locate(path)[1]
    if path.name == 'checkpoints':
      path = path.parent
  tag = dataset_name if step is None else f'{dataset_name}_step{step}'
  return (str(path / f'eval_{tag}_results.json'), str(path / f'eval_{tag}_metrics.json'))


def data_identity(name: str, dataset_configs: dict[str, Any]) -> dict[str, Any]:
  """What the evaluation scores against, as the `input` of the metrics file's record.

  COCO datasets: the validation annotation file (`output_files.describe_input`: path, size,
  sha256), so an edited file is other data. The synthetic set has no file: its settings
  (as canonical JSON) stand for it, with their size and sha256.
  """
  if name in ('coco', 'coco_format'):
    path = val_annotation_file(name, dataset_configs)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'validation annotation file not found: {path}')
    return output_files.describe_input(path)
  text = json.dumps({'dataset': name, **dataset_configs}, sort_keys=True, separators=(',', ':'),
                    default=list).encode()
  return {'path': f'the {name} validation set (generated, no file)', 'size': len(text),
          'sha256': hashlib.sha256(text).hexdigest()}


def record_settings(config_spec: str | None, checkpoint: str, config: Any,
                    dataset_configs: dict[str, Any]) -> dict[str, Any]:
  """What the metrics file's record names besides the data: what changes the numbers.

  The config (its path, as predict's pictures), the checkpoint (folder and step), the
  dataset settings (resize scale, canvases...) and the post-processing (`config.eval` with
  the flags). Not the batch size: it changes the speed, not the detections.
  """
  return {
      'config': output_files.config_identity(config_spec) if config_spec else None,
      'checkpoint': checkpoints.identity(checkpoint),
      'dataset': config_get(config, 'dataset_name'),
      'dataset_configs': dataset_configs,
      'eval': dict(models.DETECT_DEFAULTS, **as_dict(config_get(config, 'eval'))),
  }


def _conflict(message: str) -> output_files.OutputState:
  return output_files.OutputState('conflict', f'{message}; pass --overwrite to replace it')


def output_state(results_path: str, metrics_path: str, record: dict[str, Any],
                 overwrite: bool = False) -> output_files.OutputState:
  """Whether to evaluate ('todo'), skip ('done': the same evaluation's files) or refuse.

  The metrics file decides (`output_files.output_state` on its record); the results file,
  a bare COCO list, must be the one its data names (size and sha256). A results file
  without a metrics file cannot be told from another evaluation's: a conflict. A finished
  evaluation whose results file is gone is done again.
  """
  if overwrite:
    return output_files.OutputState('todo')
  if os.path.isdir(results_path):
    return output_files.OutputState('conflict',
                                    f'{results_path} is a folder; expected a file path')
  state = output_files.output_state({metrics_path: record}, overwrite=False)
  if state.status == 'conflict':
    return state
  has_results = os.path.lexists(results_path)
  if state.status == 'todo':  # no metrics file
    if has_results:
      return _conflict(f'{results_path} exists without its metrics file {metrics_path} (a COCO '
                       'results file has no record of its own: it may be another evaluation\'s)')
    return state
  if not has_results:
    return output_files.OutputState('todo', '', state.records)
  stored = (state.records[metrics_path].get('data') or {}).get('results') or {}
  try:
    found = output_files.describe_input(results_path)
  except OSError as e:
    return _conflict(f'{results_path} cannot be read ({e.strerror or e})')
  if (found['size'], found['sha256']) != (stored.get('size'), stored.get('sha256')):
    return _conflict(
        f'{results_path} is not the results file {metrics_path} records ({found["size"]:,} '
        f'bytes, sha256 {found["sha256"][:12]}...; expected {stored.get("size") or 0:,} bytes, '
        f'sha256 {str(stored.get("sha256"))[:12]}...)')
  return state


def read_metrics(path: str) -> dict[str, Any]:
  """A metrics file as `run_evaluation` returns it: no record, NaN where JSON has null."""
  with open(path) as f:
    metrics = json.load(f)
  metrics.pop(output_files.RECORD_KEY, None)
  nan = float('nan')
  for name in coco_eval.STAT_NAMES:
    if name in metrics and metrics[name] is None:
      metrics[name] = nan
  if metrics.get('per_class'):
    metrics['per_class'] = {k: nan if v is None else v for k, v in metrics['per_class'].items()}
  return metrics


def _print_table(print_fn: Callable[[str], None], metrics: dict[str, Any]) -> None:
  print_fn(f'COCO box metrics in % (the metrics file stores fractions in [0, 1]), '
           f'{metrics["num_images"]} images of {metrics["dataset"]!r}, '
           f'{metrics["num_detections"]} detections:')
  print_fn(coco_eval.format_table(metrics))


# --- evaluation ---------------------------------------------------------------------------


def run_evaluation(
    config: Any,
    checkpoint: str,
    *,
    config_spec: str | None = None,
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
    config_spec: the `--config` it came from (`path[:arg]`), named in the record.
    results_path: COCO results json; None: `default_output_paths(...)[0]`.
    metrics_path: metrics json; None: `default_output_paths(...)[1]`.
    overwrite: replace existing outputs whatever they record (module docstring).
    batch_size: images per batch; None: `config.eval_batch_size`.
    score_threshold: overrides `config.eval.score_threshold`.
    max_detections: overrides `config.eval.max_detections`.
    progress: show progress per batch on stderr (`projects.tools.progress.Progress`).
    print_fn: prints the table and the written paths; None prints nothing.

  Returns:
    The metrics written to `metrics_path` (or read from it when already evaluated, with
    `already_evaluated` True): `evaluate_boxes`'s numbers (fractions, NaN where a size
    range has no ground truth) and `per_class`, plus `dataset`, `checkpoint`, `num_images`,
    `num_detections`, `eval` (the post-processing settings), `results` and `metrics`.

  Raises:
    OutputConflictError: an existing output is not this evaluation's (before any work).
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
  if os.path.realpath(results_path) == os.path.realpath(metrics_path):
    raise ValueError(f'--results and --metrics must differ, got {results_path} for both')
  if not os.path.exists(checkpoint):  # before reading the dataset, which may take a while
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')

  dataset_kwargs = as_dict(config_get(config, 'dataset_configs'))
  dataset_kwargs.pop('start_step', None)
  settings = record_settings(config_spec, checkpoint, config, dataset_kwargs)
  record = output_files.make_record(TOOL, data_identity(name, dataset_kwargs), settings)
  state = output_state(results_path, metrics_path, record, overwrite)
  if state.status == 'conflict':
    raise OutputConflictError(state.message)
  if state.status == 'done':
    metrics = read_metrics(metrics_path)
    step = settings['checkpoint']['step']
    print(f'already evaluated: {metrics_path} records checkpoint {settings["checkpoint"]["path"]}'
          f'{"" if step is None else f" step {step}"} with these settings, and {results_path} '
          'its results (--overwrite evaluates again)', file=sys.stderr)
    if print_fn is not None:
      _print_table(print_fn, metrics)
    return dict(metrics, already_evaluated=True)
  check_writable([results_path, metrics_path])

  _, loader, meta = builder.build_loaders(
      name, batch_size=batch_size, eval_batch_size=batch_size, with_train=False,
      dtype_str=config_get(config, 'data_dtype_str', 'float32'), **dataset_kwargs)
  predict, variables = load_detector(config, checkpoint, meta['num_classes'])

  with Progress(loader.num_batches, 'evaluate', 'batch', enabled=progress) as bar:
    detections = evaluation.detect_batches(predict, variables, bar.wrap(loader.iterate()))
  results = evaluation.to_results(detections, meta['label_to_category_id'])
  metrics = coco_eval.evaluate_boxes(meta['ground_truth'], results)
  metrics.update(
      dataset=name,
      checkpoint=checkpoint,
      num_images=int(len(detections['image_id'])),
      num_detections=len(results),
      eval=settings['eval'],
      results=results_path,
      metrics=metrics_path,
  )
  if print_fn is not None:
    _print_table(print_fn, metrics)
  # The results first: the metrics' record names their size and sha256.
  coco_eval.write_results_json(results, results_path)
  record['data'] = {'results': output_files.describe_input(results_path)}
  write_json(metrics, metrics_path, record)
  if print_fn is not None:
    print_fn(f'results written to {results_path}')
    print_fn(f'metrics written to {metrics_path}')
  return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'python -m projects.cvt_detection.evaluate',
      'COCO box AP of a detection checkpoint on the validation split of its config\'s '
      'dataset. Prints the table (in percent), writes the detections (COCO results format) '
      'and the metrics (fractions, as COCO tools) as JSON.')
  parser.add_argument('--config', required=True, help='path/to/config.py[:arg]')
  parser.add_argument('--checkpoint', required=True,
                      help='workdir (its latest checkpoint), its checkpoints folder, or one '
                           'step folder')
  parser.add_argument('--batch-size', type=int, default=None,
                      help="images per batch (default: the config's eval_batch_size)")
  parser.add_argument('--score-threshold', type=float, default=None,
                      help="drop detections scoring below this (default: the config's "
                           f"eval.score_threshold, else {models.DETECT_DEFAULTS['score_threshold']})")
  parser.add_argument('--max-detections', type=int, default=None,
                      help="detections kept per image (default: the config's "
                           f"eval.max_detections, else {models.DETECT_DEFAULTS['max_detections']})")
  parser.add_argument('--results', default=None,
                      help='COCO results JSON (default: <workdir>/eval_<dataset>_step<N>_'
                           'results.json, N the step evaluated)')
  parser.add_argument('--metrics', default=None,
                      help='metrics JSON, with the record of how they were obtained (default: '
                           '<workdir>/eval_<dataset>_step<N>_metrics.json)')
  command_line.add_output_flags(parser, per_input=False)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (errors print one clear line).

  Returns:
    0 when evaluated or already evaluated, 1 on an error (an output conflict, a bad config
    or checkpoint, a write error), 2 on bad arguments (argparse).
  """
  args = parse_args(argv)
  try:
    config = load_config(args.config)
    run_evaluation(
        config, args.checkpoint, config_spec=args.config, results_path=args.results,
        metrics_path=args.metrics, overwrite=args.overwrite, batch_size=args.batch_size,
        score_threshold=args.score_threshold, max_detections=args.max_detections,
        progress=not args.no_progress,
    )
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
