"""cvt-extract: CvT stage maps of images of any size, on a memory budget.

    cvt-extract --checkpoint cvt-13-384-22k.msgpack --output features/ tiles/ *.tif \\
        [--stages stage1,stage3] [--format npz|safetensors] [--memory-budget-mb 2048] [--pca]

Per input `OUTPUT/<stem>.npz` (or `.safetensors`) with one `[H_i, W_i, C_i]` map per stage.
Images of one size run in batches, compiling once; for each size `planning.plan_attention`
picks plain or query-chunked attention that fits the budget. Outputs follow the tools'
output policy (`projects.tools.output_files`); the README's feature extraction page has the rest.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cvt_backbone.cvt import MIN_INPUT_SIZE, VARIANTS, CvTBackbone, CvTSpec
from cvt_backbone.kernels import attention as attention_lib
from cvt_backbone.tools import at_least
from cvt_backbone.weights.converted import variables_digest
from projects.feature_extraction import images as images_lib
from projects.feature_extraction import planning, writers
from projects.feature_extraction.planning import (
  DEFAULT_MEMORY_BUDGET_MB,
  AttentionPlan,
  MemoryBudgetError,
)
from projects.tools import command_line, output_files
from projects.tools.input_files import InputImage, collect_inputs
from projects.tools.progress import Progress
from projects.training.images import ImageError, displayed_size

DTYPES = ('float16', 'float32')
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_NORMALIZATION = 'RGB/255, minus ImageNet mean (0.485,0.456,0.406), over std (0.229,0.224,0.225)'


class ExtractionError(Exception):
  """A problem that stops the run (or, with --strict, any skipped input)."""


class FeatureExtractor:
  """Runs a `CvTBackbone` on batches, with attention planned per input size.

  Compiled functions are cached per attention plan, and jit caches them per shape,
  so each image size compiles once. The variables are passed as arguments, not
  baked into the program as constants.

    extractor = FeatureExtractor(backbone, variables, memory_budget_mb=1024)
    maps = extractor(images)   # [N, H, W, 3] normalized -> {'stage1': [N, H1, W1, C1], ...}
    maps = extractor(images, progress=print)   # 'stage 1 attention chunk 5/256', ...

With `progress`, another compiled program reports each attention chunk as it ends
(`attention.progress_hook`: a host callback per chunk); without it the program
holds no callback.

  Attributes:
    backbone: the backbone, restricted to the selected stages.
    memory_budget_mb: attention memory budget (see `planning.plan_attention`).
    attention: 'auto', 'plain', 'chunked' or 'fused'.
    chunk_size: forced query chunk for chunked attention, or None.
  """

  def __init__(self, backbone: CvTBackbone, variables: Mapping[str, Any], *,
               stages: Sequence[str] | None = None,
               memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, attention: str = 'auto',
               chunk_size: int | None = None):
    """Binds the backbone, its variables and the attention settings.

    Raises:
      ValueError: an unknown stage or attention implementation, or a chunk size with
        plain or fused attention.
    """
    if stages is not None:
      backbone = backbone.clone(out_features=tuple(stages))
    if not backbone.out_names:  # Unknown stage names fail here, listing the known ones.
      raise ValueError('No stage selected.')
    planning.check_settings(memory_budget_mb, attention, chunk_size)
    self.backbone = backbone
    self.memory_budget_mb = memory_budget_mb
    self.attention = attention
    self.chunk_size = chunk_size
    self._variables = jax.device_put(variables)
    self._functions: dict[tuple[str, int | None, bool], Callable[..., Any]] = {}
    self._compiled: set[tuple[Any, ...]] = set()
    self._listener: Callable[[str], None] | None = None
    self._weights_sha256: str | None = None

  @property
  def weights_sha256(self) -> str:
    """sha256 over the variables' names, shapes, dtypes and values: which weights ran.

    Output records name the weights by it, so a checkpoint moved or renamed is the same
    and random weights of another seed are not. Computed once (about 0.2 s per 100 MB).
    """
    if self._weights_sha256 is None:
      self._weights_sha256 = variables_digest(jax.device_get(self._variables))
    return self._weights_sha256

  @property
  def spec(self) -> CvTSpec:
    return self.backbone.resolved_spec

  @property
  def out_names(self) -> tuple[str, ...]:
    return self.backbone.out_names

  def plan(self, height: int, width: int, batch: int) -> AttentionPlan:
    """The attention plan for a batch of `height` x `width` inputs (may raise MemoryBudgetError)."""
    return planning.plan_attention(height, width, batch, self.memory_budget_mb, self.spec,
                                   implementation=self.attention, chunk_size=self.chunk_size)

  def _function(self, plan: AttentionPlan, reported: bool) -> Callable[..., Any]:
    key = (plan.implementation, plan.chunk_size, reported)
    if key not in self._functions:
      model = self.backbone.clone(attention=plan.implementation,
                                  attention_chunk_size=plan.chunk_size,
                                  attention_budget_mb=self.memory_budget_mb)

      def run(variables, x):
        with (attention_lib.progress_hook(self._on_attention) if reported
              else contextlib.nullcontext()):
          return model.apply(variables, x)

      self._functions[key] = jax.jit(run)
    return self._functions[key]

  def _on_attention(self, layer: int, done: int, total: int) -> None:
    """The host callback of the reporting program: one attention unit has ended."""
    listener = self._listener
    if listener is None:
      return
    # The layers in the order the backbone traces them: its blocks, stage by stage.
    stage, block = [(s, b) for s, d in enumerate(self.spec.depths) for b in range(d)][layer]
    depth = self.spec.depths[stage]
    where = f'stage {stage + 1}' + (f' block {block + 1}/{depth}' if depth > 1 else '')
    listener(f'{where} attention chunk {done}/{total}' if total > 1 else f'{where} attention')

  def __call__(self, images: np.ndarray, plan: AttentionPlan | None = None, *,
               progress: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Stage maps of a batch.

    Args:
      images: `[N, H, W, 3]` normalized float32 images.
      plan: the attention plan (default: `self.plan(H, W, N)`).
      progress: called with 'compiling' before a new size compiles, then with each
        attention chunk as it ends ('stage 1 attention chunk 5/256', 'stage 3 block
        4/10 attention chunk 7/18'), from another thread. The maps are the same.

    Returns:
      {stage: `[N, H_i, W_i, C_i]` float32 numpy array} for the selected stages.
    """
    n, height, width, _ = images.shape
    plan = plan or self.plan(height, width, n)
    reported = progress is not None
    function = self._function(plan, reported)
    key = (plan.implementation, plan.chunk_size, reported, images.shape)
    if progress is not None and key not in self._compiled:
      progress('compiling')
    self._listener = progress
    try:
      out = function(self._variables, jnp.asarray(images, jnp.float32))
      maps = {name: np.asarray(value) for name, value in out.items()}
    finally:
      self._listener = None
    self._compiled.add(key)
    return maps


def extract_features(
    backbone: CvTBackbone, variables: Mapping[str, Any], image: np.ndarray, *,
    stages: Sequence[str] | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    attention: str = 'auto', chunk_size: int | None = None, max_side: int | None = None,
    normalize: bool = True, dtype: Any = np.float32) -> dict[str, np.ndarray]:
  """{stage: `[H_i, W_i, C_i]`} maps of one image (compiled per call: `FeatureExtractor`
  keeps them for many images).

  Args:
    image: `[H, W, 3]` RGB in [0, 255], or with `normalize=False` already normalized.
    max_side: shrink the image so that its longer side is at most this.
    dtype: dtype of the returned maps (computed in float32).

  Raises:
    MemoryBudgetError: the budget cannot hold the attention for this size.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'Expected one [H, W, C] image; got shape {image.shape}.')
  pixels = image.astype(np.float32)
  pixels = images_lib.resize(pixels, images_lib.model_size(*pixels.shape[:2], max_side))
  if normalize:
    pixels = images_lib.normalize(pixels)
  extractor = FeatureExtractor(backbone, variables, stages=stages,
                               memory_budget_mb=memory_budget_mb, attention=attention,
                               chunk_size=chunk_size)
  return {name: value[0].astype(dtype) for name, value in extractor(pixels[None]).items()}


def prepare_output_dir(path: str) -> None:
  """Creates the output folder if needed; `ExtractionError` unless a file can be written in it."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExtractionError(f'the output folder {path} exists and is not a folder')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ExtractionError(f'cannot create the output folder {path}: {e.strerror or e}') from None
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ExtractionError(f'cannot write to the output folder {path}: {e.strerror or e}') from None


TOOL = 'cvt-extract'


@dataclasses.dataclass
class Summary:
  """What `extract_files` did: feature files written, inputs already done, failure messages."""

  written: list[str] = dataclasses.field(default_factory=list)
  done: list[str] = dataclasses.field(default_factory=list)
  failed: list[str] = dataclasses.field(default_factory=list)


def record_settings(extractor: FeatureExtractor, dtype: str,
                    max_side: int | None) -> dict[str, Any]:
  """What changes the stored maps; not the attention implementation, chunk, batch or budget
  (they change how, not what, is computed, to float rounding)."""
  backbone = extractor.backbone
  return {
      'weights_sha256': extractor.weights_sha256,
      'activation': backbone.activation,
      'out_norm': bool(backbone.out_norm),
      'compute_dtype': None if backbone.dtype is None else np.dtype(backbone.dtype).name,
      'stages': list(extractor.out_names),
      'dtype': dtype,
      'max_side': max_side,
  }


class _Console:
  """Messages on stderr that do not break the progress bar."""

  def __init__(self) -> None:
    self.progress: Progress | None = None

  def write(self, message: str) -> None:
    if self.progress is not None:
      self.progress.write(message)
    else:
      print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Pending:
  item: InputImage
  original_size: tuple[int, int]
  size: tuple[int, int]
  record: dict[str, Any]


def _batch_plan(extractor: FeatureExtractor, height: int, width: int,
                batch: int) -> tuple[int, AttentionPlan]:
  """The largest batch (halving from `batch`) whose attention fits, and its plan."""
  while True:
    try:
      return batch, extractor.plan(height, width, batch)
    except MemoryBudgetError:
      if batch == 1:
        raise
      batch = max(1, batch // 2)


def extract_files(
    extractor: FeatureExtractor, inputs: Sequence[InputImage], output_dir: str, *, fmt: str = 'npz',
    dtype: str = 'float32', max_side: int | None = None, batch_size: int = 1, pca: bool = False,
    overwrite: bool = False, strict: bool = False, progress: bool = True,
    console: _Console | None = None, reads: Mapping[str, str] | None = None) -> Summary:
  """Extracts and writes the features of `inputs` into the writable `output_dir`.

  What can be checked without the model comes first (outputs that are inputs or `reads`,
  `{path: what}`, such as the checkpoint: a ValueError; existing outputs and their records,
  non-images, sizes against the memory budget), so these errors come before any work:
  MemoryBudgetError for a size even in batches of 1, ExtractionError for a failed input
  with `strict`. A write error (OutputWriteError) stops the run.
  """
  console = console or _Console()
  skip = command_line.Failures(strict, ExtractionError, 'skipped')
  skip.write = console.write
  summary = Summary(failed=skip)
  stages = extractor.out_names
  strides = dict(zip(extractor.backbone.stage_names, extractor.spec.strides, strict=True))
  settings = record_settings(extractor, dtype, max_side)

  def outputs(item: InputImage) -> dict[str, dict[str, Any]]:
    paths = [writers.feature_path(output_dir, item.stem, fmt)]
    if pca:
      paths += [writers.pca_path(output_dir, item.stem, s) for s in stages if s in strides]
    return dict.fromkeys(paths, settings)

  # 1. What existing outputs record, non-images and sizes: headers only.
  todo, done = output_files.plan_inputs(inputs, outputs, TOOL, overwrite, skip,
                                        say=console.write, inputs=reads)
  summary.done.extend(job.item.path for job in done)
  groups: dict[tuple[int, int], list[_Pending]] = collections.defaultdict(list)
  for job in todo:
    try:
      original = displayed_size(job.item.path)
      size = images_lib.model_size(*original, max_side, job.item.path)
    except ImageError as e:
      skip(str(e))
      continue
    groups[size].append(_Pending(job.item, original, size, next(iter(job.records.values()))))

  # 2. A plan per size, before any work: a budget too small for a size stops the run.
  plans = {}
  for (height, width), pending in groups.items():
    try:
      plans[height, width] = _batch_plan(extractor, height, width,
                                         min(batch_size, len(pending)))
    except MemoryBudgetError as e:
      raise MemoryBudgetError(f'{pending[0].item.path}: {e}',
                              allowed_chunk_size=e.allowed_chunk_size,
                              needed_chunk_size=e.needed_chunk_size,
                              needed_budget_mb=e.needed_budget_mb) from None
  for (height, width), (batch, plan) in plans.items():
    count = len(groups[height, width])
    reduced = f' (batches reduced from {batch_size} to fit the budget)' if (
        batch < min(batch_size, count)) else ''
    console.write(f'{count} image{"s" if count > 1 else ""} at '
                  + planning.describe_plan(plan, height, width, batch, extractor.spec) + reduced)

  # 3. Extraction, a batch at a time.
  total = sum(len(p) for p in groups.values())
  bar = Progress(total, 'extract', 'img', enabled=progress and total > 0)
  console.progress = bar
  try:
    for size, pending in groups.items():
      batch, plan = plans[size]
      ready: list[tuple[_Pending, np.ndarray]] = []
      for index, entry in enumerate(pending):
        if not ready:
          bar.start_item(_item_label(entry, pending[index:index + batch]))
        bar.set_detail('reading')
        try:
          ready.append((entry, images_lib.read_image(entry.item.path, entry.size)))
        except ImageError as e:
          skip(str(e))
          bar.update(1)
        if len(ready) == batch or (index == len(pending) - 1 and ready):
          _run_batch(extractor, ready, plan if len(ready) == batch else None, output_dir,
                     fmt=fmt, dtype=dtype, pca=pca, strides=strides, summary=summary,
                     console=console, progress=bar if progress else None)
          bar.update(len(ready))
          ready = []
  finally:
    bar.close()
    console.progress = None
  return summary


def _item_label(entry: _Pending, batch: Sequence[_Pending]) -> str:
  """'big.png 2048x2048' (height x width as read), or 'a.png +3 512x512' for a batch."""
  name = os.path.basename(entry.item.path)
  more = f' +{len(batch) - 1}' if len(batch) > 1 else ''
  return f'{name}{more} {entry.size[0]}x{entry.size[1]}'


def _run_batch(extractor: FeatureExtractor, ready: list[tuple[_Pending, np.ndarray]],
               plan: AttentionPlan | None, output_dir: str, *, fmt: str, dtype: str, pca: bool,
               strides: Mapping[str, int], summary: Summary, console: _Console,
               progress: Progress | None = None) -> None:
  batch = np.stack([images_lib.normalize(pixels) for _, pixels in ready])
  # Per-chunk reports are host callbacks inside the attention loops: on CPU they cost
  # nothing measurable, on an accelerator each would wait for the device, so there the
  # progress is per image only.
  chunks = progress is not None and jax.default_backend() == 'cpu'
  if progress is not None and not chunks:
    progress.set_detail('computing')
  maps = extractor(batch, plan, progress=progress.set_detail if chunks else None)
  if progress is not None:
    progress.set_detail('writing')
  for i, (entry, _) in enumerate(ready):
    features = {}
    for stage, value in maps.items():
      value = value[i]
      if dtype == 'float16' and np.abs(value).max(initial=0) > _FLOAT16_MAX:
        console.write(f'warning: {entry.item.path}: {stage} has values beyond the float16 '
                      'range (stored as inf); use --dtype float32')
      features[stage] = value.astype(dtype)
    height, width = entry.size
    metadata = {
        'source': entry.item.path,
        'input_size': f'{height}x{width}',
        'original_size': '{}x{}'.format(*entry.original_size),
        'strides': json.dumps({s: strides[s] for s in features if s in strides}),
        'normalization': _NORMALIZATION,
        'layout': 'HWC',
    }
    path = writers.feature_path(output_dir, entry.item.stem, fmt)
    if pca:
      for stage in features:
        if stage in strides:  # Not the cls token.
          writers.write_pca(writers.pca_path(output_dir, entry.item.stem, stage),
                            maps[stage][i], strides[stage], entry.record)
    writers.write_features(path, features, fmt, metadata, entry.record)
    summary.written.append(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = command_line.parser(
      'cvt-extract',
      'Extract CvT stage maps (strides 4, 8, 16) from images of any size, one .npz or '
      '.safetensors file per image, with attention chunked to fit a memory budget. Progress '
      '(per image, and per attention chunk inside a large image) goes to stderr: a bar on a '
      'terminal, a line every $CVT_PROGRESS_INTERVAL seconds (10) in a log.')
  command_line.add_inputs(parser, 'output folder (created if missing)')
  weights = parser.add_mutually_exclusive_group(required=True)
  weights.add_argument('--checkpoint', help='a converted checkpoint (.msgpack from cvt-convert)')
  weights.add_argument('--random-weights', action='store_true',
                       help='untrained weights, to try the pipeline only: the features mean nothing')
  parser.add_argument('--variant', default='cvt-13', choices=sorted(VARIANTS),
                      help='architecture for --random-weights (a checkpoint knows its own)')
  parser.add_argument('--seed', type=int, default=0, help='initialisation seed for --random-weights')
  parser.add_argument('--stages', type=command_line.names, default=None,
                      help='stages to store, comma-separated such as stage1,stage3 (default: all)')
  parser.add_argument('--format', choices=writers.FORMATS, default='npz', help='feature file format')
  parser.add_argument('--dtype', choices=DTYPES, default='float32',
                      help='stored dtype (computed in float32)')
  parser.add_argument('--max-side', type=at_least(MIN_INPUT_SIZE), default=None,
                      help='shrink images whose longer side exceeds this, keeping their aspect '
                      'ratio; images whose shorter side then falls below 16 pixels are skipped '
                      '(default: any size)')
  parser.add_argument('--batch-size', type=command_line.positive_int, default=1,
                      help='images of the same size per forward pass (halved when the memory '
                      'budget needs it)')
  parser.add_argument('--memory-budget-mb', type=command_line.positive_float,
                      default=DEFAULT_MEMORY_BUDGET_MB,
                      help='memory for attention logits in MiB; decides plain vs chunked '
                      'attention and the chunk size')
  parser.add_argument('--attention', choices=('auto', 'plain', 'chunked', 'fused'),
                      default='auto', help='force an attention implementation (default: from '
                      'the image size and the budget)')
  parser.add_argument('--chunk-size', type=command_line.positive_int, default=None,
                      help='force queries per chunk for chunked attention (default: the largest '
                      'that fits the budget)')
  parser.add_argument('--pca', action='store_true',
                      help='also write OUTPUT/<stem>_<stage>_pca.png, the first three principal '
                      'components of each map as RGB')
  command_line.add_output_flags(parser)
  args = parser.parse_args(argv)
  if args.chunk_size is not None and args.attention in ('plain', 'fused'):
    parser.error(f'--chunk-size applies to chunked attention, not --attention {args.attention}')
  return args


def load_model(args: argparse.Namespace, stages: Sequence[str] | None,
               console: _Console) -> tuple[CvTBackbone, dict[str, Any], str]:
  """`(backbone, variables, description)` from --checkpoint or --random-weights."""
  if args.random_weights:
    if stages is not None:  # Fails on unknown stages before the initialisation (seconds).
      _ = CvTBackbone(variant=args.variant, out_features=tuple(stages)).out_names
    console.write(f'WARNING: --random-weights: {args.variant} with untrained weights (seed '
                  f'{args.seed}). The features are for testing the pipeline only.')
    backbone = CvTBackbone(variant=args.variant)
    variables = jax.jit(backbone.init)(jax.random.key(args.seed),
                                       jnp.zeros((1, 32, 32, 3), jnp.float32))
    return backbone, variables, f'{args.variant} (random weights, seed {args.seed})'
  # Imported here: only this path reads checkpoints.
  from cvt_backbone.weights.converted import load_backbone

  backbone, variables = load_backbone(args.checkpoint)
  name = backbone.variant if backbone.spec is None else 'a custom CvT'
  return backbone, variables, f'{name} from {args.checkpoint}'


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit status (see the module docstring)."""
  args = parse_args(argv)
  console = _Console()
  # The tool is for very large images; PIL's decompression-bomb limit (about 179
  # megapixels) guards servers against hostile uploads, not local files.
  Image.MAX_IMAGE_PIXELS = None
  start = time.perf_counter()
  try:
    prepare_output_dir(args.output)
    notes: list[str] = []
    inputs, problems = collect_inputs(args.inputs, args.output, notes=notes)
    for message in problems:
      if args.strict:
        raise ExtractionError(message)
      console.write(f'skipped {message}')
    for note in notes:
      console.write(f'note: {note}')
    if not inputs:
      raise ExtractionError('no input files found')
    stages = list(args.stages) if args.stages else None
    backbone, variables, description = load_model(args, stages, console)
    extractor = FeatureExtractor(backbone, variables, stages=stages,
                                 memory_budget_mb=args.memory_budget_mb,
                                 attention=args.attention, chunk_size=args.chunk_size)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
    console.write(f'Loaded {description}: stages {", ".join(extractor.out_names)}, weights '
                  f'{planning.format_bytes(weight_bytes)}')
    summary = extract_files(
        extractor, inputs, args.output, fmt=args.format, dtype=args.dtype,
        max_side=args.max_side, batch_size=args.batch_size, pca=args.pca,
        overwrite=args.overwrite, strict=args.strict, progress=not args.no_progress,
        console=console, reads={args.checkpoint: 'the checkpoint'} if args.checkpoint else None)
  except (ExtractionError, MemoryBudgetError, OSError, ValueError) as e:
    print(f'cvt-extract: error: {e}', file=sys.stderr)
    return command_line.EXIT_FAILED
  failed = len(summary.failed) + len(problems)
  parts = [f'{len(summary.written)} feature file{"s" if len(summary.written) != 1 else ""} '
           f'written to {args.output} in {time.perf_counter() - start:.1f} s']
  if summary.done:
    parts.append(f'{len(summary.done)} already done')
  if failed:
    parts.append(f'{failed} failed')
  console.write('; '.join(parts))
  return command_line.EXIT_FAILED if failed else command_line.EXIT_OK


if __name__ == '__main__':
  sys.exit(main())
