"""The `predict` command: palette masks and overlays for folders of images of any size."""

import os

import numpy as np
import pytest
from PIL import Image

from projects.cvt_segmentation import palettes, predict
from projects.cvt_segmentation.inference import make_logits_fn, segment_image

from .test_inference_support import ContextModel, init_model, write_synthetic_config

K = 6
TEST_SCALE = (48, 32)


@pytest.fixture
def config_path(tmp_path):
  return write_synthetic_config(tmp_path, K, test_scale=TEST_SCALE)


def _model_loader(config, checkpoint):
  del config, checkpoint
  return init_model(ContextModel(K, min_input=16))  # rejects inputs under 16 px, as CvT


def _rgb(rng, h, w):
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def image_dir(tmp_path):
  """Images of different sizes, modes and formats, plus files that are not images."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'images'
  (root / 'sub').mkdir(parents=True)
  Image.fromarray(_rgb(rng, 40, 60)).save(root / 'wide.jpg')
  Image.fromarray(_rgb(rng, 23, 31)[..., 0]).save(root / 'grey.png')  # mode L
  Image.fromarray(rng.integers(0, 256, (50, 17, 4), dtype=np.uint8)).save(root / 'sub' / 'tall.png')
  Image.fromarray(_rgb(rng, 6, 200)).save(root / 'strip.png')  # resized to 1 x 40 for the model
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 30 wide x 20 high, shown rotated: 20 wide x 30 high
  Image.fromarray(_rgb(rng, 20, 30)).save(root / 'rotated.jpg', exif=exif)
  (root / 'notes.txt').write_text('not an image')
  (root / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  Image.fromarray(_rgb(rng, 8, 8)).save(root / '.hidden.png')
  return root


EXPECTED = {  # output stem -> (height, width) of the input as displayed
    'wide': (40, 60), 'grey': (23, 31), 'sub/tall': (50, 17), 'strip': (6, 200),
    'rotated': (30, 20),
}


def test_predict_folder_writes_one_mask_and_overlay_per_image(
    tmp_path, config_path, image_dir, capsys
):
  out = tmp_path / 'out'
  argv = ['--config', config_path, '--checkpoint', str(tmp_path), '--output', str(out),
          str(image_dir)]
  assert predict.main(argv, model_loader=_model_loader) == 1  # two inputs failed
  err = capsys.readouterr().err
  assert 'notes.txt: not an image file' in err
  assert 'broken.jpg' in err and '5 images segmented' in err and '2 failed' in err
  written = sorted(os.path.relpath(os.path.join(d, f), out)
                   for d, _, files in os.walk(out) for f in files)
  assert written == sorted(f'{stem}{suffix}' for stem in EXPECTED
                           for suffix in (predict.MASK_SUFFIX, predict.OVERLAY_SUFFIX))
  logits_fn = make_logits_fn(*_model_loader(None, None))
  for stem, (h, w) in EXPECTED.items():
    mask = Image.open(out / f'{stem}_mask.png')
    overlay = Image.open(out / f'{stem}_overlay.png')
    assert mask.mode == 'P' and mask.size == (w, h)
    assert overlay.mode == 'RGB' and overlay.size == (2 * w, h)
    source = next(p for p in image_dir.rglob(f'{os.path.basename(stem)}.*'))
    image = predict.read_image(str(source))
    labels = np.asarray(mask)
    want = segment_image(logits_fn, image, test_scale=TEST_SCALE, min_size=32, num_classes=K)
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(np.asarray(overlay)[:, :w], image)  # left: the input
    palette = np.asarray(mask.getpalette()[: 3 * K]).reshape(K, 3)
    np.testing.assert_array_equal(palette, palettes.ADE20K_PALETTE[:K])  # auto: ADE20K


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, config_path, image_dir, capsys):
  out = tmp_path / 'out'
  base = ['--config', config_path, '--checkpoint', str(tmp_path), '--output', str(out),
          '--palette', 'cityscapes', '--no-progress', str(image_dir / 'wide.jpg')]
  assert predict.main(base, model_loader=_model_loader) == 0
  mask = out / 'wide_mask.png'
  mask.write_bytes(b'sentinel')  # not written by predict: kept, and a failure
  assert predict.main(base, model_loader=_model_loader) == 1
  assert 'wide_mask.png: not a PNG file (8 bytes)' in capsys.readouterr().err
  assert mask.read_bytes() == b'sentinel'
  assert predict.main(base + ['--strict'], model_loader=_model_loader) == 1
  assert mask.read_bytes() == b'sentinel'
  assert predict.main(base + ['--overwrite'], model_loader=_model_loader) == 0
  im = Image.open(mask)
  assert im.mode == 'P' and im.size == (60, 40)
  assert im.getpalette()[:3] == list(palettes.CITYSCAPES_PALETTE[0])


def test_strict_fails_on_a_non_image_before_writing(tmp_path, config_path, image_dir, capsys):
  out = tmp_path / 'out'
  argv = ['--config', config_path, '--checkpoint', str(tmp_path), '--output', str(out),
          '--strict', str(image_dir)]
  assert predict.main(argv, model_loader=_model_loader) == 1
  assert 'broken.jpg: unreadable image' in capsys.readouterr().err  # the first bad file
  assert not out.exists()


def test_collect_inputs_globs_missing_paths_and_name_clashes(tmp_path):
  rng = np.random.default_rng(1)
  for name in ('x.jpg', 'x.png', 'y.png'):
    Image.fromarray(_rgb(rng, 4, 4)).save(tmp_path / name)
  images, problems = predict.collect_inputs(
      [str(tmp_path / '*.png'), str(tmp_path / 'x.jpg'), str(tmp_path / 'y.png'),
       str(tmp_path / 'nothing.png'), str(tmp_path / 'none_*.jpg')]
  )
  assert [(os.path.basename(i.path), i.stem) for i in images] == [
      ('x.png', 'x'), ('y.png', 'y'), ('x.jpg', 'x_jpg')]
  assert len(problems) == 2 and 'no such file' in problems[0] and 'no file matches' in problems[1]


def test_palettes():
  assert len(palettes.ADE20K_PALETTE) == 150 and len(palettes.CITYSCAPES_PALETTE) == 19
  assert palettes.get_palette('auto', 19, 'cityscapes').tolist()[0] == [128, 64, 128]
  assert palettes.get_palette('auto', 200).shape == (200, 3)  # generated beyond ADE20K's
  with pytest.raises(ValueError, match='has 19 colours'):
    palettes.get_palette('cityscapes', 150)
  labels = np.array([[0, 1], [2, 255]])
  mask = palettes.mask_image(labels, palettes.ADE20K_PALETTE)
  assert np.asarray(mask).tolist() == labels.tolist()
  side = palettes.overlay_image(np.full((2, 2, 3), 100, np.uint8), labels, [(0, 0, 0)] * 3, 0.5)
  assert side.shape == (2, 4, 3) and side[1, 3].tolist() == [100, 100, 100]  # 255: unblended
  assert side[0, 2].tolist() == [50, 50, 50]


def test_a_number_given_as_an_input_hints_at_the_comma_syntax(tmp_path, monkeypatch):
  # `--crop-size 512 1024 photos/`: argparse passes 1024 on as an input.
  monkeypatch.chdir(tmp_path)
  _, problems = predict.collect_inputs(['1024'])
  assert problems == ['1024: no such file or folder (a number: lists of numbers are written '
                      'with commas, such as --crop-size 512,1024)']
