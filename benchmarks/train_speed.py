r"""A segmentation training step: this package (JAX) against its PyTorch equivalent, side by side.

Ours is what `projects.cvt_segmentation.main` runs: the model class of the ADE20K config
(`configs/ade20k_cvt13_upernet.py`: CvT-13 + UPerNet, 512 channels, pool scales 1, 2, 3, 6,
+ FCN auxiliary head on stage 3, 256 channels; dropout 0.1, drop path 0.1), its
`loss_function` (cross-entropy ignoring 255 + 0.4 x auxiliary), the optimizer of
`projects.training.optim.make_optimizer` (AdamW, layer-wise lr decay) and
`projects.training.loop.train_step`, jitted with the state donated as the loop does.

The PyTorch side is built from `transformers`: `CvtModel` hidden states (the three stage
maps, cls token split off), `UperNetHead` on them and `UperNetFCNHead` on stage 3 (the
same widths), both logits upsampled bilinearly to the input, cross-entropy with
ignore_index=255 plus 0.4 x the auxiliary loss, `torch.optim.AdamW`, with as many torch
threads as the machine has cores. SegFormer is compared with `SegformerDecodeHead` (256
channels); Semantic FPN has no Hugging Face head, so only ours is measured.

Each measurement runs in its own fresh process (JAX's compile cache off), so peak RSS is
that step's alone (interpreter and framework included, as a user would see it). Both sides
train float32 from random weights on the same random images and labels (ADE20K's 150
classes, 10% of the pixels labelled 255). Prints one table: compile time and first step
apart, the median seconds per step after warm-up, peak RSS, and the ratios (ours/PyTorch
steps per second and peak RSS), with the parameter counts of both sides and the machine's
float32 matmul throughput and load average measured in the same run.

  python benchmarks/train_speed.py                                  # 512x2 and 256x8, UPerNet
  python benchmarks/train_speed.py --heads upernet,semantic_fpn,segformer --json out.json
  python benchmarks/train_speed.py --variant cvt-tiny --sizes 64x2 --steps 2 --warmup 1

Needs the test extra (torch, transformers) for the reference rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import workers

from projects.tools import command_line
from projects.training import xla_flags

NUM_CLASSES = 150  # ADE20K
IGNORE_INDEX = 255
IGNORE_FRACTION = 0.1
AUX_WEIGHT = 0.4  # mmseg's UPerNet configs; `config.loss.aux_weight`
HEADS = ('upernet', 'semantic_fpn', 'segformer')
HEAD_TITLES = {'upernet': 'UPerNet + FCN aux', 'semantic_fpn': 'Semantic FPN',
               'segformer': 'SegFormer'}
# Heads with a Hugging Face counterpart (transformers' UperNet and SegFormer heads).
REFERENCE_HEADS = ('upernet', 'segformer')

# Other work on the machine slows both sides, and PyTorch's OpenMP threads far more: on 2
# busy cores (load 4.6) its CvT-13 UPerNet step at 64x64 b2 took 0.54 s with 1 thread and
# 1.7-19 s with 2 (each op's barrier waits for a descheduled thread), 0.56-0.61 s with 2
# threads and OMP_WAIT_POLICY=PASSIVE (`--torch-omp-wait-policy passive`).
BUSY_LOAD = 0.5  # per core, from the 1-minute load average before the run
BUSY_WARNING = ('warning: the machine is busy (load average {load:.2f} on {cores} cores): the '
                'timings are unreliable, PyTorch\'s with several threads most of all{hint}; '
                'rerun on a quiet machine for figures to publish.')

EPILOG = ('exit status: 0 when every measurement ran, 1 when any failed (its row is missing '
          'and the worker\'s last lines are printed), 2 for bad arguments.')


def _random_batch(size: int, batch: int, num_classes: int):
  """`(images [B, H, W, 3] float32, labels [B, H, W] int32 with IGNORE_INDEX)`, seeded."""
  import numpy as np

  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  labels = rng.integers(0, num_classes, (batch, size, size), dtype=np.int32)
  labels[rng.random((batch, size, size)) < IGNORE_FRACTION] = IGNORE_INDEX
  return images, labels


def ours_config(head: str, variant: str):
  """The project's config of `head` (its ADE20K file where there is one) for `variant`."""
  from projects.cvt_segmentation.configs import (
      ade20k_cvt13_semantic_fpn,
      ade20k_cvt13_upernet,
      common,
  )

  short = variant.removeprefix('cvt-')
  if head == 'upernet':
    return ade20k_cvt13_upernet.get_config(f'variant={short}')
  if head == 'semantic_fpn':
    return ade20k_cvt13_semantic_fpn.get_config(f'variant={short}')
  # No SegFormer config file: mmseg's recipe with the UPerNet config's optimizer.
  config = common.base_config('cvt_segformer', 'ade20k')
  config.model.backbone.variant = variant
  config.optimizer.base_lr = 1e-4
  config.optimizer.weight_decay = 0.05
  config.optimizer.head_lr_mult = 1.0
  return config


def _count(tree) -> int:
  import jax

  return int(sum(x.size for x in jax.tree.leaves(tree)))


def ours_step(head: str, variant: str, size: int, batch: int, dtype: str = 'float32',
              attention: str | None = None):
  """Our training step on random data: `(model, lowered, compiled, step, losses, info)`.

  `step()` runs one step, waits for it and appends its loss to `losses`; `info` holds the
  init and compile seconds and the parameter counts. `attention` overrides the config's.
  """
  import jax
  import numpy as np

  from projects.cvt_segmentation import models
  from projects.training import loop

  config = ours_config(head, variant)
  config.model.backbone.dtype = dtype  # the backbone's compute dtype; parameters stay float32
  if attention is not None:
    config.model.backbone.attention = attention
  meta = {'input_shape': (batch, size, size, 3), 'num_classes': NUM_CLASSES}
  model = models.get_model_cls(config.model_name)(config, meta)
  start = time.perf_counter()
  state, tx, schedule = loop.initial_state(config, model, meta, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  params = state.variables['params']
  images, labels = _random_batch(size, batch, NUM_CLASSES)
  data = jax.device_put({'inputs': images, 'label': labels,
                         'batch_mask': np.ones(batch, np.float32)})
  # As `loop.train` builds and compiles it (one device: no shardings to give).
  step_fn = loop.jit_train_step(flax_model=model.flax_model, loss_fn=model.loss_function,
                                tx=tx, schedule=schedule)
  start = time.perf_counter()
  lowered = step_fn.lower(state, data)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  loop.release_freed_memory()
  losses = []

  def step():
    nonlocal state
    state, metrics = compiled(state, data)
    losses.append(float(metrics['loss']))  # waits for the step

  info = {'compile_s': compile_s, 'init_s': init_s, 'params': _count(params),
          'param_parts': {k: _count(v) for k, v in params.items()}}
  return model, lowered, compiled, step, losses, info


def worker_ours(head: str, variant: str, size: int, batch: int, warmup: int,
                steps: int, dtype: str = 'float32') -> dict:
  import jax

  *_, compiled, step, losses, info = ours_step(head, variant, size, batch, dtype)
  memory = compiled.memory_analysis()
  temp_gb = getattr(memory, 'temp_size_in_bytes', 0) / 2**30 if memory is not None else 0.0
  first_s, times = workers.run_steps(step, warmup, steps)
  return {'times': times, 'first_step_s': first_s, **info,
          'first_loss': losses[0], 'last_loss': losses[-1], 'xla_temp_gb': temp_gb,
          'device': str(jax.devices()[0])}


def _cvt_config(variant: str):
  """Hugging Face's `CvtConfig` of one of our variants (same dims, heads and depths)."""
  from transformers import CvtConfig

  from cvt_backbone.cvt import get_spec

  spec = get_spec(variant)
  config = CvtConfig()  # CvT-13; its other settings are those of every variant
  config.embed_dim = list(spec.embed_dims)
  config.num_heads = list(spec.num_heads)
  config.depth = list(spec.depths)
  return config


def _hf_cvt_model(variant: str):
  """`CvtModel` of `variant`, also for depths Hugging Face cannot build directly.

  `CvtStage` gives every block of stage i the i-th entry of its stage's drop-path
  `linspace` (modeling_cvt.py: `drop_path_rates[self.stage]`), so stage i needs at least
  i + 1 blocks (cvt-tiny's stage 2 has one). Such stages are built with i + 1 blocks and
  cut back to their depth: the same architecture and parameters.
  """
  import torch
  from transformers import CvtModel

  config = _cvt_config(variant)
  depths = list(config.depth)
  config.depth = [max(d, i + 1) for i, d in enumerate(depths)]
  model = CvtModel(config, add_pooling_layer=False)
  for stage, depth in zip(model.encoder.stages, depths, strict=True):
    stage.layers = torch.nn.Sequential(*list(stage.layers)[:depth])
  model.config.depth = depths
  return model


def build_reference(head: str, variant: str, num_classes: int = NUM_CLASSES):
  """The PyTorch model: `forward(images NCHW, labels) -> loss`, and its parts' names."""
  import torch
  import torch.nn.functional as F
  from transformers import SegformerConfig, UperNetConfig
  from transformers.models.segformer.modeling_segformer import SegformerDecodeHead
  from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

  backbone = _hf_cvt_model(variant)
  channels = list(backbone.config.embed_dim)
  if head == 'upernet':
    config = UperNetConfig(hidden_size=512, pool_scales=[1, 2, 3, 6], num_labels=num_classes,
                           auxiliary_in_channels=None, auxiliary_channels=256,
                           auxiliary_num_convs=1, auxiliary_concat_input=False)
    decode_head = UperNetHead(config, in_channels=channels)
    auxiliary_head = UperNetFCNHead(config, in_channels=channels, in_index=2)
  elif head == 'segformer':
    config = SegformerConfig(num_encoder_blocks=len(channels), hidden_sizes=channels,
                             decoder_hidden_size=256, num_labels=num_classes,
                             classifier_dropout_prob=0.1)
    decode_head = SegformerDecodeHead(config)
    auxiliary_head = None
  else:
    raise ValueError(f'No Hugging Face reference for head {head!r}; expected one of '
                     f'{REFERENCE_HEADS}.')

  class Reference(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone = backbone
      self.decode_head = decode_head
      self.auxiliary_head = auxiliary_head

    def forward(self, images, labels):
      # Stage maps [B, C, H, W]; the encoder splits stage 3's cls token off.
      features = list(self.backbone(pixel_values=images, output_hidden_states=True)
                      .hidden_states)

      def loss(logits):
        logits = F.interpolate(logits, size=images.shape[2:], mode='bilinear',
                               align_corners=False)
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

      total = loss(self.decode_head(features))
      if self.auxiliary_head is not None:
        total = total + AUX_WEIGHT * loss(self.auxiliary_head(features))
      return total

  return Reference()


def worker_torch(head: str, variant: str, size: int, batch: int, warmup: int, steps: int,
                 threads: int, device: str = 'cpu', dtype: str = 'float32') -> dict:
  """The reference's steps on `device`; 'bfloat16' runs the forward pass under autocast."""
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  start = time.perf_counter()
  model = build_reference(head, variant).to(device).train()
  # mmseg's UPerNet recipe for transformers: lr 1e-4, weight decay 0.05.
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  init_s = time.perf_counter() - start
  images, labels = _random_batch(size, batch, NUM_CLASSES)
  images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  labels = torch.from_numpy(labels).long().to(device)
  autocast = dict(device_type=torch.device(device).type, dtype=torch.bfloat16,
                  enabled=dtype == 'bfloat16')
  losses = []

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(**autocast):
      loss = model(images, labels)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())  # waits for the step

  first_s, times = workers.run_steps(step, warmup, steps)
  parts = {name: sum(p.numel() for p in module.parameters())
           for name, module in model.named_children()}
  return {'times': times, 'compile_s': 0.0, 'first_step_s': first_s, 'init_s': init_s,
          'params': sum(p.numel() for p in model.parameters()), 'param_parts': parts,
          'first_loss': losses[0], 'last_loss': losses[-1],
          'device': f'cpu ({threads} threads)' if device == 'cpu' else device}


def _run_worker(args: argparse.Namespace, worker: list[str]) -> dict | None:
  env = workers.environment()
  if worker[0] == 'ours':
    xla_flags.set_training_flags(env)  # as the project mains set them
  if worker[0] == 'torch' and args.torch_omp_wait_policy != 'default':
    env['OMP_WAIT_POLICY'] = args.torch_omp_wait_policy.upper()
  return workers.run(__file__, [
      '--variant', args.variant, '--dtype', args.dtype, '--steps', str(args.steps),
      '--warmup', str(args.warmup), '--torch-threads', str(args.torch_threads),
      '--worker', *worker], ' '.join(worker), env)


def size_batch(text: str) -> tuple[tuple[int, int], ...]:
  """'512x2,256x8' -> ((512, 2), (256, 8)): square inputs and batch sizes (batch 1 if absent)."""
  pairs = []
  for item in command_line.names(text):
    size, _, batch = item.partition('x')
    try:
      pair = (int(size), int(batch or 1))
    except ValueError:
      pair = (0, 0)
    if min(pair) <= 0:
      raise argparse.ArgumentTypeError(
          f'expected SIZE[xBATCH] items such as 512x2,256x8 (positive integers), got {item!r}')
    pairs.append(pair)
  return tuple(pairs)


def choice_names(kind: str, choices: tuple[str, ...]):
  """An argparse type: comma-separated names, each one of `choices`."""
  def parse(text: str) -> tuple[str, ...]:
    names = command_line.names(text)
    unknown = [n for n in names if n not in choices]
    if unknown:
      raise argparse.ArgumentTypeError(
          f'unknown {kind} {", ".join(unknown)}; expected some of {",".join(choices)}')
    return names

  return parse


head_names = choice_names('head', HEADS)


def variant_name(text: str) -> str:
  """A CvT variant name ('13', 'CvT-13', 'cvt-tiny') -> its canonical form ('cvt-13')."""
  from cvt_backbone.cvt import canonical_variant_name, get_spec

  try:
    get_spec(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return canonical_variant_name(text)


def build_parser() -> argparse.ArgumentParser:
  parser = command_line.parser('train_speed.py', __doc__.splitlines()[0], epilog=EPILOG)
  parser.add_argument('--sizes', type=size_batch, default='512x2,256x8',
                      help='comma-separated SIZE[xBATCH] square training crops')
  parser.add_argument('--heads', type=head_names, default='upernet',
                      help=f'comma-separated heads, of {",".join(HEADS)}')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (their median is kept)')
  parser.add_argument('--warmup', type=int, default=1,
                      help='untimed steps after the first one (reported apart) and before the '
                           'timed ones')
  parser.add_argument('--variant', type=variant_name, default='cvt-13',
                      help='backbone variant of both sides (cvt-tiny for a quick check)')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help="our backbone's compute dtype (config.model.backbone.dtype; the "
                      'heads and the reference stay float32)')
  parser.add_argument('--torch-threads', type=int, default=os.cpu_count(),
                      help='torch.set_num_threads for the reference (default: the machine\'s '
                           f'cores, {os.cpu_count()})')
  parser.add_argument('--torch-omp-wait-policy', default='default',
                      choices=('default', 'passive', 'active'),
                      help='OMP_WAIT_POLICY of the reference\'s process (default: the '
                           'environment\'s); passive keeps its threads fast on a busy machine')
  parser.add_argument('--skip-reference', action='store_true',
                      help='measure ours only')
  parser.add_argument('--json', help='also write the results to this file')
  parser.add_argument('--worker', nargs='+', help=argparse.SUPPRESS)
  return parser


def _param_line(head: str, ours: dict | None, ref: dict | None) -> str:
  def parts(result):
    return ', '.join(f'{k} {v:,}' for k, v in result['param_parts'].items())

  title = HEAD_TITLES[head]
  if ours is None:
    return f'{title} parameters: ours not measured'
  line = f'{title} parameters: ours {ours["params"]:,}'
  if ref is None:
    return line + (' (no Hugging Face reference)' if head not in REFERENCE_HEADS else '')
  if ref['params'] == ours['params']:
    return line + f', PyTorch {ref["params"]:,}: the same'
  return (line + f', PyTorch {ref["params"]:,}: they DIFFER by '
          f'{ours["params"] - ref["params"]:+,} (ours: {parts(ours)}; PyTorch: {parts(ref)})')


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    build_parser().error(f'--steps must be at least 1 and --warmup at least 0, got '
                         f'{args.steps} and {args.warmup}')

  if args.worker:
    workers.exit_with_parent()  # a killed run leaves no worker behind
    kind, *rest = args.worker
    if kind == 'peak':
      result = workers.matmul_peak()
    else:
      head, size, batch = rest[0], int(rest[1]), int(rest[2])
      if kind == 'ours':
        result = worker_ours(head, args.variant, size, batch, args.warmup, args.steps,
                             args.dtype)
      else:
        result = worker_torch(head, args.variant, size, batch, args.warmup, args.steps,
                              args.torch_threads)
    result['peak_rss_gb'] = workers.peak_rss_gb()
    print(json.dumps(result))
    return command_line.EXIT_OK

  failed = False
  load_start = os.getloadavg()
  peak = _run_worker(args, ['peak'])
  failed |= peak is None
  peak_gflops = peak['gflops'] if peak else float('nan')
  omp = ('' if args.torch_omp_wait_policy == 'default' else
         f', OMP_WAIT_POLICY={args.torch_omp_wait_policy.upper()}')
  dtype = 'float32' if args.dtype == 'float32' else f'ours {args.dtype} backbone compute'
  print(f'{args.variant} segmentation training step, {dtype}, AdamW, {NUM_CLASSES} classes; '
        f'{os.cpu_count()} CPU cores (torch threads {args.torch_threads}{omp}); float32 matmul '
        f'(jnp.dot 2048^2): {peak_gflops:.1f} GFLOP/s; load average {load_start[0]:.2f}; '
        f'median of {args.steps} timed step{"s" * (args.steps > 1)} after {1 + args.warmup} '
        'untimed', flush=True)
  busy = load_start[0] > BUSY_LOAD * os.cpu_count()
  hint = (' (try --torch-omp-wait-policy passive)' if args.torch_omp_wait_policy == 'default'
          else '')
  if busy:
    print(BUSY_WARNING.format(load=load_start[0], cores=os.cpu_count(), hint=hint), flush=True)
  header = (f'{"input":>12} | {"head":<17} | {"impl":<24} | {"compile s":>9} | '
            f'{"1st step s":>10} | {"s/step":>7} | {"steps/s":>7} | {"peak RSS GB":>11} | '
            f'{"speed":>6} | {"RSS ratio":>9}')
  print(header)
  print('-' * len(header), flush=True)
  rows, notes = [], []
  for head in args.heads:
    counts = {}
    for size, batch in args.sizes:
      task = [head, str(size), str(batch)]
      ours = _run_worker(args, ['ours', *task])
      ref = None
      has_reference = head in REFERENCE_HEADS and not args.skip_reference
      if has_reference:
        ref = _run_worker(args, ['torch', *task])
      failed |= ours is None or (has_reference and ref is None)
      # Parameter counts do not depend on the input size: the first measured ones.
      if ours is not None:
        counts.setdefault('ours', ours)
      if ref is not None:
        counts.setdefault('ref', ref)
      label = f'{size}x{size} b{batch}'
      for name, result in (('ours (JAX)', ours), ('HF + PyTorch', ref)):
        if result is None:
          if name == 'HF + PyTorch' and head not in REFERENCE_HEADS:
            print(f'{label:>12} | {HEAD_TITLES[head]:<17} | {"PyTorch: no HF head":<24} |',
                  flush=True)
          continue
        median = statistics.median(result['times'])
        row = {'head': head, 'size': size, 'batch': batch, 'impl': name,
               'median_s': median, 'steps_per_s': 1 / median, **result}
        speed = rss = ''
        if name.startswith('ours') and ref is not None:
          row['speed_ratio'] = statistics.median(ref['times']) / median
          row['rss_ratio'] = result['peak_rss_gb'] / ref['peak_rss_gb']
          speed, rss = f'{row["speed_ratio"]:.2f}x', f'{row["rss_ratio"]:.2f}'
        rows.append(row)
        compile_s = f'{result["compile_s"]:9.1f}' if name.startswith('ours') else f'{"-":>9}'
        print(f'{label:>12} | {HEAD_TITLES[head]:<17} | {name:<24} | {compile_s} | '
              f'{result["first_step_s"]:10.2f} | {median:7.2f} | {1 / median:7.3f} | '
              f'{result["peak_rss_gb"]:11.2f} | {speed:>6} | {rss:>9}', flush=True)
    notes.append(_param_line(head, counts.get('ours'), counts.get('ref')))
  load_end = os.getloadavg()
  print('-' * len(header))
  print('speed: ours / PyTorch steps per second (above 1: ours faster); RSS ratio: ours / '
        'PyTorch peak RSS (below 1: ours smaller).')
  for note in notes:
    print(note)
  print(f'load average at the end: {load_end[0]:.2f}, {load_end[1]:.2f}, {load_end[2]:.2f} '
        '(this run\'s own threads count in it, about one per core)')
  # Less this run's own threads, about one per core.
  if busy or load_end[0] > (1 + BUSY_LOAD) * os.cpu_count():
    print(BUSY_WARNING.format(load=max(load_start[0], load_end[0]), cores=os.cpu_count(),
                              hint=hint))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'variant': args.variant, 'dtype': args.dtype, 'cpu_cores': os.cpu_count(),
                 'torch_threads': args.torch_threads,
                 'torch_omp_wait_policy': args.torch_omp_wait_policy,
                 'matmul_peak_gflops': peak_gflops,
                 'load_average_start': load_start, 'load_average_end': load_end, 'busy': busy,
                 'steps': args.steps, 'warmup': args.warmup, 'rows': rows}, f, indent=1)
  return command_line.EXIT_FAILED if failed else command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
