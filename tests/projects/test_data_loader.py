"""Step-indexed training batches, padded eval batches, and the dataset builders."""

import itertools
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from projects.cvt_segmentation.data import (
    EvalLoader,
    EvalTransform,
    SyntheticSegmentation,
    TrainLoader,
    TrainTransform,
    build_loaders,
    get_dataset,
)
from projects.training import datasets

from . import trainer_support as support

SIZE = (16, 24)


def _train_loader(seed=0, num_examples=10, batch_size=4, **kw):
  src = SyntheticSegmentation(num_classes=4, image_size=SIZE, num_examples=num_examples)
  transform = TrainTransform(crop_size=(12, 16), scale=(48, 16), cat_max_ratio=0.75)
  return TrainLoader(src, transform, batch_size=batch_size, seed=seed, **kw)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_batch_format():
  batch = _train_loader().batch(0)
  assert batch['inputs'].shape == (4, 12, 16, 3) and batch['inputs'].dtype == np.float32
  assert batch['label'].shape == (4, 12, 16) and batch['label'].dtype == np.int32
  assert batch['batch_mask'].dtype == np.float32 and (batch['batch_mask'] == 1).all()
  assert set(np.unique(batch['label'])) <= {0, 1, 2, 3, 255}


@pytest.mark.parametrize('num_threads', [0, 2])
def test_resume_sees_the_same_batches(num_threads):
  loader = _train_loader(num_threads=num_threads)
  from_start = list(itertools.islice(loader.iterate(0), 8))
  resumed = list(itertools.islice(_train_loader(num_threads=num_threads).iterate(start_step=5), 3))
  for a, b in zip(from_start[5:8], resumed, strict=True):
    _assert_batches_equal(a, b)
  _assert_batches_equal(from_start[6], loader.batch(6))  # pure function of the step
  # Batches 5..7 cross epoch boundaries (10 examples, batch 4): still identical.
  assert not np.array_equal(from_start[0]['inputs'], from_start[1]['inputs'])


def test_thread_counts_agree_and_seed_matters():
  a = list(itertools.islice(_train_loader(num_threads=0).iterate(2), 2))
  b = list(itertools.islice(_train_loader(num_threads=2).iterate(2), 2))
  for x, y in zip(a, b, strict=True):
    _assert_batches_equal(x, y)
  other = _train_loader(seed=1).batch(2)
  assert not np.array_equal(a[0]['inputs'], other['inputs'])


def test_epochs_are_permutations():
  loader = _train_loader(num_examples=12, batch_size=4)
  for epoch in range(2):
    seen = [loader.record(epoch * 12 + i) for i in range(12)]
    assert {e for e, _ in seen} == {epoch}
    assert sorted(i for _, i in seen) == list(range(12))
  assert [loader.record(i)[1] for i in range(12)] != [loader.record(12 + i)[1] for i in range(12)]


def test_processes_load_disjoint_slices_of_the_global_batch():
  whole = _train_loader(batch_size=4).batch(3)
  parts = [_train_loader(batch_size=4, process_index=p, process_count=2).batch(3) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])
  # Scenic's registered builders reshape for pmap (`datasets.shard`).
  sharded = datasets.shard(whole, 2)
  assert sharded['inputs'].shape == (2, 2, 12, 16, 3) and sharded['label'].shape == (2, 2, 12, 16)
  np.testing.assert_array_equal(sharded['inputs'].reshape(whole['inputs'].shape), whole['inputs'])
  with pytest.raises(ValueError, match='multiple of the process count'):
    _train_loader(batch_size=3, process_count=2)
  with pytest.raises(ValueError, match='num_shards'):
    datasets.shard(whole, 3)


def test_grain_worker_processes_give_the_same_batches():
  loader = _train_loader(num_workers=2, num_threads=1)
  it = loader.iterate(start_step=1, num_steps=4)
  got = list(it)
  assert len(got) == 4
  for s, batch in enumerate(got, start=1):
    _assert_batches_equal(batch, loader.batch(s))


@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='needs /proc (Linux)')
def test_loader_workers_end_when_their_trainer_is_killed():
  # A trainer that the OOM killer, a preemption or kill -9 ends runs no clean-up: its
  # worker processes must notice by themselves.
  code = (
      'import time\n'
      'from tests.projects.test_data_loader import _train_loader\n'
      'batches = _train_loader(num_workers=2, num_threads=1).iterate()\n'
      'next(batches)\n'
      'print("loading", flush=True)\n'
      'time.sleep(300)\n')
  trainer = subprocess.Popen([sys.executable, '-c', code], cwd=support.REPO,
                             env=support.subprocess_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert trainer.stdout.readline().strip() == 'loading'
    workers = support.descendants(trainer.pid)
    assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
  finally:
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(timeout=30)
  support.assert_processes_end(workers)


def test_eval_batches_are_padded():
  src = SyntheticSegmentation(num_classes=4, image_size=SIZE, num_examples=5, split='validation')
  loader = EvalLoader(src, EvalTransform(scale=(48, 8)), batch_size=2, size_divisor=8)
  batches = list(loader.iterate())
  assert loader.num_batches == 3 and len(batches) == 3
  last = batches[-1]
  np.testing.assert_array_equal(last['batch_mask'], [1, 0])
  assert (last['label'][1] == 255).all() and (last['inputs'][1] == 0).all()
  # Resized input 8x12 (short edge 8) padded to 8x16; labels at the original 16x24.
  assert last['inputs'].shape == (2, 8, 16, 3) and last['label'].shape == (2, 16, 24)
  np.testing.assert_array_equal(last['input_size'][0], [8, 12])
  np.testing.assert_array_equal(last['label_size'][0], [16, 24])
  np.testing.assert_array_equal(last['label'][0], src[4]['label'])
  assert (last['inputs'][0, :, 12:] == 0).all()
  # Two processes split each global batch; padding lands on whichever holds it.
  p1 = EvalLoader(src, EvalTransform(), batch_size=2, process_index=1, process_count=2)
  assert p1.batch(2)['batch_mask'].tolist() == [0.0]
  assert (p1.batch(2)['label'] == 255).all()


def test_eval_one_unpadded_example_at_a_time(tmp_path):
  images, masks = tmp_path / 'images', tmp_path / 'masks'
  for i, (h, w) in enumerate([(10, 14), (13, 9), (11, 11)]):
    os.makedirs(images, exist_ok=True)
    os.makedirs(masks, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(images / f'{i}.png')
    Image.fromarray(np.full((h, w), i, np.uint8)).save(masks / f'{i}.png')
  _, evaluation, meta = build_loaders(
      'folder',
      batch_size=1,
      eval_batch_size=1,
      eval_size_divisor=1,
      test_scale=None,
      train_images=str(images),
      train_masks=str(masks),
      val_images=str(images),
      val_masks=str(masks),
      num_classes=3,
      crop_size=(8, 8),
  )
  shapes = [(b['inputs'].shape, b['label'].shape) for b in evaluation.iterate()]
  assert shapes == [
      ((1, 10, 14, 3), (1, 10, 14)),
      ((1, 13, 9, 3), (1, 13, 9)),
      ((1, 11, 11, 3), (1, 11, 11)),
  ]
  assert meta['num_eval_examples'] == 3 and meta['class_names'] == ('class_0', 'class_1', 'class_2')
  # Padded batches of different sizes: inputs to the batch max rounded to 32, labels to the max.
  ev = EvalLoader(evaluation.source, EvalTransform(), batch_size=3, size_divisor=32)
  b = ev.batch(0)
  assert b['inputs'].shape == (3, 32, 32, 3) and b['label'].shape == (3, 13, 14)
  assert (b['label'][1, :, 9:] == 255).all()


def test_get_dataset_synthetic_meta_and_iterators():
  kwargs = dict(num_classes=5, image_size=(16, 16), num_train=8, num_eval=4)
  ds = get_dataset('synthetic', batch_size=4, eval_batch_size=3, seed=1, start_step=2, **kwargs)
  meta = ds.meta_data
  assert meta['input_shape'] == (-1, 16, 16, 3) and meta['num_classes'] == 5
  assert meta['num_train_examples'] == 8 and meta['num_eval_examples'] == 4
  assert meta['target_is_onehot'] is False and meta['ignore_index'] == 255
  assert meta['input_dtype'] == np.float32 and len(meta['class_names']) == 5
  assert meta['num_eval_batches'] == 2 and ds.test_iter is None
  train, _, _ = build_loaders('synthetic', batch_size=4, eval_batch_size=3, seed=1, **kwargs)
  _assert_batches_equal(next(ds.train_iter), train.batch(2))
  evals = [next(ds.valid_iter)['batch_mask'].tolist() for _ in range(4)]
  assert evals == [[1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 0, 0]]  # endless padded passes
  bf16 = get_dataset('synthetic', batch_size=2, eval_batch_size=2, dtype_str='bfloat16', **kwargs)
  assert str(next(bf16.train_iter)['inputs'].dtype) == 'bfloat16'


def test_get_dataset_ade20k_folder(tmp_path):
  base = tmp_path / 'ADEChallengeData2016'
  for split in ('training', 'validation'):
    for stem in ('a', 'b', 'c'):
      os.makedirs(base / 'images' / split, exist_ok=True)
      os.makedirs(base / 'annotations' / split, exist_ok=True)
      image = np.full((20, 30, 3), 100, np.uint8)
      Image.fromarray(image).save(base / 'images' / split / f'{stem}.jpg')
      lab = np.zeros((20, 30), np.uint8)
      lab[:, 10:] = 5
      Image.fromarray(lab).save(base / 'annotations' / split / f'{stem}.png')
  ds = get_dataset(
      'ade20k', batch_size=2, eval_batch_size=2, data_dir=str(tmp_path), crop_size=(16, 16)
  )
  batch = next(ds.train_iter)
  assert batch['inputs'].shape == (2, 16, 16, 3)
  assert set(np.unique(batch['label'])) <= {4, 255}  # 0 -> ignore, 5 -> 4
  assert ds.meta_data['num_classes'] == 150 and ds.meta_data['class_names'][0] == 'wall'
  ev = next(ds.valid_iter)
  assert ev['label'].shape == (2, 20, 30)  # original resolution for scoring
  assert ev['inputs'].shape == (2, 512, 768, 3)  # short side 512 at the ADE20K test scale


def test_get_dataset_bad_arguments():
  with pytest.raises(ValueError, match='unknown dataset'):
    get_dataset('voc', batch_size=2, eval_batch_size=2)
  with pytest.raises(ValueError, match='unexpected arguments.*colour'):
    get_dataset('synthetic', batch_size=2, eval_batch_size=2, colour=1)
  with pytest.raises(ValueError, match='data_dir'):
    get_dataset('cityscapes', batch_size=2, eval_batch_size=2)


def _truncated_jpeg(path, size):
  """A JPEG cut in the middle of its pixel data (an interrupted copy): its header reads, its
  pixels do not."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(0).integers(0, 256, size + (3,), np.uint8)).save(path)
  data = path.read_bytes()
  path.write_bytes(data[: (data.index(b'\xff\xda') + len(data)) // 2])  # SOS marker .. end


def _one_line_naming(error, *parts):
  text = str(error.value)
  assert '\n' not in text and all(str(p) in text for p in parts), text
  return text


# Threads in this process, and a Grain worker process (`mp_prefetch`).
LOADER_SETTINGS = [dict(num_threads=0), dict(num_threads=2), dict(num_threads=1, num_workers=1)]


@pytest.mark.parametrize('settings', LOADER_SETTINGS)
def test_an_image_that_fails_to_load_is_named_by_the_segmentation_loaders(tmp_path, settings):
  for i in range(3):
    (tmp_path / 'masks').mkdir(exist_ok=True)
    Image.fromarray(np.full((32, 48), i, np.uint8)).save(tmp_path / 'masks' / f'{i}.png')
    if i != 1:
      (tmp_path / 'images').mkdir(exist_ok=True)
      Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / 'images' / f'{i}.png')
  bad = tmp_path / 'images/1.jpg'
  _truncated_jpeg(bad, (32, 48))
  folder = dict(train_images=str(tmp_path / 'images'), train_masks=str(tmp_path / 'masks'),
                val_images=str(tmp_path / 'images'), val_masks=str(tmp_path / 'masks'))
  train, evaluation, _ = build_loaders(
      'folder', batch_size=3, eval_batch_size=3, num_classes=3, crop_size=(8, 8),
      validate='headers', **folder, **settings)
  with pytest.raises(datasets.DatasetError) as error:
    next(iter(train))
  _one_line_naming(error, 'training example 1', bad, tmp_path / 'masks/1.png', 'truncated')
  with pytest.raises(datasets.DatasetError) as error:
    next(evaluation.iterate())
  _one_line_naming(error, 'evaluation example 1', bad, 'truncated')


@pytest.mark.parametrize('settings', LOADER_SETTINGS[1:])
def test_an_image_that_fails_to_load_is_named_by_the_detection_loaders(tmp_path, settings):
  import json

  from projects.cvt_detection.data import builder as detection

  infos = []
  for image_id in (1, 2, 3):
    name = f'{image_id}.jpg'
    if image_id == 2:
      _truncated_jpeg(tmp_path / name, (32, 32))
    else:
      Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name)
    infos.append({'id': image_id, 'file_name': name, 'height': 32, 'width': 32})
  ann = tmp_path / 'instances.json'
  boxes = [{'id': i, 'image_id': i, 'category_id': 1, 'bbox': [2, 2, 9, 9], 'area': 81,
            'iscrowd': 0} for i in (1, 2, 3)]
  ann.write_text(json.dumps({'images': infos, 'categories': [{'id': 1, 'name': 'thing'}],
                             'annotations': boxes}))
  coco = dict(train_annotations=str(ann), train_images=str(tmp_path), val_annotations=str(ann),
              val_images=str(tmp_path))
  train, evaluation, _ = detection.build_loaders(
      'coco_format', batch_size=3, eval_batch_size=3, scale=(16, 16), validate='headers',
      **coco, **settings)
  bad = tmp_path / '2.jpg'
  with pytest.raises(datasets.DatasetError) as error:
    next(iter(train))
  _one_line_naming(error, 'training example 1', bad, 'truncated')
  with pytest.raises(datasets.DatasetError) as error:
    next(evaluation.iterate())
  _one_line_naming(error, 'evaluation example 1', bad, 'truncated')


@pytest.mark.slow  # half a minute or more (a compile): left out by -m "not slow"
def test_a_training_run_names_the_file_it_cannot_load_in_one_line(tmp_path):
  # ADE20K's config loads with Grain worker processes; 'headers' validation lets the file
  # through, so the loader meets it after compilation.
  base = support.make_ade20k(tmp_path / 'data', size=(24, 32))
  bad = base / 'images/training/ADE_training_00000001.jpg'
  _truncated_jpeg(bad, (24, 32))
  config = tmp_path / 'headers_only.py'
  config.write_text(
      'from projects.cvt_segmentation.configs import ade20k_cvt13_upernet\n\n\n'
      'def get_config(arg=None):\n'
      '  config = ade20k_cvt13_upernet.get_config(arg)\n'
      '  with config.unlocked():\n'
      "    config.dataset_configs.validate = 'headers'\n"
      '  return config\n')
  error, _ = support.main_error(f'{config}:data_dir={base},runlocal', tmp_path / 'work')
  mask = base / 'annotations/training/ADE_training_00000001.png'
  assert error.startswith(f'error: cannot load training example 1 ({bad}, {mask}): OSError: '
                          'image file is truncated'), error
