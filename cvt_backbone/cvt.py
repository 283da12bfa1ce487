"""CvT (Convolutional vision Transformer, Wu et al. 2021, arXiv 2103.15808) in Flax.

The model family in one file: blocks, the multi-scale `CvTBackbone`, the `CvT` classifier,
the variant table and `build_backbone`. Names mirror the official checkpoints (microsoft/CvT
`cls_cvt.py`, stage modules `stage0..stage2`); the backbone's outputs use the paper's stage
numbers (`'stage1'..'stage3'`, strides 4/8/16). Attention mixes every position of an image, so
one NaN or inf pixel makes all its outputs NaN: `assert_finite` refuses such inputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from cvt_backbone import kernels
from cvt_backbone.kernels import attention as attention_lib
from cvt_backbone.kernels import depthwise as depthwise_lib
from cvt_backbone.tools import is_int

Dtype = Any
MIN_INPUT_SIZE = 16

# PyTorch LayerNorm/BatchNorm defaults, which the official weights were trained with.
LN_EPS = 1e-5
BN_EPS = 1e-5
BN_MOMENTUM = 0.9  # = 1 - PyTorch's momentum of 0.1.

# Official init: trunc_normal(std=0.02) for Linear weights and the cls token.
_dense_init = nn.initializers.truncated_normal(0.02)


def _check_rate(name: str, value: Any) -> None:
  """A dropout or drop path probability: a number in [0, 1) (1 would drop everything)."""
  if not (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and 0 <= value < 1):
    raise ValueError(f'{name} must be in [0, 1); got {value!r}.')


@dataclasses.dataclass(frozen=True)
class CvTSpec:
  """The architecture of a CvT: one entry per stage (official `SPEC` of the yaml configs)."""

  embed_dims: tuple[int, ...] = (64, 192, 384)
  num_heads: tuple[int, ...] = (1, 3, 6)
  depths: tuple[int, ...] = (1, 2, 10)
  mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0)
  patch_sizes: tuple[int, ...] = (7, 3, 3)
  patch_strides: tuple[int, ...] = (4, 2, 2)
  patch_paddings: tuple[int, ...] = (2, 1, 1)
  kernel_qkv: tuple[int, ...] = (3, 3, 3)
  stride_q: tuple[int, ...] = (1, 1, 1)
  stride_kv: tuple[int, ...] = (2, 2, 2)
  cls_token: tuple[bool, ...] = (False, False, True)
  drop_path_rates: tuple[float, ...] = (0.0, 0.0, 0.1)
  qkv_bias: bool = True

  def __post_init__(self):
    lengths = {f.name: len(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != 'qkv_bias'}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'CvTSpec fields must all have one entry per stage; got lengths {lengths}.')
    for dim, heads in zip(self.embed_dims, self.num_heads, strict=True):
      if dim % heads:
        raise ValueError(f'Stage width {dim} is not divisible by its {heads} heads.')
    for rate in self.drop_path_rates:
      _check_rate('CvTSpec.drop_path_rates', rate)

  def to_dict(self) -> dict[str, Any]:
    """The fields as msgpack/JSON-friendly lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, fields: Mapping[str, Any]) -> CvTSpec:
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

  @property
  def num_stages(self) -> int:
    return len(self.embed_dims)

  @property
  def strides(self) -> tuple[int, ...]:
    """Cumulative stride of each stage's output map (4, 8, 16 for the official models)."""
    return tuple(int(s) for s in np.cumprod(self.patch_strides))

  def output_sizes(self, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """The exact `(H_i, W_i)` of each stage's map: per axis `(n + 2p - k) // s + 1` per
    embedding conv (official models: `(n + 1) // 4`, then `ceil(n / 2)` twice)."""
    if not (is_int(height) and is_int(width) and height >= 1 and width >= 1):
      raise ValueError(f'height and width must be integers >= 1; got {height!r}x{width!r}.')
    sizes = []
    h, w = int(height), int(width)
    for i, (k, s, p) in enumerate(
        zip(self.patch_sizes, self.patch_strides, self.patch_paddings, strict=True)):
      h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
      if h < 1 or w < 1:
        raise ValueError(f'an input of {height}x{width} leaves stage {i + 1} an empty map '
                         f'({max(h, 0)}x{max(w, 0)}); give a larger input.')
      sizes.append((h, w))
    return tuple(sizes)


VARIANTS: dict[str, CvTSpec] = {
    # microsoft/CvT experiments/imagenet/cvt/cvt-13-224x224.yaml etc.
    'cvt-13': CvTSpec(),
    'cvt-21': CvTSpec(depths=(1, 4, 16)),
    'cvt-w24': CvTSpec(embed_dims=(192, 768, 1024), num_heads=(3, 12, 16), depths=(2, 2, 20),
                       drop_path_rates=(0.0, 0.0, 0.3)),
    # A few-thousand-parameter model with every structural feature, for tests.
    'cvt-tiny': CvTSpec(embed_dims=(16, 32, 48), num_heads=(1, 2, 3), depths=(1, 1, 2)),
}


def canonical_variant_name(name: str) -> str:
  """'CvT-13', 'cvt_13' and '13' all name 'cvt-13'."""
  key = name.strip().lower().replace('_', '-')
  if not key.startswith('cvt-'):
    key = 'cvt-' + key.removeprefix('cvt')
  return key


def get_spec(variant: str) -> CvTSpec:
  """The `CvTSpec` of a named variant ('cvt-13', 'cvt-21', 'cvt-w24', 'cvt-tiny')."""
  key = canonical_variant_name(variant)
  if key not in VARIANTS:
    raise ValueError(f'Unknown CvT variant {variant!r}; expected one of {sorted(VARIANTS)}.')
  return VARIANTS[key]


ACTIVATIONS = {
    # Official code (cls_cvt.py QuickGELU).
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    # Hugging Face CvtModel (nn.GELU): the exact erf form.
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class ConvEmbed(nn.Module):
  """Convolutional token embedding: strided conv with explicit padding, then LayerNorm."""

  dim: int
  patch_size: int
  stride: int
  padding: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, H, W, C_in]` -> `[N, H', W', dim]`."""
    # Explicit padding: 'SAME' pads asymmetrically and shifts every feature.
    p = self.padding
    x = nn.Conv(self.dim, (self.patch_size, self.patch_size), strides=self.stride,
                padding=((p, p), (p, p)), dtype=self.dtype, param_dtype=self.param_dtype,
                name='proj')(x)
    return nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                        name='norm')(x)


class DepthwiseConv(nn.Module):
  """Depthwise conv without bias; the kernel is `[k, k, 1, C]` as in `nn.Conv(groups=C)`."""

  kernel_size: int
  stride: int
  padding: int
  implementation: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel_size, self.kernel_size, 1, x.shape[-1]), self.param_dtype)
    return depthwise_lib.depthwise_conv2d(
        x.astype(self.dtype), kernel, stride=self.stride, padding=self.padding,
        implementation=self.implementation)


class ConvProjection(nn.Module):
  """The 'dw_bn' projection of CvT: depthwise conv then BatchNorm, on the token grid."""

  kernel_size: int
  stride: int
  depthwise: str = 'auto'
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """`[N, h, w, C]` -> `[N, h', w', C]`."""
    x = DepthwiseConv(self.kernel_size, self.stride, self.kernel_size // 2, self.depthwise,
                      self.dtype, self.param_dtype, name='conv')(x)
    return nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                        epsilon=BN_EPS, axis_name=self.bn_axis_name, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='bn')(x)


class ConvAttention(nn.Module):
  """Multi-head attention with convolutional projections (official `Attention`)."""

  dim: int
  num_heads: int
  spatial: tuple[int, int]
  with_cls_token: bool
  kernel_size: int = 3
  stride_q: int = 1
  stride_kv: int = 2
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  implementation: str = 'auto'
  chunk_size: int | None = None
  budget_bytes: int = attention_lib.DEFAULT_MEMORY_BUDGET_BYTES
  depthwise: str = 'auto'
  bn_axis_name: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool, deterministic: bool) -> jax.Array:
    """`[N, T, C]` tokens (cls first when present, then the `h*w` grid) -> `[N, T, dim]`."""
    n, _, c = x.shape
    h, w = self.spatial
    cls_token, grid = (x[:, :1], x[:, 1:]) if self.with_cls_token else (None, x)
    grid = grid.reshape(n, h, w, c)

    def project(name: str, stride: int) -> jax.Array:
      y = ConvProjection(self.kernel_size, stride, self.depthwise, self.bn_axis_name,
                         self.dtype, self.param_dtype, name=f'conv_proj_{name}')(
                             grid, use_running_average)
      y = y.reshape(n, -1, c)
      if cls_token is not None:
        # The cls token skips the conv projection and joins q, k and v in front.
        y = jnp.concatenate([cls_token.astype(y.dtype), y], axis=1)
      y = nn.Dense(self.dim, use_bias=self.qkv_bias, kernel_init=_dense_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=f'proj_{name}')(y)
      # Heads split the channels as head * head_dim + j (einops 'b t (h d)').
      return y.reshape(n, y.shape[1], self.num_heads, self.dim // self.num_heads)

    q = project('q', self.stride_q)
    k = project('k', self.stride_kv)
    v = project('v', self.stride_kv)
    # Official scale: the full stage width, not the head dim.
    out = attention_lib.attention(
        q, k, v, scale=self.dim**-0.5, implementation=self.implementation,
        chunk_size=self.chunk_size, budget_bytes=self.budget_bytes)
    out = out.reshape(n, -1, self.dim)
    out = nn.Dense(self.dim, kernel_init=_dense_init, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='proj')(out)
    return nn.Dropout(self.dropout_rate)(out, deterministic=deterministic)


class Mlp(nn.Module):
  """fc1 (D -> ratio*D), activation, fc2."""

  dim: int
  hidden_dim: int
  activation: str = 'quick_gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    dense = lambda features, name: nn.Dense(features, kernel_init=_dense_init, dtype=self.dtype,
                                            param_dtype=self.param_dtype, name=name)
    x = _activation(self.activation)(dense(self.hidden_dim, 'fc1')(x))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(self.dim, 'fc2')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x + DropPath(Attn(LN1(x))); x + DropPath(MLP(LN2(x)))."""

  attention_kwargs: tuple[tuple[str, Any], ...]  # `ConvAttention` fields.
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  activation: str = 'quick_gelu'
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool, deterministic: bool) -> jax.Array:
    """`[N, T, D]` -> `[N, T, D]`."""
    dim = x.shape[-1]
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype,
                                     param_dtype=self.param_dtype, name=name)
    # Drop path: one Bernoulli draw per sample, broadcast over tokens and channels.
    drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(
        y, deterministic=deterministic)
    y = ConvAttention(dropout_rate=self.dropout_rate, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='attn', **dict(self.attention_kwargs))(
                          norm('norm1')(x), use_running_average, deterministic)
    x = x + drop_path(y)
    y = Mlp(dim, int(dim * self.mlp_ratio), self.activation, self.dropout_rate,
            self.dtype, self.param_dtype, name='mlp')(norm('norm2')(x), deterministic)
    return x + drop_path(y)


class CvTStage(nn.Module):
  """One stage (official `VisionTransformer`): conv embedding, optional cls token, blocks."""

  spec: CvTSpec
  index: int
  activation: str = 'quick_gelu'
  dropout_rate: float = 0.0
  attention_kwargs: tuple[tuple[str, Any], ...] = ()
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool,
               deterministic: bool) -> tuple[jax.Array, jax.Array | None]:
    """`[N, H, W, C_in]` -> (`[N, H', W', D]` map, `[N, D]` cls token or None)."""
    spec, i = self.spec, self.index
    dim, depth = spec.embed_dims[i], spec.depths[i]
    x = ConvEmbed(dim, spec.patch_sizes[i], spec.patch_strides[i], spec.patch_paddings[i],
                  self.dtype, self.param_dtype, name='patch_embed')(x)
    n, h, w, _ = x.shape
    x = x.reshape(n, h * w, dim)
    with_cls = spec.cls_token[i]
    if with_cls:
      cls = self.param('cls_token', _dense_init, (1, 1, dim), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, dim)).astype(x.dtype), x], axis=1)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)

    attention = dict(self.attention_kwargs, dim=dim, num_heads=spec.num_heads[i],
                     spatial=(h, w), with_cls_token=with_cls, kernel_size=spec.kernel_qkv[i],
                     stride_q=spec.stride_q[i], stride_kv=spec.stride_kv[i],
                     qkv_bias=spec.qkv_bias)
    block_cls = nn.remat(Block, static_argnums=(2, 3)) if self.remat else Block
    rates = np.linspace(0.0, spec.drop_path_rates[i], depth)
    for j in range(depth):
      x = block_cls(tuple(sorted(attention.items())), spec.mlp_ratios[i], float(rates[j]),
                    self.activation, self.dropout_rate, self.dtype, self.param_dtype,
                    name=f'blocks_{j}')(x, use_running_average, deterministic)
    cls_out = x[:, 0] if with_cls else None
    grid = x[:, 1:] if with_cls else x
    return grid.reshape(n, h, w, dim), cls_out


def is_size(value: Any) -> bool:
  """An integer (`is_int`) or a symbolic dimension of `jax.export` (an exported model's size)."""
  return is_int(value) or jax.export.is_symbolic_dim(value)


def _check_image_size(height: Any, width: Any) -> None:
  if not (is_size(height) and is_size(width)):
    raise ValueError(f'CvT image sizes in pixels must be integers; got {height!r}x{width!r}.')
  try:
    small = height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE
  except jax.errors.InconclusiveDimensionOperation as error:
    raise ValueError(
        f'CvT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels: export it with '
        f"the symbolic sizes constrained, jax.export.symbolic_shape('b, {height}, {width}', "
        f"constraints=('{height} >= {MIN_INPUT_SIZE}', '{width} >= {MIN_INPUT_SIZE}')).") from error
  if small:
    raise ValueError(f'CvT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels; '
                     f'got {height}x{width}.')


def _check_images(images: jax.Array, in_chans: int) -> None:
  if images.ndim != 4:
    raise ValueError(f'CvT expects NHWC images [N, H, W, {in_chans}]; got shape {images.shape}.')
  if images.shape[-1] != in_chans:
    raise ValueError(f'CvT expects {in_chans} channels last (NHWC); got shape {images.shape}.')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f'CvT expects floating-point images; got dtype {images.dtype}. '
                    'Convert and normalize them first (e.g. images.astype(jnp.float32) / 255).')
  if images.shape[0] < 1:
    # Otherwise the token reshapes divide by zero deep inside the first stage.
    raise ValueError(f'CvT needs a batch of at least one image; got shape {images.shape}.')
  _check_image_size(images.shape[1], images.shape[2])


def assert_finite(x: jax.Array, name: str = 'images') -> None:
  """Raises a ValueError if concrete `x` holds NaN or inf, which CvT spreads over the image.

  Traced, it adds a `checkify.check` instead, to run under
  `jax.jit(checkify.checkify(model.apply, errors=checkify.user_checks))`.
  """
  if isinstance(x, jax.core.Tracer):
    checkify.check(jnp.isfinite(x).all(),
                   f'{name} hold non-finite values (NaN or inf); CvT would spread them over '
                   'the whole image. Clean or mask the input first.')
    return
  bad = ~np.asarray(jnp.isfinite(x))
  if bad.any():
    count = int(bad.sum())
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f'{name} hold {count} non-finite value{"s" if count > 1 else ""} (NaN or inf); the '
        f'first at index {first}. CvT would spread them over the whole image (global '
        'attention): clean or mask the input first.')


def _stage_kwargs(activation: str, dropout_rate: float, attention: str, chunk_size: int | None,
                  depthwise: str, dtype: Dtype, param_dtype: Dtype, *,
                  budget_bytes: int = attention_lib.DEFAULT_MEMORY_BUDGET_BYTES,
                  bn_axis_name: str | None = None, remat: bool = False) -> dict[str, Any]:
  """`CvTStage` settings shared by the backbone and the classifier."""
  kernels.resolve('attention', attention, attention_lib.IMPLEMENTATIONS)
  attention_kwargs = dict(implementation=attention, chunk_size=chunk_size,
                          budget_bytes=budget_bytes, depthwise=depthwise,
                          bn_axis_name=bn_axis_name)
  return dict(activation=activation, dropout_rate=dropout_rate,
              attention_kwargs=tuple(sorted(attention_kwargs.items())), remat=remat,
              dtype=dtype, param_dtype=param_dtype)


def _run_stages(spec: CvTSpec, x: jax.Array, *, train: bool, norm_eval: bool,
                frozen_stages: int, stage_kwargs: dict[str, Any]):
  """The stage maps and the last stage's cls token (or None), as submodules `stage{i}`."""
  maps, cls = [], None
  for i in range(spec.num_stages):
    frozen = i < frozen_stages
    # Frozen stages behave as in eval (mmseg `_freeze_stages`); norm_eval keeps
    # BatchNorm on its running statistics while the rest trains.
    x, cls = CvTStage(spec, i, name=f'stage{i}', **stage_kwargs)(
        x, use_running_average=not train or norm_eval or frozen,
        deterministic=not train or frozen)
    if frozen:
      x = jax.lax.stop_gradient(x)
      cls = None if cls is None else jax.lax.stop_gradient(cls)
    maps.append(x)
  return maps, cls


class CvTBackbone(nn.Module):
  """CvT as a dense-prediction backbone: NHWC maps at strides 4, 8 and 16, any input >= 16.

  The last stage's cls token is used inside the blocks (the weights were trained with it);
  `return_cls_token` also returns it as `out['cls_token']` `[N, C3]`. Settings are checked
  at construction.

  Attributes:
    variant: 'cvt-13', 'cvt-21', 'cvt-w24' or 'cvt-tiny' (tests); `spec` overrides it.
    out_features: outputs by name ('stage1'..'stage3') or index (0..2, negatives allowed).
    out_norm: a LayerNorm (`out_norm_{name}`) on each output.
    drop_path_rate: the last stage's stochastic depth; None keeps the variant's.
    frozen_stages: the first this many stages get no gradient and run in eval mode.
    norm_eval: keep BatchNorm on running statistics in train mode.
    remat: rematerialize each block in the backward pass.
    activation: 'quick_gelu' (official weights) or 'gelu' (Hugging Face).
    attention: 'auto', 'plain', 'chunked' or 'fused' (`kernels.attention`), with
      `attention_chunk_size` queries per block (None: from `attention_budget_mb`).
    depthwise: 'auto', 'slices' or 'conv' (`kernels.depthwise`).
    dtype: compute dtype; parameters stay in `param_dtype`.
    check_finite: refuse images holding NaN or inf (`assert_finite`).
  """

  variant: str = 'cvt-13'
  spec: CvTSpec | None = None
  out_features: Sequence[str | int] | None = None
  out_norm: bool = False
  return_cls_token: bool = False
  drop_path_rate: float | None = None
  frozen_stages: int = 0
  norm_eval: bool = False
  remat: bool = False
  activation: str = 'quick_gelu'
  attention: str = 'auto'
  attention_chunk_size: int | None = None
  attention_budget_mb: float = attention_lib.DEFAULT_MEMORY_BUDGET_BYTES / 2**20
  depthwise: str = 'auto'
  dropout_rate: float = 0.0
  bn_axis_name: str | None = None
  in_chans: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  check_finite: bool = False

  def __post_init__(self):
    spec = self.resolved_spec  # An unknown variant or a bad drop_path_rate fails here.
    if not (is_int(self.frozen_stages) and 0 <= self.frozen_stages <= spec.num_stages):
      raise ValueError(f'frozen_stages must be an integer in [0, {spec.num_stages}]; '
                       f'got {self.frozen_stages!r}.')
    _check_rate('dropout_rate', self.dropout_rate)
    attention_lib.check_chunk_size(self.attention_chunk_size, 'attention_chunk_size')
    _ = self.out_names  # Checks out_features.
    super().__post_init__()

  @property
  def resolved_spec(self) -> CvTSpec:
    spec = self.spec if self.spec is not None else get_spec(self.variant)
    if self.drop_path_rate is not None:
      _check_rate('drop_path_rate', self.drop_path_rate)
      rates = spec.drop_path_rates[:-1] + (float(self.drop_path_rate),)
      spec = dataclasses.replace(spec, drop_path_rates=rates)
    return spec

  @property
  def stage_names(self) -> tuple[str, ...]:
    return tuple(f'stage{i + 1}' for i in range(self.resolved_spec.num_stages))

  @property
  def out_names(self) -> tuple[str, ...]:
    """The selected outputs, fine to coarse."""
    names, n = self.stage_names, len(self.stage_names)
    if self.out_features is None:
      return names
    if isinstance(self.out_features, (str, int)):
      raise TypeError(f'out_features must be a sequence of names or indices; '
                      f'got {self.out_features!r}.')
    expected = f'expected one of {names} or an index in [-{n}, {n - 1}]'
    picked = set()
    for feature in self.out_features:
      if isinstance(feature, str):
        if feature not in names:
          raise ValueError(f'Unknown output {feature!r}; {expected}.')
        picked.add(names.index(feature))
      elif not is_int(feature):  # int(1.5) or True would silently pick stage 2.
        raise ValueError(f'out_features entries must be stage names {names} or integer indices '
                         f'in [-{n}, {n - 1}]; got {feature!r} ({type(feature).__name__}) in '
                         f'out_features={self.out_features!r}.')
      elif not -n <= int(feature) < n:
        raise ValueError(f'Output index {feature} out of range; {expected}.')
      else:
        picked.add(int(feature) % n)
    return tuple(names[i] for i in sorted(picked))

  @property
  def output_channels(self) -> dict[str, int]:
    spec = self.resolved_spec
    return {name: spec.embed_dims[self.stage_names.index(name)] for name in self.out_names}

  @property
  def output_strides(self) -> dict[str, int]:
    spec = self.resolved_spec
    return {name: spec.strides[self.stage_names.index(name)] for name in self.out_names}

  @property
  def feature_info(self) -> list[dict[str, Any]]:
    """timm-style metadata of the selected outputs: name, channels, reduction."""
    return [{'name': name, 'num_chs': self.output_channels[name],
             'reduction': self.output_strides[name], 'module': f'stage{int(name[-1]) - 1}'}
            for name in self.out_names]

  def output_sizes(self, height: int, width: int) -> dict[str, tuple[int, int]]:
    """Exact `(H_i, W_i)` of each selected output for an input of `height` x `width`."""
    _check_image_size(height, width)
    sizes = self.resolved_spec.output_sizes(height, width)
    return {name: sizes[self.stage_names.index(name)] for name in self.out_names}

  def output_shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
    """detectron2-style `(H_i, W_i, C_i)` of each selected output (batch excluded)."""
    return {name: (*size, self.output_channels[name])
            for name, size in self.output_sizes(height, width).items()}

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> dict[str, jax.Array]:
    """`[N, H, W, in_chans]` float images -> `{'stage1': [N, H1, W1, C1], ...}` (`out_names`).

    `train` uses batch statistics and drop path (a 'dropout' rng when drop path > 0).
    """
    _check_images(images, self.in_chans)
    if self.check_finite:
      assert_finite(images)
    out_names = self.out_names
    spec = self.resolved_spec
    stage_kwargs = _stage_kwargs(
        self.activation, self.dropout_rate, self.attention, self.attention_chunk_size,
        self.depthwise, self.dtype, self.param_dtype,
        budget_bytes=int(self.attention_budget_mb * 2**20), bn_axis_name=self.bn_axis_name,
        remat=self.remat)
    maps, cls = _run_stages(spec, images.astype(self.dtype), train=train,
                            norm_eval=self.norm_eval, frozen_stages=self.frozen_stages,
                            stage_kwargs=stage_kwargs)
    out = {}
    for name, x in zip(self.stage_names, maps, strict=True):
      if name not in out_names:
        continue
      if self.out_norm:
        x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f'out_norm_{name}')(x)
      out[name] = x
    if self.return_cls_token:
      if cls is None:
        raise ValueError('return_cls_token=True but this CvT has no cls token in its last stage.')
      out['cls_token'] = cls
    return out


# The seed API's per-stage fields `s{i}_{key}` and the `CvTSpec` fields they set.
_SEED_FIELDS = {'emb_dim': 'embed_dims', 'emb_kernel': 'patch_sizes', 'emb_stride': 'patch_strides',
                'proj_kernel': 'kernel_qkv', 'kv_proj_stride': 'stride_kv', 'heads': 'num_heads',
                'depth': 'depths', 'mlp_mult': 'mlp_ratios'}


class CvT(nn.Module):
  """The CvT ImageNet classifier (LayerNorm on the cls token, Linear), with the seed API.

  The `s{i}_*` fields default to CvT-13; `CvT.from_variant('cvt-21')` builds a named one.
  The embedding pads `(kernel - stride + 1) // 2`: the official (7, 4, 2) and (3, 2, 1).
  `num_classes=0` returns the normalized cls token `[N, C3]`.
  """

  num_classes: int = 1000
  s1_emb_dim: int = 64
  s1_emb_kernel: int = 7
  s1_emb_stride: int = 4
  s1_proj_kernel: int = 3
  s1_kv_proj_stride: int = 2
  s1_heads: int = 1
  s1_depth: int = 1
  s1_mlp_mult: float = 4
  s2_emb_dim: int = 192
  s2_emb_kernel: int = 3
  s2_emb_stride: int = 2
  s2_proj_kernel: int = 3
  s2_kv_proj_stride: int = 2
  s2_heads: int = 3
  s2_depth: int = 2
  s2_mlp_mult: float = 4
  s3_emb_dim: int = 384
  s3_emb_kernel: int = 3
  s3_emb_stride: int = 2
  s3_proj_kernel: int = 3
  s3_kv_proj_stride: int = 2
  s3_heads: int = 6
  s3_depth: int = 10
  s3_mlp_mult: float = 4
  dropout: float = 0.0
  channels: int = 3
  drop_path_rate: float = 0.0
  activation: str = 'quick_gelu'
  attention: str = 'auto'
  attention_chunk_size: int | None = None
  depthwise: str = 'auto'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  check_finite: bool = False

  def __post_init__(self):
    _check_rate('drop_path_rate', self.drop_path_rate)
    _check_rate('dropout', self.dropout)
    attention_lib.check_chunk_size(self.attention_chunk_size, 'attention_chunk_size')
    super().__post_init__()

  @classmethod
  def from_variant(cls, variant: str, num_classes: int = 1000, **kwargs) -> CvT:
    """The classifier of a named variant with its official drop path rate."""
    return cls.from_spec(get_spec(variant), num_classes, **kwargs)

  @classmethod
  def from_spec(cls, spec: CvTSpec, num_classes: int = 1000, **kwargs) -> CvT:
    """The classifier of a three-stage `CvTSpec` (the seed fields cannot express others)."""
    if spec.num_stages != 3:
      raise ValueError(f'The CvT classifier has 3 stages; the spec has {spec.num_stages}.')
    fields = {f's{i + 1}_{seed}': getattr(spec, name)[i]
              for seed, name in _SEED_FIELDS.items() for i in range(3)}
    fields['drop_path_rate'] = spec.drop_path_rates[-1]
    return cls(num_classes=num_classes, **{**fields, **kwargs})

  @property
  def resolved_spec(self) -> CvTSpec:
    fields = {name: tuple(getattr(self, f's{i}_{seed}') for i in (1, 2, 3))
              for seed, name in _SEED_FIELDS.items()}
    fields['mlp_ratios'] = tuple(float(m) for m in fields['mlp_ratios'])
    paddings = tuple((k - s + 1) // 2 for k, s in
                     zip(fields['patch_sizes'], fields['patch_strides'], strict=True))
    return CvTSpec(**fields, patch_paddings=paddings, stride_q=(1, 1, 1),
                   cls_token=(False, False, True),
                   drop_path_rates=(0.0, 0.0, float(self.drop_path_rate)))

  @nn.compact
  def __call__(self, img: jax.Array, train: bool = False, debug: bool = False) -> jax.Array:
    """`[N, H, W, channels]` float images -> `[N, num_classes]` logits.

    `debug` is accepted for Scenic's trainers (they pass it to every model) and unused.
    """
    del debug
    _check_images(img, self.channels)
    if self.check_finite:
      assert_finite(img)
    stage_kwargs = _stage_kwargs(self.activation, self.dropout, self.attention,
                                 self.attention_chunk_size, self.depthwise, self.dtype,
                                 self.param_dtype)
    _, cls = _run_stages(self.resolved_spec, img.astype(self.dtype), train=train,
                         norm_eval=False, frozen_stages=0, stage_kwargs=stage_kwargs)
    x = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='norm')(cls)
    if self.num_classes == 0:
      return x
    return nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='head')(x)


# Settings of a backbone config block that say how to load weights, not how to build it.
LOADING_KEYS = ('pretrained', 'keep_cls_token')
_DTYPE_FIELDS = ('dtype', 'param_dtype')
_FIELDS = tuple(f.name for f in dataclasses.fields(CvTBackbone) if f.name not in ('parent', 'name'))


def config_dict(config: Any) -> dict[str, Any]:
  """A config block (ConfigDict, mapping or None) as a dict."""
  if config is None:
    return {}
  if hasattr(config, 'to_dict'):  # ml_collections.ConfigDict / FrozenConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise TypeError(f'A backbone config must be a mapping or a ConfigDict; got '
                    f'{type(config).__name__}.')
  return dict(config)


def _dtype(value: Any, key: str) -> Any:
  if not isinstance(value, str):
    return value
  try:
    return jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f'config {key}={value!r} is not a dtype name such as "float32" or '
                     '"bfloat16".') from e


def build_backbone(config: Any = None, **overrides: Any) -> CvTBackbone:
  """A `CvTBackbone` from a config block (a ConfigDict, a mapping or None for CvT-13).

  The block holds `CvTBackbone` fields (dtypes may be names such as 'bfloat16', `spec` a
  dict) and the loading keys `LOADING_KEYS`, ignored here; `overrides` win over it.
  """
  settings = {**config_dict(config), **overrides}
  check_keys(settings, _FIELDS + LOADING_KEYS, 'CvTBackbone')
  fields = {}
  for key, value in settings.items():
    if key in LOADING_KEYS:
      continue
    if key in _DTYPE_FIELDS:
      value = _dtype(value, key)
    elif key == 'spec' and isinstance(value, Mapping):
      value = CvTSpec.from_dict(value)
    elif key == 'out_features' and isinstance(value, list):
      value = tuple(value)
    fields[key] = value
  return CvTBackbone(**fields)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def closest_key(key: str, known: Iterable[str], cutoff: float = 0.6) -> str | None:
  """The known key that `key` most likely misspells, or None."""
  match = difflib.get_close_matches(key, list(known), n=1, cutoff=cutoff)
  return match[0] if match else None


def check_keys(keys: Iterable[str], known: Collection[str], where: str,
               error: type[Exception] = ValueError) -> None:
  """Raises `error` naming the keys not in `known`, the closest to the first, and `known`."""
  unknown = [key for key in keys if key not in known]
  if unknown:
    close = closest_key(unknown[0], known)
    hint = f' Did you mean {close!r}?' if close else ''
    raise error(f'{where} has no setting(s) {unknown}.{hint} Known: {", ".join(known)}.')
