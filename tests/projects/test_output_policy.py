"""Outputs and exit codes of the command-line tools: provenance records, skips, conflicts.

Each tool is run in this process through its `main(argv)` with a stand-in model (or tiny
random weights), so a test takes seconds. The policy checked for every tool:

- an output records the input it came from (path, size, sha256) and the settings; a rerun
  skips an input only when every output of it records the same input and settings
  ("already done", exit 0);
- an output of the same name that belongs to another input, or has no readable record
  (a 0-byte file left by an older version, a file not written by the tool), is kept and
  reported, and the exit status is 1 (`--overwrite` replaces it);
- an input that fails makes the exit status 1 while the others are written;
- an output place that cannot be written fails before inference, in one line;
- a write error after the work (a full disk) is one `error:` line and exit 1, after the
  evaluation tables were printed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from projects.cvt_detection import evaluate as det_evaluate
from projects.cvt_detection import predict as det_predict
from projects.cvt_segmentation import evaluate as seg_evaluate
from projects.cvt_segmentation import predict as seg_predict
from projects.feature_extraction import extract, writers
from projects.tools import output_files

from .test_detection_cli import _fake_loader
from .test_inference_support import ContextModel, init_model, write_synthetic_config
from .trainer_support import REPO

K = 4


def _save(path, seed, size=(40, 48)):
  """A random RGB image at `path` (format from the suffix)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return path


def _stamps(folder):
  """`{relative path: (mtime_ns, bytes)}` of every file under `folder`."""
  return {os.path.relpath(os.path.join(d, f), folder):
          (os.stat(os.path.join(d, f)).st_mtime_ns, open(os.path.join(d, f), 'rb').read())
          for d, _, files in os.walk(folder) for f in files}


def _fail_if_called(*args, **kwargs):
  raise AssertionError('the model was loaded before the outputs were checked')


@pytest.fixture
def inputs(tmp_path):
  """`a.jpg`, a different image `a.bmp` (same stem), `c.png` and a text file."""
  root = tmp_path / 'in'
  return {'a': _save(root / 'a.jpg', 0), 'a_bmp': _save(root / 'other' / 'a.bmp', 1),
          'c': _save(root / 'c.png', 2, (36, 52)),
          'notes': (root / 'notes.txt', (root / 'notes.txt').write_text('not an image'))[0]}


# --------------------------------------------------------------- segmentation predict


@pytest.fixture
def seg_config(tmp_path):
  return write_synthetic_config(tmp_path, K, test_scale=(48, 32), name='seg_config.py')


def _seg_model(config, checkpoint):
  del config, checkpoint
  return init_model(ContextModel(K, min_input=16))


def _seg_predict(capsys, config, out, *paths, loader=_seg_model):
  argv = ['--config', config, '--checkpoint', os.path.dirname(config), '--output', str(out),
          '--no-progress', *map(str, paths)]
  status = seg_predict.main(argv, model_loader=loader)
  return status, capsys.readouterr().err


def test_segmentation_predict_skips_only_the_same_input(tmp_path, capsys, seg_config, inputs):
  out = tmp_path / 'out'
  mask, overlay = out / 'a_mask.png', out / 'a_overlay.png'
  assert _seg_predict(capsys, seg_config, out, inputs['a'])[0] == 0
  record = output_files.read_record(str(mask))
  assert record['input']['path'] == str(inputs['a'].absolute())
  assert record['input']['size'] == inputs['a'].stat().st_size
  assert record['input']['sha256'] == output_files.file_sha256(str(inputs['a']))
  assert output_files.read_record(str(overlay))['settings']['alpha'] == 0.5
  first = _stamps(out)

  # The same input again: skipped as done, exit 0, nothing rewritten.
  status, err = _seg_predict(capsys, seg_config, out, inputs['a'])
  assert status == 0 and 'already done' in err
  assert _stamps(out) == first

  # Another image with the same stem: a.jpg's outputs are kept, reported, exit 1.
  status, err = _seg_predict(capsys, seg_config, out, inputs['a_bmp'])
  assert status == 1
  assert f'{mask} belongs to {inputs["a"].absolute()}' in err and '--overwrite' in err
  assert _stamps(out) == first

  # Other settings (--alpha) are not the same output either.
  status, err = _seg_predict(capsys, seg_config, out, inputs['a'], '--alpha', '0.3')
  assert status == 1 and 'other settings (alpha)' in err
  assert _stamps(out) == first

  # A 0-byte mask (a kill under an older version) is detected, kept, and replaced on request.
  mask.write_bytes(b'')
  status, err = _seg_predict(capsys, seg_config, out, inputs['a'])
  assert status == 1 and f'{mask}: empty file' in err and mask.read_bytes() == b''
  assert _seg_predict(capsys, seg_config, out, inputs['a'], '--overwrite')[0] == 0
  assert _stamps(out)[os.path.basename(mask)][1] == first['a_mask.png'][1]

  # A failing input: the others are done, exit 1; a.jpg is already done.
  status, err = _seg_predict(capsys, seg_config, out, inputs['a'], inputs['c'], inputs['notes'])
  assert status == 1 and 'notes.txt: not an image file' in err and 'already done' in err
  assert (out / 'c_mask.png').is_file() and (out / 'c_overlay.png').is_file()

  # --strict stops at the first conflict, before any work.
  (out / 'c_mask.png').unlink()
  (out / 'c_overlay.png').unlink()
  status, err = _seg_predict(capsys, seg_config, out, inputs['a_bmp'], inputs['c'], '--strict',
                             loader=_fail_if_called)
  assert status == 1 and 'belongs to' in err and not (out / 'c_mask.png').exists()
  assert not [p for p in os.listdir(out) if p.startswith('.')]  # no temporary files left


def test_segmentation_predict_to_an_unwritable_place_fails_before_inference(
    tmp_path, capsys, seg_config, inputs
):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  status, err = _seg_predict(capsys, seg_config, blocker / 'out', inputs['a'],
                             loader=_fail_if_called)
  assert status == 1
  assert err.splitlines() == [f'error: cannot write to {blocker / "out"}: {blocker} is a file, '
                              'not a folder']


def test_segmentation_predict_interrupted_or_failed_writes_leave_no_partial_output(
    tmp_path, capsys, monkeypatch, seg_config, inputs
):
  out = tmp_path / 'out'

  def killed_while_writing(im, fp, filename, *args, **kwargs):
    fp.write(b'\x89PNG\r\n\x1a\n part of a picture')
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setitem(Image.SAVE, 'PNG', killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
      _seg_predict(capsys, seg_config, out, inputs['a'])
  assert os.listdir(out) == []  # neither a part under the final name nor a temporary file

  replace = os.replace

  def disk_full(src, dst, *args, **kwargs):
    if str(dst).startswith(str(out)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
    return replace(src, dst, *args, **kwargs)

  with monkeypatch.context() as patch:
    patch.setattr(os, 'replace', disk_full)
    status, err = _seg_predict(capsys, seg_config, out, inputs['a'])
  assert status == 1
  assert err.splitlines() == [f'error: cannot write {out / "a_mask.png"}: No space left on device']
  assert os.listdir(out) == []
  assert _seg_predict(capsys, seg_config, out, inputs['a'])[0] == 0
  assert sorted(os.listdir(out)) == ['a_mask.png', 'a_overlay.png']


# --------------------------------------------------------------- segmentation evaluate


def _seg_eval_config(tmp_path):
  return write_synthetic_config(tmp_path, K, num_eval=2, name='eval_config.py')


def test_segmentation_evaluate_checks_its_output_first_and_prints_before_writing(
    tmp_path, capsys, monkeypatch
):
  config = _seg_eval_config(tmp_path)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--no-progress']
  assert seg_evaluate.main(argv + ['--output', str(blocker / 'r.json')],
                           model_loader=_fail_if_called) == 1
  err = capsys.readouterr().err
  assert err.splitlines() == [f'error: cannot write to {blocker}: {blocker} is a file, '
                              'not a folder']

  # The folder is replaced by a file while the model runs: the table is printed, then one
  # error line.
  out = tmp_path / 'results' / 'r.json'
  out.parent.mkdir()
  report = seg_evaluate.metrics.metrics_report

  def report_then_break_the_folder(*args, **kwargs):
    if out.parent.is_dir():
      shutil.rmtree(out.parent)
      out.parent.write_text('now a file')
    return report(*args, **kwargs)

  monkeypatch.setattr(seg_evaluate.metrics, 'metrics_report', report_then_break_the_folder)
  assert seg_evaluate.main(argv + ['--output', str(out)], model_loader=_seg_model) == 1
  captured = capsys.readouterr()
  assert 'mIoU' in captured.out
  assert len(captured.err.splitlines()) == 1
  assert captured.err.startswith(f'error: cannot write {out}')


# --------------------------------------------------------------- detection predict

DET_CONFIG = os.path.join(REPO, 'projects/cvt_detection/configs/synthetic_demo.py:runlocal')


def _det_predict(capsys, out, *paths):
  argv = ['--config', DET_CONFIG, '--checkpoint', str(out.parent), '--output', str(out),
          '--score-threshold', '0', *map(str, paths)]
  status = det_predict.main(argv)
  return status, capsys.readouterr().err


def test_detection_predict_skips_only_the_same_input(tmp_path, capsys, monkeypatch, inputs):
  monkeypatch.setattr(det_predict, 'load_detector', _fake_loader)
  out = tmp_path / 'out'
  assert _det_predict(capsys, out, inputs['a'])[0] == 0
  assert output_files.read_record(str(out / 'a.png'))['input']['sha256'] == (
      output_files.file_sha256(str(inputs['a'])))
  first = _stamps(out)
  results = json.loads((out / 'results.json').read_text())
  assert [r['image_id'] for r in results] == [1]

  status, err = _det_predict(capsys, out, inputs['a'])
  assert status == 0 and 'already done' in err and _stamps(out) == first

  # One more input: a is not redone, the run files list both (a's detections kept).
  status, err = _det_predict(capsys, out, inputs['a'], inputs['c'])
  assert status == 0 and 'already done' in err
  assert _stamps(out)['a.png'] == first['a.png']
  assert json.loads((out / 'images.json').read_text()) == {
      '1': str(inputs['a'].absolute()), '2': str(inputs['c'].absolute())}
  both = json.loads((out / 'results.json').read_text())
  assert [r['image_id'] for r in both] == [1, 2] and both[0] == results[0]
  second = _stamps(out)

  # Another image with the same stem: reported, nothing written, exit 1.
  status, err = _det_predict(capsys, out, inputs['a_bmp'])
  assert status == 1 and f'{out / "a.png"} belongs to {inputs["a"].absolute()}' in err
  assert _stamps(out) == second

  # A 0-byte picture is detected; --overwrite replaces it.
  (out / 'a.png').write_bytes(b'')
  status, err = _det_predict(capsys, out, inputs['a'], inputs['c'])
  assert status == 1 and 'empty file' in err and (out / 'a.png').read_bytes() == b''
  assert _det_predict(capsys, out, inputs['a'], inputs['c'], '--overwrite')[0] == 0
  assert _stamps(out)['a.png'][1] == first['a.png'][1]

  # A results.json that is not ours is not replaced.
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'results.json').write_text('[]')
  status, err = _det_predict(capsys, foreign, inputs['a'])
  assert status == 1 and 'results.json' in err and not (foreign / 'a.png').exists()

  # A failing input: the others are done, exit 1.
  status, err = _det_predict(capsys, tmp_path / 'out2', inputs['a'], inputs['notes'])
  assert status == 1 and 'notes.txt: not an image file' in err
  assert (tmp_path / 'out2' / 'a.png').is_file()


def test_detection_predict_to_an_unwritable_place_fails_before_inference(
    tmp_path, capsys, monkeypatch, inputs
):
  monkeypatch.setattr(det_predict, 'load_detector', _fail_if_called)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  status, err = _det_predict(capsys, blocker / 'out', inputs['a'])
  assert status == 1
  assert err.splitlines() == [f'error: cannot write to {blocker / "out"}: {blocker} is a file, '
                              'not a folder']


# --------------------------------------------------------------- detection evaluate


def test_detection_evaluate_prints_its_table_before_a_write_error(tmp_path, capsys, monkeypatch):
  config = tmp_path / 'det_config.py'
  config.write_text(
      'from projects.cvt_detection.configs import synthetic_demo\n\n'
      'def get_config():\n'
      "  config = synthetic_demo.get_config('runlocal')\n"
      '  with config.unlocked():\n'
      '    config.dataset_configs.num_eval = 4\n'
      '  return config\n')
  monkeypatch.setattr(det_evaluate, 'load_detector', _fake_loader)
  replace = os.replace

  def disk_full(src, dst, *args, **kwargs):
    if str(dst).startswith(str(tmp_path)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
    return replace(src, dst, *args, **kwargs)

  monkeypatch.setattr(os, 'replace', disk_full)
  results, metrics = tmp_path / 'out' / 'results.json', tmp_path / 'out' / 'metrics.json'
  argv = ['--config', str(config), '--checkpoint', str(tmp_path), '--results', str(results),
          '--metrics', str(metrics), '--no-progress']
  assert det_evaluate.main(argv) == 1
  captured = capsys.readouterr()
  assert 'AP50' in captured.out
  assert captured.err.splitlines() == [f'error: cannot write {results}: No space left on device']
  assert not results.exists() and not [p for p in os.listdir(results.parent)]


# --------------------------------------------------------------- cvt-extract


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  from cvt_backbone.cvt import CvTBackbone, get_spec
  from cvt_backbone.weights import converted as checkpoint_lib

  from .test_feature_extraction import _random_variables

  path = tmp_path_factory.mktemp('weights') / 'tiny.msgpack'
  checkpoint_lib.save_converted(path, _random_variables(CvTBackbone(variant='cvt-tiny')), {
      'variant': 'cvt-tiny', 'spec': get_spec('cvt-tiny').to_dict(),
      'activation': 'quick_gelu', 'num_classes': 0, 'backbone_only': True, 'in_chans': 3,
      'source': {'file': 'random', 'sha256': '', 'naming': 'flax'}, 'converter': 'test'})
  return str(path)


def _extract(weights, out, *args):
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = extract.main(['--checkpoint', weights, '--output', str(out), '--no-progress',
                           *map(str, args)])
  return status, err.getvalue()


@pytest.mark.parametrize('fmt', ['npz', 'safetensors'])
def test_extract_skips_only_the_same_input(tmp_path, weights, inputs, fmt):
  out = tmp_path / 'features'
  feature = out / f'a.{fmt}'
  assert _extract(weights, out, inputs['a'], '--format', fmt, '--pca')[0] == 0
  for path in (feature, out / 'a_stage1_pca.png'):
    record = output_files.read_record(str(path))
    assert record['input']['sha256'] == output_files.file_sha256(str(inputs['a']))
  assert set(writers.read_features(str(feature))) == {'stage1', 'stage2', 'stage3'}
  assert writers.read_metadata(str(feature))['source'] == str(inputs['a'])
  first = _stamps(out)

  status, err = _extract(weights, out, inputs['a'], '--format', fmt, '--pca')
  assert status == 0 and 'already done' in err and _stamps(out) == first

  status, err = _extract(weights, out, inputs['a_bmp'], '--format', fmt)
  assert status == 1 and f'{feature} belongs to {inputs["a"].absolute()}' in err
  assert _stamps(out) == first

  status, err = _extract(weights, out, inputs['a'], '--format', fmt, '--dtype', 'float16')
  assert status == 1 and 'other settings (dtype)' in err and _stamps(out) == first

  # A truncated feature file is detected and kept; --overwrite replaces it.
  data = feature.read_bytes()
  feature.write_bytes(data[:len(data) // 2])
  status, err = _extract(weights, out, inputs['a'], '--format', fmt)
  assert status == 1 and f'{feature}: incomplete' in err
  assert _extract(weights, out, inputs['a'], '--format', fmt, '--overwrite')[0] == 0
  assert feature.read_bytes() == data

  status, err = _extract(weights, out, inputs['a'], inputs['c'], inputs['notes'], '--format', fmt)
  assert status == 1 and 'notes.txt: not an image file' in err and 'already done' in err
  assert (out / f'c.{fmt}').is_file()


# --------------------------------------------------------------- no output is an input

_NEVER = 'an output never replaces an input, even with --overwrite; give another output path'


@pytest.mark.parametrize('flags', [[], ['--overwrite']])
def test_no_tool_writes_over_its_inputs(tmp_path, capsys, monkeypatch, seg_config, inputs, weights,
                                        flags):
  """Whatever the flags: the config, the checkpoint, an input image (here by a symbolic
  link), each named in one `error:` line before anything is written or loaded."""
  kept = {p: p.read_bytes() for p in (inputs['a'], tmp_path / 'seg_config.py')}
  run = tmp_path / 'run'
  (run / 'checkpoints' / '4' / 'state').mkdir(parents=True)
  argv = ['--no-progress', '--config', seg_config, '--checkpoint', str(run), *flags]

  assert seg_evaluate.main([*argv, '--output', seg_config], model_loader=_fail_if_called) == 1
  assert capsys.readouterr().err.splitlines() == [
      f'error: {seg_config} is the config file: {_NEVER}']

  out = tmp_path / 'out'
  out.mkdir()
  (out / 'a_mask.png').symlink_to(inputs['a'])
  assert seg_predict.main([*argv, '--output', str(out), str(inputs['a'])],
                          model_loader=_fail_if_called) == 1
  assert capsys.readouterr().err.splitlines() == [
      f'error: {out / "a_mask.png"} is the input {inputs["a"]}: {_NEVER}']
  masks = run / 'checkpoints' / 'masks'
  assert seg_predict.main([*argv, '--output', str(masks), str(inputs['c'])],
                          model_loader=_fail_if_called) == 1
  assert capsys.readouterr().err.splitlines() == [
      f'error: {masks / "c_mask.png"} lies in the checkpoints folder {run / "checkpoints"}: '
      f'{_NEVER}']

  monkeypatch.setattr(det_evaluate, 'load_detector', _fail_if_called)
  monkeypatch.setattr(det_predict, 'load_detector', _fail_if_called)
  det_config = tmp_path / 'det_config.py'
  det_config.write_text('from projects.cvt_detection.configs.synthetic_demo import get_config\n')
  kept[det_config] = det_config.read_bytes()
  det = ['--config', f'{det_config}:runlocal', '--checkpoint', str(run), '--no-progress', *flags]
  assert det_evaluate.main([*det, '--metrics', str(det_config),
                            '--results', str(tmp_path / 'r.json')]) == 1
  assert capsys.readouterr().err.splitlines() == [
      f'error: {det_config} is the config file: {_NEVER}']
  assert det_predict.main([*det, '--output', str(run / 'checkpoints' / '4'),
                           str(inputs['c'])]) == 1
  assert capsys.readouterr().err.splitlines() == [
      f'error: {run / "checkpoints" / "4" / "results.json"} lies in the checkpoints folder '
      f'{run / "checkpoints"}: {_NEVER}']

  # cvt-extract: the converted weights where a feature file would go.
  features = tmp_path / 'features'
  features.mkdir()
  shutil.copy(weights, features / 'a.npz')
  kept[features / 'a.npz'] = (features / 'a.npz').read_bytes()
  status, err = _extract(str(features / 'a.npz'), features, inputs['a'], *flags)
  assert status == 1 and err.splitlines()[-1] == (
      f'cvt-extract: error: {features / "a.npz"} is the checkpoint: {_NEVER}')

  assert {p: p.read_bytes() for p in kept} == kept
  assert sorted(os.listdir(out)) == ['a_mask.png'] and os.listdir(features) == ['a.npz']
  assert sorted(os.listdir(run / 'checkpoints')) == ['4'] and not (tmp_path / 'r.json').exists()
