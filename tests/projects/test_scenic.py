"""The project inside the real Scenic: its trainer, base models and registries, unchanged.

Scenic comes from an installed copy or the snapshot beside the checkout (`tests/scenic_support`).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cvt_backbone import CvTBackbone
from projects.cvt_segmentation import models
from tests.scenic_support import requires_scenic
from tests.weights_support import write_converted_backbone

from . import trainer_support as support

pytestmark = [
    requires_scenic,
    # Scenic's trainer donates each batch to its pmapped steps; XLA:CPU cannot reuse them.
    pytest.mark.filterwarnings('ignore:Some donated buffers were not usable'),
]

MODEL_NAMES = tuple(models.MODELS)
# Every model trains once in Scenic's trainer, half of them on the synthetic set and half on a
# folder of odd sizes (the runs cost half a minute each on 2 CPU cores).
SYNTHETIC_RUNS = ('cvt_upernet', 'cvt_semantic_fpn')
FOLDER_RUNS = tuple(name for name in MODEL_NAMES if name not in SYNTHETIC_RUNS)
# The synthetic and folder runs share their shapes (train crops, padded eval batches,
# classes), so the second run of a model reads its programs from the compilation cache.
SHARED_SHAPES = dict(eval_pad_shape=(64, 96), num_classes=6)


@pytest.fixture(autouse=True)
def _free_compiled_programs():
  yield
  # Each Scenic run pmaps new step functions; free their executables, or those of the
  # whole file accumulate (6.5 GB, then XLA:CPU runs out of memory maps and crashes).
  jax.clear_caches()
  gc.collect()


def _scenic_config(model_name: str, config_module: str = 'synthetic', arg: str = '',
                   **overrides):
  """An example-project config (runlocal) with the shapes the tests share."""
  import importlib

  module = importlib.import_module(f'projects.cvt_scenic_example.configs.{config_module}')
  config = module.get_config(f'model={model_name},runlocal' + (f',{arg}' if arg else ''))
  config.dataset_configs.update(SHARED_SHAPES)
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def _scenic_train(config, workdir):
  """What `scenic.main` does: registries -> dataset -> Scenic's classification_trainer."""
  from projects.cvt_scenic_example import main

  return main.main(jax.random.PRNGKey(config.rng_seed), config, str(workdir),
                   support.RecordingWriter())


def _write_folder(root, sizes, num_classes=6, seed=0):
  """Images and masks in mmseg's layout whose sizes are not multiples of 32, some pixels
  ignored (255); returns the `build_loaders` arguments for them."""
  rng = np.random.default_rng(seed)
  for split in ('train', 'val'):
    for i, (h, w) in enumerate(sizes):
      image = rng.integers(0, 255, (h, w, 3), np.uint8)
      mask = rng.integers(0, num_classes, (h, w), np.uint8)
      mask[: h // 5] = 255
      (root / 'img_dir' / split).mkdir(parents=True, exist_ok=True)
      (root / 'ann_dir' / split).mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(root / 'img_dir' / split / f'{i}.jpg')
      Image.fromarray(mask).save(root / 'ann_dir' / split / f'{i}.png')
  return dict(train_images=str(root / 'img_dir/train'), train_masks=str(root / 'ann_dir/train'),
              val_images=str(root / 'img_dir/val'), val_masks=str(root / 'ann_dir/val'),
              num_classes=num_classes, crop_size=(32, 32), scale=(64, 32), photometric=False,
              test_scale=None)


def _tiny_backbone_file(tmp_path):
  path = tmp_path / 'tiny.msgpack'
  return path, write_converted_backbone(path)


def _assert_tree_equal(got, want):
  got, want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_model_classes_are_scenic_segmentation_models():
  from scenic.model_lib import models as scenic_models
  from scenic.model_lib.base_models.segmentation_model import SegmentationModel

  assert models.register_with_scenic() == list(MODEL_NAMES)
  assert models.register_with_scenic() == list(MODEL_NAMES)  # idempotent
  for name in MODEL_NAMES:
    cls = scenic_models.get_model_cls(name)
    assert cls is models.MODELS[name] and issubclass(cls, SegmentationModel)


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
@pytest.mark.parametrize('model_name', SYNTHETIC_RUNS)
def test_scenic_classification_trainer_trains_on_synthetic(tmp_path, model_name):
  _, train_summary, eval_summary = _scenic_train(_scenic_config(model_name), tmp_path)
  assert np.isfinite(train_summary['loss']) and 0 <= eval_summary['accuracy'] <= 1
  assert (tmp_path / 'checkpoint_3').exists()


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
@pytest.mark.parametrize('model_name', FOLDER_RUNS)
def test_scenic_classification_trainer_on_a_folder_of_odd_sizes(tmp_path, model_name):
  _write_folder(tmp_path / 'data', sizes=[(45, 61), (50, 70), (37, 83)])
  config = _scenic_config(model_name, 'folder', f'data_dir={tmp_path / "data"},num_classes=6')
  _, train_summary, eval_summary = _scenic_train(config, tmp_path / 'work')
  assert np.isfinite(train_summary['loss']) and np.isfinite(eval_summary['loss'])


def test_registered_builder_takes_the_per_host_batch_size(monkeypatch):
  from scenic.dataset_lib import datasets

  from projects.cvt_segmentation.data import builder, register_with_scenic

  names = ['cvt_seg_synthetic', 'cvt_seg_ade20k', 'cvt_seg_cityscapes', 'cvt_seg_folder']
  assert register_with_scenic() == names
  assert register_with_scenic() == names  # idempotent
  assert set(names) <= set(datasets.DatasetRegistry.list())
  configs = {'image_size': (24, 24), 'num_train': 16, 'num_eval': 5}
  reference = builder.get_dataset('synthetic', batch_size=8, eval_batch_size=4, **configs)
  whole = next(reference.train_iter)
  parts = []
  for host in (0, 1):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    ds = datasets.get_dataset('cvt_seg_synthetic')(
        batch_size=4, eval_batch_size=2, num_shards=2, dtype_str='float32', shuffle_seed=0,
        dataset_configs=configs)
    batch = next(ds.train_iter)
    assert batch['inputs'].shape == (2, 2, 24, 24, 3)  # per host: 4 = 2 shards x 2
    assert batch['batch_mask'].shape == (2, 2, 24, 24)  # per pixel
    assert next(ds.valid_iter)['inputs'].shape[:2] == (2, 1)
    parts.append(batch['inputs'].reshape(4, 24, 24, 3))
  # The two hosts hold the two halves of the global batch of 8.
  np.testing.assert_array_equal(np.concatenate(parts), whole['inputs'])


def test_scenic_eval_batches_pad_inputs_and_labels_alike(tmp_path):
  from scenic.dataset_lib import datasets

  from projects.cvt_segmentation.data import register_with_scenic

  register_with_scenic()
  folder = _write_folder(tmp_path, sizes=[(45, 61), (50, 70), (37, 83)])
  ds = datasets.get_dataset('cvt_seg_folder')(
      batch_size=2, eval_batch_size=4, num_shards=1, dtype_str='float32', shuffle_seed=0,
      dataset_configs=folder)
  batch = next(ds.valid_iter)
  inputs, label, mask = batch['inputs'][0], batch['label'][0], batch['batch_mask'][0]
  assert inputs.shape[:3] == label.shape == mask.shape == (4, 64, 96)
  # Real labelled pixels weigh 1; ignored (255), padded pixels and the padded example 0.
  assert mask[3].sum() == 0 and (mask[label == 255] == 0).all()
  np.testing.assert_array_equal(mask[:3] > 0, label[:3] != 255)
  assert mask[0, :45, :61].sum() == (label[0, :45, :61] != 255).sum() > 0
  first = next(ds.train_iter)
  assert first['batch_mask'].shape == first['label'].shape == (1, 2, 32, 32)


def test_scenic_metrics_on_four_devices_equal_one_device():
  script = textwrap.dedent('''
      import json
      import jax, jax.numpy as jnp, numpy as np
      from projects.cvt_segmentation import models
      model = models.CvTSegFormer(None, {'num_classes': 5})
      rng = np.random.default_rng(0)
      logits = rng.normal(size=(8, 6, 7, 5)).astype(np.float32)
      labels = rng.integers(0, 5, (8, 6, 7)).astype(np.int32)
      labels[:, :2] = 255
      mask = (labels != 255).astype(np.float32)
      mask[-1] = 0  # a padded example
      batch = {'label': labels, 'batch_mask': mask}
      shard = lambda x: x.reshape((4, 2) + x.shape[1:])
      pmapped = jax.pmap(model.get_metrics_fn('validation'), axis_name='batch')(
          shard(logits), jax.tree.map(shard, batch))
      one = jax.jit(model.get_metrics_fn_jit('validation'))(logits, batch)
      print(json.dumps({'devices': jax.local_device_count(),
                        'pmap': {k: [np.asarray(v).tolist() for v in vs] for k, vs in pmapped.items()},
                        'jit': {k: [float(v) for v in vs] for k, vs in one.items()}}))
      ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=support.REPO, capture_output=True,
                        text=True, timeout=300, env=support.subprocess_env(
                            XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 4
  for name, (total, normalizer) in out['jit'].items():
    per_device_total, per_device_norm = out['pmap'][name]
    # Every device holds the totals over all four devices (psum), equal to one device's.
    np.testing.assert_allclose(per_device_total, [total] * 4, rtol=1e-5)
    np.testing.assert_allclose(per_device_norm, [normalizer] * 4, rtol=1e-6)
  assert out['jit']['accuracy'][1] == 7 * 4 * 7  # labelled pixels of the 7 real examples


def test_scenic_trainer_starts_from_the_pretrained_backbone(tmp_path, monkeypatch):
  from scenic.train_lib import classification_trainer

  path, weights = _tiny_backbone_file(tmp_path)
  initialized = {}
  real_initialize = classification_trainer.train_utils.initialize_model

  def spy(**kwargs):
    out = real_initialize(**kwargs)
    initialized['params'], initialized['model_state'] = out[0], out[1]
    return out

  monkeypatch.setattr(classification_trainer.train_utils, 'initialize_model', spy)
  config = _scenic_config('cvt_segformer', **{'model.backbone.pretrained': str(path),
                                              'num_training_steps': 1, 'log_eval_steps': 1})
  _scenic_train(config, tmp_path / 'work')
  _assert_tree_equal(initialized['params']['backbone'], weights['params'])
  _assert_tree_equal(initialized['model_state']['batch_stats']['backbone'],
                     weights['batch_stats'])

  config.model.backbone.pretrained = str(tmp_path / 'missing.msgpack')
  with pytest.raises(FileNotFoundError, match='missing.msgpack'):
    _scenic_train(config, tmp_path / 'work2')


def _scenic_train_state(model, variables):
  from scenic.train_lib import train_utils

  return train_utils.TrainState(
      global_step=0, params=variables['params'],
      model_state={'batch_stats': variables['batch_stats']}, rng=jax.random.PRNGKey(0))


def test_init_from_train_state_loads_the_backbone(tmp_path):
  path, weights = _tiny_backbone_file(tmp_path)
  config = _scenic_config('cvt_upernet')
  model = models.CvTUperNet(config, {'num_classes': 6})
  fresh = model.init_variables(jax.random.PRNGKey(0), (1, 32, 32, 3))
  state = _scenic_train_state(model, fresh)

  # A restored Scenic train state of a bare backbone, then one of a whole segmentation model.
  restored = _scenic_train_state(model, weights)
  loaded = model.init_from_train_state(state, restored, None)
  _assert_tree_equal(loaded.params['backbone'], weights['params'])
  _assert_tree_equal(loaded.model_state['batch_stats']['backbone'], weights['batch_stats'])
  _assert_tree_equal(loaded.params['decode_head'], fresh['params']['decode_head'])
  again = model.init_from_train_state(state, loaded, config)
  _assert_tree_equal(again.params, loaded.params)
  # A CvT classifier's train state (e.g. fine-tuned in Scenic on ImageNet): its stages.
  from cvt_backbone import CvT

  classifier = CvT.from_variant('cvt-tiny', num_classes=10)
  clf_vars = jax.jit(classifier.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))
  from_clf = model.init_from_train_state(state, _scenic_train_state(model, clf_vars))
  _assert_tree_equal(from_clf.params['backbone'],
                     {k: v for k, v in clf_vars['params'].items() if k.startswith('stage')})

  # No restored state: the configured file; none configured: unchanged.
  assert model.init_from_train_state(state) is state
  config.model.backbone.pretrained = str(path)
  from_file = models.CvTUperNet(config, {'num_classes': 6}).init_from_train_state(state)
  _assert_tree_equal(from_file.params['backbone'], weights['params'])
  config.model.backbone.pretrained = str(tmp_path / 'nope.msgpack')
  with pytest.raises(FileNotFoundError, match='nope.msgpack'):
    models.CvTUperNet(config, {'num_classes': 6}).init_from_train_state(state)

  from cvt_backbone import CheckpointMismatchError

  other = CvTBackbone(variant='cvt-13')
  other_vars = jax.eval_shape(other.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  other_vars = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), other_vars)
  with pytest.raises(CheckpointMismatchError, match='embed_dims'):
    model.init_from_train_state(state, _scenic_train_state(model, other_vars))


def test_example_project_runs_under_scenic_app_quietly(tmp_path):
  cmd = [sys.executable, '-m', 'projects.cvt_scenic_example.main',
         '--config=projects/cvt_scenic_example/configs/synthetic.py:runlocal',
         f'--workdir={tmp_path}']
  proc = subprocess.run(cmd, cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Final validation: accuracy' in proc.stdout
  assert (tmp_path / 'checkpoint_3').exists()
  # Scenic's start-up and trainer INFO logs stay off unless --verbosity is given.
  for chatter in ('JAX devices', 'Starting training loop', 'RNG:'):
    assert chatter not in proc.stderr, proc.stderr[-2000:]


def test_example_project_prints_invalid_settings_in_one_line(tmp_path):
  # Under Scenic's app as well as the project's own main: one `error:` line, no traceback.
  cmd = [sys.executable, '-m', 'projects.cvt_scenic_example.main',
         '--config=projects/cvt_scenic_example/configs/synthetic.py:runlocal',
         f'--workdir={tmp_path}', '--config.batch_size=0']
  proc = subprocess.run(cmd, cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config projects/cvt_scenic_example/configs/synthetic.py:runlocal: invalid config '
      'value batch_size=0 (expected a positive integer)')


def test_models_without_scenic_keep_the_protocol():
  script = textwrap.dedent('''
      import importlib.abc, sys
      class NoScenic(importlib.abc.MetaPathFinder):
          def find_spec(self, name, path=None, target=None):
              if name == 'scenic' or name.startswith('scenic.'):
                  raise ModuleNotFoundError(name)
      sys.meta_path.insert(0, NoScenic())
      from projects.cvt_segmentation import models
      from projects.cvt_segmentation.data import register_with_scenic
      from projects.training.model import CvTModel
      assert models.SegmentationModel.__mro__[1:] == (CvTModel, object)
      assert models.register_with_scenic() == [] and register_with_scenic() == []
      model = models.CvTFPNLinear(None, {'num_classes': 3})
      assert callable(model.get_metrics_fn()) and callable(model.init_from_train_state)
      print('ok')
      ''')
  proc = subprocess.run([sys.executable, '-c', script], cwd=support.REPO, capture_output=True,
                        text=True, timeout=300, env=support.subprocess_env())
  assert proc.returncode == 0 and proc.stdout.strip().endswith('ok'), proc.stderr[-3000:]
