"""Detect objects in image files: pictures with labelled boxes and COCO results.

  python -m projects.cvt_detection.predict --config CONFIG.py --checkpoint WORKDIR \\
      --output detections photos/ more/*.jpg [--score-threshold 0.3] [--overwrite]

Per input `OUTPUT/<stem>.png`, its boxes drawn; `OUTPUT/results.json` (COCO results) and
`OUTPUT/images.json` (image id -> input path) describe the run. Image ids count the inputs
from 1, except that a file named as an image of the validation annotations gets its COCO id.
Pictures follow the tools' output policy (`projects.tools.output_files`) and keep their
detections in their record, so a rerun lists inputs already done without inference.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from projects.cvt_detection import coco_eval, models
from projects.cvt_detection.configs.common import load_config
from projects.cvt_detection.data.builder import EVAL_DEVICE_KEYS
from projects.cvt_detection.data.synthetic import SyntheticDetection
from projects.cvt_detection.data.transforms import (
  DEFAULT_SCALE,
  DetectionEvalTransform,
  collate,
  default_canvas_sizes,
)
from projects.cvt_detection.evaluate import (
  USER_ERRORS,
  categories_source,
  load_detector,
  read_files,
  val_annotation_file,
  with_eval_settings,
)
from projects.tools import command_line, output_files
from projects.tools.input_files import PredictError, collect_inputs
from projects.tools.output_files import check_writable, write_json
from projects.tools.progress import Progress
from projects.training.configs import as_dict, config_get
from projects.training.images import ImageError, check_image_header, read_image

TOOL = 'cvt_detection.predict'
RESULTS_FILE = 'results.json'
IMAGES_FILE = 'images.json'
# mmdet's image demo (demo/image_demo.py, DetInferencer) draws detections scoring >= 0.3.
SCORE_THRESHOLD = 0.3


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What prediction needs from the config's dataset, without loading the dataset."""

  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  listed_in: str  # where the categories come from, as errors name it
  image_ids: dict[str, int]  # validation file base name -> COCO image id
  scale: tuple[int, int]  # (long, short) keep-ratio resize limits
  canvas_sizes: tuple[tuple[int, int], ...]


def dataset_info(config: Any) -> DatasetInfo:
  """The config's `DatasetInfo`: the synthetic set's shapes, or the categories and images of
  a COCO validation annotation file (only that file is read)."""
  name = config_get(config, 'dataset_name')
  kw = as_dict(config_get(config, 'dataset_configs'))
  default_scale = DEFAULT_SCALE
  if name == 'synthetic':
    settings = {k: kw[k] for k in ('num_classes', 'image_size') if kw.get(k) is not None}
    source = SyntheticDetection(1, **settings)
    names, ids, image_ids = source.class_names, source.label_to_category_id, {}
    default_scale = source.image_size[::-1]  # as build_loaders: the images' own size
  elif name in ('coco', 'coco_format'):
    path = val_annotation_file(name, kw)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'validation annotation file not found: {path} (its categories '
                              'name the classes)')
    with open(path) as f:
      gt = json.load(f)
    if not gt.get('categories'):
      raise ValueError(f'{path} lists no categories; expected a COCO detection file')
    categories = sorted(gt['categories'], key=lambda c: c['id'])  # labels in id order
    names = [str(c['name']) for c in categories]
    ids = [int(c['id']) for c in categories]
    by_name: dict[str, list[int]] = {}
    for info in gt.get('images', []):
      by_name.setdefault(os.path.basename(info['file_name']), []).append(int(info['id']))
    image_ids = {k: v[0] for k, v in by_name.items() if len(v) == 1}  # unambiguous names
  else:
    raise ValueError(f"unknown detection dataset {name!r}; expected 'synthetic', 'coco' or "
                     "'coco_format'")
  scale = tuple(int(s) for s in (kw.get('scale') or default_scale))
  canvas_sizes = kw.get('canvas_sizes') or default_canvas_sizes(scale)
  return DatasetInfo(tuple(str(n) for n in names), tuple(int(i) for i in ids),
                     categories_source(name, kw), image_ids, scale,
                     tuple(tuple(int(s) for s in c) for c in canvas_sizes))


def assign_image_ids(paths: Sequence[str], coco_ids: dict[str, int]) -> list[int]:
  """The COCO id of a known file name, else the 1-based index (or, when another input's
  COCO id took it, the next id above every id in use)."""
  ids: list[int | None] = [coco_ids.get(os.path.basename(p)) for p in paths]
  used = {i for i in ids if i is not None}
  next_free = max(used | {len(paths)}) + 1
  for k, image_id in enumerate(ids):
    if image_id is None:
      if k + 1 in used:
        ids[k], next_free = next_free, next_free + 1
      else:
        ids[k] = k + 1
      used.add(ids[k])
  return [int(i) for i in ids]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
  """Bright, distinct RGB colours: hues a golden-ratio turn apart, so neighbours differ."""
  colors = []
  for k in range(num_classes):
    r, g, b = colorsys.hsv_to_rgb((0.08 + 0.618034 * k) % 1.0, 0.85, 0.95)
    colors.append((round(255 * r), round(255 * g), round(255 * b)))
  return colors


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
  """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
  luma = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
  return (0, 0, 0) if luma > 140 else (255, 255, 255)


def draw_detections(
    image: np.ndarray | Image.Image, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
    class_names: Sequence[str], *, colors: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
  """An RGB copy of `image` (uint8 or PIL) with each box `[n, 4]` `(x1, y1, x2, y2)` outlined
  and labelled `<class> <score>` above it (inside when the box touches the top), higher
  scores on top; line width and text size follow the image size."""
  canvas = (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
  canvas = canvas.convert('RGB')
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  classes = np.asarray(classes).reshape(-1).astype(int)
  if not len(boxes) == len(scores) == len(classes):
    raise ValueError(f'draw_detections needs as many boxes, scores and classes; got '
                     f'{len(boxes)}, {len(scores)} and {len(classes)}')
  if len(classes) and not 0 <= classes.min() <= classes.max() < len(class_names):
    raise ValueError(f'classes must be labels in [0, {len(class_names)}) of class_names; got '
                     f'{sorted(set(classes.tolist()))}')
  colors = list(colors) if colors is not None else class_colors(len(class_names))
  width, height = canvas.size
  line = max(2, round(max(width, height) / 320))
  font = ImageFont.load_default(size=int(np.clip(round(max(width, height) / 40), 11, 40)))
  ascent, descent = font.getmetrics()
  pad = max(2, ascent // 5)
  draw = ImageDraw.Draw(canvas)
  order = np.argsort(scores, kind='stable')
  for k in order:
    x1, y1, x2, y2 = boxes[k].tolist()
    draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colors[classes[k]], width=line)
  for k in order:  # labels after every box, so no outline crosses a label
    x1, y1 = boxes[k, :2].tolist()
    text = f'{class_names[classes[k]]} {scores[k]:.2f}'
    label_w = round(draw.textlength(text, font=font)) + 2 * pad
    label_h = ascent + descent + 2 * pad
    x = max(0, min(round(x1), width - label_w))
    y = round(y1) - label_h
    if y < 0:  # the box touches the top: label inside it
      y = max(0, min(round(y1), height - label_h))
    color = colors[classes[k]]
    draw.rectangle([x, y, x + label_w - 1, y + label_h - 1], fill=color)
    draw.text((x + pad, y + pad), text, fill=_text_color(color), font=font, anchor='la')
  return canvas


class Detector:
  """`load_detector`'s model on one image of any size: keep-ratio resize into `scale`, padding
  to one of `canvas_sizes` (one compiled program each), inputs of `dtype`."""

  def __init__(self, predict: Any, variables: Any, scale: tuple[int, int],
               canvas_sizes: Sequence[tuple[int, int]], dtype: Any = np.float32):
    self.predict = predict
    self.variables = variables
    self.transform = DetectionEvalTransform(scale=tuple(scale))
    self.canvas_sizes = tuple(canvas_sizes)
    self.dtype = np.dtype(dtype)

  def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """`{'boxes' [n, 4] in the image's pixels, clipped to it, 'scores' [n], 'classes' [n]}`
    of a uint8 `[H, W, 3]` image, in decreasing score."""
    example = {'image': image, 'boxes': np.zeros((0, 4), np.float32),
               'labels': np.zeros((0,), np.int32), 'image_id': 0}
    batch = collate([self.transform(example)], self.canvas_sizes, max_boxes=1)
    batch['inputs'] = batch['inputs'].astype(self.dtype, copy=False)
    out = jax.device_get(self.predict(self.variables, *(batch[k] for k in EVAL_DEVICE_KEYS)))
    valid = np.asarray(out['valid'][0], bool)
    h, w = image.shape[:2]
    boxes = np.clip(np.asarray(out['boxes'][0], np.float32)[valid], 0,
                    np.float32([w, h, w, h]))
    return {'boxes': boxes, 'scores': np.asarray(out['scores'][0], np.float32)[valid],
            'classes': np.asarray(out['classes'][0], np.int32)[valid]}


def record_settings(config_spec: str, checkpoint: str, config: Any, info: DatasetInfo,
                    score_threshold: float) -> dict[str, Any]:
  """What changes a picture's detections: the model, `config.eval` with the flags, the
  resize scale and --score-threshold."""
  return {
      **output_files.model_settings(config_spec, checkpoint),
      'eval': dict(models.DETECT_DEFAULTS, **as_dict(config_get(config, 'eval'))),
      'scale': list(info.scale),
      'score_threshold': score_threshold,
  }


def predict_images(
    detector: Detector, jobs: Sequence[output_files.Planned], info: DatasetInfo,
    fail: command_line.Failures, *, score_threshold: float = SCORE_THRESHOLD, progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], str | None]:
  """Detects, draws and saves the picture of every job (`plan_inputs`), its record holding
  the detections scoring at least `score_threshold`.

  Returns:
    `({input: record}, the message that stopped a --strict run or None)`.

  Raises:
    OutputWriteError: a picture could not be written (a full disk): the run stops.
  """
  colors = class_colors(len(info.class_names))
  records = {}
  with Progress(len(jobs), 'predict', 'img', enabled=progress) as bar:
    fail.write = bar.write
    for job in jobs:
      bar.start_item(job.item.path)
      try:
        image = read_image(job.item.path)
      except ImageError as e:
        try:
          fail(str(e))
        except PredictError:
          return records, str(e)  # the pictures made so far still go into the run files
        bar.update()
        continue
      bar.set_detail(f'{image.shape[1]}x{image.shape[0]}')
      found = detector(image)
      keep = found['scores'] >= score_threshold
      boxes, scores, classes = (found['boxes'][keep], found['scores'][keep],
                                found['classes'][keep])
      detections = [{key: value for key, value in r.items() if key != 'image_id'} for r in
                    coco_eval.to_coco_results(boxes, scores, classes, 0, info.category_ids)]
      (path, record), = job.records.items()
      record = output_files.make_record(TOOL, record['input'], record['settings'], {
          'detections': detections, 'size': list(image.shape[:2])})
      output_files.save_png(
          draw_detections(image, boxes, scores, classes, info.class_names, colors=colors),
          path, record)
      records[job.item.path] = record
      bar.update()
  fail.write = None
  return records, None


def run_files(image_ids: dict[str, int], records: dict[str, dict[str, Any]]
              ) -> tuple[dict[str, str], list[dict[str, Any]]]:
  """`(images.json, results.json)` contents of the inputs with records, in input order."""
  id_to_path, results = {}, []
  for path, image_id in image_ids.items():
    if path in records:
      id_to_path[str(image_id)] = os.path.abspath(path)
      results += [{'image_id': image_id, **d} for d in records[path]['data']['detections']]
  return id_to_path, results


def check_run_files(output_dir: str, done: dict[str, dict[str, Any]]) -> None:
  """Raises `PredictError` unless results.json and images.json are absent or may be replaced
  without loss: every image images.json lists is an input of this run already done here
  (`done`: input -> record), and results.json holds exactly their recorded detections."""
  images_path = os.path.join(output_dir, IMAGES_FILE)
  results_path = os.path.join(output_dir, RESULTS_FILE)
  hint = 'pass --overwrite to replace it, or choose another --output'
  old_images = None
  if os.path.lexists(images_path):
    try:
      with open(images_path) as f:
        old_images = json.load(f)
      if not isinstance(old_images, dict) or not all(
          k.isdigit() and isinstance(v, str) for k, v in old_images.items()):
        raise ValueError('expected {"image id": "input path"}')
    except (OSError, ValueError) as e:
      raise PredictError(f'{images_path} is not an image list written by predict ({e}); '
                         f'{hint}') from None
    by_path = {os.path.abspath(p): p for p in done}
    for path in old_images.values():
      if path not in by_path:
        raise PredictError(f'{images_path} lists {path}, which is not an input of this run '
                           f'already done in {output_dir} (its results would be lost); {hint}')
  if os.path.lexists(results_path):
    if old_images is None:
      raise PredictError(f'{results_path} exists without {IMAGES_FILE}: not the results of a '
                         f'previous run of predict; {hint}')
    old_ids = {by_path[p]: int(k) for k, p in old_images.items()}
    _, expected = run_files(old_ids, done)
    try:
      with open(results_path) as f:
        same = json.load(f) == expected
    except (OSError, ValueError):
      same = False
    if not same:
      raise PredictError(f'{results_path} does not hold the detections recorded in the '
                         f'pictures {IMAGES_FILE} lists; {hint}')


def write_run_files(output_dir: str, image_ids: dict[str, int],
                    records: dict[str, dict[str, Any]]) -> int:
  """Writes images.json, then results.json, unless they hold this already; returns #results."""
  id_to_path, results = run_files(image_ids, records)
  for name, value, write in ((IMAGES_FILE, id_to_path, write_json),
                             (RESULTS_FILE, results, coco_eval.write_results_json)):
    path = os.path.join(output_dir, name)
    try:
      with open(path) as f:
        if json.load(f) == value:
          continue
    except (OSError, ValueError):
      pass
    write(value, path)
  return len(results)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'python -m projects.cvt_detection.predict',
      'Detect objects in images: one picture with labelled boxes per image (OUTPUT/<name>.png) '
      'and the detections in COCO results format (OUTPUT/results.json, OUTPUT/images.json).')
  command_line.add_model_flags(parser)
  command_line.add_inputs(parser, 'output folder: <stem>.png per image, results.json, images.json')
  parser.add_argument('--score-threshold', type=float, default=SCORE_THRESHOLD,
                      help='draw and write detections scoring at least this; 0 keeps the '
                           'max-detections best of each image')
  parser.add_argument('--max-detections', type=int, default=None,
                      help="detections kept per image (default: the config's "
                           f"eval.max_detections, else {models.DETECT_DEFAULTS['max_detections']})")
  command_line.add_output_flags(parser)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (0 all done, 1 any failed, 2 usage)."""
  args = parse_args(argv)
  fail = command_line.Failures(args.strict, PredictError, 'failed:')
  try:
    if not 0 <= args.score_threshold <= 1:
      raise ValueError(f'--score-threshold must be in [0, 1], got {args.score_threshold}')
    images, problems = collect_inputs(args.inputs, args.output, fail)
    config = load_config(args.config)
    # Candidates pass config.eval's class-probability threshold before the final score
    # (probability x centerness) is compared with ours: never filter more than asked.
    eval_threshold = config_get(config_get(config, 'eval'), 'score_threshold',
                                models.DETECT_DEFAULTS['score_threshold'])
    config = with_eval_settings(config, score_threshold=min(eval_threshold, args.score_threshold),
                                max_detections=args.max_detections)
    info = dataset_info(config)
    settings = record_settings(args.config, args.checkpoint, config, info, args.score_threshold)
    # Before the model is loaded: inputs as outputs, conflicts, the run files and an
    # unwritable place.
    inputs = read_files(args.config, args.checkpoint, config)
    run_paths = [os.path.join(args.output, name) for name in (RESULTS_FILE, IMAGES_FILE)]
    output_files.check_apart(run_paths, inputs)
    todo, done = output_files.plan_inputs(
        images, lambda item: {os.path.join(args.output, item.stem + '.png'): settings}, TOOL,
        args.overwrite, fail, check=check_image_header, inputs=inputs)
    done = {job.item.path: dict(next(iter(job.state.records.values()))) for job in done}
    if not args.overwrite:
      check_run_files(args.output, done)
    check_writable([p for job in todo for p in job.records] + (run_paths if todo or done
                                                                else []))
    made, stopped = {}, None
    if todo:
      # The checkpoint's category map must be the config's: the names drawn and the ids written.
      predict, variables = load_detector(
          config, args.checkpoint, dict(zip(info.category_ids, info.class_names, strict=True)),
          info.listed_in)
      detector = Detector(predict, variables, info.scale, info.canvas_sizes,
                          config_get(config, 'data_dtype_str', 'float32'))
      made, stopped = predict_images(detector, todo, info, fail,
                                     score_threshold=args.score_threshold,
                                     progress=not args.no_progress)
    records = {**done, **made}
    # Also after a --strict stop: the pictures made are listed, so a rerun finds them.
    image_ids = dict(zip((item.path for item in images),
                         assign_image_ids([item.path for item in images], info.image_ids),
                         strict=True))
    num_results = write_run_files(args.output, image_ids, records) if records else 0
    if stopped:
      raise PredictError(stopped)
  except (PredictError, *USER_ERRORS) as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  already = f' ({len(done)} already done)' if done else ''
  print(f'{len(records)} of {len(images) + len(problems)} inputs done{already} into '
        f'{args.output}: {num_results} detections in '
        f'{os.path.join(args.output, RESULTS_FILE)}', file=sys.stderr)
  if fail:
    print(f'{len(fail)} failed: ' + '; '.join(fail), file=sys.stderr)
    return command_line.EXIT_FAILED
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
