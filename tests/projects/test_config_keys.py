"""Config typos are errors: every key is checked against the settings the projects read.

A key a config file adds (`config.optimizer.base_rl = 1.0`) or a misspelled `--config.x`
flag stops the run before any training, with one line naming the key and the closest known
one; every shipped config passes with each of its documented arguments.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from projects.training import configs

from . import trainer_support as support

REPO = pathlib.Path(__file__).resolve().parents[2]
SEG_DEMO = 'projects/cvt_segmentation/configs/synthetic_demo.py'
DET_DEMO = 'projects/cvt_detection/configs/synthetic_demo.py'
SCENIC_SYNTHETIC = 'projects/cvt_scenic_example/configs/synthetic.py'

# Each shipped config with the arguments its docstring documents.
SEG_ARGS = (None, 'runlocal', 'variant=21', 'variant=w24,pretrained=cvt.msgpack,data_dir=/d',
            'variant=21,runlocal')
SCENIC_ARGS = tuple(f'model={m},{a}' for m in ('cvt_linear_segmentation', 'cvt_upernet',
                                               'cvt_semantic_fpn', 'cvt_segformer',
                                               'cvt_fpn_linear')
                    for a in ('runlocal', 'steps=10,pretrained=cvt.msgpack,sync_bn'))
SHIPPED = {
    'projects/cvt_segmentation/configs/ade20k_cvt13_semantic_fpn.py': SEG_ARGS,
    'projects/cvt_segmentation/configs/ade20k_cvt13_upernet.py': SEG_ARGS,
    'projects/cvt_segmentation/configs/cityscapes_cvt13_upernet.py': SEG_ARGS,
    SEG_DEMO: (None, 'runlocal', 'steps=600,runlocal', 'steps=600'),
    'projects/cvt_detection/configs/coco_cvt13_atss_1x.py': SEG_ARGS,
    DET_DEMO: (None, 'runlocal', 'steps=1200,runlocal', 'steps=1200'),
    SCENIC_SYNTHETIC: (None, 'runlocal', *SCENIC_ARGS),
    'projects/cvt_scenic_example/configs/folder.py': tuple(
        f'data_dir=/d,num_classes=5,{a}' for a in ('crop=128', 'runlocal', *SCENIC_ARGS)),
}


def _keys(config_path: str) -> configs.ProjectKeys:
  """The known keys of the project a shipped config file belongs to."""
  import importlib

  project = config_path.split('/')[1]
  return importlib.import_module(f'projects.{project}.configs.common').CONFIG_KEYS


def _write_config(tmp_path, base: str, *lines: str) -> str:
  """A config file building on a shipped one, with `lines` run on it before returning."""
  module = base.removesuffix('.py').replace('/', '.')
  body = textwrap.indent('\n'.join(lines), '    ')
  path = tmp_path / 'my_config.py'
  path.write_text(f'from {module} import get_config as shipped\n\n\n'
                  'def get_config(arg=None):\n'
                  '  config = shipped(arg)\n'
                  '  with config.unlocked():\n'
                  f'{body}\n'
                  '  return config\n')
  return str(path)


TYPOS = [
    (SEG_DEMO, 'config.optimizer.base_rl = 1.0', 'optimizer.base_rl', 'optimizer.base_lr'),
    (SEG_DEMO, 'config.num_training_step = 2', 'num_training_step', 'num_training_steps'),
    (SEG_DEMO, 'config.dataset_configs.num_clases = 3', 'dataset_configs.num_clases',
     'dataset_configs.num_classes'),
    (SEG_DEMO, 'config.model.decode_head.chanels = 8', 'model.decode_head.chanels',
     'model.decode_head.channels'),
    (SEG_DEMO, 'config.model.backbone.drop_pth_rate = 0.1', 'model.backbone.drop_pth_rate',
     'model.backbone.drop_path_rate'),
    (SEG_DEMO, 'config.eval.crop_sise = (64, 64)', 'eval.crop_sise', 'eval.crop_size'),
    # A setting of another section: the closest key is found there.
    (SEG_DEMO, 'config.base_lr = 1.0', 'base_lr', 'optimizer.base_lr'),
    (DET_DEMO, 'config.model.head.num_conv = 2', 'model.head.num_conv', 'model.head.num_convs'),
    (DET_DEMO, 'config.eval.score_thresh = 0.1', 'eval.score_thresh', 'eval.score_threshold'),
    (DET_DEMO, 'config.dataset_configs.max_box = 4', 'dataset_configs.max_box',
     'dataset_configs.max_boxes'),
    # Scenic's own trainer settings in the example's (unlocked) configs.
    (SCENIC_SYNTHETIC, 'config.max_grad_nrom = 1.0', 'max_grad_nrom', 'max_grad_norm'),
    (SCENIC_SYNTHETIC, 'config.dataset_configs.num_eavl = 3', 'dataset_configs.num_eavl',
     'dataset_configs.num_eval'),
]


@pytest.mark.parametrize('base, line, unknown, closest', TYPOS,
                         ids=[typo[2] for typo in TYPOS])
def test_load_config_names_an_unknown_key_and_the_closest(tmp_path, base, line, unknown,
                                                          closest):
  path = _write_config(tmp_path, base, line)
  with pytest.raises(ValueError) as error:
    configs.load_config(path + ':runlocal', _keys(base))
  message = str(error.value)
  assert type(error.value).__name__ == 'ConfigKeyError'
  assert f'unknown config key {unknown} (did you mean {closest}?)' in message
  assert 'my_config.py' in message
  assert '\n' not in message


def test_every_unknown_key_is_listed_and_sections_a_model_lacks_are_unknown(tmp_path):
  path = _write_config(tmp_path, SEG_DEMO, 'config.num_training_step = 2',
                       'config.model.neck = {"out_channels": 8}',
                       'config.loss.whatever = 1')
  with pytest.raises(ValueError) as error:
    configs.load_config(path, _keys(SEG_DEMO))
  message = str(error.value)
  assert 'num_training_step (did you mean num_training_steps?)' in message
  # UPerNet has no neck: the section would be read by nothing.
  assert 'model.neck' in message
  # No close match: the keys known there are named instead.
  assert 'loss.whatever (known there: aux_weight, avg_non_ignore, label_smoothing)' in message


def test_scenic_keys_a_user_may_set_are_known(tmp_path):
  path = _write_config(tmp_path, SEG_DEMO, 'config.trainer_name = "cvt_segmentation"',
                       'config.checkpoint = True', 'config.xprof = False',
                       'config.workdir_suffix = "a"')
  configs.load_config(path, _keys(SEG_DEMO))
  # Scenic's `init_from` is not read by the project trainers: pointed to what is.
  path = _write_config(tmp_path, SEG_DEMO, 'config.init_from = {"checkpoint_path": "x"}')
  with pytest.raises(ValueError, match=r'init_from \(did you mean model.backbone.pretrained\?'):
    configs.load_config(path, _keys(SEG_DEMO))


@pytest.mark.parametrize('path, arg', [(p, a) for p, args in SHIPPED.items() for a in args])
def test_every_shipped_config_passes_the_check(path, arg):
  spec = str(REPO / path) + ('' if arg is None else f':{arg}')
  config = configs.load_config(spec, _keys(path))
  configs.check_config(config, _keys(path))


def test_the_shipped_config_table_covers_every_config_file():
  found = {str(p.relative_to(REPO)) for p in REPO.glob('projects/*/configs/*.py')
           if p.stem not in ('__init__', 'common')}
  assert found == set(SHIPPED)


def test_minimal_tool_configs_without_a_model_pass():
  """Evaluation configs may hold only the dataset and `eval` (tests/projects/test_evaluate)."""
  import ml_collections

  config = ml_collections.ConfigDict(dict(
      dataset_name='synthetic', eval=dict(mode='whole'),
      dataset_configs=dict(num_classes=3, image_size=(40, 48), num_train=2, test_scale=None)))
  configs.check_config(config, _keys(SEG_DEMO))
  config.dataset_configs.num_trian = 2
  with pytest.raises(ValueError, match='dataset_configs.num_trian .did you mean '
                                       'dataset_configs.num_train'):
    configs.check_config(config, _keys(SEG_DEMO))


@pytest.mark.parametrize('project', ['cvt_segmentation', 'cvt_detection'])
def test_main_checks_before_any_work(tmp_path, project):
  """The project's `main`, where a config enters, refuses a typo first."""
  import importlib

  main = importlib.import_module(f'projects.{project}.main')
  config = importlib.import_module(f'projects.{project}.configs.synthetic_demo').get_config()
  with config.unlocked():
    config.optimizer.base_rl = 1.0
  with pytest.raises(ValueError, match='optimizer.base_rl .did you mean optimizer.base_lr'):
    main.main(jax.random.PRNGKey(0), config, str(tmp_path), None)
  assert not list(tmp_path.iterdir())


def test_dataset_keys_are_those_the_builders_accept():
  from projects.cvt_detection.configs import common as det_common
  from projects.cvt_detection.data import builder as det_builder
  from projects.cvt_segmentation.configs import common as seg_common
  from projects.cvt_segmentation.data import builder as seg_builder

  assert set(seg_common.DATASET_KEYS) == set(seg_builder.DATASET_NAMES)
  assert set(det_common.DATASET_KEYS) == set(det_builder.DATASET_NAMES)
  # Every key known for the synthetic sets is taken by the builder.
  seg = dict(num_classes=3, image_size=(32, 32), num_train=2, num_eval=2, data_seed=1,
             max_objects=2, crop_size=(32, 32), scale=(64, 32), ratio_range=(0.5, 2.0),
             cat_max_ratio=1.0, flip_prob=0.5, photometric=False, num_threads=1, num_workers=0,
             eval_pad_shape=None, eval_label_pad_shape=None, eval_size_divisor=32,
             test_scale=None, pixel_batch_mask=False, validate='full')
  assert set(seg) == set(seg_common.CONFIG_KEYS.datasets['synthetic'])
  seg_builder.build_loaders('synthetic', batch_size=2, eval_batch_size=2, **seg)
  det = dict(num_classes=2, image_size=(32, 32), num_train=2, num_eval=2, scale=(32, 32),
             canvas_sizes=((32, 32),), max_boxes=4, flip_prob=0.5, num_threads=1, prefetch=1,
             num_workers=0, validate='full')
  assert set(det) == set(det_common.CONFIG_KEYS.datasets['synthetic'])
  det_builder.build_loaders('synthetic', batch_size=2, eval_batch_size=2, **det)


def _run_main(project: str, *args: str, scenic: bool) -> subprocess.CompletedProcess:
  env = support.subprocess_env()
  if not scenic:  # the plain absl runner of projects.training.app
    env['PYTHONPATH'] = str(REPO)
  return subprocess.run([sys.executable, '-m', f'projects.{project}.main', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('project, config, flag, unknown, closest, scenic', [
    ('cvt_segmentation', SEG_DEMO, '--config.num_training_step=2', 'num_training_step',
     'num_training_steps', True),
    ('cvt_detection', DET_DEMO, '--config.optimizer.base_rl=1', 'optimizer.base_rl',
     'optimizer.base_lr', False),
])
def test_misspelled_config_flag_is_one_line(tmp_path, project, config, flag, unknown, closest,
                                            scenic):
  start = time.time()
  proc = _run_main(project, f'--config={config}:runlocal', f'--workdir={tmp_path}', flag,
                   scenic=scenic)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: unknown config key {unknown} in {flag.split("=")[0]} '
                    f'(did you mean {closest}?)'], proc.stderr[-3000:]
  assert not list(tmp_path.iterdir())
  assert time.time() - start < 60


def test_typo_in_a_config_file_stops_main_with_one_line(tmp_path):
  path = _write_config(tmp_path, SEG_DEMO, 'config.optimizer.base_rl = 1.0')
  workdir = tmp_path / 'work'
  proc = _run_main('cvt_segmentation', f'--config={path}:runlocal', f'--workdir={workdir}',
                   scenic=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert 'unknown config key optimizer.base_rl (did you mean optimizer.base_lr?)' in errors[0]
  assert 'my_config.py' in errors[0]
  assert not (workdir / 'checkpoints').exists()


# Issue 27 item 7: counts, sizes and rates are checked where the config enters, one line.
BAD_VALUES = [
    (SEG_DEMO, 'dataset_configs.num_classes', 0, 'an integer in [2, 255]'),
    (SEG_DEMO, 'dataset_configs.num_classes', -3, 'an integer in [2, 255]'),
    (SEG_DEMO, 'batch_size', 0, 'a positive integer'),
    (SEG_DEMO, 'eval_batch_size', 0, 'a positive integer'),
    (SEG_DEMO, 'num_training_steps', -1, 'a positive integer'),
    (SEG_DEMO, 'log_summary_steps', 0, 'a positive integer'),
    (SEG_DEMO, 'checkpoint_steps', -5, 'an integer >= 0 (0: at the end only)'),
    (SEG_DEMO, 'dataset_configs.image_size', (0, 64), 'two positive integers'),
    (SEG_DEMO, 'eval.stride', (48, -1), 'a positive integer or two'),
    (SEG_DEMO, 'eval.scales', (1.0, -0.5), 'a list of positive numbers'),
    (SEG_DEMO, 'optimizer.base_lr', -0.1, 'a number >= 0'),
    (SEG_DEMO, 'optimizer.accumulation_steps', 0, 'a positive integer'),
    (SEG_DEMO, 'loss.label_smoothing', 1.5, 'a number in [0, 1]'),
    (SEG_DEMO, 'optimizer.warmup_steps', -1, 'an integer >= 0'),
    (DET_DEMO, 'dataset_configs.num_classes', -3, 'a positive integer'),
    (DET_DEMO, 'eval_batch_size', 0, 'a positive integer'),
    (DET_DEMO, 'dataset_configs.max_boxes', 0, 'a positive integer'),
    (DET_DEMO, 'eval.score_threshold', 2.0, 'a number in [0, 1]'),
    (DET_DEMO, 'optimizer.decay_steps', (5, -1), 'a list of integers >= 0'),
    (DET_DEMO, 'model.head.channels', 0, 'a positive integer'),
]


@pytest.mark.parametrize('base, path, value, expected', BAD_VALUES,
                         ids=[f'{b.split("/")[1]}-{p}={v}' for b, p, v, _ in BAD_VALUES])
def test_invalid_numbers_are_config_errors(tmp_path, base, path, value, expected):
  config_file = _write_config(tmp_path, base, f'config.{path} = {value!r}')
  with pytest.raises(ValueError) as error:
    configs.load_config(config_file + ':runlocal', _keys(base))
  assert str(error.value) == (f'config {config_file}: invalid config value {path}={value!r} '
                              f'(expected {expected})')


def test_every_invalid_number_is_listed_and_loader_settings_are_checked(tmp_path):
  config_file = _write_config(
      tmp_path, SEG_DEMO, 'config.batch_size = 0', 'config.eval_batch_size = -1',
      'config.dataset_configs.num_workers = -2', 'config.dataset_configs.crop_size = (32,)',
      'config.dataset_configs.flip_prob = 2.0', 'config.dataset_configs.test_scale = "default"',
      'config.dataset_configs.scale = None')
  with pytest.raises(ValueError) as error:
    configs.load_config(config_file, _keys(SEG_DEMO))
  message = str(error.value)
  assert type(error.value).__name__ == 'ConfigValueError' and '\n' not in message
  for part in ('batch_size=0 (', 'eval_batch_size=-1 (', 'num_workers=-2 (expected an integer >= 0)',
               'crop_size=(32,) (', 'flip_prob=2.0 (expected a number in [0, 1])'):
    assert part in message
  assert 'test_scale' not in message and 'scale=None' not in message  # allowed values


@pytest.mark.parametrize('project, config, flag, expected', [
    ('cvt_segmentation', SEG_DEMO, '--config.dataset_configs.num_classes=-3',
     'dataset_configs.num_classes=-3 (expected an integer in [2, 255])'),
    ('cvt_detection', DET_DEMO, '--config.batch_size=0',
     'batch_size=0 (expected a positive integer)'),
])
def test_invalid_number_flag_is_one_line(tmp_path, project, config, flag, expected):
  proc = _run_main(project, f'--config={config}:runlocal', f'--workdir={tmp_path}', flag,
                   scenic=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert errors == [f'error: config {config}:runlocal: invalid config value {expected}'], (
      proc.stderr)
  assert not (tmp_path / 'checkpoints').exists()
