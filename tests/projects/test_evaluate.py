"""Dataset evaluation (shared with the trainer) and the `evaluate` command, on stand-in models."""

import json

import numpy as np
import pytest

from projects.cvt_segmentation import evaluate, inference, metrics
from projects.cvt_segmentation.data import EvalLoader, EvalTransform
from projects.training import datasets
from projects.training.configs import load_config

from .test_inference_support import (
  ContextModel,
  ListSource,
  PointwiseModel,
  init_model,
  logits_fn_of,
  write_synthetic_config,
)

K = 5


def _brute_force_cm(logits_fn, source, transform, **kwargs):
  """Each example alone: transform, infer, resize back, argmax, numpy confusion matrix."""
  cm = np.zeros((K, K), np.int64)
  for item in source.items:
    x, label = transform(item['image'], item['label'])
    pred = np.asarray(inference.predict_labels(logits_fn, x, label.shape, **kwargs))
    cm += metrics.confusion_matrix(label, pred, K)
  return cm


@pytest.mark.parametrize('num_shards', [None, 2])
@pytest.mark.parametrize('kwargs', [dict(mode='whole'),
                                    dict(mode='slide', crop_size=(12, 12), stride=(8, 8))])
def test_evaluate_dataset_equals_per_example_brute_force(kwargs, num_shards):
  logits_fn = logits_fn_of(ContextModel(K))
  source = ListSource([(20, 28), (33, 17), (20, 28), (12, 40), (25, 25)], K, seed=3)
  transform = EvalTransform(scale=(24, 16))
  loader = EvalLoader(source, transform, batch_size=4, size_divisor=32, num_threads=0)
  pmap_layout = (lambda batches: batches) if num_shards is None else (
      lambda batches: (datasets.shard(b, num_shards) for b in batches))
  batches = loader if num_shards is None else list(pmap_layout(loader))
  cm = evaluate.evaluate_dataset(logits_fn, batches, K, **kwargs)
  want = _brute_force_cm(logits_fn, source, transform, **kwargs)
  assert cm.dtype == np.int64
  np.testing.assert_array_equal(cm, want)
  assert cm.sum() == sum(np.sum(it['label'] != 255) for it in source.items)
  # An endless iterator (Scenic's valid_iter) needs num_batches.
  endless = pmap_layout(loader.repeat())
  for _ in range(2):  # no batch of the next pass is consumed
    again = evaluate.evaluate_dataset(logits_fn, endless, K, num_batches=2, **kwargs)
    np.testing.assert_array_equal(again, want)


def test_single_scale_example_path_equals_batch_path():
  logits_fn = logits_fn_of(ContextModel(K))
  source = ListSource([(30, 20), (18, 50), (30, 20)], K, seed=4)
  loader = EvalLoader(source, EvalTransform(scale=(40, 24)), batch_size=2, num_threads=0)
  from_batches = evaluate.evaluate_dataset(logits_fn, loader, K)
  from_examples = evaluate.evaluate_examples(logits_fn, source, K, test_scale=(40, 24))
  np.testing.assert_array_equal(from_examples, from_batches)
  tta = evaluate.evaluate_examples(logits_fn, source, K, scales=(0.75, 1.25), flip=True,
                                   test_scale=(40, 24))
  assert tta.sum() == from_batches.sum()


def test_batches_without_sizes_are_all_valid():
  logits_fn = logits_fn_of(PointwiseModel(K))
  rng = np.random.default_rng(5)
  batch = {'inputs': rng.normal(size=(2, 16, 20, 3)).astype(np.float32),
           'label': rng.integers(0, K, (2, 16, 20)).astype(np.int32)}
  cm = evaluate.evaluate_dataset(logits_fn, [batch], K)
  pred = np.asarray(inference.predict_labels(logits_fn, batch['inputs']))
  np.testing.assert_array_equal(cm, metrics.confusion_matrix(batch['label'], pred, K))


# ----------------------------------------------------------------- command line


def _write_config(tmp_path, eval_fields='mode="whole"'):
  return write_synthetic_config(tmp_path, K, eval_fields=eval_fields)


def _loader_of(module):
  seen = []

  def model_loader(config, checkpoint):
    seen.append((config.dataset_name, checkpoint))
    return init_model(module)

  return model_loader, seen


def test_evaluate_command_writes_json_and_skips_the_same_evaluation(tmp_path, capsys):
  config = _write_config(tmp_path)
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  loader, seen = _loader_of(ContextModel(K))
  argv = ['--config', config + ':4', '--checkpoint', str(ckpt), '--no-progress']
  assert evaluate.main(argv, model_loader=loader) == 0
  assert seen == [('synthetic', str(ckpt))]
  out_path = ckpt / 'eval_synthetic_whole.json'
  report = json.loads(out_path.read_text())
  assert report['num_examples'] == 4 and report['num_classes'] == K
  assert set(report) >= {'aAcc', 'mIoU', 'mAcc', 'per_class', 'confusion_matrix', 'inference'}
  assert [r['class'] for r in report['per_class']][:2] == ['background', 'disc']
  # The numbers are the metrics of the confusion matrix it stores.
  cm = np.array(report['confusion_matrix'])
  assert report['mIoU'] == metrics.metrics_report(cm)['mIoU']
  assert 'mIoU' in capsys.readouterr().out
  before = out_path.read_text()
  # The same evaluation again: its report is printed, the model is not loaded.
  assert evaluate.main(argv, model_loader=loader) == 0
  captured = capsys.readouterr()
  assert 'already evaluated' in captured.err and 'mIoU' in captured.out
  assert len(seen) == 1 and out_path.read_text() == before
  # Another evaluation (the config's arg: 3 examples) is kept: one error line, exit 1.
  other = ['--config', config + ':3'] + argv[2:]
  assert evaluate.main(other, model_loader=loader) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and 'holds another evaluation' in err[0] and 'config.py:3' in err[0]
  assert 'dataset.configs.num_eval 4 (this run: 3)' in err[0]
  assert out_path.read_text() == before
  assert evaluate.main(other + ['--overwrite'], model_loader=loader) == 0
  assert json.loads(out_path.read_text())['num_examples'] == 3


def test_evaluate_command_flags_override_config(tmp_path):
  config = _write_config(tmp_path, 'mode="slide", crop_size=16, stride=(8, 12)')
  loader, _ = _loader_of(ContextModel(K))
  out = tmp_path / 'tta.json'
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--output', str(out),
          '--no-progress', '--scales', '0.75,1.25', '--flip', '--stride', '8']
  assert evaluate.main(argv, model_loader=loader) == 0
  settings = json.loads(out.read_text())['inference']
  assert settings['mode'] == 'slide' and settings['crop_size'] == [16, 16]
  assert settings['stride'] == [8, 8] and settings['scales'] == [0.75, 1.25] and settings['flip']
  assert settings['test_scale'] == [40, 32]


def test_checkpoint_not_matching_the_config_is_a_clear_error(tmp_path, capsys):
  config = _write_config(tmp_path)
  loader, _ = _loader_of(PointwiseModel(K + 2))
  argv = ['--config', config, '--checkpoint', str(tmp_path), '--no-progress']
  assert evaluate.main(argv, model_loader=loader) == 1
  assert f'predicts {K + 2} classes but {K} were expected' in capsys.readouterr().err


def test_settings_and_config_errors(tmp_path):
  config = load_config(_write_config(tmp_path, 'mode="slide"'))
  with pytest.raises(ValueError, match="'slide' needs crop_size and stride"):
    inference.inference_settings(config)
  args = evaluate.parse_args(['--config', 'c', '--checkpoint', 'k', '--mode', 'whole'])
  assert inference.inference_settings(config, **evaluate.flag_settings(args)).mode == 'whole'
  with pytest.raises(FileNotFoundError, match='config file not found'):
    load_config(str(tmp_path / 'missing.py'))
  with pytest.raises(FileNotFoundError, match='checkpoint not found'):
    evaluate.load_model(config, str(tmp_path / 'no_checkpoint'))
