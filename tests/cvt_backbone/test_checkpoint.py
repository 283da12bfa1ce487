"""Weight-file readers, the `cvt-convert` tool, the converted format and the loaders."""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cvt_backbone import CvT, CvTBackbone, CvTSpec, get_spec
from cvt_backbone.weights import convert as convert_lib
from cvt_backbone.weights import converted as checkpoint_lib
from cvt_backbone.weights import readers
from cvt_backbone.weights.convert import CheckpointError, CheckpointMismatchError

from .hf_support import (
  TINY_CLASSES,
  build_hf_tiny,
  numpy_state_dict,
  to_official_names,
  torch,
)

safetensors_torch = pytest.importorskip('safetensors.torch')

IMAGES = np.random.default_rng(0).standard_normal((2, 40, 56, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def hf_tiny(tmp_path_factory):
  return build_hf_tiny(tmp_path_factory)


def _assert_same(a, b):
  a, b = traverse_util.flatten_dict(a, sep='/'), traverse_util.flatten_dict(b, sep='/')
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _torch_to_numpy(t):
  t = t.detach()
  if t.dtype == torch.bfloat16:
    return t.float().numpy()
  return t.numpy()


def _mixed_tensors():
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=gen)
  return {
      'f32': torch.randn(3, 4, generator=gen),
      'f16': torch.randn(7, generator=gen).half(),
      'bf16': torch.randn(2, 3, generator=gen).bfloat16(),
      'f64': torch.randn(2, 2, generator=gen).double(),
      'i64': torch.arange(5),
      'i32': torch.arange(4, dtype=torch.int32),
      'u8': torch.arange(3, dtype=torch.uint8),
      'bool': torch.tensor([True, False, True]),
      'scalar': torch.tensor(7),
      'empty': torch.zeros(0, 3),
      'conv': torch.randn(4, 3, 2, 2, generator=gen),
      'base': base,
  }


# ---------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------


def test_safetensors_reader_matches_the_package(tmp_path, hf_tiny):
  tensors = {k: v for k, v in _mixed_tensors().items() if k != 'base'}
  path = tmp_path / 'mixed.safetensors'
  safetensors_torch.save_file(tensors, path)
  ours = readers.read_safetensors(path)
  reference = safetensors_torch.load_file(path)
  assert sorted(ours) == sorted(reference)
  for key, value in reference.items():
    assert ours[key].shape == tuple(value.shape), key
    np.testing.assert_array_equal(ours[key].astype(_torch_to_numpy(value).dtype),
                                  _torch_to_numpy(value), err_msg=key)
  assert ours['bf16'].dtype == jnp.bfloat16
  # The Hugging Face file, against the package's numpy reader.
  _, hf_path = hf_tiny
  from safetensors.numpy import load_file
  _assert_same(readers.read_state_dict(hf_path), load_file(hf_path))


def test_torch_zip_reader_matches_torch_load(tmp_path):
  tensors = _mixed_tensors()
  base = tensors.pop('base')
  saved = {
      'state_dict': dict(
          tensors,
          transposed=base.t(),  # non-contiguous view
          row=base[2],  # a view at an offset, sharing base's storage
          base=base,
          param=torch.nn.Parameter(torch.ones(3))),
      'epoch': 3,
      'name': 'run-1',
  }
  path = tmp_path / 'mixed.pth'
  torch.save(saved, path)
  ours = readers.read_torch_checkpoint(path)
  reference = torch.load(path, weights_only=True)
  assert ours['epoch'] == 3 and ours['name'] == 'run-1'
  assert sorted(ours['state_dict']) == sorted(reference['state_dict'])
  for key, value in reference['state_dict'].items():
    got = ours['state_dict'][key]
    assert isinstance(got, np.ndarray) and got.shape == tuple(value.shape), key
    np.testing.assert_array_equal(got.astype(_torch_to_numpy(value).dtype),
                                  _torch_to_numpy(value), err_msg=key)


def test_legacy_torch_pickle_goes_through_torch(tmp_path, hf_tiny):
  state_dict = hf_tiny[0].state_dict()
  path = tmp_path / 'legacy.pth'
  torch.save(state_dict, path, _use_new_zipfile_serialization=False)
  _assert_same(readers.read_state_dict(path), numpy_state_dict(hf_tiny[0]))


def test_readers_work_without_torch(tmp_path, hf_tiny):
  """In a process where `import torch` fails: zip and safetensors read, legacy explains."""
  model, safetensors_path = hf_tiny
  zip_path, legacy_path = tmp_path / 'model.pth', tmp_path / 'legacy.pth'
  torch.save(model.state_dict(), zip_path)
  torch.save(model.state_dict(), legacy_path, _use_new_zipfile_serialization=False)
  script = textwrap.dedent(f"""
      import sys
      sys.modules['torch'] = None  # import torch now raises ImportError
      from cvt_backbone.weights.readers import read_state_dict
      from cvt_backbone.weights.convert import CheckpointError
      a = read_state_dict({str(zip_path)!r})
      b = read_state_dict({str(safetensors_path)!r})
      assert sorted(a) == sorted(b) and all((a[k] == b[k]).all() for k in a)
      try:
        read_state_dict({str(legacy_path)!r})
      except CheckpointError as e:
        print(e)
      """)
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'pip install torch' in result.stdout and 'legacy.pth' in result.stdout


def test_pickled_code_is_refused(tmp_path):
  path = tmp_path / 'with_args.pth'
  torch.save({'w': torch.zeros(2), 'args': argparse.Namespace(lr=0.1)}, path)
  with pytest.raises(CheckpointError, match=r'argparse\.Namespace is not allowed'):
    readers.read_state_dict(path)


def _corrupt_copies(folder: Path, source: Path, suffix: str, flip_at: int) -> list[Path]:
  data = source.read_bytes()
  flipped = bytearray(data)
  flipped[flip_at] ^= 0xFF
  copies = {'truncated': data[:len(data) // 2], 'head_only': data[:20], 'empty': b'',
            'flipped': bytes(flipped), 'garbage': b'not a checkpoint at all' * 10}
  paths = []
  for name, content in copies.items():
    path = folder / f'{name}{suffix}'
    path.write_bytes(content)
    paths.append(path)
  return paths


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_corrupt_files_give_clear_errors(tmp_path, hf_tiny, suffix):
  model, source = hf_tiny
  if suffix == '.pth':
    source = tmp_path / 'good.pth'
    torch.save(model.state_dict(), source)
  # A byte inside the classifier weights' data.
  flip_at = source.read_bytes().find(model.classifier.weight.detach().numpy().tobytes()) + 5
  for path in _corrupt_copies(tmp_path, source, suffix, flip_at):
    if path.name.startswith('flipped') and suffix == '.safetensors':
      # safetensors has no checksum: a changed value reads as a value.
      readers.read_state_dict(path)
      continue
    with pytest.raises(CheckpointError) as error:
      readers.read_state_dict(path)
    assert path.name in str(error.value), path.name
  with pytest.raises(FileNotFoundError, match='missing'):
    readers.read_state_dict(tmp_path / 'missing.pth')


# ---------------------------------------------------------------------------
# cvt-convert
# ---------------------------------------------------------------------------


def test_console_script_is_declared():
  (entry,) = importlib.metadata.entry_points(group='console_scripts', name='cvt-convert')
  assert entry.value == 'cvt_backbone.weights.converted:main'


def test_cli_writes_variables_and_metadata(tmp_path, hf_tiny, capsys):
  model, src = hf_tiny
  out = tmp_path / 'tiny.msgpack'
  assert checkpoint_lib.main([str(src), str(out)]) == 0
  assert 'cvt-tiny' in capsys.readouterr().out
  variables, metadata = checkpoint_lib.load_converted(out)
  _assert_same(variables, convert_lib.convert_state_dict(numpy_state_dict(model)))
  assert metadata['variant'] == 'cvt-tiny' and metadata['activation'] == 'quick_gelu'
  assert CvTSpec.from_dict(metadata['spec']) == get_spec('cvt-tiny')
  assert metadata['num_classes'] == TINY_CLASSES and not metadata['backbone_only']
  assert metadata['source'] == {'file': 'model.safetensors', 'naming': 'hugging_face',
                                'sha256': hashlib.sha256(src.read_bytes()).hexdigest()}
  assert os.listdir(tmp_path) == ['tiny.msgpack']  # no temporary file left


@pytest.mark.parametrize('naming', ['official', 'hugging_face'])
def test_cli_reads_pth_and_bin(tmp_path, hf_tiny, naming):
  model, src = hf_tiny
  state_dict = model.state_dict()
  if naming == 'official':
    state_dict = to_official_names(state_dict)
  pth = tmp_path / ('CvT-tiny.pth' if naming == 'official' else 'pytorch_model.bin')
  torch.save(state_dict, pth)
  assert checkpoint_lib.main([str(pth), str(tmp_path / 'a.msgpack')]) == 0
  assert checkpoint_lib.main([str(src), str(tmp_path / 'b.msgpack')]) == 0
  a, meta = checkpoint_lib.load_converted(tmp_path / 'a.msgpack')
  b, _ = checkpoint_lib.load_converted(tmp_path / 'b.msgpack')
  _assert_same(a, b)
  assert meta['source']['naming'] == naming and meta['source']['file'] == pth.name


def test_cli_hf_folder_and_cvtmodel(tmp_path, hf_tiny):
  model, src = hf_tiny
  # A folder: its model.safetensors (and config.json) are used.
  assert checkpoint_lib.main([str(src.parent), str(tmp_path / 'a.msgpack')]) == 0
  assert checkpoint_lib.load_converted(tmp_path / 'a.msgpack')[1]['source']['file'] == src.name
  # `CvtModel` alone (keys without 'cvt.', no classifier) converts to a backbone.
  model.cvt.save_pretrained(tmp_path / 'cvtmodel')
  assert checkpoint_lib.main([str(tmp_path / 'cvtmodel'), str(tmp_path / 'b.msgpack')]) == 0
  variables, metadata = checkpoint_lib.load_converted(tmp_path / 'b.msgpack')
  assert metadata['backbone_only'] and metadata['num_classes'] == 0
  _assert_same(variables, convert_lib.convert_state_dict(numpy_state_dict(model), backbone=True))
  with pytest.raises(CheckpointError, match='backbone-only'):
    checkpoint_lib.load_classifier(tmp_path / 'b.msgpack')


def test_cli_refuses_to_overwrite_without_force(tmp_path, hf_tiny, capsys):
  _, src = hf_tiny
  out = tmp_path / 'tiny.msgpack'
  out.write_bytes(b'keep me')
  assert checkpoint_lib.main([str(src), str(out)]) == 1
  assert '--overwrite' in capsys.readouterr().err and out.read_bytes() == b'keep me'
  assert checkpoint_lib.main([str(src), str(out), '--force']) == 0
  assert checkpoint_lib.load_converted(out)[1]['variant'] == 'cvt-tiny'
  assert os.listdir(tmp_path) == ['tiny.msgpack']


def test_cli_bad_inputs_leave_no_output(tmp_path, hf_tiny, capsys):
  _, src = hf_tiny
  out = tmp_path / 'out.msgpack'
  # Output folder missing.
  assert checkpoint_lib.main([str(src), str(tmp_path / 'nowhere' / 'x.msgpack')]) == 1
  assert 'does not exist' in capsys.readouterr().err
  # A variant other than the file's.
  assert checkpoint_lib.main([str(src), str(out), '--variant', 'cvt-13']) == 1
  assert 'holds cvt-tiny weights, not cvt-13' in capsys.readouterr().err.replace(
      ' (dims (16, 32, 48), depths (1, 1, 2), heads (1, 2, 3))', '')
  # Another architecture.
  resnet = tmp_path / 'resnet.safetensors'
  safetensors_torch.save_file({'conv1.weight': torch.zeros(4, 3, 7, 7),
                               'fc.weight': torch.zeros(10, 4)}, resnet)
  assert checkpoint_lib.main([str(resnet), str(out)]) == 1
  err = capsys.readouterr().err
  assert 'not a CvT state_dict' in err and 'conv1.weight' in err
  # Truncated source.
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes(src.read_bytes()[:5000])
  assert checkpoint_lib.main([str(truncated), str(out)]) == 1
  assert 'truncated.safetensors: truncated or corrupt' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['resnet.safetensors', 'truncated.safetensors']


def test_interrupted_write_leaves_nothing(tmp_path, hf_tiny, monkeypatch):
  _, src = hf_tiny
  out = tmp_path / 'tiny.msgpack'

  def fail(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoint_lib.os, 'replace', fail)
  with pytest.raises(KeyboardInterrupt):
    checkpoint_lib.convert_checkpoint(src, out)
  assert os.listdir(tmp_path) == []


def test_corrupt_converted_file(tmp_path, hf_tiny):
  _, src = hf_tiny
  out = tmp_path / 'tiny.msgpack'
  checkpoint_lib.convert_checkpoint(src, out)
  broken = tmp_path / 'broken.msgpack'
  broken.write_bytes(out.read_bytes()[:3000])
  with pytest.raises(CheckpointError, match='broken.msgpack: truncated or corrupt'):
    checkpoint_lib.load_backbone(broken)


# ---------------------------------------------------------------------------
# Loaders and round trip
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def converted(tmp_path_factory, hf_tiny):
  """The tiny checkpoint converted three ways."""
  _, src = hf_tiny
  folder = tmp_path_factory.mktemp('converted')
  paths = {'full': folder / 'full.msgpack', 'backbone': folder / 'backbone.msgpack',
           'headless': folder / 'headless.msgpack'}
  checkpoint_lib.convert_checkpoint(src, paths['full'])
  checkpoint_lib.convert_checkpoint(src, paths['backbone'], backbone_only=True)
  checkpoint_lib.convert_checkpoint(src, paths['headless'], drop_head=True)
  return paths


def test_round_trip_classifier(tmp_path, hf_tiny, converted):
  _, src = hf_tiny
  model, variables = checkpoint_lib.load_classifier(converted['full'])
  assert model.activation == 'quick_gelu' and model.num_classes == TINY_CLASSES
  direct = checkpoint_lib.load_pretrained(model, src)  # the released file, no msgpack
  _assert_same(variables, direct)
  renamed = tmp_path / 'weights.bin'  # recognised by content, not by suffix
  shutil.copy(converted['full'], renamed)
  _assert_same(variables, checkpoint_lib.load_pretrained(model, renamed))
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(variables, IMAGES), apply(direct, IMAGES))


def test_round_trip_backbone(hf_tiny, converted):
  _, src = hf_tiny
  model, variables = checkpoint_lib.load_backbone(converted['full'])
  assert model.variant == 'cvt-tiny' and model.activation == 'quick_gelu'
  from_backbone_file = checkpoint_lib.load_backbone(converted['backbone'])[1]
  direct = checkpoint_lib.load_pretrained(model, src)
  _assert_same(variables, direct)
  _assert_same(variables, from_backbone_file)
  apply = jax.jit(model.apply)
  out, ref = apply(variables, IMAGES), apply(direct, IMAGES)
  assert list(out) == ['stage1', 'stage2', 'stage3']
  for name in out:
    np.testing.assert_array_equal(out[name], ref[name])


def test_backbone_options_and_out_norm(converted, caplog):
  with caplog.at_level(logging.WARNING):
    model, variables = checkpoint_lib.load_backbone(
        converted['backbone'], out_norm=True, out_features=('stage3',), activation='gelu')
  assert 'out_norm_stage3' in caplog.text
  assert model.activation == 'gelu' and model.out_names == ('stage3',)
  assert 'out_norm_stage3' in variables['params']


def test_classifier_head_options(converted):
  with pytest.raises(CheckpointError, match='backbone-only'):
    checkpoint_lib.load_classifier(converted['backbone'])
  with pytest.raises(CheckpointError, match='pass num_classes'):
    checkpoint_lib.load_classifier(converted['headless'])
  model, variables = checkpoint_lib.load_classifier(converted['headless'], num_classes=5)
  assert variables['params']['head']['kernel'].shape == (48, 5)
  with pytest.raises(CheckpointMismatchError, match='drop_head=True'):
    checkpoint_lib.load_classifier(converted['full'], num_classes=5)
  model, variables = checkpoint_lib.load_classifier(converted['full'], num_classes=5,
                                                    drop_head=True)
  assert variables['params']['head']['kernel'].shape == (48, 5)


def test_metadata_is_checked_against_the_model(converted):
  with pytest.raises(CheckpointMismatchError, match='holds cvt-tiny weights') as error:
    checkpoint_lib.load_pretrained(CvTBackbone('cvt-13'), converted['full'])
  assert 'the model is cvt-13' in str(error.value)
  # Heads are invisible in the shapes; the metadata still tells them apart.
  spec = get_spec('cvt-tiny')
  other_heads = CvTBackbone(spec=dataclasses.replace(spec, num_heads=(1, 1, 1)))
  with pytest.raises(CheckpointMismatchError, match=r'num_heads: \(1, 2, 3\) vs \(1, 1, 1\)'):
    checkpoint_lib.load_pretrained(other_heads, converted['full'])


def test_activation_is_recorded_and_checked(tmp_path, hf_tiny):
  _, src = hf_tiny
  out = tmp_path / 'gelu.msgpack'
  assert checkpoint_lib.main([str(src), str(out), '--activation', 'gelu']) == 0
  model, _ = checkpoint_lib.load_backbone(out)
  assert model.activation == 'gelu'
  assert checkpoint_lib.load_classifier(out)[0].activation == 'gelu'
  with pytest.warns(UserWarning, match="converted for activation 'gelu'"):
    checkpoint_lib.load_pretrained(CvTBackbone('cvt-tiny'), out)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    checkpoint_lib.load_pretrained(CvTBackbone('cvt-tiny', activation='gelu'), out)


def test_quick_gelu_is_the_default():
  assert CvT().activation == 'quick_gelu' and CvTBackbone().activation == 'quick_gelu'
  assert CvT.from_variant('cvt-tiny').activation == 'quick_gelu'
