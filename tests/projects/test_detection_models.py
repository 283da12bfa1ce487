"""The detection model classes: ATSS loss on padded batches, detections, configs, Scenic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.cvt_detection import models
from projects.cvt_detection.configs import coco_cvt13_atss_1x, synthetic_demo
from projects.cvt_detection.data import build_loaders
from tests.scenic_support import requires_scenic


@pytest.fixture(scope='module')
def tiny():
  """The runlocal demo model, its variables and one training batch of 2 synthetic images."""
  config = synthetic_demo.get_config('runlocal')
  train, _, meta = build_loaders('synthetic', batch_size=2, eval_batch_size=2, num_classes=4,
                                 image_size=(128, 128), num_train=4, num_eval=2, max_boxes=8)
  model = models.get_model_cls(config.model_name)(config, meta)
  variables = model.init_variables(jax.random.PRNGKey(0), meta['input_shape'])
  batch = {k: jnp.asarray(v) for k, v in train.batch(0).items()}
  outputs = jax.jit(lambda v, x: model.flax_model.apply(v, x))(variables, batch['inputs'])
  return model, variables, batch, outputs


def _loss(model, outputs, batch):
  return jax.jit(model.loss_and_metrics)(outputs, batch)


def test_loss_is_finite_and_has_positives(tiny):
  model, _, batch, outputs = tiny
  loss, parts = _loss(model, outputs, batch)
  assert np.isfinite(loss) and float(loss) > 0
  assert float(parts['num_pos']) >= int(batch['box_mask'].sum())  # ATSS: >= 1 point per box
  np.testing.assert_allclose(
      loss, parts['loss_cls'] + 2.0 * parts['loss_box'] + parts['loss_centerness'], rtol=1e-6)


def test_padded_boxes_change_nothing(tiny):
  model, _, batch, outputs = tiny
  loss, _ = _loss(model, outputs, batch)
  # Garbage in the padding slots (box_mask False) must not match any point.
  garbage = dict(batch)
  pad = ~batch['box_mask']
  garbage['boxes'] = jnp.where(pad[..., None], jnp.asarray([5.0, 5.0, 120.0, 120.0]),
                               batch['boxes'])
  garbage['labels'] = jnp.where(pad, 3, batch['labels'])
  np.testing.assert_allclose(_loss(model, outputs, garbage)[0], loss, rtol=1e-6)


def test_masked_batch_entry_contributes_nothing(tiny):
  model, _, batch, outputs = tiny
  first = {k: v[:1] for k, v in batch.items()}
  first_outputs = {k: v[:1] for k, v in outputs.items()}
  alone, _ = _loss(model, first_outputs, first)
  masked = dict(batch, batch_mask=jnp.asarray([1.0, 0.0]))
  np.testing.assert_allclose(_loss(model, outputs, masked)[0], alone, rtol=1e-5)


def test_detect_returns_fixed_count_in_original_pixels(tiny):
  model, variables, batch, _ = tiny
  # An untrained head scores every point at its prior, 0.01: keep all candidates.
  config = model.config.copy_and_resolve_references()
  config.eval.score_threshold = 0.0
  predict = models.get_model_cls(config.model_name)(config, model.dataset_meta_data).predict_fn()
  # Inputs resized x2 from 64 px originals: boxes come back in the 64 px frame.
  size = jnp.asarray([[128, 128], [128, 128]])
  dets = predict(variables, batch['inputs'], size, jnp.full((2, 2), 2.0))
  assert dets['boxes'].shape == (2, 100, 4) and dets['classes'].shape == (2, 100)
  boxes = np.asarray(dets['boxes'])[np.asarray(dets['valid'])]
  assert boxes.size and boxes.min() >= 0 and boxes.max() <= 64


def test_unknown_loss_setting_is_an_error(tiny):
  model, _, batch, outputs = tiny
  with model.config.unlocked():
    model.config.loss.box_wieght = 1.0
  try:
    with pytest.raises(ValueError, match='box_wieght'):
      model.loss_function(outputs, batch)
  finally:
    with model.config.unlocked():
      del model.config.loss['box_wieght']


# Backbones as the official CvT-13 / CvT-21 without their classifier (20.0M / 31.6M with it);
# neck: laterals 192/384 -> 256, two 3x3 outputs, P5 from stage 3 (384 -> 256), P6, P7;
# head: 8 tower convs 256 -> 256 with GroupNorm, 3x3 predictors for 80 classes, 4, 1.
@pytest.mark.parametrize('arg, backbone', [('', 19_611_712), ('variant=21', 31_236_928)])
def test_coco_configs_build_cvt13_and_cvt21(arg, backbone):
  config = coco_cvt13_atss_1x.get_config(arg)
  assert config.optimizer.schedule == 'step' and config.optimizer.decay_steps == (58_640, 80_630)
  assert config.num_training_steps == 87_960
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 80})
  shapes = jax.eval_shape(model.flax_model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 256, 320, 3)))
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
            for k, v in shapes['params'].items()}
  assert counts == {'backbone': backbone, 'neck': 3_393_280, 'head': 4_918_618}
  assert model.flax_model.level_shapes(800, 1344) == (
      (100, 168), (50, 84), (25, 42), (13, 21), (7, 11))


def test_config_typo_is_an_error():
  config = synthetic_demo.get_config('runlocal')
  with pytest.raises(AttributeError):
    config.optimizer.base_rl = 1.0


@requires_scenic
def test_registered_with_scenic_and_metrics_psum_over_batch(tiny):
  from scenic.dataset_lib import datasets as scenic_datasets
  from scenic.model_lib import models as scenic_models

  from projects.cvt_detection.data import register_with_scenic

  assert models.register_with_scenic() == ['cvt_atss']
  assert scenic_models.get_model_cls('cvt_atss') is models.CvTATSS
  assert 'cvt_det_synthetic' in register_with_scenic()
  builder = scenic_datasets.get_dataset('cvt_det_synthetic')
  ds = builder(batch_size=2, eval_batch_size=2, num_shards=1, dataset_configs=dict(
      num_classes=4, image_size=(128, 128), num_train=4, num_eval=2, max_boxes=8))
  train_batch = next(ds.train_iter)
  assert train_batch['inputs'].shape == (1, 2, 128, 128, 3)
  assert train_batch['boxes'].shape == (1, 2, 8, 4)

  model, _, batch, outputs = tiny
  metrics_fn = models.get_model_cls('cvt_atss')(model.config, ds.meta_data).get_metrics_fn()
  sharded = jax.tree.map(lambda x: x[None], (outputs, batch))
  metrics = jax.pmap(metrics_fn, axis_name='batch')(*sharded)
  loss, _ = _loss(model, outputs, batch)
  np.testing.assert_allclose(metrics['loss'][0][0] / metrics['loss'][1][0], loss, rtol=1e-5)


@pytest.mark.parametrize('height, width', [(97, 131), (250, 250)])
def test_any_input_size_gives_boxes_inside_the_image(tiny, height, width):
  """A photo of any size: keep-ratio resize, padding to a canvas, boxes back in its pixels."""
  from projects.cvt_detection.data import DetectionEvalTransform, collate, default_canvas_sizes

  model, variables, _, _ = tiny
  config = model.config.copy_and_resolve_references()
  config.eval.score_threshold = 0.0  # untrained: keep every candidate
  predict = models.get_model_cls(config.model_name)(config, model.dataset_meta_data).predict_fn()
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (height, width, 3), np.uint8)
  item = {'image': image, 'boxes': np.zeros((0, 4), np.float32),
          'labels': np.zeros((0,), np.int32), 'crowd': np.zeros((0,), bool), 'image_id': 1,
          'orig_size': (height, width)}
  scale = (160, 96)
  batch = collate([DetectionEvalTransform(scale=scale)(item)], default_canvas_sizes(scale))
  dets = predict(variables, batch['inputs'], batch['image_size'], batch['scale_factor'])
  boxes = np.asarray(dets['boxes'][0])[np.asarray(dets['valid'][0])]
  assert len(boxes) == 100
  assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= width + 1e-3
  assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= height + 1e-3


def test_full_size_input_traces(tiny):
  """800x1333 (mmdet's test scale) through model and post-processing, shapes only."""
  model, variables, _, _ = tiny
  images = jax.ShapeDtypeStruct((1, 800, 1344, 3), jnp.float32)
  size = jax.ShapeDtypeStruct((1, 2), jnp.float32)

  def predict(variables, images, size, scale):
    outputs = model.flax_model.apply(variables, images)
    return model.detect(outputs, images.shape[1:3], size, scale)

  dets = jax.eval_shape(predict, variables, images, size, size)
  assert dets['boxes'].shape == (1, 100, 4) and dets['valid'].shape == (1, 100)
  points = sum(h * w for h, w in model.flax_model.level_shapes(800, 1344))
  assert points == 100 * 168 + 50 * 84 + 25 * 42 + 13 * 21 + 7 * 11


@pytest.mark.parametrize('height, width', [(97, 131), (250, 250)])
def test_detector_runs_on_unpadded_odd_sizes(tiny, height, width):
  """No resize or padding: odd pyramid sizes, every point decoded, boxes inside the image."""
  model, variables, _, _ = tiny
  config = model.config.copy_and_resolve_references()
  config.eval.score_threshold = 0.0
  predict = models.get_model_cls(config.model_name)(config, model.dataset_meta_data).predict_fn()
  images = jax.random.normal(jax.random.PRNGKey(1), (1, height, width, 3))
  size = jnp.asarray([[height, width]])
  dets = predict(variables, images, size, jnp.ones((1, 2)))
  boxes = np.asarray(dets['boxes'][0])[np.asarray(dets['valid'][0])]
  assert len(boxes) == 100
  assert boxes.min() >= 0 and boxes[:, [0, 2]].max() <= width and boxes[:, [1, 3]].max() <= height
  # P3, P4 at the backbone's exact stage-2 and stage-3 sizes; P5-P7 halve (rounding up).
  p3, p4, *coarser = model.flax_model.level_shapes(height, width)
  sizes = model.flax_model.backbone.output_sizes(height, width)
  assert (p3, p4) == (sizes['stage2'], sizes['stage3'])
  for finer, level in zip((p4, *coarser), coarser, strict=False):
    assert level == (-(-finer[0] // 2), -(-finer[1] // 2))


def test_detections_of_processes_are_gathered_without_their_padding(monkeypatch):
  """Two processes scoring 3 and 1 real images: each gets all 4, in process order."""
  from jax.experimental import multihost_utils

  from projects.cvt_detection import evaluation

  def local(ids):
    n = len(ids)
    return {'boxes': np.full((n, 2, 4), ids[:, None, None], np.float32),
            'scores': np.ones((n, 2), np.float32), 'classes': np.zeros((n, 2), np.int32),
            'valid': np.ones((n, 2), bool), 'image_id': np.asarray(ids)}

  parts = [local(np.array([1, 2, 3])), local(np.array([4]))]
  calls = []

  def allgather(tree):  # what process_allgather returns: a leading process axis
    calls.append(tree)
    if len(calls) == 1:
      return np.array([3, 1])
    padded = [jax.tree.map(lambda v, n=n: np.concatenate(
        [v, np.zeros((3 - n, *v.shape[1:]), v.dtype)]), p)
              for p, n in zip(parts, (3, 1), strict=True)]
    return jax.tree.map(lambda *v: np.stack(v), *padded)

  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  gathered = evaluation.gather_processes(parts[0])
  assert gathered['image_id'].tolist() == [1, 2, 3, 4]
  assert gathered['boxes'][:, 0, 0].tolist() == [1, 2, 3, 4]
  assert calls[1]['image_id'].shape == (3,)  # this process's 3 rows, padded to the largest
