"""The command line of the detection `predict` and `evaluate` tools: help, flags, progress, reruns.

The tools run in this process through `main(argv)` with a stand-in model (no checkpoint is
restored), so every test takes seconds; `test_detection_tools.py` runs them on a trained one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection import evaluate, predict
from projects.tools import output_files

from .trainer_support import REPO

CONFIG = os.path.join(REPO, 'projects/cvt_detection/configs/synthetic_demo.py:runlocal')


def _save(path, seed, size=(40, 48)):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return path


def _fake_predict(variables, inputs, image_size, scale_factor):
  """One box per image, scored by the image's mean (a stand-in model)."""
  del variables, scale_factor
  b = inputs.shape[0]
  level = 1 / (1 + np.exp(-np.asarray(inputs, np.float32).mean(axis=(1, 2, 3))))
  h, w = np.asarray(image_size, np.float32)[:, 0], np.asarray(image_size, np.float32)[:, 1]
  boxes = np.stack([np.ones(b), np.ones(b), 2 + level * (w - 3), h - 1], -1)[:, None]
  return {'boxes': boxes.astype(np.float32), 'scores': level[:, None].astype(np.float32),
          'classes': np.zeros((b, 1), np.int32), 'valid': np.ones((b, 1), bool)}


def _fake_loader(*args):
  del args  # config, checkpoint, categories, where they are listed
  return _fake_predict, {}


def _fail_if_called(*args, **kwargs):
  raise AssertionError('a model or the dataset was loaded when it was not needed')


def _stamps(folder):
  return {os.path.relpath(os.path.join(d, f), folder):
          (os.stat(os.path.join(d, f)).st_mtime_ns, open(os.path.join(d, f), 'rb').read())
          for d, _, files in os.walk(folder) for f in files}


@pytest.fixture
def images(tmp_path):
  root = tmp_path / 'in'
  return {'a': _save(root / 'a.jpg', 0), 'b': _save(root / 'b.png', 1, (36, 52)),
          'notes': (root / 'notes.txt', (root / 'notes.txt').write_text('not an image'))[0]}


# --- help and flags --------------------------------------------------------------------------


def _help(module, capsys):
  with pytest.raises(SystemExit) as exit_info:
    module.parse_args(['--help'])
  assert exit_info.value.code == 0
  return ' '.join(capsys.readouterr().out.split())  # argparse wraps lines


def test_predict_help_shows_every_default_and_the_shared_flags(capsys):
  text = _help(predict, capsys)
  for flag in ('--overwrite', '--strict', '--no-progress', '--score-threshold',
               '--max-detections'):
    assert flag in text, flag
  assert '(default: 0.3)' in text
  assert "default: the config's eval.max_detections" in text
  assert 'exit status: 0 when every input was done or skipped' in text


def test_evaluate_help_shows_every_default_and_the_shared_flags(capsys):
  text = _help(evaluate, capsys)
  for flag in ('--overwrite', '--no-progress', '--batch-size', '--results', '--metrics'):
    assert flag in text, flag
  assert '--strict' not in text  # one input: nothing to go on with
  assert "default: the config's eval_batch_size" in text
  assert "default: the config's eval.score_threshold" in text
  assert 'step<N>' in text  # the default names say which checkpoint
  assert 'exit status:' in text


@pytest.mark.parametrize('module', [predict, evaluate])
def test_bad_arguments_exit_2(module, capsys):
  more = ['--output', 'o', 'a.png'] if module is predict else []
  with pytest.raises(SystemExit) as exit_info:
    module.parse_args(['--config', CONFIG, '--checkpoint', 'x', *more, '--max-detections',
                       'many'])
  assert exit_info.value.code == 2
  assert "invalid int value: 'many'" in capsys.readouterr().err


# --- predict: progress and --strict ------------------------------------------------------------


def _predict(tmp_path, *args):
  return predict.main(['--config', CONFIG, '--checkpoint', str(tmp_path), '--output',
                       str(tmp_path / 'out'), '--score-threshold', '0', *map(str, args)])


def test_predict_shows_progress_in_a_log_not_one_line_per_image(
    tmp_path, capsys, monkeypatch, images
):
  monkeypatch.setattr(predict, 'load_detector', _fake_loader)
  assert _predict(tmp_path, images['a'], images['b']) == 0
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert lines[0].startswith('predict: 0/2 img (0%), 0:00 elapsed')  # stderr is not a TTY
  assert any(line.startswith('predict: 2/2 img (100%)') for line in lines)
  assert lines[-1].startswith('2 of 2 inputs done into ')

  assert _predict(tmp_path / 'quiet', images['a'], '--no-progress') == 0
  assert capsys.readouterr().err.splitlines() == [
      f'1 of 1 inputs done into {tmp_path / "quiet" / "out"}: 1 detections in '
      f'{tmp_path / "quiet" / "out" / "results.json"}']


def test_predict_failures_are_written_beside_the_progress(tmp_path, capsys, monkeypatch, images):
  monkeypatch.setattr(predict, 'load_detector', _fake_loader)
  assert _predict(tmp_path, images['notes'], images['a'], tmp_path / 'missing.png') == 1
  err = capsys.readouterr().err
  assert f'failed: {tmp_path / "missing.png"}: no such file or folder' in err
  assert f'failed: {images["notes"]}: not an image file' in err
  assert '1 of 3 inputs done' in err and '2 failed' in err
  assert (tmp_path / 'out' / 'a.png').is_file()


@pytest.mark.parametrize('bad', ['missing', 'notes', 'conflict'])
def test_predict_strict_stops_at_the_first_failure_before_loading(
    tmp_path, capsys, monkeypatch, images, bad
):
  monkeypatch.setattr(predict, 'load_detector', _fail_if_called)
  out = tmp_path / 'out'
  if bad == 'conflict':
    out.mkdir()
    (out / 'b.png').write_bytes(b'')
  first = {'missing': tmp_path / 'missing.png', 'notes': images['notes'],
           'conflict': images['b']}[bad]
  assert _predict(tmp_path, images['a'], first, '--strict', '--no-progress') == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('error: '), err
  assert {'missing': 'missing.png: no such file', 'notes': 'notes.txt: not an image file',
          'conflict': 'b.png: empty file'}[bad] in err[0]
  assert not (out / 'a.png').exists()


def test_predict_strict_stops_at_an_image_that_cannot_be_decoded(
    tmp_path, capsys, monkeypatch, images
):
  monkeypatch.setattr(predict, 'load_detector', _fake_loader)
  broken = tmp_path / 'in' / 'broken.png'
  broken.write_bytes(images['b'].read_bytes()[:60])  # a PNG header, then nothing
  assert _predict(tmp_path, images['a'], broken, images['b'], '--strict', '--no-progress') == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: {broken}'), err
  out = tmp_path / 'out'
  assert (out / 'a.png').is_file() and not (out / 'b.png').exists()
  # What was done before the stop is listed in the run files, so a rerun finds it.
  assert json.loads((out / 'images.json').read_text()) == {'1': str(images['a'].absolute())}


# --- evaluate: progress and reruns ---------------------------------------------------------


@pytest.fixture
def eval_config(tmp_path):
  path = tmp_path / 'det_config.py'
  path.write_text(
      'from projects.cvt_detection.configs import synthetic_demo\n\n'
      'def get_config():\n'
      "  config = synthetic_demo.get_config('runlocal')\n"
      '  with config.unlocked():\n'
      '    config.dataset_configs.num_eval = 6\n'
      '    config.eval_batch_size = 4\n'
      '  return config\n')
  return str(path)


def _evaluate(eval_config, tmp_path, *args):
  out = tmp_path / 'out'
  return evaluate.main(['--config', eval_config, '--checkpoint', str(tmp_path), '--results',
                        str(out / 'results.json'), '--metrics', str(out / 'metrics.json'),
                        *map(str, args)])


def test_evaluate_shows_progress_per_batch_and_says_the_table_is_in_percent(
    tmp_path, capsys, monkeypatch, eval_config
):
  monkeypatch.setattr(evaluate, 'load_detector', _fake_loader)
  assert _evaluate(eval_config, tmp_path) == 0
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert lines[0].startswith('evaluate: 0/2 batch (0%)') and 'tqdm' not in captured.err
  assert lines[-1].startswith('evaluate: 2/2 batch (100%)')
  assert 'in % (the metrics file stores fractions' in captured.out
  report = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
  assert 0 <= report['AP'] <= 1 and report['num_images'] == 6


def test_evaluate_rerun_with_the_same_checkpoint_and_settings_is_already_done(
    tmp_path, capsys, monkeypatch, eval_config
):
  monkeypatch.setattr(evaluate, 'load_detector', _fake_loader)
  assert _evaluate(eval_config, tmp_path, '--no-progress') == 0
  first_out = capsys.readouterr().out
  out = tmp_path / 'out'
  before = _stamps(out)
  record = output_files.read_record(str(out / 'metrics.json'))
  assert record['tool'] == 'cvt_detection.evaluate'
  assert record['settings']['checkpoint'] == {'path': str(tmp_path), 'step': None}
  assert record['data']['results']['sha256'] == output_files.file_sha256(str(out / 'results.json'))

  monkeypatch.setattr(evaluate, 'load_detector', _fail_if_called)
  monkeypatch.setattr('projects.cvt_detection.data.builder.build_loaders', _fail_if_called)
  assert _evaluate(eval_config, tmp_path) == 0
  captured = capsys.readouterr()
  assert captured.err.startswith(f'already evaluated: {out / "metrics.json"} records')
  table = first_out[first_out.index('COCO box metrics'):first_out.index('results written')]
  assert table in captured.out  # the stored numbers, printed as they were
  assert _stamps(out) == before


def test_evaluate_keeps_outputs_of_other_settings_or_unreadable_until_overwrite(
    tmp_path, capsys, monkeypatch, eval_config
):
  monkeypatch.setattr(evaluate, 'load_detector', _fake_loader)
  out = tmp_path / 'out'
  assert _evaluate(eval_config, tmp_path, '--no-progress') == 0
  capsys.readouterr()
  before = _stamps(out)
  monkeypatch.setattr(evaluate, 'load_detector', _fail_if_called)

  def refused(*args, expect):
    assert _evaluate(eval_config, tmp_path, '--no-progress', *args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and expect in err[0], err
    assert '--overwrite' in err[0]

  refused('--score-threshold', '0.5', expect='other settings (eval)')
  assert _stamps(out) == before

  (out / 'results.json').write_text('[]')  # edited results: not those the metrics describe
  refused(expect=f'{out / "results.json"} is not the results file')
  (out / 'metrics.json').write_bytes(b'')  # a 0-byte file: kept, reported
  refused(expect='empty file')
  assert (out / 'metrics.json').read_bytes() == b''
  (out / 'metrics.json').unlink()  # results without their metrics: cannot tell whose
  refused(expect=f'{out / "results.json"} exists without')

  monkeypatch.setattr(evaluate, 'load_detector', _fake_loader)
  assert _evaluate(eval_config, tmp_path, '--no-progress', '--overwrite') == 0
  assert _stamps(out)['results.json'][1] == before['results.json'][1]
  # Missing results of a finished evaluation: evaluated again, both written.
  (out / 'results.json').unlink()
  assert _evaluate(eval_config, tmp_path, '--no-progress') == 0
  assert (out / 'results.json').read_bytes() == before['results.json'][1]


def test_default_evaluate_outputs_name_the_checkpoint_step(tmp_path):
  steps = tmp_path / 'checkpoints'
  for step in ('1000', '2000', '3000.corrupt'):
    (steps / step / 'state').mkdir(parents=True)
  for checkpoint in (tmp_path, steps):  # the latest step
    assert evaluate.default_output_paths(str(checkpoint), 'coco') == (
        str(tmp_path / 'eval_coco_step2000_results.json'),
        str(tmp_path / 'eval_coco_step2000_metrics.json'))
  assert evaluate.default_output_paths(str(steps / '1000'), 'coco')[1] == str(
      tmp_path / 'eval_coco_step1000_metrics.json')
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert evaluate.default_output_paths(str(empty), 'coco')[1] == str(
      empty / 'eval_coco_metrics.json')
