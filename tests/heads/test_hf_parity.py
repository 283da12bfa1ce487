"""Numerical parity with the Hugging Face heads, weights copied across (float32, 1e-4).

References: `UperNetHead` and `UperNetFCNHead` (transformers/models/upernet/modeling_upernet.py)
and `SegformerDecodeHead` (transformers/models/segformer/modeling_segformer.py), in eval mode
with randomised BatchNorm statistics so the norms are not identities. Sizes are those of real
backbone maps for non-square inputs that are not multiples of 32 (97x131 -> 24x33/12x17/6x9,
250 -> 62/31/16/8), where adaptive pooling bins overlap and resizes are not 2x.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cvt_backbone.weights.convert import merge_variables
from heads import FCNHead, SegFormerHead, UPerNetHead
from heads.segformer import convert_hf_segformer_head
from heads.upernet import convert_hf_fcn_head, convert_hf_upernet_head

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TOLERANCE = 1e-4

LEVEL_SHAPES = {
    '97x131': [(24, 33), (12, 17), (6, 9)],
    '250x250 4 levels': [(62, 62), (31, 31), (16, 16), (8, 8)],
}
CHANNELS = (8, 12, 20, 24)


pytestmark = pytest.mark.usefixtures('highest_precision')


def _randomize_norms(module, seed: int) -> None:
  """Gives every BatchNorm random affine parameters and running statistics."""
  generator = torch.Generator().manual_seed(seed)
  for layer in module.modules():
    if isinstance(layer, torch.nn.BatchNorm2d):
      n = layer.num_features
      with torch.no_grad():
        layer.weight.copy_(1 + 0.3 * torch.randn(n, generator=generator))
        layer.bias.copy_(0.3 * torch.randn(n, generator=generator))
        layer.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
        layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def _features(shapes, channels, seed: int):
  rng = np.random.default_rng(seed)
  nhwc = [rng.standard_normal((2, h, w, c)).astype(np.float32)
          for (h, w), c in zip(shapes, channels, strict=True)]
  nchw = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) for x in nhwc]
  names = [f'stage{i + 1}' for i in range(len(shapes))]
  return dict(zip(names, nhwc, strict=True)), names, nchw


def _numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _compare(flax_module, converted, features, reference_nchw) -> float:
  # Only the structure is needed to check the converted weights: no random init to overwrite.
  shapes = jax.eval_shape(flax_module.init, jax.random.key(0), features)
  variables, _ = merge_variables(shapes, converted)
  ours = np.asarray(jax.jit(flax_module.apply)(variables, features))
  reference = reference_nchw.detach().numpy().transpose(0, 2, 3, 1)
  assert ours.shape == reference.shape
  diff = float(np.abs(ours - reference).max())
  print(f'{type(flax_module).__name__}: max abs diff {diff:.3g} (logit scale '
        f'{np.abs(reference).max():.3g})')
  return diff


def _upernet_config(**kwargs):
  return transformers.UperNetConfig(
      hidden_size=32, pool_scales=[1, 2, 3, 6], num_labels=5, auxiliary_channels=16,
      **kwargs)


def _run_reference(reference, shapes, channels):
  """The reference with randomised norm statistics on random features of `shapes`."""
  _randomize_norms(reference, seed=1)
  features, names, nchw = _features(shapes, channels, seed=2)
  with torch.no_grad():
    return features, names, reference(nchw)


@pytest.mark.parametrize('sizes', list(LEVEL_SHAPES))
def test_upernet_head_matches_hugging_face(sizes):
  from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

  shapes = LEVEL_SHAPES[sizes]
  channels = CHANNELS[:len(shapes)]
  torch.manual_seed(0)
  reference = HFUperNetHead(_upernet_config(), in_channels=list(channels)).eval()
  features, names, expected = _run_reference(reference, shapes, channels)
  head = UPerNetHead(num_classes=5, in_features=names, in_channels=channels, channels=32)
  converted = convert_hf_upernet_head(_numpy_state_dict(reference), prefix='')
  assert _compare(head, converted, features, expected) < TOLERANCE


@pytest.mark.parametrize('num_convs,concat_input', [(1, False), (2, True)])
def test_fcn_head_matches_hugging_face(num_convs, concat_input):
  from transformers.models.upernet.modeling_upernet import UperNetFCNHead

  shapes = LEVEL_SHAPES['97x131']
  channels = CHANNELS[:3]
  config = _upernet_config(auxiliary_num_convs=num_convs, auxiliary_concat_input=concat_input)
  torch.manual_seed(0)
  reference = UperNetFCNHead(config, in_channels=list(channels), in_index=2).eval()
  features, _, expected = _run_reference(reference, shapes, channels)
  head = FCNHead(num_classes=5, in_features=('stage3',), in_channels=(channels[2],),
                 channels=16, num_convs=num_convs, concat_input=concat_input)
  converted = convert_hf_fcn_head(_numpy_state_dict(reference), prefix='')
  assert _compare(head, converted, features, expected) < TOLERANCE


@pytest.mark.parametrize('sizes', list(LEVEL_SHAPES))
def test_segformer_head_matches_hugging_face(sizes):
  from transformers.models.segformer.modeling_segformer import SegformerDecodeHead

  shapes = LEVEL_SHAPES[sizes]
  channels = CHANNELS[:len(shapes)]
  config = transformers.SegformerConfig(
      num_encoder_blocks=len(shapes), hidden_sizes=list(channels), decoder_hidden_size=16,
      num_labels=5)
  torch.manual_seed(0)
  reference = SegformerDecodeHead(config).eval()
  features, names, expected = _run_reference(reference, shapes, channels)
  head = SegFormerHead(num_classes=5, in_features=names, in_channels=channels, channels=16)
  converted = convert_hf_segformer_head(_numpy_state_dict(reference), prefix='')
  assert _compare(head, converted, features, expected) < TOLERANCE


def test_conversion_of_a_full_model_state_dict_uses_the_prefix():
  from transformers.models.upernet.modeling_upernet import UperNetHead as HFUperNetHead

  reference = HFUperNetHead(_upernet_config(), in_channels=[8, 12, 20])
  state = {f'decode_head.{k}': v for k, v in _numpy_state_dict(reference).items()}
  state['backbone.embeddings.weight'] = np.zeros((3, 3, 1, 1), np.float32)
  converted = convert_hf_upernet_head(state)
  assert set(converted) == {'params', 'batch_stats'}
  assert set(converted['params']) == {
      'psp_modules_0', 'psp_modules_1', 'psp_modules_2', 'psp_modules_3', 'bottleneck',
      'lateral_convs_0', 'lateral_convs_1', 'fpn_convs_0', 'fpn_convs_1', 'fpn_bottleneck',
      'classifier'}


def test_merge_lists_missing_and_unexpected_keys():
  head = SegFormerHead(num_classes=5, channels=16)
  features, _, _ = _features(LEVEL_SHAPES['97x131'], CHANNELS[:3], seed=0)
  init = jax.eval_shape(head.init, jax.random.key(0), features)
  converted = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, x.dtype), dict(init))
  del converted['params']['classifier']
  converted['params']['extra_layer'] = {'kernel': np.zeros((1,), np.float32)}
  converted['params']['linear_fuse']['kernel'] = np.zeros((1, 1, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    merge_variables(init, converted)
  message = str(error.value)
  assert 'params/classifier/kernel' in message
  assert 'params/extra_layer/kernel' in message
  assert 'params/linear_fuse/kernel' in message
