"""Detect objects in image files: pictures with labelled boxes and COCO results.

  python -m projects.cvt_detection.predict \\
      --config=projects/cvt_detection/configs/synthetic_demo.py:runlocal \\
      --checkpoint=workdirs/cvt_detection_demo --output=detections \\
      photos/ more/*.jpg one.png [--score-threshold 0.3] [--max-detections 100] \\
      [--overwrite] [--strict] [--no-progress]

For every input image `<stem>.<ext>` (any size and mode; EXIF orientation applied) it writes
`OUTPUT/<stem>.png`: the image at its own size with the boxes drawn, one colour per class,
labelled `<class> <score>`. Images go through the evaluation pipeline: keep-ratio resize to
the dataset's scale (`dataset_configs.scale`; the synthetic set's image size, else mmdet's
(1333, 800)), ImageNet normalisation, zero padding to one of a few fixed canvases (so the
jitted model compiles at most once per canvas), the model and `config.eval`'s
post-processing; boxes come back in original pixels, clipped to the image.

Two files describe the run: `OUTPUT/results.json`, the detections in COCO results format
(`{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}`), and `OUTPUT/images.json`
mapping each image id to its input path. Image ids count the inputs from 1 in input order,
except that an input whose file name is an image of the dataset's validation annotations
(COCO datasets) gets that image's id, so the results can be scored against the
annotations; an index that such an id already took moves past the largest id used.

Detections scoring at least --score-threshold (mmdet's demo default 0.3) are drawn and
written: the score shown is the final one (class probability x centerness). The
post-processing (`config.eval`) keeps candidates whose class probability passes its own
`score_threshold`; a lower --score-threshold lowers that one too, so `--score-threshold 0`
gives the `max_detections` best of every image (what COCO AP wants).

Inputs are files, folders (searched recursively; outputs keep the sub-folders) and glob
patterns. Progress (`projects.tools.progress`) is shown on stderr: a bar on a terminal, a timed
line in a log (`--no-progress`: none). A missing or unreadable input, or one whose picture
is in conflict, is reported by name (`failed: ...`) and the others are still done;
`--strict` stops at the first instead (one `error:` line), before loading the model when
the checks find it (a missing file, a file that is not an image, an output conflict).

Outputs and reruns (`projects.tools.output_files`): every picture is written atomically and
records, in a PNG text chunk, its input (absolute path, size, sha256), the settings that
made it (config, checkpoint folder and step, `config.eval` with the flags, the scale,
--score-threshold) and its detections. A rerun skips an input whose picture records the
same input and settings ("already done"; its detections come from the record, so
results.json lists it without inference); a picture that records another input (an
`a.bmp` after an `a.jpg`), other settings, or nothing (a 0-byte file, an older version's
file) is kept and reported as a failed input. results.json and images.json are rewritten
for the inputs of the run done so far (images.json first) when absent, or when they are a
previous run's on inputs of this run already done here (every listed image among them and
the results exactly their recorded detections): nothing is lost. Any other such file is
kept and the run stops before the model is loaded. --overwrite replaces every output. The
output place is checked before the model is loaded. A run stopped by --strict after some
pictures were made still lists them in the two files. Exit status: 0 when every input was
done or already done, 1 when any failed (or on an error, one `error:` line), 2 on bad
arguments.
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

from projects.tools import command_line
from projects.tools import output_files
from projects.cvt_detection import coco_eval, models
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
  load_detector,
  val_annotation_file,
  with_eval_settings,
)
from projects.tools.input_files import (
  InputImage,
  PredictError,
  check_image_header,
  collect_inputs,
  read_image,
)
from projects.tools.output_files import check_writable, write_json
from projects.tools.progress import Progress
from projects.training import checkpoints
from projects.cvt_detection.configs.common import load_config
from projects.training.configs import as_dict, config_get

TOOL = 'cvt_detection.predict'
RESULTS_FILE = 'results.json'
IMAGES_FILE = 'images.json'
# mmdet's image demo (demo/image_demo.py, DetInferencer) draws detections scoring >= 0.3.
SCORE_THRESHOLD = 0.3


# --- what the dataset says: class names, category ids, image ids ---------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What prediction needs from the config's dataset, without loading the dataset.

  Attributes:
    class_names: one name per label `0..K-1`.
    category_ids: COCO category id of each label.
    image_ids: validation image file name (base name) -> COCO image id; empty for the
      synthetic set.
    scale: `(long, short)` keep-ratio resize limits of evaluation.
    canvas_sizes: padded `(H, W)` input shapes.
  """

  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]
  image_ids: dict[str, int]
  scale: tuple[int, int]
  canvas_sizes: tuple[tuple[int, int], ...]


def dataset_info(config: Any) -> DatasetInfo:
  """Class names, category ids, validation image ids and resize settings of the config.

  The synthetic set gives its shape names; 'coco' and 'coco_format' read the categories
  and images of the validation annotation file (only that json: the images and the
  training annotations are not opened).
  """
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
  return DatasetInfo(tuple(str(n) for n in names), tuple(int(i) for i in ids), image_ids,
                     scale, tuple(tuple(int(s) for s in c) for c in canvas_sizes))


def assign_image_ids(paths: Sequence[str], coco_ids: dict[str, int]) -> list[int]:
  """Image ids of the inputs: the COCO id of a known file name, else the 1-based index.

  An index already taken by a COCO id of another input is replaced by the next id above
  every id in use, so ids stay unique.
  """
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


# --- drawing ----------------------------------------------------------------------------------


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
    image: np.ndarray | Image.Image,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    *,
    colors: Sequence[tuple[int, int, int]] | None = None,
) -> Image.Image:
  """The image with each box outlined and labelled `<class> <score>` on a filled background.

  Line width and text size follow the image size. A label sits above its box, or inside
  it at the top when the box touches the image's top edge, and is shifted left when it
  would leave the image on the right. Higher scores are drawn last (on top).

  Args:
    image: uint8 `[H, W, 3]` (or `[H, W]`) or a PIL image.
    boxes: `[n, 4]` `(x1, y1, x2, y2)` in pixels of `image`.
    scores: `[n]` in [0, 1].
    classes: `[n]` labels in `[0, len(class_names))`.
    class_names: one name per label.
    colors: RGB colour per label (default `class_colors`).

  Returns:
    An RGB PIL image of the input's size.
  """
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


def save_png(image: Image.Image, path: str, record: dict[str, Any] | None = None) -> None:
  """Saves `image` as PNG atomically (a temporary name, then a rename), with its record."""
  output_files.save_png(image, path, record)


# --- prediction ---------------------------------------------------------------------------


class Detector:
  """A restored model that detects objects in one image of any size.

  Args:
    predict: `load_detector`'s jitted function.
    variables: its variables.
    scale: `(long, short)` keep-ratio resize limits.
    canvas_sizes: padded input shapes (one compiled program each).
    dtype: input dtype of the model (the config's `data_dtype_str`).
  """

  def __init__(self, predict: Any, variables: Any, scale: tuple[int, int],
               canvas_sizes: Sequence[tuple[int, int]], dtype: Any = np.float32):
    self.predict = predict
    self.variables = variables
    self.transform = DetectionEvalTransform(scale=tuple(scale))
    self.canvas_sizes = tuple(canvas_sizes)
    self.dtype = np.dtype(dtype)

  def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
    """Detections of a uint8 `[H, W, 3]` image.

    Returns:
      `{'boxes' float32 [n, 4] (x1, y1, x2, y2) in the image's pixels, clipped to it,
      'scores' [n], 'classes' int32 [n]}`, the valid detections in decreasing score.
    """
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


def output_path(output_dir: str, stem: str) -> str:
  return os.path.join(output_dir, stem + '.png')


def record_settings(config_spec: str, checkpoint: str, config: Any, info: DatasetInfo,
                    score_threshold: float) -> dict[str, Any]:
  """What a picture's record names besides its input: what changes its detections.

  The config and checkpoint (folder and step), the post-processing (`config.eval` with the
  flags applied), the resize scale and --score-threshold.
  """
  return {
      'config': output_files.config_identity(config_spec),
      'checkpoint': checkpoints.identity(checkpoint),
      'eval': dict(models.DETECT_DEFAULTS, **as_dict(config_get(config, 'eval'))),
      'scale': list(info.scale),
      'score_threshold': score_threshold,
  }


@dataclasses.dataclass(frozen=True)
class Job:
  """One input to detect: its picture and what its record names."""

  item: InputImage
  image_id: int
  path: str
  source: dict[str, Any]


@dataclasses.dataclass
class Plan:
  """The inputs sorted before any work (`plan_outputs`).

  Attributes:
    todo: inputs to detect.
    done: input path -> the record of its picture, for inputs already done (their
      detections are kept in the record, so results.json lists them without a rerun).
    failed: one message per input that cannot be done (unreadable, an output conflict).
    image_ids: input path -> image id, for every input.
  """

  todo: list[Job]
  done: dict[str, dict[str, Any]]
  failed: list[str]
  image_ids: dict[str, int]


def _fail(message: str, strict: bool, failed: list[str], report: Any = None) -> None:
  """Counts a failed input (`failed: ...` on stderr), or with `strict` stops the run."""
  if strict:
    raise PredictError(message)
  failed.append(message)
  line = f'failed: {message}'
  if report is not None:
    report(line)
  else:
    print(line, file=sys.stderr, flush=True)


def plan_outputs(images: Sequence[InputImage], output_dir: str, info: DatasetInfo,
                 settings: dict[str, Any], *, overwrite: bool = False,
                 strict: bool = False) -> Plan:
  """Checks each input's header, reads its sha256 and decides: todo, done or conflict.

  See `projects.tools.output_files.output_state`: a picture recording this input and `settings`
  is done; one recording another input, other settings, or nothing is a conflict (failed).
  A file that is not an image fails here, before the model is loaded.

  Raises:
    PredictError: with `strict`, the first input that fails.
  """
  image_ids = assign_image_ids([item.path for item in images], info.image_ids)
  plan = Plan([], {}, [], dict(zip((item.path for item in images), image_ids, strict=True)))
  for item, image_id in zip(images, image_ids, strict=True):
    path = output_path(output_dir, item.stem)
    try:
      check_image_header(item.path)
      source = output_files.describe_input(item.path)
    except PredictError as e:
      _fail(str(e), strict, plan.failed)
      continue
    except OSError as e:
      _fail(f'{item.path}: cannot read ({e.strerror or e})', strict, plan.failed)
      continue
    record = output_files.make_record(TOOL, source, settings)
    state = output_files.output_state({path: record}, overwrite)
    if state.status == 'done' and 'detections' in state.records[path].get('data', {}):
      plan.done[item.path] = dict(state.records[path])
      print(f'{item.path}: already done ({path})', file=sys.stderr)
    elif state.status == 'conflict':
      _fail(f'{item.path}: {state.message}', strict, plan.failed)
    else:
      plan.todo.append(Job(item, image_id, path, source))
  return plan


def predict_images(
    detector: Detector,
    jobs: Sequence[Job],
    info: DatasetInfo,
    settings: dict[str, Any],
    *,
    score_threshold: float = SCORE_THRESHOLD,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
  """Detects, draws and saves the picture of every job, its record holding the detections.

  Args:
    detector: the restored model.
    jobs: `plan_outputs(...).todo`.
    info: class names, category ids and COCO image ids (`dataset_info`).
    settings: `record_settings(...)`.
    score_threshold: draw and keep the detections scoring at least this.
    strict: stop at the first image that cannot be read (its message in 'stopped').
    progress: show progress per image on stderr (`projects.tools.progress.Progress`).

  Returns:
    `{'done': [(input, output png, image id, detections)], 'failed': [message],
    'records': {input: record}, 'stopped': the message that stopped a strict run, or None}`.

  Raises:
    OutputWriteError: a picture could not be written (a full disk): the run stops.
  """
  colors = class_colors(len(info.class_names))
  summary = {'done': [], 'failed': [], 'records': {}, 'stopped': None}
  with Progress(len(jobs), 'predict', 'img', enabled=progress) as bar:
    for job in jobs:
      bar.start_item(job.item.path)
      try:
        image = read_image(job.item.path)
      except PredictError as e:
        if strict:
          summary['stopped'] = str(e)
          break
        _fail(str(e), False, summary['failed'], bar.write)
        bar.update()
        continue
      bar.set_detail(f'{image.shape[1]}x{image.shape[0]}')
      found = detector(image)
      keep = found['scores'] >= score_threshold
      boxes, scores, classes = (found['boxes'][keep], found['scores'][keep],
                                found['classes'][keep])
      detections = [{key: value for key, value in r.items() if key != 'image_id'} for r in
                    coco_eval.to_coco_results(boxes, scores, classes, 0, info.category_ids)]
      record = output_files.make_record(TOOL, job.source, settings,
                                        {'detections': detections, 'size': list(image.shape[:2])})
      save_png(draw_detections(image, boxes, scores, classes, info.class_names, colors=colors),
               job.path, record)
      summary['records'][job.item.path] = record
      summary['done'].append((job.item.path, job.path, job.image_id, len(scores)))
      bar.update()
  return summary


def run_files(image_ids: dict[str, int], records: dict[str, dict[str, Any]]
              ) -> tuple[dict[str, str], list[dict[str, Any]]]:
  """`(images.json, results.json)` contents of the inputs with records, in input order."""
  id_to_path, results = {}, []
  for path, image_id in image_ids.items():
    if path in records:
      id_to_path[str(image_id)] = os.path.abspath(path)
      results += [{'image_id': image_id, **d} for d in records[path]['data']['detections']]
  return id_to_path, results


def check_run_files(output_dir: str, plan: Plan) -> None:
  """Fails unless results.json and images.json are absent or a previous run's on these inputs.

  They are replaced (without --overwrite) only when nothing would be lost: every image
  images.json lists is an input of this run already done here, and results.json holds
  exactly the detections those pictures record. Otherwise (another run's files, inputs
  missing from this run, files edited or not written by predict) they are kept.

  Raises:
    PredictError: naming the file and what it holds.
  """
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
    by_path = {os.path.abspath(p): p for p in plan.done}
    for path in old_images.values():
      if path not in by_path:
        raise PredictError(f'{images_path} lists {path}, which is not an input of this run '
                           f'already done in {output_dir} (its results would be lost); {hint}')
  if os.path.lexists(results_path):
    if old_images is None:
      raise PredictError(f'{results_path} exists without {IMAGES_FILE}: not the results of a '
                         f'previous run of predict; {hint}')
    old_ids = {by_path[p]: int(k) for k, p in old_images.items()}
    _, expected = run_files(old_ids, plan.done)
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
  parser.add_argument('--config', required=True, help='path/to/config.py[:arg]')
  parser.add_argument('--checkpoint', required=True,
                      help='workdir (its latest checkpoint), its checkpoints folder, or one '
                           'step folder')
  parser.add_argument('--output', required=True, help='output folder')
  parser.add_argument('inputs', nargs='+', help='image files, folders or glob patterns')
  parser.add_argument('--score-threshold', type=float, default=SCORE_THRESHOLD,
                      help='draw and write detections scoring at least this; 0 keeps the '
                           'max-detections best of each image')
  parser.add_argument('--max-detections', type=int, default=None,
                      help="detections kept per image (default: the config's "
                           f"eval.max_detections, else {models.DETECT_DEFAULTS['max_detections']})")
  command_line.add_output_flags(parser)
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status.

  Returns:
    0 when every input was done or already done, 1 when an input failed (missing,
    unreadable, an output conflict) or on an error, 2 on bad arguments (argparse).
  """
  args = parse_args(argv)
  try:
    if not 0 <= args.score_threshold <= 1:
      raise ValueError(f'--score-threshold must be in [0, 1], got {args.score_threshold}')
    images, problems = collect_inputs(args.inputs, exclude_dir=args.output)
    if args.strict and problems:
      raise PredictError(problems[0])
    for message in problems:
      print(f'failed: {message}', file=sys.stderr)
    if not images:
      raise PredictError('no input files found')
    config = load_config(args.config)
    # Candidates pass config.eval's class-probability threshold before the final score
    # (probability x centerness) is compared with ours: never filter more than asked.
    eval_threshold = config_get(config_get(config, 'eval'), 'score_threshold',
                                models.DETECT_DEFAULTS['score_threshold'])
    config = with_eval_settings(config, score_threshold=min(eval_threshold, args.score_threshold),
                                max_detections=args.max_detections)
    info = dataset_info(config)
    settings = record_settings(args.config, args.checkpoint, config, info, args.score_threshold)
    # Before the model is loaded: conflicts, the run files and an unwritable place.
    plan = plan_outputs(images, args.output, info, settings, overwrite=args.overwrite,
                        strict=args.strict)
    if not args.overwrite:
      check_run_files(args.output, plan)
    run_paths = [os.path.join(args.output, name) for name in (RESULTS_FILE, IMAGES_FILE)]
    check_writable([job.path for job in plan.todo] + (run_paths if plan.todo or plan.done
                                                     else []))
    summary = {'done': [], 'failed': [], 'records': {}, 'stopped': None}
    if plan.todo:
      predict, variables = load_detector(config, args.checkpoint, len(info.class_names))
      detector = Detector(predict, variables, info.scale, info.canvas_sizes,
                          config_get(config, 'data_dtype_str', 'float32'))
      summary = predict_images(detector, plan.todo, info, settings,
                               score_threshold=args.score_threshold, strict=args.strict,
                               progress=not args.no_progress)
    records = {**plan.done, **summary['records']}
    # Also after a --strict stop: the pictures made are listed, so a rerun finds them.
    num_results = write_run_files(args.output, plan.image_ids, records) if records else 0
    if summary['stopped']:
      raise PredictError(summary['stopped'])
  except (PredictError, *USER_ERRORS) as e:
    print(f'error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  failed = problems + plan.failed + summary['failed']
  already = f' ({len(plan.done)} already done)' if plan.done else ''
  print(f'{len(records)} of {len(images) + len(problems)} inputs done{already} into '
        f'{args.output}: {num_results} detections in '
        f'{os.path.join(args.output, RESULTS_FILE)}', file=sys.stderr)
  if failed:
    print(f'{len(failed)} failed: ' + '; '.join(failed), file=sys.stderr)
    return command_line.EXIT_FAILED
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
