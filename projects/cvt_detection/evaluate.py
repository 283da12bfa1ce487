"""Evaluate a detection checkpoint: COCO box AP on the validation split, as mmdet's CocoMetric.

  python -m projects.cvt_detection.evaluate --config CONFIG.py --checkpoint WORKDIR \\
      [--score-threshold 0.05] [--max-detections 100] [--results R.json] [--metrics M.json]

The split goes through the trainer's evaluation loader and `evaluation.detect_batches`, so
the numbers are those of the periodic evaluation. The table is printed in percent; the
COCO results file and the metrics file (fractions, with the record) follow the tools' output
policy (`output_files.report_state`: the results file has no record of its own).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from projects.cvt_detection import coco_eval, evaluation, models
from projects.cvt_detection.configs.common import load_config
from projects.cvt_detection.data.coco import check_same_categories
from projects.tools import command_line, output_files
from projects.tools.output_files import check_writable, write_json
from projects.tools.progress import Progress
from projects.training.configs import as_dict, config_get

TOOL = 'cvt_detection.evaluate'

# Errors a user can cause (paths, config, checkpoint, a full disk, an output conflict): one
# `error:` line and exit status 1.
USER_ERRORS = (OSError, ValueError)


class OutputConflictError(FileExistsError):
  """An existing output is not this evaluation's (another checkpoint or settings, unreadable)."""


def with_eval_settings(config: Any, **overrides: Any) -> Any:
  """`config`, or a copy whose `config.eval` takes the `overrides` that are not None
  (`score_threshold` in [0, 1], `max_detections` >= 1)."""
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


def load_detector(config: Any, checkpoint: str, categories: Mapping[int, str],
                  listed_in: str) -> tuple[evaluation.PredictFn, dict[str, Any]]:
  """`(predict, variables)` of a checkpoint: `DetectionModel.predict_fn` with `config.eval`'s
  post-processing, boxes `[B, D, 4]` in original pixels.

  `categories` (id -> name, labels in id order, from `listed_in`) must be the category map
  the checkpoint records (a `DatasetError` naming both otherwise; older checkpoints record
  none, only their number of classes).
  """
  from projects.training import checkpoints

  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
  model_name = config_get(config, 'model_name')
  if model_name is None:
    raise ValueError('the config has no model_name')
  saved = checkpoints.saved_metadata(checkpoint)
  if 'category_ids' in saved:
    where = checkpoints.identity(checkpoint)
    check_same_categories(categories, listed_in,
                          dict(zip(saved['category_ids'], saved['class_names'], strict=True)),
                          f'the checkpoint of step {where["step"]} in {where["path"]}')
  num_classes = len(categories)
  flax_model, variables = models.restore_for_inference(config, checkpoint,
                                                       num_classes=num_classes)
  model = models.get_model_cls(model_name)(config, {'num_classes': num_classes})
  model.flax_model = flax_model  # the restored one: no pretrained file to read
  return model.predict_fn(), variables


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


def read_files(config_spec: str | None, checkpoint: str, config: Any) -> dict[str, str]:
  """What evaluate and predict read, as `output_files.check_apart` takes it: the model's
  files and a COCO dataset's validation annotations."""
  inputs = output_files.model_inputs(config_spec, checkpoint)
  name = config_get(config, 'dataset_name')
  if name in ('coco', 'coco_format'):
    annotations = val_annotation_file(name, as_dict(config_get(config, 'dataset_configs')))
    inputs[annotations] = 'the validation annotations'
  return inputs


def default_output_paths(checkpoint: str, dataset_name: str) -> tuple[str, str]:
  """`(results, metrics)`: `WORKDIR/eval_<dataset>[_step<N>]_{results,metrics}.json`."""
  return tuple(output_files.report_path(checkpoint, dataset_name, f'_{kind}.json')
               for kind in ('results', 'metrics'))


def data_identity(name: str, dataset_configs: dict[str, Any]) -> dict[str, Any]:
  """The record's input: the validation annotation file, or for the generated synthetic
  set its settings as canonical JSON (their size and sha256)."""
  if name in ('coco', 'coco_format'):
    path = val_annotation_file(name, dataset_configs)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'validation annotation file not found: {path}')
    return output_files.describe_input(path)
  text = json.dumps({'dataset': name, **dataset_configs}, sort_keys=True, separators=(',', ':'),
                    default=list).encode()
  return {'path': f'the {name} validation set (generated, no file)', 'size': len(text),
          'sha256': hashlib.sha256(text).hexdigest()}


def categories_source(name: str, dataset_configs: dict[str, Any]) -> str:
  """Where the config's dataset lists its categories, as errors name it."""
  if name in ('coco', 'coco_format'):
    return val_annotation_file(name, dataset_configs)
  return f'the {name} dataset of the config'


def record_settings(config_spec: str | None, checkpoint: str, config: Any,
                    dataset_configs: dict[str, Any]) -> dict[str, Any]:
  """What changes the numbers besides the data (not the batch size: only the speed)."""
  return {
      **output_files.model_settings(config_spec, checkpoint),
      'dataset': config_get(config, 'dataset_name'),
      'dataset_configs': dataset_configs,
      'eval': dict(models.DETECT_DEFAULTS, **as_dict(config_get(config, 'eval'))),
  }


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


def run_evaluation(
    config: Any, checkpoint: str, *, config_spec: str | None = None,
    results_path: str | None = None, metrics_path: str | None = None, overwrite: bool = False,
    batch_size: int | None = None, score_threshold: float | None = None,
    max_detections: int | None = None, progress: bool = True,
    print_fn: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Evaluates `checkpoint` on the validation split of `config`; prints, writes and returns
  the metrics (`evaluate_boxes`'s, plus `dataset`, `checkpoint`, `num_images`,
  `num_detections`, `eval`, `results`, `metrics`), read back with `already_evaluated` when
  already evaluated. OutputConflictError, before any work, when an output is another's.
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
  output_files.check_apart([results_path, metrics_path],
                           read_files(config_spec, checkpoint, config))
  settings = record_settings(config_spec, checkpoint, config, dataset_kwargs)
  record = output_files.make_record(TOOL, data_identity(name, dataset_kwargs), settings)
  state = output_files.report_state(metrics_path, record, overwrite, results=results_path)
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
  predict, variables = load_detector(
      config, checkpoint, dict(zip(meta['category_ids'], meta['class_names'], strict=True)),
      categories_source(name, dataset_kwargs))

  with Progress(loader.num_batches, 'evaluate', 'batch', enabled=progress) as bar:
    detections = evaluation.detect_batches(predict, variables, bar.wrap(loader.iterate()))
  results = evaluation.to_results(detections, meta['category_ids'])
  metrics = coco_eval.evaluate_boxes(meta['ground_truth'], results)
  metrics.update(dataset=name, checkpoint=checkpoint, num_images=int(len(detections['image_id'])),
                 num_detections=len(results), eval=settings['eval'], results=results_path,
                 metrics=metrics_path)
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
  command_line.add_model_flags(parser)
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
  """Command-line entry point; returns the exit status (errors print one `error:` line)."""
  args = parse_args(argv)
  try:
    config = load_config(args.config)
    run_evaluation(
        config, args.checkpoint, config_spec=args.config, results_path=args.results,
        metrics_path=args.metrics, overwrite=args.overwrite, batch_size=args.batch_size,
        score_threshold=args.score_threshold, max_detections=args.max_detections,
        progress=not args.no_progress)
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
