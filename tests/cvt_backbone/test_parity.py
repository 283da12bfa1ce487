"""Parity of converted weights with the reference, Hugging Face `CvtForImageClassification`.

Random weights with non-trivial norms and BatchNorm statistics, saved with
`save_pretrained` and loaded through the public loaders. Logits and the three
stage maps must agree within 1e-4 (float32, matmul precision 'highest', set in
tests/conftest.py) at 224x224, 250x250, 384x384 and 225x301. Hugging Face runs
exact GELU, so the Flax models here use activation='gelu'.

The weights are drawn wider than the Hugging Face default (std 0.02): with small
weights attention is nearly uniform and an error in the attention scale changes
the tiny model's logits by only 5e-5, below the tolerance. With the stds used
here that error is 1.7 (tiny) and 0.3 (CvT-13) while conversion stays below 1e-5.
"""

import copy

import jax
import numpy as np
import pytest

from cvt_backbone import CvT, CvTBackbone
from cvt_backbone.cvt import CvTStage
from cvt_backbone.weights import convert as convert_lib
from cvt_backbone.weights.converted import load_pretrained

from .hf_support import (
  TINY,
  TINY_CLASSES,
  make_hf_classifier,
  numpy_state_dict,
  save_hf,
  to_official_names,
  torch,
)

SIZES = [(224, 224), (250, 250), (384, 384), (225, 301)]
TOLERANCE = 1e-4
CVT13 = dict(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 2, 10])


def _images(size, seed=0):
  """`[1, 3, H, W]` float32 (NCHW for torch; transposed for Flax)."""
  return np.random.default_rng(seed).standard_normal((1, 3, *size)).astype(np.float32)


def _nhwc(x):
  return x.transpose(0, 2, 3, 1)


def _hf_forward(model, images):
  """Logits `[1, C]` and the three stage maps in NHWC."""
  with torch.no_grad():
    out = model(torch.from_numpy(images), output_hidden_states=True)
  return out.logits.numpy(), [_nhwc(h.numpy()) for h in out.hidden_states]


def _classifier_forward(model):
  """Jitted `(variables, images) -> (logits, [stage maps])`: one compile gives both."""

  @jax.jit
  def forward(variables, images):
    logits, state = model.apply(variables, images,
                                capture_intermediates=lambda m, _: isinstance(m, CvTStage))
    stages = state['intermediates']
    return logits, [stages[f'stage{i}']['__call__'][0][0] for i in range(3)]

  return forward


def _max_diffs(maps, ref_maps, logits=None, ref_logits=None):
  """Max abs differences per output: {'logits': ..., 'stage1': ..., ...}."""
  diffs = {}
  if logits is not None:
    diffs['logits'] = float(np.abs(np.asarray(logits) - ref_logits).max())
  for i, (ours, ref) in enumerate(zip(maps, ref_maps, strict=True)):
    assert ours.shape == ref.shape, (i, ours.shape, ref.shape)
    diffs[f'stage{i + 1}'] = float(np.abs(np.asarray(ours) - ref).max())
  return diffs


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  hf = make_hf_classifier(TINY, TINY_CLASSES, seed=1, initializer_range=0.2)
  path = save_hf(hf, tmp_path_factory.mktemp('parity_tiny'))
  classifier = CvT.from_variant('cvt-tiny', num_classes=TINY_CLASSES, activation='gelu')
  backbone = CvTBackbone('cvt-tiny', activation='gelu')
  return dict(hf=hf, path=path, classifier=_classifier_forward(classifier),
              classifier_vars=load_pretrained(classifier, path),
              backbone=jax.jit(backbone.apply), backbone_vars=load_pretrained(backbone, path))


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_tiny_parity(tiny, size):
  images = _images(size)
  ref_logits, ref_maps = _hf_forward(tiny['hf'], images)
  logits, maps = tiny['classifier'](tiny['classifier_vars'], _nhwc(images))
  diffs = _max_diffs(maps, ref_maps, logits, ref_logits)
  features = tiny['backbone'](tiny['backbone_vars'], _nhwc(images))
  backbone = _max_diffs([features[f'stage{i}'] for i in (1, 2, 3)], ref_maps)
  print(f'tiny {size}: classifier {diffs}, backbone {backbone}')
  assert max(diffs.values()) < TOLERANCE, diffs
  assert max(backbone.values()) < TOLERANCE, backbone


class QuickGELU(torch.nn.Module):
  """The official activation (microsoft/CvT cls_cvt.py)."""

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


def test_activation_field_is_honoured(tiny):
  """Each activation matches the reference running it and not the other one."""
  official = copy.deepcopy(tiny['hf'])
  for stage in official.cvt.encoder.stages:
    for layer in stage.layers:
      layer.intermediate.activation = QuickGELU()
  images = _images((64, 96), seed=3)
  references = {'gelu': _hf_forward(tiny['hf'], images)[0],
                'quick_gelu': _hf_forward(official, images)[0]}
  for activation in ('gelu', 'quick_gelu'):
    model = CvT.from_variant('cvt-tiny', num_classes=TINY_CLASSES, activation=activation)
    logits = np.asarray(jax.jit(model.apply)(tiny['classifier_vars'], _nhwc(images)))
    for reference, ref_logits in references.items():
      diff = np.abs(logits - ref_logits).max()
      if reference == activation:
        assert diff < TOLERANCE, (activation, diff)
      else:
        assert diff > 100 * TOLERANCE, (activation, reference, diff)


@pytest.fixture(scope='module')
def cvt13(tmp_path_factory):
  hf = make_hf_classifier(CVT13, 1000, seed=2, initializer_range=0.05)
  path = save_hf(hf, tmp_path_factory.mktemp('parity_cvt13'))
  model = CvT.from_variant('cvt-13', num_classes=1000, activation='gelu')
  return dict(hf=hf, path=path, forward=_classifier_forward(model),
              variables=load_pretrained(model, path))


@pytest.mark.slow
@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_cvt13_parity(cvt13, size):
  images = _images(size, seed=1)
  ref_logits, ref_maps = _hf_forward(cvt13['hf'], images)
  logits, maps = cvt13['forward'](cvt13['variables'], _nhwc(images))
  diffs = _max_diffs(maps, ref_maps, logits, ref_logits)
  print(f'cvt-13 {size}: {diffs}')
  assert max(diffs.values()) < TOLERANCE, diffs


@pytest.mark.slow
def test_cvt13_backbone_and_official_names(cvt13):
  state_dict = numpy_state_dict(cvt13['hf'])
  from_hf = convert_lib.convert_state_dict(state_dict)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_hf,
                         convert_lib.convert_state_dict(to_official_names(state_dict)))
  backbone = CvTBackbone('cvt-13', activation='gelu')
  variables = load_pretrained(backbone, cvt13['path'])
  images = _images((224, 224), seed=1)
  _, ref_maps = _hf_forward(cvt13['hf'], images)
  features = jax.jit(backbone.apply)(variables, _nhwc(images))
  diffs = _max_diffs([features[f'stage{i}'] for i in (1, 2, 3)], ref_maps)
  print(f'cvt-13 backbone (224, 224): {diffs}')
  assert max(diffs.values()) < TOLERANCE, diffs
