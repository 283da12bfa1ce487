"""The detection `evaluate` and `predict` commands on a checkpoint trained once for the module.

The checkpoint comes from the real training entry point (`projects.cvt_detection.main`, the
runlocal synthetic config: 4 steps, about a minute on 2 CPU cores); predict runs on real
photos of odd sizes (scikit-image's samples). The drawing is checked on an image with known
boxes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection import coco_eval, evaluate, predict
from projects.cvt_detection.data import build_loaders
from projects.training.configs import load_config

from .trainer_support import REPO, subprocess_env

CONFIG = 'projects/cvt_detection/configs/synthetic_demo.py:runlocal'
SHAPE_NAMES = ['rectangle', 'ellipse', 'triangle', 'ring']  # the runlocal config's 4 classes


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir with checkpoints of the runlocal synthetic config (trained in a subprocess)."""
  path = tmp_path_factory.mktemp('detection') / 'workdir'
  proc = subprocess.run(
      [sys.executable, '-m', 'projects.cvt_detection.main', f'--config={CONFIG}',
       f'--workdir={path}'], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (path / 'checkpoints').is_dir()
  return path


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """Real photos of odd sizes and modes: `{file name: (height, width)}` in a folder."""
  import skimage.data

  folder = tmp_path_factory.mktemp('photos')
  Image.fromarray(skimage.data.astronaut()).save(folder / 'astronaut.png')  # 512x512 RGB
  Image.fromarray(skimage.data.coffee()).save(folder / 'coffee.jpg', quality=90)  # 400x600
  Image.fromarray(skimage.data.camera()).save(folder / 'camera.png')  # 512x512 grayscale
  return folder, {'astronaut.png': (512, 512), 'camera.png': (512, 512),
                  'coffee.jpg': (400, 600)}


def _ground_truth():
  config = load_config(os.path.join(REPO, CONFIG))
  return build_loaders('synthetic', batch_size=1, eval_batch_size=1,
                       **config.dataset_configs.to_dict())[2]['ground_truth']


def _same(a, b):
  return (a is None and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# --- evaluate ---------------------------------------------------------------------------


def test_evaluate_prints_the_table_then_writes_results_that_score_the_same(
    workdir, tmp_path, capsys
):
  results, metrics = tmp_path / 'out' / 'results.json', tmp_path / 'out' / 'metrics.json'
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(workdir),
          '--results', str(results), '--metrics', str(metrics), '--batch-size', '25',
          '--score-threshold', '0', '--max-detections', '20', '--no-progress']
  assert evaluate.main(argv) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  header = next(i for i, line in enumerate(lines) if line.split()[:2] == ['AP', 'AP50'])
  assert lines[header].split() == ['AP', 'AP50', 'AP75', 'APs', 'APm', 'APl']
  assert all(name in out for name in SHAPE_NAMES)
  assert header < lines.index(f'results written to {results}')  # table first

  report = json.loads(metrics.read_text())
  assert report['eval']['score_threshold'] == 0 and report['eval']['max_detections'] == 20
  assert report['num_images'] == 100 and list(report['per_class']) == SHAPE_NAMES
  detections = json.loads(results.read_text())
  assert len(detections) == report['num_detections'] and 0 < len(detections) <= 100 * 20
  assert {d['category_id'] for d in detections} <= {1, 2, 3, 4}
  # The written results score the same again; threshold 0 makes AP small but not 0.
  again = coco_eval.evaluate_boxes(_ground_truth(), str(results))
  assert report['AP'] > 0
  for name in coco_eval.STAT_NAMES:
    assert _same(report[name], again[name]), name
  for name in SHAPE_NAMES:
    assert _same(report['per_class'][name], again['per_class'][name]), name

  # The same evaluation again: the stored table, nothing loaded or written.
  before = {p: os.stat(p).st_mtime_ns for p in (results, metrics)}
  assert evaluate.main(argv) == 0
  captured = capsys.readouterr()
  assert captured.err.startswith(f'already evaluated: {metrics} records checkpoint '
                                 f'{workdir / "checkpoints"} step 4 ')
  assert out[out.index('COCO box'):out.index('results written')] in captured.out
  assert {p: os.stat(p).st_mtime_ns for p in (results, metrics)} == before
  # Other settings: refused before any work, then replaced with --overwrite.
  assert evaluate.main(argv + ['--score-threshold', '0.05']) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: {metrics} was made from') and 'other settings (eval)' in err
  assert '--overwrite' in err
  assert evaluate.main(argv + ['--overwrite', '--score-threshold', '0.05']) == 0
  assert json.loads(metrics.read_text())['eval']['score_threshold'] == 0.05


def _fail_if_called(*args, **kwargs):
  raise AssertionError('evaluate loaded data or a model before checking its outputs')


@pytest.mark.parametrize('flag', ['--results', '--metrics'])
def test_evaluate_to_an_unwritable_path_fails_before_inference(
    workdir, tmp_path, capsys, monkeypatch, flag
):
  monkeypatch.setattr(evaluate, 'load_detector', _fail_if_called)
  monkeypatch.setattr('projects.cvt_detection.data.builder.build_loaders', _fail_if_called)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(workdir),
          flag, str(blocker / 'sub' / 'out.json')]
  assert evaluate.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: cannot write to') and f'{blocker} is a file' in err


def test_evaluate_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(tmp_path / 'nothing'),
          '--results', str(tmp_path / 'r.json'), '--metrics', str(tmp_path / 'm.json')]
  assert evaluate.main(argv) == 1
  assert 'checkpoint not found' in capsys.readouterr().err
  assert not (tmp_path / 'r.json').exists()


# --- predict ------------------------------------------------------------------------------


def test_predict_photos_writes_pictures_at_their_size_and_coco_results(
    workdir, photos, tmp_path, capsys, monkeypatch
):
  folder, sizes = photos
  out = tmp_path / 'predictions'
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(workdir),
          '--output', str(out), str(folder), '--score-threshold', '0', '--max-detections', '5']
  monkeypatch.setenv('CVT_PROGRESS_INTERVAL', '0')  # a progress line at every step
  assert predict.main(argv) == 0
  err = capsys.readouterr().err
  order = sorted(sizes)  # a folder is listed in name order
  progress = [line for line in err.splitlines() if line.startswith('predict: ')]
  started = [line.split('; ')[1] for line in progress if '; ' in line and ': ' not in
             line.split('; ')[1]]
  assert started == [str(folder / n) for n in order]
  assert progress[-1].startswith('predict: 3/3 img (100%)')

  assert sorted(os.listdir(out)) == sorted(
      [os.path.splitext(n)[0] + '.png' for n in order] + ['images.json', 'results.json'])
  for name, (h, w) in sizes.items():
    with Image.open(out / (os.path.splitext(name)[0] + '.png')) as im:
      assert im.format == 'PNG' and im.mode == 'RGB' and im.size == (w, h)

  images = json.loads((out / 'images.json').read_text())
  assert images == {str(k + 1): str(folder / n) for k, n in enumerate(order)}
  results = json.loads((out / 'results.json').read_text())
  assert 0 < len(results) <= 3 * 5
  for r in results:
    assert set(r) == {'image_id', 'category_id', 'bbox', 'score'}
    h, w = sizes[order[r['image_id'] - 1]]
    x, y, bw, bh = r['bbox']
    assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0 and x + bw <= w and y + bh <= h, r
    assert r['category_id'] in (1, 2, 3, 4) and 0 <= r['score'] <= 1

  # The same run again: every input already done (its picture records it), nothing
  # rewritten, no model loaded.
  before = {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)}
  monkeypatch.setattr(predict, 'load_detector', _fail_if_called)
  assert predict.main(argv) == 0
  err = capsys.readouterr().err
  assert err.count(': already done') == 3 and '3 of 3 inputs done (3 already done)' in err
  assert {p: os.stat(out / p).st_mtime_ns for p in os.listdir(out)} == before


def test_predict_reports_failed_inputs_and_does_the_others(workdir, photos, tmp_path, capsys):
  folder, _ = photos
  (tmp_path / 'notes.txt').write_text('not an image')
  out = tmp_path / 'predictions'
  (out / 'astronaut.png').parent.mkdir()
  (out / 'astronaut.png').write_bytes(b'old')
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(workdir),
          '--output', str(out), str(folder / 'astronaut.png'), str(tmp_path / 'notes.txt'),
          str(tmp_path / 'missing.jpg'), '--overwrite']
  assert predict.main(argv) == 1
  captured = capsys.readouterr()
  assert 'notes.txt: not an image file' in captured.err
  assert 'missing.jpg: no such file or folder' in captured.err and '2 failed' in captured.err
  assert 'predict: 1/1 img (100%)' in captured.err  # the progress of the images to do
  with Image.open(out / 'astronaut.png') as im:  # replaced (--overwrite)
    assert im.size == (512, 512)
  assert json.loads((out / 'images.json').read_text()) == {'1': str(folder / 'astronaut.png')}


def test_predict_without_images_fails_before_loading(tmp_path, capsys):
  argv = ['--config', os.path.join(REPO, CONFIG), '--checkpoint', str(tmp_path),
          '--output', str(tmp_path / 'out'), str(tmp_path / 'nothing*.png')]
  assert predict.main(argv) == 1
  assert 'no input files found' in capsys.readouterr().err


# --- pieces of predict ----------------------------------------------------------------


def test_draw_detections_outlines_and_labels_known_boxes(tmp_path):
  h, w = 120, 200
  image = np.full((h, w, 3), 90, np.uint8)
  names = ['rectangle', 'ellipse', 'triangle']
  boxes = np.float32([[60, 50, 120, 100],   # middle: label above the box
                      [10, 0, 70, 40],      # touches the top: label inside the box
                      [150, 30, 199, 80]])  # at the right edge: label shifted left
  classes = np.int32([0, 1, 2])
  picture = predict.draw_detections(image, boxes, np.float32([0.9, 0.75, 0.5]), classes, names)
  picture.save(tmp_path / 'drawn.png')  # for a look
  assert picture.size == (w, h) and picture.mode == 'RGB'
  pixels = np.asarray(picture)
  colors = predict.class_colors(3)
  assert len(set(colors)) == 3
  assert tuple(pixels[75, 60]) == colors[0]  # left edge of the middle box
  assert tuple(pixels[40, 40]) == colors[1]  # bottom edge of the top box
  assert tuple(pixels[79, 199]) == colors[2]  # right edge of the right box
  # Label backgrounds: above the middle box, inside the top one, inside the image on the right.
  assert tuple(pixels[48, 61]) == colors[0]
  assert tuple(pixels[3, 12]) == colors[1]
  right_label = np.all(pixels[:30, 100:] == colors[2], axis=-1)
  assert right_label[:, -1].any() and right_label.sum() > 100
  assert (pixels[:, :, :] != 90).any(axis=-1).sum() < 0.5 * h * w  # most of the image shows
  # Text is drawn in a contrasting colour on the label backgrounds.
  label = pixels[30:47, 60:120].reshape(-1, 3)
  assert len({tuple(p) for p in label}) > 2

  with pytest.raises(ValueError, match='labels in'):
    predict.draw_detections(image, boxes, np.ones(3), np.int32([0, 1, 3]), names)
  empty = predict.draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0), names)
  assert np.array_equal(np.asarray(empty), image)


def test_image_ids_follow_the_input_order_or_the_coco_file_name():
  coco = {'000000000139.jpg': 139, '000000000002.jpg': 2}
  paths = ['a.png', 'x/000000000139.jpg', 'b.png', 'c/000000000002.jpg']
  # a -> 1; b's index 3 is free; the index 4 of the last input is not its id (COCO's 2).
  assert predict.assign_image_ids(paths, coco) == [1, 139, 3, 2]
  # Index 2 is taken by a COCO id: the second input gets the next id above all in use.
  assert predict.assign_image_ids(['000000000002.jpg', 'z.png', 'y.png'], coco) == [2, 4, 3]


def test_dataset_info_reads_class_names_and_image_ids_of_the_val_annotations(tmp_path):
  ann = tmp_path / 'val.json'
  ann.write_text(json.dumps({
      'images': [{'id': 7, 'file_name': 'sub/p.jpg', 'width': 10, 'height': 10},
                 {'id': 8, 'file_name': 'q.jpg', 'width': 10, 'height': 10}],
      'annotations': [],
      'categories': [{'id': 5, 'name': 'dog'}, {'id': 2, 'name': 'cat'}]}))
  config = load_config(os.path.join(REPO, CONFIG))
  with config.unlocked():
    config.dataset_name = 'coco_format'
    config.dataset_configs = dict(val_annotations=str(ann), scale=(640, 480))
  info = predict.dataset_info(config)
  assert info.class_names == ('cat', 'dog') and info.category_ids == (2, 5)
  assert info.listed_in == str(ann)
  assert info.image_ids == {'p.jpg': 7, 'q.jpg': 8}
  assert info.scale == (640, 480) and info.canvas_sizes == ((480, 640), (640, 480), (640, 640))

  synthetic = predict.dataset_info(load_config(os.path.join(REPO, CONFIG)))
  assert synthetic.class_names == tuple(SHAPE_NAMES) and synthetic.category_ids == (1, 2, 3, 4)
  assert synthetic.listed_in == 'the synthetic dataset of the config'
  assert synthetic.scale == (128, 128) and synthetic.canvas_sizes == ((128, 128),)
  with config.unlocked():
    config.dataset_configs = dict(val_annotations=str(tmp_path / 'missing.json'))
  with pytest.raises(FileNotFoundError, match='missing.json'):
    predict.dataset_info(config)


def test_predict_with_a_config_of_other_classes_names_the_mismatch(workdir, photos, tmp_path,
                                                                    capsys):
  ann = tmp_path / 'val.json'
  ann.write_text(json.dumps({'images': [], 'annotations': [],
                             'categories': [{'id': 1, 'name': 'cat'}, {'id': 3, 'name': 'dog'}]}))
  config = tmp_path / 'two_classes.py'
  config.write_text(
      'from projects.cvt_detection.configs import synthetic_demo\n\n'
      'def get_config():\n'
      "  config = synthetic_demo.get_config('runlocal')\n"
      '  with config.unlocked():\n'
      "    config.dataset_name = 'coco_format'\n"
      f'    config.dataset_configs = dict(val_annotations={str(ann)!r})\n'
      '  return config\n')
  folder, _ = photos
  argv = ['--config', str(config), '--checkpoint', str(workdir), '--output',
          str(tmp_path / 'out'), str(folder / 'camera.png')]
  assert predict.main(argv) == 1
  # The checkpoint's category map (the synthetic set's 4 shapes, ids 1-4) against the file's.
  err = capsys.readouterr().err
  assert err.startswith(f'error: {ann} does not list category ids 2, 4 of the checkpoint of '
                        f'step 4 in {workdir / "checkpoints"}; category 1 is \'cat\' in {ann} '
                        "but 'rectangle' in the checkpoint"), err
  assert not (tmp_path / 'out').exists()


def test_default_evaluate_outputs_go_beside_the_checkpoints(tmp_path):
  # Without any checkpoint step (the names of a later step: test_detection_cli.py).
  for checkpoint in (tmp_path, tmp_path / 'checkpoints'):
    assert evaluate.default_output_paths(str(checkpoint), 'coco') == (
        str(tmp_path / 'eval_coco_results.json'), str(tmp_path / 'eval_coco_metrics.json'))
  assert evaluate.default_output_paths(str(tmp_path / 'checkpoints' / '2000'), 'coco') == (
      str(tmp_path / 'eval_coco_step2000_results.json'),
      str(tmp_path / 'eval_coco_step2000_metrics.json'))
