"""Faulty inputs of `cvt-convert` and of the converted-file loaders (checkpoint.py)."""

import os
import re
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from cvt_backbone import CvTBackbone, load_backbone_weights
from cvt_backbone.weights import converted as checkpoint_lib
from cvt_backbone.weights.convert import CheckpointError

from .hf_support import (
    TINY,
    TINY_CLASSES,
    make_hf_classifier,
    save_hf,
    to_official_names,
    torch,
)


@pytest.fixture(scope='module')
def hf_model():
  return make_hf_classifier(TINY, TINY_CLASSES, seed=0)


@pytest.fixture(scope='module')
def official(hf_model):
  """The tiny classifier's state_dict with official names (torch tensors)."""
  return to_official_names(hf_model.state_dict())


@pytest.fixture(scope='module')
def good_pth(tmp_path_factory, official):
  path = tmp_path_factory.mktemp('good') / 'CvT-tiny.pth'
  torch.save(official, path)
  return path


@pytest.fixture(scope='module')
def good_msgpack(tmp_path_factory, good_pth):
  path = tmp_path_factory.mktemp('converted') / 'tiny.msgpack'
  checkpoint_lib.convert_checkpoint(good_pth, path)
  return path


def _convert(tmp_path, state_dict, capsys, *args):
  """Runs cvt-convert on `state_dict` saved as a .pth; returns (exit status, stderr)."""
  src = tmp_path / 'src.pth'
  torch.save(state_dict, src)
  status = checkpoint_lib.main([str(src), str(tmp_path / 'out.msgpack'), *args])
  return status, capsys.readouterr().err


def _reshaped(state_dict, key, shape):
  return dict(state_dict, **{key: state_dict[key].reshape(shape).clone()})


# ---------------------------------------------------------------------------
# Shapes checked before writing
# ---------------------------------------------------------------------------


def test_same_size_reshape_is_refused_and_nothing_written(tmp_path, official, capsys):
  key = 'stage1.blocks.0.attn.proj.weight'  # (32, 32) in cvt-tiny
  status, err = _convert(tmp_path, _reshaped(official, key, (64, 16)), capsys)
  assert status == 1
  assert (f'{key} (params/stage1/blocks_0/attn/proj/kernel): found (64, 16), '
          'expected (32, 32)') in err
  assert 'cvt-tiny' in err
  assert os.listdir(tmp_path) == ['src.pth']


@pytest.mark.parametrize('heads', [[], ['--num-heads', '1,2,3']])
def test_reshaped_patch_embedding_names_the_tensor_not_the_heads(tmp_path, official, capsys,
                                                                 heads):
  key = 'stage0.patch_embed.proj.weight'  # (16, 3, 7, 7)
  status, err = _convert(tmp_path, _reshaped(official, key, (16, 3, 49, 1)), capsys, *heads)
  assert status == 1
  assert (f'{key} (params/stage0/patch_embed/proj/kernel): found (16, 3, 49, 1), '
          'expected (16, 3, 7, 7)') in err
  assert '--num-heads' not in err
  assert os.listdir(tmp_path) == ['src.pth']


def test_reshaped_tensor_read_by_the_inference(tmp_path, official, capsys):
  # fc1 of the first block sets the MLP ratio; the other tensors still say cvt-tiny.
  key = 'stage0.blocks.0.mlp.fc1.weight'  # (64, 16)
  status, err = _convert(tmp_path, _reshaped(official, key, (16, 64)), capsys)
  assert status == 1
  assert f'{key} (params/stage0/blocks_0/mlp/fc1/kernel): found (16, 64), expected (64, 16)' in err
  assert 'fc2' not in err and '--num-heads' not in err


def test_hugging_face_names_are_reported(tmp_path, hf_model, capsys):
  state_dict = hf_model.state_dict()
  key = 'cvt.encoder.stages.2.layers.1.attention.output.dense.weight'  # (48, 48)
  state_dict = _reshaped(state_dict, key, (16, 144))
  folder = tmp_path / 'hf'
  folder.mkdir()
  from safetensors.torch import save_file
  save_file(state_dict, folder / 'model.safetensors')
  status = checkpoint_lib.main([str(folder), str(tmp_path / 'out.msgpack')])
  assert status == 1
  assert (f'{key} (params/stage2/blocks_1/attn/proj/kernel): found (16, 144), '
          'expected (48, 48)') in capsys.readouterr().err


def test_missing_tensor_is_refused(tmp_path, official, capsys):
  state_dict = dict(official)
  del state_dict['stage2.blocks.1.norm2.bias']
  status, err = _convert(tmp_path, state_dict, capsys)
  assert status == 1
  assert ('missing: stage2.blocks.1.norm2.bias (params/stage2/blocks_1/norm2/bias), '
          'expected (48,)') in err


def test_dropped_block_is_compared_with_the_closest_variant(tmp_path, official, capsys):
  state_dict = {k: v for k, v in official.items() if not k.startswith('stage2.blocks.1.')}
  status, err = _convert(tmp_path, state_dict, capsys)
  assert status == 1
  assert 'not its depths (1, 1, 1) (cvt-tiny: (1, 1, 2))' in err


def test_consistent_custom_architecture_still_converts(tmp_path, capsys):
  model = make_hf_classifier(dict(TINY, depth=[1, 1, 3]), TINY_CLASSES, seed=1)
  state_dict = to_official_names(model.state_dict())
  status, err = _convert(tmp_path, state_dict, capsys)
  assert status == 1 and '--num-heads' in err  # the heads are the only unknown
  status, _ = _convert(tmp_path, state_dict, capsys, '--num-heads', '1,2,3')
  assert status == 0
  backbone, variables = checkpoint_lib.load_backbone(tmp_path / 'out.msgpack')
  assert backbone.resolved_spec.depths == (1, 1, 3)
  assert variables['params']['stage2']['blocks_2']['mlp']['fc1']['kernel'].shape == (48, 192)


def test_converted_file_as_source(tmp_path, good_msgpack, capsys):
  assert checkpoint_lib.main([str(good_msgpack), str(tmp_path / 'again.msgpack')]) == 1
  assert 'already converted' in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------


def test_checksum_is_stored(good_msgpack):
  variables, metadata = checkpoint_lib.load_converted(good_msgpack)
  assert metadata['checksum'] == 'sha256:' + checkpoint_lib.variables_digest(variables)
  assert metadata['format_version'] == checkpoint_lib.FORMAT_VERSION


def test_zeroed_bytes_are_detected(tmp_path, good_msgpack, hf_model):
  data = bytearray(good_msgpack.read_bytes())
  head = hf_model.classifier.weight.detach().numpy().T.copy().tobytes()
  at = data.find(head)
  assert at > 0
  data[at + 8:at + 40] = bytes(32)
  damaged = tmp_path / 'damaged.msgpack'
  damaged.write_bytes(bytes(data))
  expected = (rf'{damaged}: checksum mismatch: the file is damaged; convert it again '
              r'\(cvt-convert CvT-tiny\.pth damaged\.msgpack --overwrite\)')
  for load in (checkpoint_lib.load_converted, checkpoint_lib.load_backbone,
               checkpoint_lib.load_classifier,
               lambda p: checkpoint_lib.load_pretrained(CvTBackbone('cvt-tiny'), p)):
    with pytest.raises(CheckpointError, match=expected):
      load(damaged)


@pytest.mark.parametrize('flag', ['--overwrite', '--force'])
def test_existing_output_is_kept_unless_overwrite(tmp_path, good_pth, capsys, flag):
  """--overwrite, as in the other tools; --force, its old name, still works."""
  out = tmp_path / 'tiny.msgpack'
  out.write_bytes(b'keep me')
  assert checkpoint_lib.main([str(good_pth), str(out)]) == 1
  err = capsys.readouterr().err
  assert f'cvt-convert: error: {out} exists; pass --overwrite' in err
  assert out.read_bytes() == b'keep me'
  assert checkpoint_lib.main([str(good_pth), str(out), flag]) == 0
  assert checkpoint_lib.load_converted(out)[1]['variant'] == 'cvt-tiny'
  assert os.listdir(tmp_path) == ['tiny.msgpack']


def test_help_shows_defaults_and_the_old_flag(capsys):
  with pytest.raises(SystemExit) as exit_info:
    checkpoint_lib.main(['--help'])
  assert exit_info.value.code == 0
  text = ' '.join(capsys.readouterr().out.split())
  assert '--overwrite, --force replace OUT if it exists (--force is the old name' in text
  assert 'Hugging Face runs) (default: quick_gelu)' in text
  assert '(default: inferred from them)' in text and 'exit status: 0 when OUT was written' in text
  assert '(default: None)' not in text and '(default: False)' not in text


def test_bad_num_heads_is_a_usage_error(tmp_path, good_pth, capsys):
  with pytest.raises(SystemExit) as exit_info:
    checkpoint_lib.main([str(good_pth), str(tmp_path / 'out.msgpack'), '--num-heads', '1,x,3'])
  assert exit_info.value.code == 2
  assert "--num-heads: expected positive integers separated by commas such as 1,3,6, got '1,x,3'" in (
      capsys.readouterr().err)


def test_files_without_checksum_still_load(tmp_path, good_msgpack):
  """A file written before the checksum (format version 1)."""
  variables, metadata = checkpoint_lib.load_converted(good_msgpack)
  metadata = {k: v for k, v in metadata.items() if k != 'checksum'}
  metadata['format_version'] = 1
  old = tmp_path / 'old.msgpack'
  old.write_bytes(serialization.msgpack_serialize({'variables': variables,
                                                   'metadata': metadata}))
  model, loaded = checkpoint_lib.load_backbone(old)
  assert model.variant == 'cvt-tiny'
  np.testing.assert_array_equal(loaded['params']['stage0']['patch_embed']['proj']['kernel'],
                                variables['params']['stage0']['patch_embed']['proj']['kernel'])


def test_version_2_without_checksum_is_refused(tmp_path, good_msgpack):
  variables, metadata = checkpoint_lib.load_converted(good_msgpack)
  del metadata['checksum']
  path = tmp_path / 'stripped.msgpack'
  path.write_bytes(serialization.msgpack_serialize({'variables': variables,
                                                    'metadata': metadata}))
  with pytest.raises(CheckpointError, match='stripped.msgpack: no checksum'):
    checkpoint_lib.load_converted(path)


def test_checksum_covers_names_dtypes_and_shapes():
  a = {'params': {'x': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  digest = checkpoint_lib.variables_digest
  assert digest(a) == digest({'params': {'x': jnp.asarray(a['params']['x'])}})
  assert digest(a) != digest({'params': {'y': a['params']['x']}})
  assert digest(a) != digest({'params': {'x': a['params']['x'].reshape(3, 2)}})
  assert digest(a) != digest({'params': {'x': a['params']['x'].view(np.int32)}})
  bf16 = {'params': {'x': jnp.ones((2, 2), jnp.bfloat16)}}
  assert digest(bf16) != digest({'params': {'x': jnp.ones((2, 2), jnp.float16)}})


def test_bfloat16_files_round_trip(tmp_path):
  backbone = CvTBackbone('cvt-tiny')
  shapes = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, jnp.bfloat16), shapes)
  path = tmp_path / 'bf16.msgpack'
  checkpoint_lib.save_converted(path, variables, {'variant': 'cvt-tiny'})
  loaded, _ = checkpoint_lib.load_converted(path)
  assert loaded['params']['stage0']['patch_embed']['proj']['kernel'].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------
# Released files where a converted file is expected
# ---------------------------------------------------------------------------


def test_pytorch_checkpoint_where_a_converted_file_is_expected(tmp_path, good_pth, hf_model):
  hf_folder = tmp_path / 'hf'
  safetensors = save_hf(hf_model, hf_folder)
  torch.save(hf_model.state_dict(), tmp_path / 'pytorch_model.bin')
  cases = {
      good_pth: 'is a PyTorch checkpoint',
      tmp_path / 'pytorch_model.bin': 'is a PyTorch checkpoint',
      safetensors: 'is a safetensors checkpoint',
      hf_folder: 'is a Hugging Face model folder',
  }
  for path, kind in cases.items():
    for load in (checkpoint_lib.load_converted, checkpoint_lib.load_backbone,
                 checkpoint_lib.load_classifier):
      with pytest.raises(CheckpointError) as error:
        load(path)
      message = str(error.value)
      assert f'{path} {kind}, not a converted file; convert it first: cvt-convert {path} ' in (
          message), message
      assert 'corrupt' not in message


def test_renamed_pytorch_checkpoint(tmp_path, good_pth, good_msgpack):
  renamed = tmp_path / 'weights.msgpack'
  shutil.copy(good_pth, renamed)
  with pytest.raises(CheckpointError, match='is a PyTorch checkpoint, not a converted file'):
    checkpoint_lib.load_backbone(renamed)
  # Loaders that take released files recognise it by its content, whatever its name.
  backbone = CvTBackbone('cvt-tiny')
  shapes = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  from_pth = load_backbone_weights(zeros, renamed, backbone, path=())
  from_msgpack = load_backbone_weights(zeros, good_msgpack, backbone, path=())
  flat_a = traverse_util.flatten_dict(from_pth, sep='/')
  flat_b = traverse_util.flatten_dict(from_msgpack, sep='/')
  assert sorted(flat_a) == sorted(flat_b)
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)



# ---------------------------------------------------------------------------
# An output is never one of the inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('flags', [[], ['--overwrite']])
def test_the_source_is_never_the_output(tmp_path, good_pth, hf_model, capsys, flags):
  """Not by its own path, another spelling of it, a symbolic or a hard link, nor a file the
  conversion reads beside the weights (a Hugging Face folder's config.json)."""
  src = tmp_path / 'CvT-tiny.pth'
  shutil.copy(good_pth, src)
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'link.pth').symlink_to(src)
  os.link(src, tmp_path / 'hard.pth')
  folder = tmp_path / 'hf'
  weights = save_hf(hf_model, folder)
  before = {p: p.read_bytes() for p in (src, weights, folder / 'config.json')}
  capsys.readouterr()  # save_pretrained's progress bar
  rule = 'an output never replaces an input, even with --overwrite; give another output path'
  cases = {
      (src, src): f'{src} is the source weights file: {rule}',
      (src, tmp_path / 'sub' / '..' / src.name):
          f'{tmp_path / "sub" / ".." / src.name} is the source weights file {src}: {rule}',
      (src, tmp_path / 'link.pth'): f'{tmp_path / "link.pth"} is the source weights file {src}: {rule}',
      (src, tmp_path / 'hard.pth'): f'{tmp_path / "hard.pth"} is the source weights file {src}: {rule}',
      (folder, weights): f'{weights} is the source weights file: {rule}',
      (folder, folder / 'config.json'):
          f'{folder / "config.json"} is the Hugging Face config of the source: {rule}',
  }
  for (source, out), message in cases.items():
    assert checkpoint_lib.main([str(source), str(out), *flags]) == 1
    assert capsys.readouterr().err.splitlines() == [f'cvt-convert: error: {message}']
  assert {p: p.read_bytes() for p in before} == before
  assert sorted(os.listdir(tmp_path)) == ['CvT-tiny.pth', 'hard.pth', 'hf', 'link.pth', 'sub']
  assert sorted(os.listdir(folder)) == ['config.json', 'model.safetensors']


# ---------------------------------------------------------------------------
# Other files: named by their content
# ---------------------------------------------------------------------------


def test_other_formats_are_named_not_called_corrupt(tmp_path, capsys):
  np.savez(tmp_path / 'weights.npz', a=np.zeros(3), b=np.ones(2))
  np.save(tmp_path / 'weights.npy', np.zeros(3))
  with zipfile.ZipFile(tmp_path / 'other.zip', 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  (tmp_path / 'model.h5').write_bytes(b'\x89HDF\r\n\x1a\n' + bytes(100))
  (tmp_path / 'notes.json').write_text('{"a": 1}\n')
  cases = {
      'weights.npz': 'is a NumPy .npz archive (arrays a, b)',
      'weights.npy': 'is a NumPy .npy array',
      'other.zip': 'is a zip archive without data.pkl (readme.txt)',
      'model.h5': 'is an HDF5 file (Keras or TensorFlow .h5)',
      'notes.json': 'is a text file',
  }
  for name, found in cases.items():
    path = tmp_path / name
    assert checkpoint_lib.main([str(path), str(tmp_path / 'out.msgpack')]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f'cvt-convert: error: {path} {found}, not a PyTorch checkpoint '
                          '(.pth, .bin) or a safetensors file'), err
    assert 'corrupt' not in err
    if name == 'weights.npz':  # What to do: a name -> array file that the converter reads.
      assert 'safetensors.numpy.save_file' in err
    with pytest.raises(CheckpointError, match=re.escape(f'{path} {found}, not a converted file')):
      checkpoint_lib.load_backbone(path)
  assert not (tmp_path / 'out.msgpack').exists()


def _training_workdir(root):
  for step in (4, 8):
    (root / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
  return root


def test_a_training_workdir_is_named_with_how_to_load_it(tmp_path):
  workdir = _training_workdir(tmp_path / 'run')
  for path in (workdir, workdir / 'checkpoints', workdir / 'checkpoints' / '8'):
    for load in (checkpoint_lib.load_converted, checkpoint_lib.load_backbone,
                 checkpoint_lib.load_classifier):
      with pytest.raises(CheckpointError) as error:
        load(path)
      message = str(error.value)
      assert message.startswith(f'{path} is a training ') and 'not a converted file' in message
      assert 'steps 4, 8' in message or 'step 8' in message, message
      assert 'restore_for_inference(config, ' in message and 'No converted' not in message
