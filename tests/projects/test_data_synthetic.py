"""The synthetic segmentation dataset: deterministic by seed, several classes, learnable."""

import numpy as np
import pytest

from projects.cvt_segmentation.data import SyntheticSegmentation, synthetic_class_names


def _same(a, b):
  return np.array_equal(a['image'], b['image']) and np.array_equal(a['label'], b['label'])


def test_deterministic_by_seed_and_split():
  a = SyntheticSegmentation(num_classes=5, image_size=(32, 40), num_examples=4, seed=3)
  b = SyntheticSegmentation(num_classes=5, image_size=(32, 40), num_examples=4, seed=3)
  c = SyntheticSegmentation(num_classes=5, image_size=(32, 40), num_examples=4, seed=4)
  v = SyntheticSegmentation(
      num_classes=5, image_size=(32, 40), num_examples=4, seed=3, split='validation'
  )
  assert all(_same(a[i], b[i]) for i in range(4))
  assert not any(_same(a[i], c[i]) for i in range(4))
  assert not any(_same(a[i], v[i]) for i in range(4))
  # Reading order does not matter (examples are pure functions of the index).
  assert _same(a[2], SyntheticSegmentation(num_classes=5, image_size=(32, 40), seed=3)[2])


@pytest.mark.parametrize('size', [(16, 16), (37, 53), (64, 48)])
def test_any_size_and_contract(size):
  ds = SyntheticSegmentation(num_classes=6, image_size=size, num_examples=3)
  ex = ds[0]
  assert ex['image'].shape == size + (3,) and ex['image'].dtype == np.uint8
  assert ex['label'].shape == size and ex['label'].dtype == np.uint8
  assert ex['label'].max() < 6
  assert len(ds) == 3
  with pytest.raises(IndexError):
    ds[3]


def test_several_classes_present():
  ds = SyntheticSegmentation(num_classes=6, image_size=(32, 32), num_examples=16)
  counts = sum(np.bincount(ds[i]['label'].ravel(), minlength=6) for i in range(16))
  assert (counts > 0).all(), counts  # background and all five shape classes
  assert counts[0] / counts.sum() < 0.9  # objects are not a sliver of the image
  names = ('background', 'disc', 'rectangle', 'triangle', 'ellipse', 'ring')
  assert synthetic_class_names(6) == names
  assert synthetic_class_names(10)[8] == 'disc_2'  # shapes repeat after seven


def test_learnable_from_local_colour():
  # A nearest-class-mean colour classifier fitted on train pixels must already segment
  # held-out images well: a small network with a 4x4-stride stem can learn it fast.
  k = 6
  train = SyntheticSegmentation(num_classes=k, image_size=(32, 32), num_examples=20)
  val = SyntheticSegmentation(
      num_classes=k, image_size=(32, 32), num_examples=8, split='validation'
  )
  x = np.concatenate([train[i]['image'].reshape(-1, 3) for i in range(20)]).astype(np.float32)
  y = np.concatenate([train[i]['label'].ravel() for i in range(20)])
  means = np.stack([x[y == c].mean(0) for c in range(k)])
  xv = np.concatenate([val[i]['image'].reshape(-1, 3) for i in range(8)]).astype(np.float32)
  yv = np.concatenate([val[i]['label'].ravel() for i in range(8)])
  pred = np.argmin(((xv[:, None] - means[None]) ** 2).sum(-1), 1)
  assert (pred == yv).mean() > 0.9


def test_bad_arguments():
  with pytest.raises(ValueError, match='num_classes'):
    SyntheticSegmentation(num_classes=1)
  with pytest.raises(ValueError, match='image_size'):
    SyntheticSegmentation(image_size=(4, 64))
  with pytest.raises(ValueError, match='split'):
    SyntheticSegmentation(split='val')
