"""`cvt-export`: every format run in a fresh process where this package is not importable.

A tiny segmentation run and a tiny detector (checkpoints saved from random weights, the
detector's scoring made confident so NMS has work) are exported once per format, a converted
backbone as StableHLO (the other formats convert it as they do the models); one subprocess
per format runs them at odd sizes and batch 1 and 3,
started with `python -S -I` and site-packages on its path, so the editable install's `.pth`
is not read: `import cvt_backbone` fails there, and the SavedModel and ONNX runs never
import jax. Their outputs are compared with the projects' in-process inference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from projects.deploy import export

from .trainer_support import REPO

SEGMENTATION = 'projects/cvt_segmentation/configs/synthetic_demo.py:runlocal'
DETECTION = 'projects/cvt_detection/configs/synthetic_demo.py:runlocal'
# (batch, h, w): odd sizes, batches 1 and 3, wide and tall, one just over 32 px high (each
# shape is one compile per runtime).
SHAPES = ((1, 33, 131), (3, 65, 49))
# What each runtime gets that it must refuse: under 16 px, 4 channels, the wrong dtype.
BAD_INPUTS = {'small': (1, 8, 40, 3), 'channels': (1, 40, 40, 4), 'dtype': (1, 40, 40, 3)}

# Runs in the fresh process: `python -S -I - FORMAT JOBS.json`, JOBS a list of
# {artifact, inputs (.npz), outputs (.npz), dtype}; writes outputs and `errors` per job.
RUNNER = r'''
import json, sys
import numpy as np
fmt, jobs = sys.argv[1], json.load(open(sys.argv[2]))
try:
  import cvt_backbone  # noqa: F401
  sys.exit('cvt_backbone is importable')
except ImportError:
  pass
if fmt != 'stablehlo':  # TensorFlow and onnxruntime must run it without jax
  class NoJax:
    def find_spec(self, name, path=None, target=None):
      if name.partition('.')[0] in ('jax', 'jaxlib', 'flax'):
        raise ImportError(f'{name} is not installed here')
  sys.meta_path.insert(0, NoJax())
if fmt == 'stablehlo':
  from jax import export
  def load(path):
    call = export.deserialize(open(path, 'rb').read()).call
    return lambda x: {k: np.asarray(v) for k, v in call(x).items()}
elif fmt == 'savedmodel':
  import tensorflow as tf
  def load(path):
    serve = tf.saved_model.load(path).signatures['serving_default']
    return lambda x: {k: v.numpy() for k, v in serve(images=tf.constant(x)).items()}
else:
  import onnxruntime as ort
  def load(path):
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {'images': x})))
for job in jobs:
  run = load(job['artifact'])
  data = np.load(job['inputs'])
  np.savez(job['outputs'], **{f'{key}/{name}': value for key in data.files
                              for name, value in run(data[key]).items()})
  errors = {}
  for what, shape in job['bad'].items():
    dtype = ('float32' if job['dtype'] == 'uint8' else 'uint8') if what == 'dtype' else job['dtype']
    try:
      run(np.zeros(shape, dtype))
      errors[what] = None
    except Exception as e:  # what a user's traceback shows: the error and its cause
      errors[what] = f'{type(e).__name__}: {e}' + (f' (cause: {e.__cause__})' if e.__cause__
                                                    else '')
  job['errors'] = errors
json.dump({'jobs': jobs, 'jax_imported': 'jax' in sys.modules}, open(sys.argv[2], 'w'))
'''


def _key(b: int, h: int, w: int) -> str:
  return f'{b}x{h}x{w}'


def _save_checkpoint(config_spec: str, workdir, meta: dict, adjust=None) -> None:
  """A checkpoint of `config_spec`'s model from random weights, as training saves one."""
  from projects.cvt_detection import models as detection_models
  from projects.cvt_segmentation import models as segmentation_models
  from projects.training import checkpoints
  from projects.training.configs import load_config

  config = load_config(os.path.join(REPO, config_spec.partition(':')[0]) + ':runlocal')
  models = (detection_models if config.model_name in detection_models.MODELS
            else segmentation_models)
  model = models.get_model_cls(config.model_name)(config, meta)
  variables = model.flax_model.clone(pretrained='').init(jax.random.PRNGKey(0),
                                                         np.zeros((1, 64, 64, 3), np.float32))
  variables = jax.tree.map(np.asarray, checkpoints.inference_variables(variables))
  if adjust is not None:
    adjust(variables['params'])
  with checkpoints.manager(workdir) as mngr:
    checkpoints.save(mngr, 3, {'variables': variables},
                     checkpoints.model_metadata(config, meta['num_classes'], meta))
    checkpoints.wait(mngr)


def _confident_detector(params) -> None:
  # Initial ATSS scores are ~0.01 (prior_prob), below the score threshold: wider class and
  # box weights give many overlapping candidates for NMS.
  rng = np.random.default_rng(0)
  head = params['head']
  head['conv_cls']['kernel'] = rng.normal(0, 0.3, head['conv_cls']['kernel'].shape).astype(
      np.float32)
  head['conv_cls']['bias'] = np.ones_like(head['conv_cls']['bias'])
  head['conv_reg']['bias'] = np.ones_like(head['conv_reg']['bias'])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """`{kind: (config, checkpoint workdir) or backbone file}`."""
  from cvt_backbone import CvTBackbone, get_spec
  from cvt_backbone.weights.converted import save_converted

  root = tmp_path_factory.mktemp('runs')
  _save_checkpoint(SEGMENTATION, root / 'segmentation', {'num_classes': 6})
  _save_checkpoint(DETECTION, root / 'detection', {
      'num_classes': 4, 'category_ids': [1, 2, 3, 4],
      'class_names': ['rectangle', 'ellipse', 'triangle', 'ring']}, _confident_detector)
  variables = jax.jit(CvTBackbone(variant='cvt-tiny').init)(  # op by op: 3 times slower
      jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32))
  save_converted(root / 'backbone.msgpack', jax.tree.map(np.asarray, variables), {
      'variant': 'cvt-tiny', 'spec': get_spec('cvt-tiny').to_dict(), 'activation': 'quick_gelu',
      'num_classes': 0, 'backbone_only': True, 'in_chans': 3,
      'source': {'file': 'random', 'sha256': '', 'naming': 'flax'}, 'converter': 'test'})
  return {'segmentation': ['--config', os.path.join(REPO, SEGMENTATION), '--checkpoint',
                           str(root / 'segmentation'), '--logits'],
          'detection': ['--config', os.path.join(REPO, DETECTION), '--checkpoint',
                        str(root / 'detection')],
          'backbone': ['--backbone', str(root / 'backbone.msgpack')]}


def _export(args: list[str]) -> None:
  assert export.main(args) == 0


def _export_error(args: list[str]) -> str | None:
  """None when exported, else its `error:` line."""
  import contextlib
  import io

  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = export.main(args)
  return None if status == 0 else err.getvalue().strip().splitlines()[-1]


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """`{dtype: .npz path}` of images `{b x h x w: [b, h, w, 3]}`: uint8 RGB and normalized."""
  rng = np.random.default_rng(1)
  folder = tmp_path_factory.mktemp('inputs')
  images = {_key(*shape): rng.integers(0, 256, (*shape, 3), np.uint8) for shape in SHAPES}
  paths = {'uint8': str(folder / 'uint8.npz'), 'float32': str(folder / 'float32.npz')}
  np.savez(paths['uint8'], **images)
  np.savez(paths['float32'], **{k: rng.normal(size=v.shape).astype(np.float32)
                                for k, v in images.items()})
  return paths


def _run_fresh(fmt: str, jobs: list[dict], folder) -> dict:
  spec = folder / f'{fmt}_jobs.json'
  spec.write_text(json.dumps(jobs))
  paths = list(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]))
  code = f'import sys; sys.path += {paths!r}\n' + RUNNER
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  proc = subprocess.run([sys.executable, '-S', '-I', '-c', code, fmt, str(spec)], cwd=folder,
                        env=env, capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    return {'jobs': [], 'error': proc.stderr[-3000:]}
  return json.loads(spec.read_text())


@pytest.fixture(scope='module')
def exported(runs, inputs, tmp_path_factory, request):
  """`{format: (results of the fresh process, {kind: outputs .npz})}`, made on first use."""
  folder = tmp_path_factory.mktemp('exported')
  cache = {}

  def get(fmt):
    if fmt not in cache:
      if fmt == 'onnx':
        pytest.importorskip('projects.deploy.onnx', reason='to_onnx (branch onnx) not merged')
      jobs, failed = [], {}
      for kind, args in runs.items():
        if kind == 'backbone' and fmt != 'stablehlo':
          continue  # the same conversion as the models': one format is enough
        artifact = str(folder / f'{kind}.{fmt}')
        try:  # one kind failing to export fails its own tests only
          export_error = _export_error([*args, '--format', fmt, '--output', artifact])
        except Exception as e:  # noqa: BLE001
          export_error = f'{type(e).__name__}: {e}'
        if export_error:
          failed[kind] = export_error
          continue
        dtype = 'float32' if kind == 'backbone' else 'uint8'
        jobs.append({'kind': kind, 'artifact': artifact, 'inputs': inputs[dtype],
                     'outputs': str(folder / f'{kind}_{fmt}_out.npz'), 'dtype': dtype,
                     'bad': BAD_INPUTS})
      cache[fmt] = {**_run_fresh(fmt, jobs, folder), 'failed': failed}
    return cache[fmt]

  return get


def _expected_segmentation(args, uint8):
  from projects.cvt_segmentation import models
  from projects.cvt_segmentation.configs.common import load_config
  from projects.cvt_segmentation.inference import make_logits_fn, predict_logits, segment_image
  from projects.training.image_ops import normalize

  logits_fn = make_logits_fn(*models.restore_for_inference(load_config(args[1]), args[3]))
  out = {}
  for key in uint8.files:
    images = uint8[key]
    out[f'{key}/classes'] = np.stack([segment_image(logits_fn, x) for x in images])
    out[f'{key}/logits'] = np.asarray(predict_logits(logits_fn,
                                                     np.stack([normalize(x) for x in images])))
  return out


def _expected_detection(args, uint8):
  from projects.cvt_detection import models
  from projects.cvt_detection.configs.common import load_config
  from projects.training.image_ops import normalize

  config = load_config(args[1])
  flax_model, variables = models.restore_for_inference(config, args[3])
  model = models.get_model_cls(config.model_name)(config, {'num_classes': 4})
  model.flax_model = flax_model
  predict = model.predict_fn()
  out = {}
  for key in uint8.files:
    images = uint8[key]
    b, h, w, _ = images.shape
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32  # predict's canvases: multiples of 32
    x = np.zeros((b, ph, pw, 3), np.float32)
    x[:, :h, :w] = np.stack([normalize(i) for i in images])
    found = jax.device_get(predict(variables, x, np.tile([h, w], (b, 1)).astype(np.int32),
                                   np.ones((b, 2), np.float32)))
    out.update({f'{key}/{k}': np.asarray(v) for k, v in found.items()})
  return out


def _expected_backbone(args, floats):
  from cvt_backbone.weights.converted import load_backbone

  backbone, variables = load_backbone(args[1])
  apply = jax.jit(lambda x: backbone.apply(variables, x))
  return {f'{key}/{k}': np.asarray(v) for key in floats.files
          for k, v in apply(floats[key]).items()}


@pytest.fixture(scope='module')
def expected(runs, inputs):
  """The projects' own inference of the same images, `{b x h x w/output: array}` of a kind
  (`predict`'s path at the input size), computed on first use."""
  cache = {}
  compute = {'segmentation': _expected_segmentation, 'detection': _expected_detection,
             'backbone': _expected_backbone}

  def get(kind):
    if kind not in cache:
      data = np.load(inputs['float32' if kind == 'backbone' else 'uint8'])
      cache[kind] = compute[kind](runs[kind], data)
    return cache[kind]

  return get


FORMATS = ['stablehlo', 'savedmodel',
           pytest.param('onnx', marks=pytest.mark.skipif(
               not os.path.exists(os.path.join(REPO, 'projects/deploy/onnx.py')),
               reason='depends on projects/deploy/onnx.py (branch onnx)'))]


def _outputs(results, kind):
  assert 'error' not in results, results['error']
  assert kind not in results['failed'], results['failed'][kind]
  job = next(j for j in results['jobs'] if j['kind'] == kind)
  return dict(np.load(job['outputs'])), job


@pytest.mark.parametrize('fmt', FORMATS)
def test_segmentation_artifact_predicts_as_predict(fmt, exported, expected):
  results = exported(fmt)
  got, _ = _outputs(results, 'segmentation')
  want = expected('segmentation')
  assert results['jax_imported'] == (fmt == 'stablehlo')
  for shape in SHAPES:
    key = _key(*shape)
    logits = want[f'{key}/logits']
    assert got[f'{key}/classes'].shape == shape and got[f'{key}/classes'].dtype == np.int32
    np.testing.assert_allclose(got[f'{key}/logits'], logits, atol=1e-4, rtol=0, err_msg=key)
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-4  # not an argmax tie
    np.testing.assert_array_equal(got[f'{key}/classes'][clear], want[f'{key}/classes'][clear],
                                  err_msg=key)


@pytest.mark.parametrize('fmt', FORMATS)
def test_detection_artifact_detects_as_the_model(fmt, exported, expected):
  results = exported(fmt)
  if fmt == 'onnx':  # one size only (tests/projects/test_export_onnx.py runs it)
    assert 'a detector exports to ONNX at one size (--static' in results['failed']['detection']
    return
  got, _ = _outputs(results, 'detection')
  want = expected('detection')
  for shape in SHAPES:
    key = _key(*shape)
    count = want[f'{key}/valid'].astype(bool).sum(axis=1)
    np.testing.assert_array_equal(got[f'{key}/num_detections'], count, err_msg=key)
    assert count.min() > 1, key  # NMS had work to do
    for i, n in enumerate(count):
      np.testing.assert_allclose(got[f'{key}/boxes'][i, :n], want[f'{key}/boxes'][i, :n],
                                 atol=1e-3, rtol=0, err_msg=key)
      np.testing.assert_allclose(got[f'{key}/scores'][i, :n], want[f'{key}/scores'][i, :n],
                                 atol=1e-5, rtol=0, err_msg=key)
      np.testing.assert_array_equal(got[f'{key}/classes'][i, :n], want[f'{key}/classes'][i, :n],
                                    err_msg=key)


def test_backbone_artifact_gives_the_stage_maps(exported, expected):
  got, _ = _outputs(exported('stablehlo'), 'backbone')
  want = expected('backbone')
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)


# What each runtime says of an image it cannot take (None: it runs it anyway).
ERRORS = {
    'stablehlo': {'small': 'h >= 16', 'channels': 'Shape mismatch', 'dtype': 'Dtype mismatch'},
    'savedmodel': {'small': 'h >= 16', 'channels': 'not compatible with expected shape',
                   'dtype': 'expected to be a'},
    'onnx': {'small': None, 'channels': 'dimensions', 'dtype': 'type'},
}


@pytest.mark.parametrize('fmt', FORMATS)
def test_artifacts_refuse_what_the_contract_excludes(fmt, exported):
  for job in exported(fmt)['jobs']:
    for what, message in ERRORS[fmt].items():
      found = job['errors'][what]
      if message is None:
        continue
      assert found is not None and message in found, (job['kind'], what, found)


def test_metadata_says_what_the_artifact_takes_and_gives(runs, tmp_path):
  path = str(tmp_path / 'det.stablehlo')
  _export([*runs['detection'], '--output', path, '--static', '2x97x131'])
  meta = json.loads(open(path + '.json').read())
  assert meta['kind'] == 'detection' and meta['format'] == 'stablehlo'
  assert meta['input']['shape'] == [2, 97, 131, 3] and meta['input']['symbolic_dims'] == []
  assert meta['input']['dtype'] == 'uint8' and meta['input']['normalization_inside']
  assert meta['category_ids'] == [1, 2, 3, 4] and meta['class_names'][0] == 'rectangle'
  assert meta['checkpoint']['step'] == 3 and len(meta['checkpoint']['sha256']) == 64
  assert set(meta['outputs']) == {'boxes', 'scores', 'classes', 'num_detections'}
  assert {'jax', 'flax', 'cvt-dense'} <= set(meta['exported_with'])
  exp = jax.export.deserialize(open(path, 'rb').read())
  assert exp.in_avals[0].shape == (2, 97, 131, 3)


def test_an_existing_artifact_is_kept_without_overwrite(runs, tmp_path, capsys):
  path = tmp_path / 'bb.stablehlo'
  path.write_bytes(b'old')
  assert export.main([*runs['backbone'], '--output', str(path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: {path} exists; pass --overwrite to replace it']
  assert path.read_bytes() == b'old' and not os.path.exists(f'{path}.json')
  assert sorted(os.listdir(tmp_path)) == ['bb.stablehlo']
  _export([*runs['backbone'], '--output', str(path), '--overwrite', '--static', '64x64'])
  assert jax.export.deserialize(path.read_bytes()).in_avals[0].shape[1:] == (64, 64, 3)
  assert sorted(os.listdir(tmp_path)) == ['bb.stablehlo', 'bb.stablehlo.json']


def test_an_output_never_replaces_an_input(runs, capsys):
  backbone = runs['backbone'][1]
  assert export.main([*runs['backbone'], '--output', backbone, '--overwrite']) == 1
  assert 'an output never replaces an input' in capsys.readouterr().err
