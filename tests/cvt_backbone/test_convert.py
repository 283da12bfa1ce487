"""State_dict -> Flax conversion, architecture inference and the strict merge (convert.py)."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cvt_backbone import CvT, CvTBackbone, get_spec
from cvt_backbone.weights import convert as convert_lib
from cvt_backbone.weights.convert import CheckpointError, CheckpointMismatchError
from cvt_backbone.weights.converted import load_pretrained

from .hf_support import (
  TINY_CLASSES,
  build_hf_tiny,
  numpy_state_dict,
  to_official_names,
)


@pytest.fixture(scope='module')
def hf_tiny(tmp_path_factory):
  return build_hf_tiny(tmp_path_factory)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _assert_same_tree(a, b):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _abstract(model):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def _fresh(model, rng, name):
  """`init(rng)['params'][name]`, jitted without the forward pass (which is dead code)."""
  return jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)))['params'][name])(rng)


def _shape_only(tree):
  """Zero arrays with zero strides: the shapes of a large model without its memory."""
  return jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), tree)


@pytest.fixture(scope='module')
def tiny_sd(hf_tiny):
  return numpy_state_dict(hf_tiny[0])


def test_detect_naming(tiny_sd):
  assert convert_lib.detect_naming(tiny_sd) == 'hugging_face'
  # CvtModel alone saves without the 'cvt.' prefix.
  bare = {k.removeprefix('cvt.'): v for k, v in tiny_sd.items() if k.startswith('cvt.')}
  assert convert_lib.detect_naming(bare) == 'hugging_face'
  assert convert_lib.detect_naming(to_official_names(tiny_sd)) == 'official'
  assert convert_lib.detect_naming(convert_lib.convert_state_dict(tiny_sd)) == 'flax'


def test_official_names_convert_to_identical_variables(tiny_sd):
  from_hf = convert_lib.convert_state_dict(tiny_sd)
  official = to_official_names(tiny_sd)
  _assert_same_tree(from_hf, convert_lib.convert_state_dict(official))
  # DistributedDataParallel prefixes and training-checkpoint wrappers are unwrapped.
  ddp = {'module.' + k: v for k, v in official.items()}
  _assert_same_tree(from_hf, convert_lib.convert_state_dict({'state_dict': ddp, 'epoch': 3}))


def test_layouts(tiny_sd):
  variables = convert_lib.convert_state_dict(tiny_sd)
  params, stats = variables['params'], variables['batch_stats']
  hf = 'cvt.encoder.stages.'
  np.testing.assert_array_equal(  # Conv (O, I, kh, kw) -> (kh, kw, I, O).
      params['stage1']['patch_embed']['proj']['kernel'],
      tiny_sd[hf + '1.embedding.convolution_embeddings.projection.weight'].transpose(2, 3, 1, 0))
  layer = hf + '2.layers.1.attention.attention.'
  conv = params['stage2']['blocks_1']['attn']['conv_proj_k']
  assert conv['conv']['kernel'].shape == (3, 3, 1, 48)  # Depthwise (D, 1, 3, 3) -> (3, 3, 1, D).
  bn = layer + 'convolution_projection_key.convolution_projection.normalization.'
  np.testing.assert_array_equal(conv['bn']['scale'], tiny_sd[bn + 'weight'])
  bn_stats = stats['stage2']['blocks_1']['attn']['conv_proj_k']['bn']
  np.testing.assert_array_equal(bn_stats['mean'], tiny_sd[bn + 'running_mean'])
  np.testing.assert_array_equal(bn_stats['var'], tiny_sd[bn + 'running_var'])
  assert set(bn_stats) == {'mean', 'var'}  # num_batches_tracked dropped
  np.testing.assert_array_equal(  # Linear (out, in) -> (in, out).
      params['stage2']['blocks_1']['attn']['proj_v']['kernel'],
      tiny_sd[layer + 'projection_value.weight'].T)
  np.testing.assert_array_equal(params['stage2']['blocks_0']['mlp']['fc2']['kernel'],
                                tiny_sd[hf + '2.layers.0.output.dense.weight'].T)
  assert params['stage2']['cls_token'].shape == (1, 1, 48)
  np.testing.assert_array_equal(params['head']['kernel'], tiny_sd['classifier.weight'].T)
  np.testing.assert_array_equal(params['norm']['scale'], tiny_sd['layernorm.weight'])


@pytest.mark.parametrize('backbone', [False, True])
def test_tree_matches_the_model(tiny_sd, backbone):
  converted = convert_lib.convert_state_dict(tiny_sd, backbone=backbone)
  model = (CvTBackbone('cvt-tiny') if backbone
           else CvT.from_variant('cvt-tiny', num_classes=TINY_CLASSES))
  expected = {k: v.shape for k, v in _flat(_abstract(model)).items()}
  assert {k: v.shape for k, v in _flat(converted).items()} == expected


def test_idempotent(tiny_sd):
  once = convert_lib.convert_state_dict(tiny_sd)
  _assert_same_tree(once, convert_lib.convert_state_dict(once))
  _assert_same_tree(once, convert_lib.convert_state_dict(_flat(once)))
  backbone = convert_lib.convert_state_dict(once, backbone=True)
  assert 'head' not in backbone['params'] and 'norm' not in backbone['params']
  _assert_same_tree(backbone, convert_lib.convert_state_dict(tiny_sd, backbone=True))


def test_another_architecture_is_refused():
  resnet = {'conv1.weight': np.zeros((64, 3, 7, 7)), 'bn1.weight': np.zeros(64),
            'bn1.running_mean': np.zeros(64), 'layer1.0.conv1.weight': np.zeros((64, 64, 1, 1)),
            'fc.weight': np.zeros((1000, 2048))}
  with pytest.raises(CheckpointError, match='not a CvT state_dict') as error:
    convert_lib.convert_state_dict(resnet)
  assert 'conv1.weight' in str(error.value) and 'fc.weight' in str(error.value)


def test_unknown_keys_and_shapes_are_refused(tiny_sd):
  extra = dict(tiny_sd, **{'cvt.encoder.stages.0.pos_embed': np.zeros((1, 4, 16)),
                           'cvt.pooler.dense.weight': np.zeros((4, 4))})
  with pytest.raises(CheckpointError, match='Unexpected keys') as error:
    convert_lib.convert_state_dict(extra)
  assert 'pos_embed' in str(error.value) and 'pooler' in str(error.value)
  official = to_official_names(tiny_sd)
  official['stage0.blocks.0.attn.proj_q.weight'] = np.zeros((16, 16, 1, 1))
  with pytest.raises(CheckpointError, match=r'proj_q\.weight has shape \(16, 16, 1, 1\)'):
    convert_lib.convert_state_dict(official)
  mixed = dict(official, **{'cvt.encoder.stages.0.cls_token': np.zeros((1, 1, 16))})
  with pytest.raises(CheckpointError, match='mixes'):
    convert_lib.convert_state_dict(mixed)


def test_infer_architecture_tiny(tiny_sd):
  arch = convert_lib.infer_architecture(tiny_sd)
  assert arch.variant == 'cvt-tiny' and arch.spec == get_spec('cvt-tiny')
  assert (arch.num_classes, arch.has_norm, arch.in_chans) == (TINY_CLASSES, True, 3)
  backbone = convert_lib.infer_architecture(convert_lib.convert_state_dict(tiny_sd, backbone=True))
  assert backbone.variant == 'cvt-tiny' and backbone.num_classes == 0 and not backbone.has_norm


@pytest.mark.parametrize('variant', ['cvt-13', 'cvt-21', 'cvt-w24'])
def test_infer_architecture_official_variants(variant):
  tree = _shape_only(_abstract(CvT.from_variant(variant)))
  arch = convert_lib.infer_architecture(tree)
  assert arch.variant == variant and arch.num_classes == 1000


def test_infer_architecture_custom():
  # cvt-13 widths with 3 blocks in the last stage: heads follow the official width of 64.
  spec = dataclasses.replace(get_spec('cvt-13'), depths=(1, 2, 3))
  arch = convert_lib.infer_architecture(_shape_only(_abstract(CvTBackbone(spec=spec))))
  assert arch.variant is None and arch.name == 'custom'
  assert dataclasses.replace(arch.spec, drop_path_rates=spec.drop_path_rates) == spec
  # Widths that are not multiples of 64 need the heads.
  tiny = dataclasses.replace(get_spec('cvt-tiny'), depths=(1, 1, 3))
  tree = _shape_only(_abstract(CvTBackbone(spec=tiny)))
  with pytest.raises(CheckpointError, match='num_heads'):
    convert_lib.infer_architecture(tree)
  assert convert_lib.infer_architecture(tree, num_heads=(1, 2, 3)).spec.num_heads == (1, 2, 3)


def test_merge_names_every_problem(tiny_sd):
  model = CvT.from_variant('cvt-tiny', num_classes=TINY_CLASSES)
  converted = _flat(convert_lib.convert_state_dict(tiny_sd))
  del converted['params/stage1/blocks_0/norm2/scale']
  del converted['batch_stats/stage0/blocks_0/attn/conv_proj_v/bn/var']
  converted['params/stage1/blocks_0/attn/extra/kernel'] = np.zeros((2, 2), np.float32)
  converted['params/stage0/patch_embed/proj/bias'] = np.zeros(17, np.float32)
  with pytest.raises(CheckpointMismatchError) as error:
    convert_lib.merge_variables(_abstract(model), traverse_util.unflatten_dict(converted, '/'))
  message = str(error.value)
  assert 'missing from the checkpoint (2)' in message
  assert 'params/stage1/blocks_0/norm2/scale' in message
  assert 'batch_stats/stage0/blocks_0/attn/conv_proj_v/bn/var' in message
  assert 'unexpected in the checkpoint (1)' in message and 'attn/extra/kernel' in message
  assert 'params/stage0/patch_embed/proj/bias: (17,) vs (16,)' in message
  assert sorted(error.value.missing) == ['batch_stats/stage0/blocks_0/attn/conv_proj_v/bn/var',
                                         'params/stage1/blocks_0/norm2/scale']


def test_drop_head_for_another_class_count(tiny_sd):
  model = CvT.from_variant('cvt-tiny', num_classes=5)
  with pytest.raises(CheckpointMismatchError, match='drop_head=True') as error:
    load_pretrained(model, tiny_sd)
  assert 'params/head/kernel: (48, 10) vs (48, 5)' in str(error.value)
  fresh = _fresh(model, jax.random.key(3), 'head')
  variables = load_pretrained(model, tiny_sd, drop_head=True, rng=jax.random.key(3))
  np.testing.assert_array_equal(variables['params']['head']['kernel'], fresh['kernel'])
  np.testing.assert_array_equal(variables['params']['norm']['scale'], tiny_sd['layernorm.weight'])


def test_keep_or_discard_the_cls_token(tiny_sd):
  no_cls = dataclasses.replace(get_spec('cvt-tiny'), cls_token=(False, False, False))
  model = CvTBackbone(spec=no_cls)
  with pytest.raises(CheckpointMismatchError, match='keep_cls_token=False'):
    load_pretrained(model, tiny_sd)
  variables = load_pretrained(model, tiny_sd, keep_cls_token=False)
  assert 'cls_token' not in variables['params']['stage2']
  # A model with a cls token keeps its fresh one.
  model = CvTBackbone('cvt-tiny')
  fresh = _fresh(model, jax.random.key(0), 'stage2')
  variables = load_pretrained(model, tiny_sd, keep_cls_token=False)
  np.testing.assert_array_equal(variables['params']['stage2']['cls_token'], fresh['cls_token'])
  assert not np.array_equal(variables['params']['stage2']['cls_token'],
                            tiny_sd['cvt.encoder.stages.2.cls_token'])


def test_out_norm_stays_initialised_and_is_reported(tiny_sd, caplog):
  model = CvTBackbone('cvt-tiny', out_norm=True)
  with caplog.at_level(logging.WARNING):
    variables = load_pretrained(model, tiny_sd)
  assert 'out_norm_stage1' in caplog.text and 'fresh initialisation' in caplog.text
  np.testing.assert_array_equal(variables['params']['out_norm_stage3']['scale'], np.ones(48))
  converted = convert_lib.convert_state_dict(tiny_sd, backbone=True)
  _assert_same_tree(
      {k: v for k, v in variables['params'].items() if not k.startswith('out_norm')},
      converted['params'])


def test_variant_mismatch_names_both_variants():
  cvt13 = _shape_only(_abstract(CvT.from_variant('cvt-13')))
  with pytest.raises(CheckpointMismatchError, match='holds cvt-13 weights') as error:
    load_pretrained(CvTBackbone('cvt-21'), cvt13)
  assert 'the model is cvt-21' in str(error.value)
  assert 'depths: (1, 2, 10) vs (1, 4, 16)' in str(error.value)
