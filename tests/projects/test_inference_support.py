"""Tiny stand-in segmentation models and data for the inference, evaluate and predict tests.

Shared by test_inference.py, test_evaluate.py and test_predict.py (it holds no tests).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from projects.cvt_segmentation.inference import make_logits_fn


def write_synthetic_config(folder: Path, num_classes: int, *, num_eval: int = 3,
                           eval_fields: str = 'mode="whole"', extra: str = '',
                           name: str = 'config.py', test_scale=(40, 32)) -> str:
  """A config file for the synthetic dataset at 40x48; `get_config(arg)` takes num_eval."""
  path = Path(folder) / name
  path.write_text(textwrap.dedent(f'''
      import ml_collections

      def get_config(arg=None):
        config = ml_collections.ConfigDict()
        config.dataset_name = 'synthetic'
        config.dataset_configs = ml_collections.ConfigDict(dict(
            num_classes={num_classes}, image_size=(40, 48), num_train=2,
            num_eval=int(arg) if arg else {num_eval}, test_scale={tuple(test_scale)}))
        config.eval = ml_collections.ConfigDict(dict({eval_fields}))
        {extra}
        return config
  '''))
  return str(path)


class PointwiseModel(nn.Module):
  """A 1x1 convolution: every logit depends on its own pixel only (receptive field 1)."""

  num_classes: int

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train
    return nn.Conv(self.num_classes, (1, 1), name='classifier')(images)


class ContextModel(nn.Module):
  """A 3x3 convolution (not mirror-symmetric) plus a per-image global-mean term.

  Its logits depend on the whole image, so padding, window placement and flipping all
  change them: the model that gives the padding, slide and flip tests their teeth. It
  returns a dict, as `Segmentor` does.
  """

  num_classes: int
  min_input: int = 0  # like CvT, reject images smaller than this

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    del train
    if min(images.shape[1:3]) < self.min_input:
      raise ValueError(f'images must be at least {self.min_input} px, got {images.shape}')
    local = nn.Conv(self.num_classes, (3, 3), padding=1, name='local')(images)
    context = nn.Dense(self.num_classes, name='context')(images.mean(axis=(1, 2)))
    return {'logits': local + 3.0 * context[:, None, None, :]}


def init_model(module: nn.Module, seed: int = 0, channels: int = 3):
  """`(module, variables)` with random weights."""
  variables = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, channels)))
  return module, variables


def logits_fn_of(module: nn.Module, seed: int = 0):
  """`logits_fn` of a randomly initialised stand-in model."""
  return make_logits_fn(*init_model(module, seed))


def random_images(seed: int, shape) -> np.ndarray:
  """float32 normalized-looking images of `shape`."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


class ListSource:
  """An in-memory dataset source: `{'image': uint8 [H, W, 3], 'label': uint8 [H, W]}` items."""

  def __init__(self, sizes, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    self.items = []
    for k, (h, w) in enumerate(sizes):
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      label = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
      label[rng.random((h, w)) < 0.1] = 255
      self.items.append({'image': image, 'label': label, 'name': f'item_{k}'})
    self.num_classes = num_classes
    self.class_names = tuple(f'class_{i}' for i in range(num_classes))

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]
