"""The accelerator paths, run on CPU: every 'auto' kernel choice forced to the branch a GPU or
TPU takes (`kernels.assume_backend`) against the CPU path, for the backbone, each head and
one training step of each project; each test reads the lowered program to check that the path
it names is the one that ran.

On the CPU path depthwise convs are sums of shifted slices, 1x1 convs matrix products and
attention a loop over (batch, head) pairs; on a GPU or TPU they are grouped library
convolutions, library convolutions and batched attention, in bfloat16 on a GPU
`jax.nn.dot_product_attention` (cuDNN there, its XLA reference here).

float32 agrees within 1e-4. bfloat16 keeps 8 significant bits (a relative rounding of up to
2**-9 per operation), so a bfloat16 model is about 1% off its float32 self whatever the
kernels: the accelerator path in bfloat16 must be as close to the float32 CPU path as the CPU
path in bfloat16 is (within a factor `BF16_SLACK`), and within `BF16_MAX_ERROR` in any case.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvt_backbone import CvTBackbone, kernels
from cvt_backbone.kernels import attention
from heads import build_head
from heads.atss_head import ATSSHead
from heads.fpn import detection_fpn

BF16_SLACK = 2.0
BF16_MAX_ERROR = 0.05
# The path of attention on CPU (`kernels.attention.paths_in`).
CPU_ATTENTION = {'plain_per_head'}


def lower_and_run(fn, *args, backend=None):
  """`(outputs, lowered StableHLO text)` of `jax.jit(fn)(*args)` with 'auto' chosen for
  `backend` (None: this machine's)."""
  with kernels.assume_backend(backend):
    jitted = jax.jit(fn)
    text = jitted.lower(*args).as_text(debug_info=True)
    return jitted(*args), text




def grouped_convs(text: str) -> int:
  """Convolutions with more than one feature group (depthwise) in a lowered program."""
  return sum(int(n) > 1 for n in re.findall(r'feature_group_count = (\d+)', text))


def convolutions(text: str) -> int:
  return text.count('stablehlo.convolution')


def relative_error(a, b) -> float:
  a, b = (np.asarray(jnp.asarray(x, jnp.float32)) for x in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_bf16(cpu_f32, cpu_bf16, accelerator_bf16) -> None:
  """The bfloat16 tolerance of the module docstring, leaf by leaf."""
  for ref, cpu, acc in zip(*(jax.tree.leaves(x) for x in (cpu_f32, cpu_bf16, accelerator_bf16)),
                           strict=True):
    assert acc.dtype == jnp.bfloat16
    cpu_error, error = relative_error(cpu, ref), relative_error(acc, ref)
    assert error <= max(BF16_SLACK * cpu_error, 1e-3), (error, cpu_error)
    assert error < BF16_MAX_ERROR, error


def close_f32(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def backbone():
  images = jax.random.normal(jax.random.key(0), (2, 64, 80, 3))
  variables = jax.jit(CvTBackbone(variant='cvt-tiny').init)(jax.random.key(1), images)
  return variables, images


def test_assume_backend_refuses_unknown_names():
  with pytest.raises(ValueError, match="Unknown backend 'cuda'; expected one of"):
    with kernels.assume_backend('cuda'):
      pass


@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
def test_backbone_on_the_accelerator_path_equals_the_cpu_path(backbone, backend):
  variables, images = backbone
  forward = lambda dtype: (lambda v, x: CvTBackbone(variant='cvt-tiny', dtype=dtype).apply(v, x))
  cpu, cpu_text = lower_and_run(forward(jnp.float32), variables, images)
  assert attention.paths_in(cpu_text) == CPU_ATTENTION and grouped_convs(cpu_text) == 0

  out, text = lower_and_run(forward(jnp.float32), variables, images, backend=backend)
  # cvt-tiny: 4 blocks, each with q, k and v depthwise convs.
  assert attention.paths_in(text) == {'plain_batched'} and grouped_convs(text) == 12
  close_f32(out, cpu)

  cpu_bf16, _ = lower_and_run(forward(jnp.bfloat16), variables, images)
  out_bf16, text = lower_and_run(forward(jnp.bfloat16), variables, images, backend=backend)
  expected = 'fused_xla' if backend == 'gpu' else 'plain_batched'
  assert attention.paths_in(text) == {expected} and grouped_convs(text) == 12
  # The products run in bfloat16 (float32 parameters, cast).
  assert re.search(r'stablehlo\.dot_general.*tensor<[0-9x]+xbf16>', text)
  check_bf16(cpu, cpu_bf16, out_bf16)


# Each head on cvt-tiny-shaped features: (head, its settings, the neck in front or None).
HEADS = [
    ('upernet', dict(channels=16), None),
    ('fcn', dict(channels=8, in_features=('stage3',)), None),
    ('semantic_fpn', dict(channels=16), dict(name='fpn', out_channels=16)),
    ('segformer', dict(channels=16), None),
    ('linear', {}, None),
    ('atss', dict(channels=16, num_convs=2), 'detection_fpn'),
]


def _features(dtype):
  shapes = {'stage1': (2, 16, 20, 16), 'stage2': (2, 8, 10, 32), 'stage3': (2, 4, 5, 48)}
  keys = jax.random.split(jax.random.key(2), len(shapes))
  return {name: jax.random.normal(key, shape).astype(dtype)
          for key, (name, shape) in zip(keys, shapes.items(), strict=True)}


def _head_module(name, settings, neck):
  info = CvTBackbone(variant='cvt-tiny').feature_info
  if neck == 'detection_fpn':
    neck = detection_fpn(info, out_channels=16)
  elif neck is not None:
    neck = build_head(neck, feature_info=info)
  if name == 'atss':
    head = ATSSHead(num_classes=3, num_groups=8, **settings)
  else:
    head = build_head(name, feature_info=neck.feature_info if neck else info, num_classes=3,
                      **settings)

  def apply(variables, features):
    if neck is not None:
      features = neck.apply(variables['neck'], features)
    return head.apply(variables['head'], features)

  def init(features):
    variables = {}
    if neck is not None:
      variables['neck'] = neck.init(jax.random.key(3), features)
      features = neck.apply(variables['neck'], features)
    variables['head'] = head.init(jax.random.key(4), features)
    return variables

  return init, apply


@pytest.mark.parametrize('name,settings,neck', HEADS, ids=[h[0] for h in HEADS])
def test_each_head_on_the_accelerator_path_equals_the_cpu_path(name, settings, neck):
  init, apply = _head_module(name, settings, neck)
  features = _features(jnp.float32)
  variables = init(features)
  cpu, cpu_text = lower_and_run(apply, variables, features)
  out, text = lower_and_run(apply, variables, features, backend='gpu')
  close_f32(out, cpu)
  # Every conv of the heads is the library's on the accelerator; on CPU the 1x1 convs of
  # `dense_conv` are matrix products (ATSS's towers are flax convs on both, its neck's
  # laterals 1x1 convs).
  kernels_4d = sum(x.ndim == 4 for x in jax.tree.leaves(variables))
  assert convolutions(text) >= kernels_4d
  assert convolutions(cpu_text) < convolutions(text)

  out_bf16, _ = lower_and_run(apply, variables, _features(jnp.bfloat16), backend='gpu')
  cpu_bf16, _ = lower_and_run(apply, variables, _features(jnp.bfloat16))
  if name == 'atss':  # The head hands float32 to the losses and the box decoding.
    cpu_bf16, out_bf16 = (jax.tree.map(lambda x: x.astype(jnp.bfloat16), x)
                          for x in (cpu_bf16, out_bf16))
  check_bf16(cpu, cpu_bf16, out_bf16)


def _project(name):
  """A project's synthetic demo (runlocal: cvt-tiny, batch 2): config, dataset, model class."""
  if name == 'segmentation':
    from projects.cvt_segmentation import models
    from projects.cvt_segmentation.configs import synthetic_demo
    from projects.cvt_segmentation.data import builder
  else:
    from projects.cvt_detection import models
    from projects.cvt_detection.configs import synthetic_demo
    from projects.cvt_detection.data import builder
  from projects.training import app

  config = synthetic_demo.get_config('runlocal')
  dataset = app.build_dataset(builder.get_dataset, config)
  return config, dataset, models.get_model_cls(config.model_name)


@pytest.mark.parametrize('project', ['segmentation', 'detection'])
def test_a_training_step_on_the_accelerator_path_equals_the_cpu_path(project):
  from projects.training import loop

  config, dataset, model_cls = _project(project)
  batch = next(iter(dataset.train_iter))
  models = {}
  for dtype in ('float32', 'bfloat16'):
    with config.unlocked():
      config.model.backbone.dtype = dtype
    models[dtype] = model_cls(config, dataset.meta_data)
  state, tx, schedule = loop.initial_state(config, models['float32'], dataset.meta_data,
                                           jax.random.key(0))

  def run(dtype, backend, count=1, start=state):
    """Metrics of `count` steps from `start` on one batch (the loss must go down) and the
    lowered step."""
    model = models[dtype]
    loss_fn = getattr(model, 'loss_and_metrics', None) or model.loss_function
    step = lambda s, b: loop.train_step(s, b, flax_model=model.flax_model, loss_fn=loss_fn,
                                        tx=tx, schedule=schedule)
    with kernels.assume_backend(backend):
      jitted = jax.jit(step)
      text = jitted.lower(start, batch).as_text(debug_info=True)
      metrics = []
      for _ in range(count):
        start, m = jitted(start, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return metrics, text

  (cpu,), cpu_text = run('float32', None)
  assert attention.paths_in(cpu_text) == CPU_ATTENTION and grouped_convs(cpu_text) == 0
  (accelerator,), text = run('float32', 'gpu')
  assert attention.paths_in(text) == {'plain_batched'} and grouped_convs(text) > 0
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(accelerator[key], cpu[key], rtol=1e-4)

  bf16, text = run('bfloat16', 'gpu', count=4)
  assert attention.paths_in(text) == {'fused_xla'} and grouped_convs(text) > 0
  losses = [m['loss'] for m in bf16]
  assert np.all(np.isfinite(losses)) and np.isfinite(bf16[0]['grad_norm'])
  assert losses[-1] < losses[0], losses
  # The first step's loss: bfloat16 logits, float32 loss (see the module docstring).
  assert abs(losses[0] - cpu['loss']) <= BF16_MAX_ERROR * abs(cpu['loss'])
