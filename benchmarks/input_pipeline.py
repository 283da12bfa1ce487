r"""Input pipeline speed: the ADE20K training recipe, images/s per CPU core, ours against
albumentations + OpenCV.

The recipe (mmseg 1.x `configs/_base_/datasets/ade20k.py`): JPEG decode, `RandomResize`
to fit `r x (2048, 512)` keeping the ratio, r ~ U(0.5, 2.0), `RandomCrop` 512x512 with
cat_max_ratio 0.75 (up to 10 draws), horizontal flip with probability 0.5,
`PhotoMetricDistortion`, ImageNet normalisation, padding to 512x512 (image 0, label 255),
labels reduced (0 -> 255, others minus 1), examples stacked into float32 batches.

Ours is the training loader as training runs it: `TrainLoader(ade20k(folder),
TrainTransform(...))` reading the examples in the consuming thread. The reference is the
same recipe written as a user would with OpenCV and albumentations: `cv2.imdecode` and
`cv2.cvtColor` to RGB, mmseg's keep-ratio size and `cv2.resize` (bilinear image, nearest
label), mmseg's cat_max_ratio crop loop (`np.unique` on the label window), then an
`A.Compose` of `HorizontalFlip`, the photometric steps as albumentations' nearest
equivalents, `Normalize` and `PadIfNeeded`. The photometric steps, each with probability
0.5 in mmseg's order (contrast before saturation): brightness `RandomBrightnessContrast`
(additive, +-32 levels, as mmseg), contrast `MultiplicativeNoise` (one factor in
[0.5, 1.5] for the whole image, as mmseg), saturation `ColorJitter` (blend with the grey
image; mmseg scales S in HSV, which albumentations lacks), hue `HueSaturationValue`
(+-18 OpenCV hue units, as mmseg). albumentations' uint8 steps are lookup tables, so this
reference is at least as quick as mmseg's own float code.

Each side runs in its own fresh process pinned to one core (`os.sched_setaffinity`, OpenCV
single-threaded), and its speed is images per second of its own CPU time, so the figure is
per core and holds on a busy machine (where wall time would count the other programs'
turns on that core). A repeat runs both, in alternating order, on the same JPEGs
(scikit-image's sample photos resized to typical ADE20K shapes, with synthetic labels of
several classes, written to a temporary folder first). After one untimed batch each
process loads batches for `--seconds` of CPU time; the median over `--repeats` is
reported. The last line is `per-core ratio ours/reference: R`.

  python benchmarks/input_pipeline.py                       # 3 repeats of 10 s per side
  python benchmarks/input_pipeline.py --images 4 --seconds 1 --repeats 1 --json out.json

Needs the bench extra (albumentations, opencv-python-headless, scikit-image).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import workers

from projects.tools import command_line

CROP = (512, 512)
SCALE = (2048, 512)  # ADE20K's RandomResize scale
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
IGNORE_INDEX = 255
# Typical ADE20K (height, width): most training images have a 512-pixel short side.
SHAPES = ((512, 683), (683, 512), (512, 512), (512, 768), (512, 910), (480, 640))
PHOTOS = ('astronaut', 'coffee', 'rocket', 'chelsea', 'immunohistochemistry',
          'hubble_deep_field', 'retina', 'colorwheel')
SIDES = ('ours', 'reference')


def write_dataset(root: str, count: int) -> None:
  """`count` ADE20K-style pairs under `root/{images,annotations}/training/`: JPEG photos of
  the shapes above, PNG labels of 4-8 raw classes (0 = other) following the photo's
  brightness, so regions have natural shapes."""
  from PIL import Image
  from skimage import data

  rng = np.random.default_rng(0)
  for sub in ('images', 'annotations'):
    os.makedirs(os.path.join(root, sub, 'training'), exist_ok=True)
  for i in range(count):
    h, w = SHAPES[i % len(SHAPES)]
    photo = Image.fromarray(getattr(data, PHOTOS[i % len(PHOTOS)])()).convert('RGB')
    photo = photo.resize((w, h), Image.BICUBIC)
    grey = np.asarray(photo.convert('L').resize((w // 8, h // 8))).astype(np.float32)
    levels = np.quantile(grey, np.linspace(0, 1, int(rng.integers(4, 9)))[1:-1])
    classes = rng.choice(151, len(levels) + 1, replace=False).astype(np.uint8)
    label = Image.fromarray(classes[np.digitize(grey, levels)]).resize((w, h), Image.NEAREST)
    photo.save(os.path.join(root, 'images', 'training', f'{i:05d}.jpg'), quality=90)
    label.save(os.path.join(root, 'annotations', 'training', f'{i:05d}.png'))


def ours_batches(root: str, batch: int):
  """Batches of the project's training loader, endless."""
  from projects.cvt_segmentation.data.folders import ade20k
  from projects.cvt_segmentation.data.loader import TrainLoader
  from projects.cvt_segmentation.data.transforms import TrainTransform

  transform = TrainTransform(crop_size=CROP, scale=SCALE, ratio_range=RATIO_RANGE,
                             cat_max_ratio=CAT_MAX_RATIO)
  loader = TrainLoader(ade20k(root), transform, batch_size=batch, num_threads=0)
  step = 0
  while True:
    yield loader.batch(step)
    step += 1


def _reference_crop(rng, label: np.ndarray) -> tuple[int, int, int, int]:
  """mmseg `RandomCrop.crop_bbox` with cat_max_ratio, as mmseg writes it."""
  def draw():
    y = int(rng.integers(0, max(label.shape[0] - CROP[0], 0) + 1))
    x = int(rng.integers(0, max(label.shape[1] - CROP[1], 0) + 1))
    return y, y + CROP[0], x, x + CROP[1]

  box = draw()
  for _ in range(10):
    classes, counts = np.unique(label[box[0]:box[1], box[2]:box[3]], return_counts=True)
    counts = counts[classes != IGNORE_INDEX]
    if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
      break
    box = draw()
  return box


def reference_batches(root: str, batch: int):
  """The recipe with OpenCV and albumentations (see the module docstring), endless."""
  import albumentations as A
  import cv2

  after_crop = A.Compose([
      A.HorizontalFlip(p=0.5),
      A.RandomBrightnessContrast(brightness_limit=32 / 255, contrast_limit=0, p=0.5),
      A.MultiplicativeNoise(multiplier=(0.5, 1.5), per_channel=False, elementwise=False, p=0.5),
      A.ColorJitter(brightness=0, contrast=0, saturation=(0.5, 1.5), hue=0, p=0.5),
      A.HueSaturationValue(hue_shift_limit=18, sat_shift_limit=0, val_shift_limit=0, p=0.5),
      A.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), max_pixel_value=255),
      A.PadIfNeeded(*CROP, position='top_left', border_mode=cv2.BORDER_CONSTANT, fill=0,
                    fill_mask=IGNORE_INDEX),
  ], seed=0)
  folder = Path(root)
  images = sorted((folder / 'images' / 'training').glob('*.jpg'))
  labels = [folder / 'annotations' / 'training' / f'{p.stem}.png' for p in images]
  rng = np.random.default_rng(0)
  k = 0
  while True:
    inputs, targets = [], []
    for _ in range(batch):
      image_path, label_path = images[k % len(images)], labels[k % len(images)]
      k += 1
      image = cv2.imdecode(np.fromfile(image_path, np.uint8), cv2.IMREAD_COLOR)
      image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
      label = cv2.imdecode(np.fromfile(label_path, np.uint8), cv2.IMREAD_UNCHANGED)
      label[label == 0] = 255  # mmseg's reduce_zero_label
      label -= 1
      label[label == 254] = 255
      ratio = rng.uniform(*RATIO_RANGE)
      h, w = image.shape[:2]
      long, short = int(SCALE[0] * ratio), int(SCALE[1] * ratio)
      factor = min(long / max(h, w), short / min(h, w))
      size = (int(w * factor + 0.5), int(h * factor + 0.5))
      image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
      label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
      y0, y1, x0, x1 = _reference_crop(rng, label)
      out = after_crop(image=image[y0:y1, x0:x1], mask=label[y0:y1, x0:x1])
      inputs.append(out['image'])
      targets.append(out['mask'])
    yield {'inputs': np.stack(inputs), 'label': np.stack(targets).astype(np.int32)}


def worker(side: str, root: str, batch: int, seconds: float, core: int) -> dict:
  """Images per CPU second of one side on core `core`, after one untimed batch."""
  os.sched_setaffinity(0, {core})
  import cv2

  cv2.setNumThreads(1)
  batches = (ours_batches if side == 'ours' else reference_batches)(root, batch)
  first = next(batches)
  assert first['inputs'].shape == (batch, *CROP, 3) and first['label'].shape == (batch, *CROP)
  count, start, wall = 0, time.process_time(), time.perf_counter()
  while (cpu := time.process_time() - start) < seconds:
    next(batches)
    count += batch
  return {'images': count, 'cpu_seconds': cpu, 'wall_seconds': time.perf_counter() - wall,
          'images_per_s': count / cpu}


def _run_worker(args: argparse.Namespace, side: str, root: str, core: int) -> dict | None:
  env = workers.environment(OMP_NUM_THREADS='1', OPENCV_FOR_THREADS_NUM='1',
                            NO_ALBUMENTATIONS_UPDATE='1')
  return workers.run(__file__, ['--batch', str(args.batch), '--seconds', str(args.seconds),
                                '--worker', side, root, str(core)], side, env)


def build_parser() -> argparse.ArgumentParser:
  parser = command_line.parser('input_pipeline.py', __doc__.splitlines()[0], epilog=None)
  parser.add_argument('--images', type=command_line.positive_int, default=24,
                      help='distinct image/label pairs written and cycled through')
  parser.add_argument('--seconds', type=command_line.positive_float, default=10.0,
                      help='timed CPU seconds per side and repeat')
  parser.add_argument('--repeats', type=command_line.positive_int, default=3,
                      help='runs of each side (fresh processes); the median is reported')
  parser.add_argument('--batch', type=command_line.positive_int, default=8,
                      help='examples per batch (stacking is timed too)')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', nargs=3, help=argparse.SUPPRESS)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    side, root, core = args.worker
    print(json.dumps(worker(side, root, args.batch, args.seconds, int(core))))
    return command_line.EXIT_OK

  core = max(os.sched_getaffinity(0))
  load = os.getloadavg()
  runs = {side: [] for side in SIDES}
  with tempfile.TemporaryDirectory() as root:
    write_dataset(root, args.images)
    for r in range(args.repeats):
      for side in SIDES if r % 2 == 0 else SIDES[::-1]:
        result = _run_worker(args, side, root, core)
        if result is None:
          return command_line.EXIT_FAILED
        runs[side].append(result['images_per_s'])
  median = {side: statistics.median(v) for side, v in runs.items()}
  ratio = median['ours'] / median['reference']
  print(f'ADE20K training recipe ({CROP[0]}x{CROP[1]} crops, batch {args.batch}), {args.images} '
        f'JPEGs, one core (core {core} of {os.cpu_count()}); load average {load[0]:.2f} '
        f'{load[1]:.2f} {load[2]:.2f}; median of {args.repeats} x {args.seconds:g} CPU s')
  names = {'ours': 'ours (TrainLoader)', 'reference': 'albumentations + OpenCV'}
  for side in SIDES:
    print(f'  {names[side]:<24} {median[side]:7.1f} img/s per core  '
          f'(runs: {", ".join(f"{v:.1f}" for v in runs[side])})')
  if args.json:
    from cvt_backbone.tools import write_json

    write_json({'images_per_s_per_core': median, 'runs': runs, 'ratio': ratio,
                'load_average': load, 'batch': args.batch, 'images': args.images,
                'seconds': args.seconds, 'repeats': args.repeats}, args.json)
  print(f'per-core ratio ours/reference: {ratio:.2f}')
  return command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
