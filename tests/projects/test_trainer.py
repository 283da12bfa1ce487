"""The segmentation trainer: resume after SIGKILL, data parallel, folder datasets, bad input."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from heads.resampling import resize_bilinear
from projects.cvt_segmentation import models
from projects.cvt_segmentation.configs import synthetic_demo
from projects.training import checkpoints
from tests.scenic_support import requires_scenic

from . import trainer_support as support


def _final_variables(config, workdir):
  _, variables = models.restore_for_inference(config, workdir)
  return variables


@pytest.mark.slow  # about a minute or more: left out by -m "not slow"
def test_killed_four_device_run_resumes_to_the_one_device_result(tmp_path):
  """SIGKILL after the first checkpoint, restart: the same losses, mIoU and parameters.

  The reference trains on 1 device without interruption; the other run shards each batch
  over 4 CPU devices and is killed as soon as its first checkpoint is complete.
  """
  overrides = {'num_training_steps': 8, 'checkpoint_steps': 4, 'log_eval_steps': 8,
               'log_summary_steps': 1, 'batch_size': 4}
  config = support.tiny_config(**overrides)
  one = support.run_training_subprocess(tmp_path / 'one', overrides)

  four_devices = dict(XLA_FLAGS='--xla_force_host_platform_device_count=4')
  resumed = tmp_path / 'resumed'
  cmd = [sys.executable, '-m', 'tests.projects.trainer_support', str(resumed),
         json.dumps(overrides)]
  proc = subprocess.Popen(cmd, cwd=support.REPO, env=support.subprocess_env(**four_devices),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (resumed / 'checkpoints' / '4').is_dir():
    assert proc.poll() is None, 'the run ended before its first checkpoint'
    assert time.time() < deadline, 'no checkpoint after 300 s'
    time.sleep(0.05)
  loader_workers = support.descendants(proc.pid)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL
  support.assert_processes_end(loader_workers)  # none left running
  killed_at = checkpoints.latest_step(resumed)
  assert killed_at is not None and killed_at < 8

  four = support.run_training_subprocess(resumed, overrides, **four_devices)
  assert min(four) > killed_at, 'the restarted run did not resume from the checkpoint'
  for step in four:
    np.testing.assert_allclose(four[step]['train/loss'], one[step]['train/loss'], rtol=1e-4)
  np.testing.assert_allclose(four[8]['valid/mIoU'], one[8]['valid/mIoU'], atol=0.1)  # %
  a, b = _final_variables(config, tmp_path / 'one'), _final_variables(config, resumed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    # Sharded BatchNorm statistics and gradient sums add in another order than on 1 device.
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dataset', ['ade20k', 'cityscapes'])
def test_folder_datasets_train_two_steps(tmp_path, dataset):
  root = (support.make_ade20k if dataset == 'ade20k' else support.make_cityscapes)(tmp_path)
  config = support.tiny_config(
      dataset_name=dataset, num_training_steps=2, log_summary_steps=1, log_eval_steps=2,
      checkpoint_steps=2, eval_batch_size=1,
      dataset_configs=ml_collections.ConfigDict(
          dict(data_dir=str(root), crop_size=(64, 64), scale=(128, 64), test_scale=None)))
  config.model.decode_head.channels = 16
  scalars = support.run_training(config, tmp_path / 'workdir')
  assert set(scalars) == {1, 2}
  assert np.isfinite(scalars[2]['train/loss'])
  assert 0.0 <= scalars[2]['valid/aAcc'] <= 1.0
  assert checkpoints.latest_step(tmp_path / 'workdir') == 2


def test_misspelled_config_keys_are_errors():
  config = synthetic_demo.get_config('runlocal')
  with pytest.raises(AttributeError, match='optimiser'):
    config.optimiser = 1
  with pytest.raises(AttributeError, match='base_rl'):
    config.optimizer.base_rl = 1e-3
  with pytest.raises(ValueError, match="Unknown config argument 'stpes'"):
    synthetic_demo.get_config('stpes=3')
  config = synthetic_demo.get_config('runlocal')
  with config.unlocked():
    config.model.backbone.drop_pth_rate = 0.1
  with pytest.raises(ValueError, match='drop_pth_rate'):
    models.get_model_cls(config.model_name)(config, {'num_classes': 6})


def test_loss_ignores_255_and_padding():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  labels = jnp.zeros((2, 4, 4), jnp.int32).at[0, :2].set(255)
  loss, count = models.segmentation_loss(logits, labels, jnp.array([1.0, 0.0]))
  assert int(count) == 8  # 16 pixels of example 0, 8 ignored; example 1 is padding.
  expected = -jax.nn.log_softmax(logits[0, 2:])[..., 0].mean()
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # Changing ignored or padded pixels' labels changes nothing.
  other = labels.at[1].set(2)
  np.testing.assert_allclose(models.segmentation_loss(logits, other, jnp.array([1.0, 0.0]))[0],
                             loss, rtol=1e-6)
  smooth, _ = models.segmentation_loss(logits, labels, None, label_smoothing=0.1)
  assert float(smooth) != pytest.approx(float(loss))


def test_loss_of_head_logits_equals_the_loss_of_the_resized_logits():
  """`loss_function` takes the heads' own-resolution logits (resized block by block inside
  the loss) when the model gives them, with the same value and gradient as the full-size."""
  config = synthetic_demo.get_config('runlocal')
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 3})
  rng = np.random.default_rng(0)
  head = jnp.asarray(rng.standard_normal((2, 9, 13, 3), np.float32))
  aux = jnp.asarray(rng.standard_normal((2, 5, 7, 3), np.float32))
  labels = jnp.asarray(rng.integers(0, 3, (2, 33, 50)).astype(np.int32)).at[0, :4].set(255)
  batch = {'label': labels, 'batch_mask': jnp.array([1.0, 1.0])}

  def from_heads(head, aux):
    full = resize_bilinear(head, (33, 50)), resize_bilinear(aux, (33, 50))
    return model.loss_function({'logits': full[0], 'aux_logits': full[1], 'head_logits': head,
                                'aux_head_logits': aux}, batch)

  def from_full_size(head, aux):
    return model.loss_function({'logits': resize_bilinear(head, (33, 50)),
                                'aux_logits': resize_bilinear(aux, (33, 50))}, batch)

  value, grads = jax.value_and_grad(from_heads, (0, 1))(head, aux)
  want, want_grads = jax.value_and_grad(from_full_size, (0, 1))(head, aux)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, expected in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@requires_scenic
def test_main_runs_under_scenic_app(tmp_path):
  cmd = [sys.executable, '-m', 'projects.cvt_segmentation.main',
         f'--config={support.REPO}/projects/cvt_segmentation/configs/synthetic_demo.py:runlocal',
         f'--workdir={tmp_path}', '--config.num_training_steps=2']
  proc = subprocess.run(cmd, cwd=support.REPO, env=support.subprocess_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Final validation (%): mIoU' in proc.stdout
  assert checkpoints.latest_step(tmp_path) == 2
  # As quiet as without Scenic: its start-up INFO logs stay off unless --verbosity is given.
  assert 'JAX devices' not in proc.stderr and 'RNG:' not in proc.stderr, proc.stderr[-2000:]


def test_pretrained_backbone_is_loaded_into_the_segmentor(tmp_path):
  from tests.weights_support import write_converted_backbone

  path = tmp_path / 'tiny.msgpack'
  weights = write_converted_backbone(path)
  config = support.tiny_config()
  config.model.backbone.pretrained = str(path)
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 6})
  variables = model.init_variables(jax.random.PRNGKey(1), (1, 64, 64, 3))
  for collection in ('params', 'batch_stats'):
    loaded = jax.tree.leaves(variables[collection]['backbone'])
    for got, want in zip(loaded, jax.tree.leaves(weights[collection]), strict=True):
      np.testing.assert_array_equal(got, want)
  assert 'decode_head' in variables['params']
