"""One command-line experience for segmentation `evaluate` and `predict` (issue 14).

Comma lists (`--crop-size 512,1024`), help with every default, the config's evaluation batch
size, the output policy of the other tools for evaluate's JSON report (same record: already
evaluated, exit 0 without the model; another record: one error line, exit 1), `Progress`
lines in a log, and overlays that leave the background as it is.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from projects.cvt_segmentation import evaluate, inference, palettes, predict
from projects.tools import output_files

from .test_inference_support import ContextModel, init_model, write_synthetic_config

K = 4


def _config(tmp_path, extra=''):
  return write_synthetic_config(tmp_path, K, extra=extra)


def _model(config, checkpoint):
  del config, checkpoint
  return init_model(ContextModel(K, min_input=16))


def _fail_if_called(*args, **kwargs):
  raise AssertionError('the model was loaded')


def _usage_error(parse, argv):
  """`(exit status, stderr)` of an argparse failure."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
    parse(argv)
  return exit_info.value.code, err.getvalue()


# ----------------------------------------------------------------- lists and help


@pytest.mark.parametrize('tool', [evaluate, predict])
def test_sizes_scales_and_test_scale_are_comma_lists(tool):
  extra = ['--output', 'out', 'a.png'] if tool is predict else []
  base = ['--config', 'c.py', '--checkpoint', 'k', *extra]
  args = tool.parse_args(base + ['--mode', 'slide', '--crop-size', '512,1024', '--stride',
                                 '341,682', '--scales', '0.5,1.0,1.5', '--test-scale', '2048,512'])
  settings = inference.inference_settings(None, **evaluate.flag_settings(args))  # flags alone
  assert settings.crop_size == (512, 1024) and settings.stride == (341, 682)
  assert settings.scales == (0.5, 1.0, 1.5)
  assert inference.config_test_scale(None, args.test_scale) == (2048, 512)
  square = tool.parse_args(base + ['--crop-size', '512', '--test-scale', 'none'])
  assert square.crop_size == (512, 512) and inference.config_test_scale(None, square.test_scale) is None

  for argv, expected in [(['--crop-size', '512', '1024'], 'unrecognized arguments: 1024'),
                         (['--crop-size', '512,x'], 'expected H,W'),
                         (['--test-scale', '2048'], 'expected LONG,SHORT'),
                         (['--scales', '0.5,,1'], 'separated by commas')]:
    if tool is predict and argv[-1] == '1024':
      continue  # a positional input for predict
    status, err = _usage_error(tool.parse_args, base + argv)
    assert status == 2 and expected in err, err
    assert len([line for line in err.splitlines() if 'error:' in line]) == 1


@pytest.mark.parametrize('tool', [evaluate, predict])
def test_help_shows_every_default(tool):
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
    tool.parse_args(['--help'])
  text = ' '.join(out.getvalue().split())
  for expected in ["(default: the config's eval.mode)", "(default: the config's eval.crop_size)",
                   "(default: the config's eval.scales)", "(default: the config's eval.flip)",
                   "the config's dataset_configs.test_scale", '--crop-size H,W', '--stride H,W',
                   '--test-scale LONG,SHORT|none', '--overwrite', '--no-progress',
                   'exit status: 0']:
    assert expected in text, expected
  if tool is evaluate:
    assert "(default: the config's eval_batch_size, else 1)" in text
    assert '--num-threads N data loading threads (default: 2)' in text
    assert '--strict' not in text
  else:
    assert '(default: auto)' in text and '(default: 0.5)' in text
    assert '--strict' in text and '--paint-background' in text


# ----------------------------------------------------------------- evaluate


def test_evaluate_batch_size_defaults_to_the_configs(tmp_path, monkeypatch):
  from projects.cvt_segmentation import data

  config = _config(tmp_path, 'config.eval_batch_size = 3')
  seen = []
  build = data.build_loaders

  def spy(*args, **kwargs):
    seen.append(kwargs['eval_batch_size'])
    return build(*args, **kwargs)

  monkeypatch.setattr(data, 'build_loaders', spy)
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--no-progress']
  assert evaluate.main(argv + ['--output', str(tmp_path / 'a.json')], model_loader=_model) == 0
  assert evaluate.main(argv + ['--output', str(tmp_path / 'b.json'), '--batch-size', '2'],
                       model_loader=_model) == 0
  assert seen == [3, 2]
  # The batch size is speed only: the same evaluation, the same numbers.
  a, b = (json.loads((tmp_path / n).read_text()) for n in ('a.json', 'b.json'))
  assert a['confusion_matrix'] == b['confusion_matrix']


def test_evaluate_reruns_follow_the_output_policy(tmp_path, capsys):
  config = _config(tmp_path)
  out = tmp_path / 'report.json'
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--output', str(out),
          '--no-progress']
  assert evaluate.main(argv, model_loader=_model) == 0
  first = capsys.readouterr().out
  record = output_files.read_record(str(out))
  assert record['tool'] == 'cvt_segmentation.evaluate'
  assert record['input']['sha256'] == output_files.file_sha256(config)
  assert set(record['settings']) == {'config', 'checkpoint', 'dataset', 'inference',
                                     'test_scale', 'max_examples'}
  assert record['settings']['test_scale'] == [40, 32]
  stored = out.read_bytes()

  stamp = os.stat(out).st_mtime_ns

  # The same evaluation: printed from the report, nothing loaded or rewritten, exit 0.
  assert evaluate.main(argv, model_loader=_fail_if_called) == 0
  captured = capsys.readouterr()
  assert f'{out}: already evaluated' in captured.err
  table = first.split('results written')[0]
  assert 'mIoU' in table and table in captured.out
  assert out.read_bytes() == stored and os.stat(out).st_mtime_ns == stamp

  # Other settings: one error line naming what the report holds and what was asked.
  assert evaluate.main(argv + ['--min-size', '40'], model_loader=_fail_if_called) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f'error: {out} holds another evaluation')
  assert 'inference.min_size 32 (this run: 40)' in err[0] and '--overwrite' in err[0]
  assert evaluate.main(argv + ['--flip'], model_loader=_fail_if_called) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and 'inference.flip false (this run: true)' in err[0]
  assert out.read_bytes() == stored

  # An empty file (a kill under an older version) or a report without a record: kept.
  for content in (b'', b'{"mIoU": 1.0}'):
    out.write_bytes(content)
    assert evaluate.main(argv, model_loader=_fail_if_called) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f'error: {out}: ') and '--overwrite' in err[0]
    if not content:
      assert err == [f'error: {out}: empty file (0 bytes), not written by this version; pass '
                     '--overwrite to replace it']
    assert out.read_bytes() == content
  assert evaluate.main(argv + ['--overwrite'], model_loader=_model) == 0
  assert output_files.read_record(str(out)) == record and out.read_bytes() == stored


def test_evaluate_default_report_names_the_step(tmp_path, capsys):
  config = _config(tmp_path)
  workdir = tmp_path / 'work'
  (workdir / 'checkpoints' / '2' / 'state').mkdir(parents=True)
  base = ['--config', config, '--no-progress']
  assert evaluate.main(base + ['--checkpoint', str(workdir)], model_loader=_model) == 0
  assert (workdir / 'eval_synthetic_whole_step2.json').is_file()
  # A later checkpoint of the same run is a new report, not a conflict.
  (workdir / 'checkpoints' / '4' / 'state').mkdir(parents=True)
  assert evaluate.main(base + ['--checkpoint', str(workdir / 'checkpoints')],
                       model_loader=_model) == 0
  assert (workdir / 'eval_synthetic_whole_step4.json').is_file()
  # The step folder names that step's report: already evaluated.
  assert evaluate.main(base + ['--checkpoint', str(workdir / 'checkpoints' / '2')],
                       model_loader=_fail_if_called) == 0
  assert 'already evaluated' in capsys.readouterr().err
  assert evaluate.main(base + ['--checkpoint', str(workdir), '--max-examples', '1'],
                       model_loader=_model) == 0
  assert (workdir / 'eval_synthetic_whole_first1_step4.json').is_file()
  capsys.readouterr()
  assert evaluate.main(base + ['--checkpoint', str(workdir), '--max-examples', '0'],
                       model_loader=_fail_if_called) == 1
  assert capsys.readouterr().err == ('error: --max-examples must be a positive number of '
                                     'examples, got 0\n')


def test_evaluate_progress_is_plain_lines_in_a_log(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('CVT_PROGRESS_INTERVAL', '0')
  config = _config(tmp_path)
  argv = ['--config', config, '--checkpoint', str(tmp_path)]
  assert evaluate.main(argv + ['--output', str(tmp_path / 'a.json')], model_loader=_model) == 0
  err = capsys.readouterr().err
  assert '\r' not in err and 'evaluate: 0/' in err and 'evaluate: 3/3 batch (100%)' in err
  # Test-time augmentation goes image by image, named.
  assert evaluate.main(argv + ['--output', str(tmp_path / 'b.json'), '--flip'],
                       model_loader=_model) == 0
  err = capsys.readouterr().err
  assert '\r' not in err and 'evaluate: 1/3 img (33%)' in err
  assert 'synthetic_validation_000001 48x40' in err
  assert 'evaluate: 3/3 img (100%)' in err
  assert evaluate.main(argv + ['--output', str(tmp_path / 'c.json'), '--no-progress'],
                       model_loader=_model) == 0
  assert 'evaluate:' not in capsys.readouterr().err


# ----------------------------------------------------------------- predict


class _RedIsAShape(nn.Module):
  """Class 1 where the red channel is above the mean, else class 0 ('background')."""

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train
    red = images[..., :1]
    zeros = jnp.zeros_like(red)
    return jnp.concatenate([zeros, red, zeros - 10, zeros - 10], axis=-1)


def _red_model(config, checkpoint):
  del config, checkpoint
  return init_model(_RedIsAShape())


def _photo(path, h=37, w=53):
  rng = np.random.default_rng(3)
  Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
  return path


def test_predict_overlay_leaves_the_background_as_it_is(tmp_path, capsys):
  config = _config(tmp_path)
  photo = _photo(tmp_path / 'photo.png')
  out = tmp_path / 'out'
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--output', str(out),
          '--no-progress', str(photo)]
  assert predict.main(argv, model_loader=_red_model) == 0
  image = np.asarray(Image.open(photo))
  labels = np.asarray(Image.open(out / 'photo_mask.png'))
  overlay = np.asarray(Image.open(out / 'photo_overlay.png'))[:, image.shape[1]:]
  background = labels == 0
  assert 0 < background.mean() < 1
  np.testing.assert_array_equal(overlay[background], image[background])
  assert (overlay[~background] != image[~background]).any(axis=-1).all()
  record = output_files.read_record(str(out / 'photo_overlay.png'))
  assert record['settings']['paint_background'] is False

  # The old look on request, recorded: another output, a conflict until --overwrite.
  assert predict.main(argv + ['--paint-background'], model_loader=_red_model) == 1
  assert 'other settings (paint_background)' in capsys.readouterr().err
  assert predict.main(argv + ['--paint-background', '--overwrite'], model_loader=_red_model) == 0
  painted = np.asarray(Image.open(out / 'photo_overlay.png'))[:, image.shape[1]:]
  grey = np.asarray(palettes.ADE20K_PALETTE[0], np.float32)
  want = np.rint(0.5 * image[background].astype(np.float32) + 0.5 * grey)
  np.testing.assert_array_equal(painted[background], want)
  assert output_files.read_record(str(out / 'photo_overlay.png'))['settings'][
      'paint_background'] is True


def test_background_classes():
  assert palettes.background_classes(('Background', 'disc', 'background')) == (0, 2)
  assert palettes.background_classes(None) == ()
  assert predict.class_names(ml_collections.ConfigDict(), 3) is None  # no dataset: unknown
  folder = ml_collections.ConfigDict(dict(dataset_name='folder', dataset_configs=dict(
      class_names=('sky', 'BACKGROUND'))))
  assert palettes.background_classes(predict.class_names(folder, 2)) == (1,)
  from projects.cvt_segmentation.data import synthetic_class_names

  assert palettes.background_classes(synthetic_class_names(4)) == (0,)
  labels = np.array([[0, 1], [255, 2]])
  image = np.full((2, 2, 3), 100, np.uint8)
  side = palettes.overlay_image(image, labels, [(0, 0, 0)] * 3, 0.5, transparent=(0,))
  assert side[0, 2].tolist() == [100, 100, 100] and side[1, 2].tolist() == [100, 100, 100]
  assert side[0, 3].tolist() == [50, 50, 50]


def test_predict_progress_names_each_image_in_a_log(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('CVT_PROGRESS_INTERVAL', '0')
  config = _config(tmp_path)
  (tmp_path / 'in').mkdir()
  photos = [_photo(tmp_path / 'in' / name, 30 + i, 40)
            for i, name in enumerate(('first.png', 'second.png'))]
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--output', str(tmp_path / 'out'),
          *map(str, photos)]
  assert predict.main(argv, model_loader=_model) == 0
  err = capsys.readouterr().err
  assert '\r' not in err
  assert 'predict: 0/2 img (0%)' in err and 'first.png 40x30' in err
  assert 'predict: 1/2 img (50%)' in err and 'second.png 40x31' in err
  assert 'predict: 2/2 img (100%)' in err
  os.remove(tmp_path / 'out' / 'first_mask.png')
  assert predict.main(argv + ['--no-progress'], model_loader=_model) == 0
  assert 'predict:' not in capsys.readouterr().err
