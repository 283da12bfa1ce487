"""Feature extraction: attention planning, the `cvt-extract` command and its Python API."""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from cvt_backbone.cvt import CvTBackbone, get_spec
from cvt_backbone.kernels import attention as attention_lib
from cvt_backbone.weights import converted as checkpoint_lib
from projects.feature_extraction import extract, images, planning, writers
from projects.feature_extraction.planning import MemoryBudgetError, plan_attention
from projects.training import images as read_images

VARIANT = 'cvt-tiny'
REPO = Path(__file__).resolve().parents[2]


def _random_variables(backbone, seed=0):
  """Random values of the right shapes, without compiling `init` (about 10 s on CPU)."""
  shapes = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(shapes, sep='/').items():
    if path.endswith('/var'):
      flat[path] = rng.uniform(0.5, 1.5, leaf.shape)
    elif path.endswith('/scale'):
      flat[path] = 1 + 0.1 * rng.standard_normal(leaf.shape)
    else:
      flat[path] = 0.2 * rng.standard_normal(leaf.shape)
  flat = {k: v.astype(np.float32) for k, v in flat.items()}
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.fixture(scope='module')
def backbone_and_variables():
  backbone = CvTBackbone(variant=VARIANT)
  return backbone, _random_variables(backbone)


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, backbone_and_variables):
  _, variables = backbone_and_variables
  path = tmp_path_factory.mktemp('ckpt') / 'tiny.msgpack'
  metadata = {
      'variant': VARIANT,
      'spec': get_spec(VARIANT).to_dict(),
      'activation': 'quick_gelu',
      'num_classes': 0,
      'backbone_only': True,
      'in_chans': 3,
      'source': {'file': 'random', 'sha256': '', 'naming': 'flax'},
      'converter': 'test',
  }
  checkpoint_lib.save_converted(path, variables, metadata)
  return str(path)


def _save(path, height, width, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path)
  return path


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Two sizes (64x80 twice, 48x56 in a sub-folder), a truncated PNG and a text file."""
  root = tmp_path_factory.mktemp('images')
  _save(root / 'a.png', 64, 80, 0)
  _save(root / 'b.png', 64, 80, 1)
  _save(root / 'sub' / 'c.png', 48, 56, 2)
  data = (root / 'a.png').read_bytes()
  (root / 'corrupt.png').write_bytes(data[:len(data) // 2])
  (root / 'notes.txt').write_text('not an image\n')
  return root


def _run(*argv):
  """`(exit status, stderr)` of the command, run in this process."""
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = extract.main([str(a) for a in argv] + ['--no-progress'])
  return status, err.getvalue()


@pytest.fixture(scope='module')
def folder_run(tmp_path_factory, checkpoint, image_folder):
  out = tmp_path_factory.mktemp('out') / 'features'
  status, err = _run('--checkpoint', checkpoint, '--output', out, '--pca', '--dtype', 'float16',
                     '--batch-size', '2', image_folder)
  return status, err, out


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def test_plan_plain_when_the_logits_fit():
  plan = plan_attention(224, 224, 8, 2048, 'cvt-13')
  assert plan.implementation == 'plain' and plan.chunk_size is None
  # 8 images x 3,136 queries x 784 keys, float32, three softmax buffers.
  assert plan.estimated_bytes > 3 * 4 * 8 * 3136 * 784


@pytest.mark.parametrize('height,width,budget_mb,chunk', [
    # CvT-13 stage 1 at 1024x1024: 65,536 queries x 16,384 keys, 3 x 64 KiB per query.
    (1024, 1024, 2048, 10922),
    # 1024x2048: 131,072 x 32,768 (16 GiB of logits in full), 3 x 128 KiB per query.
    (1024, 2048, 2048, 5461),
    (1024, 2048, 100, 266),
])
def test_plan_chunks_large_images(height, width, budget_mb, chunk):
  plan = plan_attention(height, width, 1, budget_mb, 'cvt-13')
  assert plan == (plan.implementation, plan.chunk_size, plan.estimated_bytes)
  assert plan.implementation == 'chunked'
  assert plan.chunk_size == chunk
  # The backbone's own sizing of chunks agrees.
  stage1 = planning.stage_attention(get_spec('cvt-13'), height, width)[0]
  assert plan.chunk_size == attention_lib.chunk_size_for_budget(
      1, stage1.heads, stage1.kv_len, int(budget_mb * 2**20))
  assert stage1.working_bytes(1, plan.chunk_size) <= budget_mb * 2**20
  assert stage1.working_bytes(1, plan.chunk_size + 1) > budget_mb * 2**20


def test_stage_attention_sizes():
  spec = get_spec('cvt-13')
  stages = planning.stage_attention(spec, 1024, 2048)
  assert [(s.q_len, s.kv_len, s.heads) for s in stages] == [
      (256 * 512, 128 * 256, 1), (128 * 256, 64 * 128, 3), (64 * 128 + 1, 32 * 64 + 1, 6)]
  assert attention_lib.logits_bytes(1, 1, stages[0].q_len, stages[0].kv_len) == 16 * 2**30


def test_budget_too_small_names_the_chunk_size():
  with pytest.raises(MemoryBudgetError) as info:
    plan_attention(1024, 2048, 1, 10, 'cvt-13')
  e = info.value
  assert (e.allowed_chunk_size, e.needed_chunk_size, e.needed_budget_mb) == (26, 64, 24)
  assert 'chunks of 26 queries' in str(e) and 'chunks of 64 queries' in str(e)
  assert 'at least 24 MiB' in str(e)


def test_forced_chunk_over_budget_names_the_allowed_chunk():
  with pytest.raises(MemoryBudgetError, match=r'use a chunk size of 5,461') as info:
    plan_attention(1024, 1024, 1, 1024, 'cvt-13', chunk_size=20000)
  assert info.value.allowed_chunk_size == 5461
  assert plan_attention(1024, 1024, 1, 1024, 'cvt-13', chunk_size=5461).chunk_size == 5461
  # A forced chunk may go under the automatic minimum.
  assert plan_attention(1024, 1024, 1, 1, 'cvt-13', chunk_size=5).chunk_size == 5


@pytest.mark.parametrize('implementation', ['plain', 'fused'])
def test_forced_plain_over_budget(implementation):
  with pytest.raises(MemoryBudgetError, match=r'needs 12\.0 GiB.*at least 12288 MiB'):
    plan_attention(1024, 1024, 1, 2048, 'cvt-13', implementation=implementation)
  assert plan_attention(1024, 1024, 1, 12288, 'cvt-13',
                        implementation=implementation).implementation == implementation


@pytest.mark.parametrize('kwargs', [
    dict(implementation='flash'), dict(chunk_size=0), dict(implementation='plain', chunk_size=8),
    dict(budget_mb=0),
])
def test_plan_rejects_bad_settings(kwargs):
  args = dict(height=64, width=64, batch=1, budget_mb=64, spec='cvt-13') | kwargs
  with pytest.raises(ValueError):
    plan_attention(**args)


def test_batches_are_halved_to_fit(backbone_and_variables):
  extractor = extract.FeatureExtractor(*backbone_and_variables, memory_budget_mb=0.06)
  # 64x80: 320 stage-1 queries over 80 keys, 960 B per query and image: chunks of 64
  # queries need 120 KiB for 2 images, 60 KiB for one; 0.06 MiB holds 65 queries of one.
  batch, plan = extract._batch_plan(extractor, 64, 80, 4)
  assert batch == 1 and plan.implementation == 'chunked' and plan.chunk_size == 65


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------


def test_chunked_attention_equals_plain(backbone_and_variables):
  backbone, variables = backbone_and_variables
  image = np.random.default_rng(3).integers(0, 256, (128, 160, 3), dtype=np.uint8)
  plain = extract.extract_features(backbone, variables, image, attention='plain')
  # 100 does not divide the 1,280 stage-1 queries: the last chunk is padded.
  chunked = extract.extract_features(backbone, variables, image, chunk_size=100,
                                     memory_budget_mb=1)
  assert sorted(plain) == ['stage1', 'stage2', 'stage3']
  for name, shape in backbone.output_shapes(128, 160).items():
    assert plain[name].shape == chunked[name].shape == shape
    np.testing.assert_allclose(chunked[name], plain[name], rtol=0, atol=1e-5, err_msg=name)


def test_image_reading(tmp_path):
  grey16 = np.array([[0, 65535], [32768, 1000]], np.uint16).repeat(8, 0).repeat(8, 1)
  Image.fromarray(grey16).save(tmp_path / 'scan.png')
  pixels = images.read_image(str(tmp_path / 'scan.png'))
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
  np.testing.assert_allclose(pixels[0, 8], 255.0)
  np.testing.assert_allclose(pixels[8, 0], 32768 * 255 / 65535, rtol=1e-6)
  # EXIF orientation 6 (rotate 90 degrees): a 20x30 file shows as 30x20.
  im = Image.new('RGB', (30, 20), (10, 20, 30))
  exif = im.getexif()
  exif[0x0112] = 6
  im.save(tmp_path / 'rotated.jpg', exif=exif)
  assert read_images.displayed_size(str(tmp_path / 'rotated.jpg')) == (30, 20)
  assert images.read_image(str(tmp_path / 'rotated.jpg')).shape == (30, 20, 3)
  assert images.target_size(3000, 1000, 1024) == (1024, 341)
  assert images.target_size(300, 100, 1024) == (300, 100)  # Never enlarged.
  normalized = images.normalize(np.full((1, 1, 3), 255.0))
  np.testing.assert_allclose(normalized[0, 0], (1 - np.array(images.IMAGENET_MEAN))
                             / np.array(images.IMAGENET_STD), rtol=1e-6)


def test_pca_rgb():
  rng = np.random.default_rng(0)
  # A map whose first principal direction separates the left and right halves.
  features = 0.001 * rng.standard_normal((6, 8, 5)).astype(np.float32)
  features[:, 4:, 0] += 1.0
  rgb = writers.pca_rgb(features)
  assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
  # The largest loading (channel 0) is made positive: the right half is the bright one.
  assert rgb[:, :4, 0].max() < 10 and rgb[:, 4:, 0].min() > 245
  # A constant map (no variance) gives a black picture, not NaNs.
  assert not writers.pca_rgb(np.ones((2, 3, 4), np.float32)).any()


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------


def test_outputs_per_good_image(folder_run, backbone_and_variables):
  status, err, out = folder_run
  backbone, _ = backbone_and_variables
  expected = {'a': (64, 80), 'b': (64, 80), os.path.join('sub', 'c'): (48, 56)}
  found = sorted(str(p.relative_to(out)) for p in out.rglob('*.npz'))
  assert found == sorted(f'{stem}.npz' for stem in expected)
  for stem, (height, width) in expected.items():
    features = writers.read_features(str(out / f'{stem}.npz'))
    assert {k: v.shape for k, v in features.items()} == backbone.output_shapes(height, width)
    assert all(v.dtype == np.float16 and np.isfinite(v).all() for v in features.values())
    for stage, stride in zip(('stage1', 'stage2', 'stage3'), (4, 8, 16), strict=True):
      h, w = features[stage].shape[:2]
      with Image.open(out / f'{stem}_{stage}_pca.png') as im:
        assert (im.mode, im.size) == ('RGB', (w * stride, h * stride))
  # The truncated PNG has a valid 64x80 header: it fails when decoded, not when probed.
  assert '3 images at 64x80, batch 2: plain attention' in err
  assert '1 image at 48x56, batch 1: plain attention' in err


def test_bad_files_are_reported_and_skipped(folder_run, image_folder):
  status, err, _ = folder_run
  assert status == 1
  assert f'skipped {image_folder / "notes.txt"}: not an image file' in err
  assert f'skipped {image_folder / "corrupt.png"}: unreadable image' in err
  assert '3 feature files written' in err and '2 failed' in err


def test_strict_fails_before_any_work(tmp_path, checkpoint, image_folder):
  status, err = _run('--checkpoint', checkpoint, '--output', tmp_path / 'out', '--strict',
                     image_folder)
  assert status == 1
  assert f'error: {image_folder / "notes.txt"}: not an image file' in err
  assert not list((tmp_path / 'out').iterdir())


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, checkpoint, image_folder):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'a.npz').write_bytes(b'old')
  (out / 'b.npz').write_bytes(b'old')
  status, err = _run('--checkpoint', checkpoint, '--output', out, image_folder / 'a.png',
                     image_folder / 'b.png')
  assert status == 1  # Files cvt-extract did not write are kept, and their inputs fail.
  assert (f'skipped {image_folder / "a.png"}: {out / "a.npz"}: incomplete or unreadable .npz '
          'file (3 bytes') in err and '--overwrite' in err
  assert (out / 'a.npz').read_bytes() == (out / 'b.npz').read_bytes() == b'old'
  status, err = _run('--checkpoint', checkpoint, '--output', out, '--overwrite',
                     image_folder / 'a.png')
  assert status == 0
  assert writers.read_features(str(out / 'a.npz'))['stage1'].shape == (16, 20, 16)
  assert (out / 'b.npz').read_bytes() == b'old'
  assert not [p for p in out.iterdir() if p.name.startswith('.')]  # No temporary files left.


def test_unwritable_output_fails_before_any_work(tmp_path, image_folder):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  # The checkpoint does not exist: the output folder is checked first.
  status, err = _run('--checkpoint', tmp_path / 'missing.msgpack', '--output', blocker / 'out',
                     image_folder)
  assert status == 1
  assert f'cannot create the output folder {blocker / "out"}' in err
  status, err = _run('--checkpoint', tmp_path / 'missing.msgpack', '--output', blocker,
                     image_folder)
  assert status == 1 and f'the output folder {blocker} exists and is not a folder' in err


def test_budget_too_small_fails_before_any_work(tmp_path, checkpoint, image_folder):
  out = tmp_path / 'out'
  status, err = _run('--checkpoint', checkpoint, '--output', out, '--memory-budget-mb', '0.01',
                     image_folder / 'a.png')
  assert status == 1
  # 64x80: 320 stage-1 queries over 80 keys, 960 B per query: 10 fit in 0.01 MiB.
  assert 'too small for 64x80 images' in err
  assert 'the budget allows chunks of 10 queries' in err and 'chunks of 64 queries' in err
  assert not list(out.iterdir())


def test_safetensors_max_side_and_name_clashes(tmp_path, checkpoint, backbone_and_variables):
  first = _save(tmp_path / 'x' / 'tile.png', 64, 80, 5)
  second = _save(tmp_path / 'y' / 'tile.png', 64, 80, 6)
  out = tmp_path / 'out'
  status, err = _run('--checkpoint', checkpoint, '--output', out, '--format', 'safetensors',
                     '--max-side', '40', '--stages', 'stage1,stage3', first, second)
  assert status == 0, err
  assert f"writing {second} as 'tile_2'" in err
  backbone, variables = backbone_and_variables
  shapes = backbone.clone(out_features=('stage1', 'stage3')).output_shapes(32, 40)
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  for stem, source in (('tile', first), ('tile_2', second)):
    path = str(out / f'{stem}.safetensors')
    tensors, metadata = writers.read_safetensors(path)
    assert {k: v.shape for k, v in tensors.items()} == shapes
    assert metadata['source'] == str(source) and metadata['input_size'] == '32x40'
    assert metadata['original_size'] == '64x80'
    reference = safetensors_numpy.load_file(path)
    for name, value in tensors.items():
      assert value.dtype == np.float32
      np.testing.assert_array_equal(reference[name], value)
  # The command and the API agree (same reading, resizing and normalization).
  with Image.open(first) as im:
    api = extract.extract_features(backbone, variables, np.asarray(im), max_side=40,
                                   stages=['stage1', 'stage3'])
  tensors, _ = writers.read_safetensors(str(out / 'tile.safetensors'))
  for name in api:
    np.testing.assert_allclose(tensors[name], api[name], rtol=0, atol=1e-5)


def test_max_side_below_the_smallest_input_is_a_usage_error(capsys):
  """No image can be shrunk to 8 pixels and still be read by CvT: refused before any work."""
  with pytest.raises(SystemExit) as exit_info:
    extract.parse_args(['--random-weights', '--output', 'out', 'a.png', '--max-side', '8'])
  assert exit_info.value.code == 2
  assert ("argument --max-side: expected an integer of at least 16 (pixels), got '8'"
          in capsys.readouterr().err)


def test_an_image_too_small_after_max_side_names_both_sizes(tmp_path, checkpoint,
                                                             backbone_and_variables):
  strip = _save(tmp_path / 'strip.png', 16, 64, 0)
  status, err = _run('--checkpoint', checkpoint, '--output', tmp_path / 'out', '--max-side', '32',
                     strip)
  assert status == 1
  message = '16x64 pixels, shrunk to 8x32 (max side 32); CvT needs at least 16x16'
  assert f'skipped {strip}: {message}' in err
  backbone, variables = backbone_and_variables
  with pytest.raises(read_images.ImageError, match=re.escape(f'the image: {message}')):
    extract.extract_features(backbone, variables, np.zeros((16, 64, 3)), max_side=32)


def test_python_m_entry_point():
  result = subprocess.run([sys.executable, '-m', 'projects.feature_extraction', '--help'],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert '--memory-budget-mb' in result.stdout and '--chunk-size' in result.stdout


# ---------------------------------------------------------------------------
# Help and progress
# ---------------------------------------------------------------------------


def _help(capsys):
  with pytest.raises(SystemExit) as exit_info:
    extract.parse_args(['--help'])
  assert exit_info.value.code == 0
  return ' '.join(capsys.readouterr().out.split())  # Without the line wrapping.


def test_help_shows_defaults_and_the_shared_flags(capsys):
  from projects.tools import command_line

  text = _help(capsys)
  for default in ('--batch-size BATCH_SIZE images of the same size per forward pass (halved '
                  'when the memory budget needs it) (default: 1)', 'format (default: npz)',
                  'chunk size (default: 2048', '(default: cvt-13)', '(default: all)'):
    assert default in text, default
  reference = command_line.parser('x', 'x')
  command_line.add_output_flags(reference)
  for action in reference._actions[1:]:  # --overwrite, --strict, --no-progress: same words.
    assert ' '.join(action.help.split()) in text, action.option_strings
  assert ' '.join(command_line.EXIT_EPILOG.split()) in text


def test_stages_are_a_comma_list(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    extract.parse_args(['--random-weights', '--output', str(tmp_path), 'x.png',
                        '--stages', 'stage1,,stage3'])
  assert exit_info.value.code == 2
  assert "expected names separated by commas such as stage1,stage3, got 'stage1,,stage3'" in (
      capsys.readouterr().err)
  assert extract.parse_args(['--random-weights', '--output', str(tmp_path), 'x.png',
                             '--stages', 'stage1,stage3']).stages == ('stage1', 'stage3')


def test_progress_per_image_and_attention_chunk_in_a_log(tmp_path, checkpoint, image_folder,
                                                          monkeypatch):
  """stderr is not a terminal: timed lines (every line here, at a 0 s interval)."""
  monkeypatch.setenv('CVT_PROGRESS_INTERVAL', '0')
  common = ['--checkpoint', checkpoint, '--attention', 'chunked', '--chunk-size', '64',
            image_folder / 'a.png', image_folder / 'sub' / 'c.png']
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = extract.main([str(a) for a in [*common, '--output', tmp_path / 'with']])
  lines = err.getvalue().splitlines()
  assert status == 0, lines
  progress = [line for line in lines if line.startswith('extract: ')]
  # 64x80: 320 stage-1 queries in chunks of 64 (one head) -> 5 chunks.
  assert 'extract: 0/2 img (0%), 0:00 elapsed; a.png 64x80: compiling' in progress
  chunks = [line.split('a.png 64x80: ')[1] for line in progress if 'a.png 64x80: stage 1' in line]
  assert chunks == [f'stage 1 attention chunk {i}/5' for i in range(1, 6)]
  assert any('a.png 64x80: stage 3 block 2/2 attention' in line for line in progress)
  assert any(line.startswith('extract: 1/2 img (50%)') and 'c.png 48x56: stage 1' in line
             for line in progress)
  assert progress[-1].startswith('extract: 2/2 img (100%)') and ';' not in progress[-1]
  # The features are the same without progress, and then nothing is drawn.
  status, err = _run(*common, '--output', tmp_path / 'without')
  assert status == 0 and 'extract:' not in err
  for stem in ('a', 'c'):
    reported = writers.read_features(str(tmp_path / 'with' / f'{stem}.npz'))
    plain = writers.read_features(str(tmp_path / 'without' / f'{stem}.npz'))
    for name in plain:
      np.testing.assert_array_equal(reported[name], plain[name], err_msg=name)


def test_extractor_progress_changes_no_value(backbone_and_variables):
  extractor = extract.FeatureExtractor(*backbone_and_variables, attention='chunked',
                                       chunk_size=40)
  images_in = np.random.default_rng(5).standard_normal((1, 48, 56, 3)).astype(np.float32)
  details = []
  reported = extractor(images_in, progress=details.append)
  plain = extractor(images_in)
  jax.effects_barrier()
  # 12x14 = 168 stage-1 queries in chunks of 40 -> 5; cvt-tiny has 4 attention layers.
  assert details[0] == 'compiling'
  assert [d for d in details if d.startswith('stage 1')] == [
      f'stage 1 attention chunk {i}/5' for i in range(1, 6)]
  assert details[-1].startswith('stage 3 block 2/2 attention')
  for name in plain:
    np.testing.assert_array_equal(reported[name], plain[name], err_msg=name)
  details.clear()
  extractor(images_in, progress=details.append)  # Compiled already: no 'compiling'.
  assert details and 'compiling' not in details
