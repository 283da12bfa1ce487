"""FPN: output names, sizes and metadata, extra levels, and numerics against a PyTorch FPN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_backbone.weights.convert import merge_variables, torch_to_flax
from heads import FPN

# Stage maps of a 97x131 input (CvT sizes: floor((n+1)/4), then ceil halving).
SHAPES = {'stage1': (24, 33), 'stage2': (12, 17), 'stage3': (6, 9)}
CHANNELS = {'stage1': 8, 'stage2': 12, 'stage3': 20}


def _features(seed: int = 0):
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.standard_normal((2, *SHAPES[name], CHANNELS[name])),
                            jnp.float32) for name in SHAPES}


@pytest.mark.parametrize('num_extra_levels,extra_type,extra_source', [
    (0, 'maxpool', 'output'), (1, 'maxpool', 'output'), (2, 'conv', 'input'),
    (2, 'conv', 'output')])
def test_output_names_sizes_and_feature_info(num_extra_levels, extra_type, extra_source):
  fpn = FPN(out_channels=16, num_extra_levels=num_extra_levels, extra_type=extra_type,
            extra_source=extra_source, relu_before_extra_convs=True)
  features = _features()
  outputs, _ = fpn.init_with_output(jax.random.key(0), features)
  expected_names = ['p2', 'p3', 'p4', 'p5', 'p6'][:3 + num_extra_levels]
  assert list(outputs) == expected_names
  # Extra levels are ceil(H / 2) of the level before, like the backbone's own stages.
  sizes = list(SHAPES.values()) + [(3, 5), (2, 3)]
  for name, size in zip(expected_names, sizes[:len(expected_names)], strict=True):
    assert outputs[name].shape == (2, *size, 16), name
  assert fpn.feature_info == [
      {'name': name, 'num_chs': 16, 'reduction': 4 * 2 ** i}
      for i, name in enumerate(expected_names)]


def test_extra_conv_source_decides_the_first_extra_conv_input_channels():
  on_input = FPN(out_channels=16, num_extra_levels=1, extra_type='conv', extra_source='input')
  on_output = on_input.clone(extra_source='output')
  features = _features()

  def kernel(fpn):
    return fpn.init(jax.random.key(0), features)['params']['extra_convs_0']['conv']['kernel']

  assert kernel(on_input).shape == (3, 3, 20, 16)
  assert kernel(on_output).shape == (3, 3, 16, 16)


@pytest.mark.parametrize('norm', ['none', 'batch', 'group', 'layer'])
def test_norm_choice_and_conv_bias(norm):
  params = FPN(out_channels=16, norm=norm).init(jax.random.key(0), _features())['params']
  lateral = params['lateral_convs_0']
  # A conv followed by a norm has no bias: the norm's shift makes it redundant.
  assert ('bias' in lateral['conv']) == (norm == 'none')
  if norm != 'none':
    assert f'{norm}_norm' in lateral


def test_config_errors_name_the_problem():
  features = _features()
  with pytest.raises(ValueError, match="extra_source='input'"):
    FPN(num_extra_levels=1, extra_type='maxpool', extra_source='input').init(
        jax.random.key(0), features)
  with pytest.raises(ValueError, match='powers of two'):
    FPN(in_strides=(4, 8, 12)).init(jax.random.key(0), features)
  with pytest.raises(ValueError, match='in_strides'):
    FPN(in_strides=(4, 8)).init(jax.random.key(0), features)
  with pytest.raises(ValueError, match='upsample_mode'):
    FPN(upsample_mode='cubic').init(jax.random.key(0), features)


@pytest.mark.parametrize('upsample_mode', ['nearest', 'bilinear'])
def test_matches_a_pytorch_fpn(upsample_mode):
  """Against the FPN of mmdet/torchvision, written out in PyTorch with the same module names."""
  torch = pytest.importorskip('torch')
  nn = torch.nn
  names = list(SHAPES)
  torch.manual_seed(0)
  reference = nn.ModuleDict({
      'lateral_convs': nn.ModuleList(
          [nn.ModuleDict({'conv': nn.Conv2d(CHANNELS[n], 16, 1)}) for n in names]),
      'fpn_convs': nn.ModuleList(
          [nn.ModuleDict({'conv': nn.Conv2d(16, 16, 3, padding=1)}) for _ in names]),
      'extra_convs': nn.ModuleList(
          [nn.ModuleDict({'conv': nn.Conv2d(16, 16, 3, stride=2, padding=1)})]),
  })
  features = _features(seed=1)
  inputs = [torch.from_numpy(np.asarray(features[n]).transpose(0, 3, 1, 2).copy())
            for n in names]
  with torch.no_grad():
    laterals = [m['conv'](x) for m, x in zip(reference['lateral_convs'], inputs, strict=True)]
    for i in range(len(laterals) - 1, 0, -1):
      kwargs = {} if upsample_mode == 'nearest' else {'align_corners': False}
      laterals[i - 1] = laterals[i - 1] + nn.functional.interpolate(
          laterals[i], size=laterals[i - 1].shape[2:], mode=upsample_mode, **kwargs)
    outs = [m['conv'](x) for m, x in zip(reference['fpn_convs'], laterals, strict=True)]
    # One extra level of each kind: mmdet's 3x3 stride-2 conv on the output (RetinaNet P6)
    # and the 1x1 stride-2 max-pool of Faster R-CNN's P6.
    with_conv = outs + [reference['extra_convs'][0]['conv'](outs[-1])]
    with_pool = outs + [nn.functional.max_pool2d(outs[-1], 1, stride=2)]

  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  for extra_type, expected in (('conv', with_conv), ('maxpool', with_pool)):
    fpn = FPN(out_channels=16, upsample_mode=upsample_mode, extra_type=extra_type,
              num_extra_levels=1)
    init = fpn.init(jax.random.key(0), features)
    converted = torch_to_flax({k: v for k, v in state.items()
                               if extra_type == 'conv' or not k.startswith('extra')})
    ours = fpn.apply(merge_variables(init, converted)[0], features)
    assert len(ours) == len(expected) == 4
    for name, want in zip(ours, expected, strict=True):
      np.testing.assert_allclose(np.asarray(ours[name]), want.numpy().transpose(0, 2, 3, 1),
                                 atol=1e-5, err_msg=name)
