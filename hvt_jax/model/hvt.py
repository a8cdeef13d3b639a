"""HVT: a ViT that max-pools its tokens after some blocks (Pan et al., ICCV 2021).

The module tree mirrors the official PyTorch release so weights map one to one
(see `convert.py`): `patch_embed`, `pos_embed`, `blocks_{i}/{norm1,attn/{qkv,proj},
norm2,mlp/{fc1,fc2},pos_embed}`, `norm`, `head`.

Inputs are normalized NHWC float images; outputs are float32 logits. With
`class_token=True` and `pool_every=0` the same code is a DeiT baseline.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
import numpy as np

from hvt_jax.errors import UserError

# Published models (docs/architecture.md). Every other field takes `HVT`'s default.
VARIANTS: dict[str, dict[str, Any]] = {
    'hvt-ti-1': dict(num_heads=3, pool_every=12),
    'hvt-s-0': dict(num_heads=6, pool_every=0),
    'hvt-s-1': dict(num_heads=6, pool_every=12),
    'hvt-s-2': dict(num_heads=6, pool_every=6),
    'hvt-s-3': dict(num_heads=6, pool_every=4),
    'hvt-s-4': dict(num_heads=6, pool_every=3),
    'deit-ti': dict(num_heads=3, pool_every=0, class_token=True),
    'deit-s': dict(num_heads=6, pool_every=0, class_token=True),
}

_trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init (kaiming uniform, a=sqrt(5)): the official code keeps it.
_torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class ConfigError(UserError):
  """A model setting that cannot work; the message says which and what to do."""


def variant(name: str, **overrides) -> dict[str, Any]:
  """All keyword arguments of `HVT` for a published model, with `overrides` applied."""
  key = name.lower()
  if key not in VARIANTS:
    raise ConfigError(f'unknown model {name!r}; choose one of {", ".join(VARIANTS)}.')
  unknown = set(overrides) - {f.name for f in dataclasses.fields(HVT)} - {'parent', 'name'}
  if unknown:
    raise ConfigError(f'unknown model setting(s) {sorted(unknown)}; valid: {model_fields()}.')
  return {**field_defaults(), **VARIANTS[key], **overrides}


def field_defaults() -> dict[str, Any]:
  """Every `HVT` field at its default."""
  return {f.name: f.default for f in dataclasses.fields(HVT) if f.name in model_fields()}


# Fields that choose how the model runs, not what it computes: a resumed run may change them.
RUN_SETTINGS = ('attention', 'remat', 'scan_blocks')


def model_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(HVT) if f.name not in ('parent', 'name')]


def pools_at(block: int, pool_every: int) -> bool:
  """Official rule: block i pools when i % pool_every == 0, so block 0 always pools."""
  return pool_every > 0 and block % pool_every == 0


def tokens_per_block(image_size: int, patch_size: int, depth: int, pool_every: int,
                     pool_kernel: int = 3, pool_stride: int = 2, class_token: bool = False,
                     **_) -> list[int]:
  """Tokens entering each block, then the count reaching the head (len depth + 1).

  Raises ConfigError for image sizes the patch does not divide and pooling that
  would leave fewer than one token.
  """
  if image_size % patch_size:
    raise ConfigError(f'image size {image_size} is not divisible by patch size {patch_size}; '
                      f'use a multiple of {patch_size} (e.g. {image_size // patch_size * patch_size or patch_size}).')
  if pool_every and class_token:
    raise ConfigError('a class token cannot be max-pooled with the patch tokens; set '
                      'pool_every=0 or class_token=False.')
  n = (image_size // patch_size) ** 2 + int(class_token)
  counts = []
  for i in range(depth):
    counts.append(n)
    if pools_at(i, pool_every):
      if n < pool_kernel:
        raise ConfigError(f'pooling after block {i} needs at least {pool_kernel} tokens but has {n}; '
                          'use fewer pooling stages (larger pool_every) or a larger image.')
      n = (n - pool_kernel) // pool_stride + 1
  counts.append(n)
  return counts


ATTENTION = ('auto', 'xla', 'cudnn')


def _cudnn_usable(device, dtype) -> bool:
  capability = getattr(device, 'compute_capability', None)
  return (device.platform == 'gpu' and capability is not None and float(capability) >= 8.0
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def _check_cudnn(setting: str, device, dtype) -> bool:
  """Whether cuDNN's attention can run on `device` in `dtype`; an explicit 'cudnn' that cannot
  raises ConfigError."""
  if setting not in ATTENTION:
    raise ConfigError(f'attention={setting!r}: choose one of {", ".join(ATTENTION)}.')
  usable = _cudnn_usable(device, dtype)
  if setting == 'cudnn' and not usable:
    raise ConfigError(f'attention=cudnn needs an NVIDIA GPU (compute capability 8.0+) and '
                      f'dtype bfloat16 or float16, not {device.device_kind} with {jnp.dtype(dtype).name}; '
                      "use attention='auto' or 'xla'.")
  return usable


def attention_implementation(setting: str, dtype, tokens: int) -> str:
  """How blocks of `tokens` tokens attend: 'xla', 'cudnn' or 'cudnn-padded'.

  cuDNN's fused attention needs an NVIDIA GPU of compute capability 8.0 or newer and 16-bit
  inputs. JAX refuses to train it on an odd token count (an H100 run hit this at HVT-S-1's 97
  tokens after the first pool): there 'auto' runs XLA's attention, and an explicit 'cudnn' pads
  one masked token ('cudnn-padded', see `attend`). Everywhere else 'auto' is XLA's attention.
  """
  if setting == 'xla':
    return setting
  if not _check_cudnn(setting, jax.devices()[0], dtype):
    return 'xla'
  if tokens % 2 == 0:
    return 'cudnn'
  return 'cudnn-padded' if setting == 'cudnn' else 'xla'


def attend(q, k, v, scale: float, implementation: str):
  """cuDNN's fused attention of (B, N, heads, head_dim) queries, keys and values; no dropout.

  'cudnn-padded' (an odd N) appends one zero token, masks it out as a key with
  `key_value_seq_lengths` and drops its output row: the values are those of attention over the
  N real tokens. (Its query row is not masked: a row with every key masked would be NaN, and
  NaN times the zero cotangent of a dropped row is still NaN in the backward pass.)
  """
  if implementation == 'cudnn-padded':
    return padded_attention(q, k, v, scale, 'cudnn')
  return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)


def padded_attention(q, k, v, scale: float, implementation: str):
  """`attend`'s one-masked-token padding, with any `jax.nn.dot_product_attention` kernel."""
  n = q.shape[1]
  pad = lambda t: jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0)))
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  return out[:, :n]


def scans_blocks(setting: bool | str, platform: str | None = None) -> bool:
  """`model.scan_blocks`: True, False, or 'auto', which scans on CPU only.

  On CPU the scan trains faster and compiles faster (docs/performance.md); on a GPU unrolled blocks
  train faster, because the loop copies its carried and stacked buffers every iteration. Config
  files and the command line give strings ('auto', 'true', 'false'); `HVT(...)` also takes bools.
  `platform`: where the model runs ('cpu', 'gpu', 'tpu'); None: JAX's default backend.
  """
  value = str(setting).lower()
  if value not in ('auto', 'true', 'false'):
    raise ConfigError(f'scan_blocks={setting!r}: choose auto, true or false.')
  if value == 'auto':
    return (platform or jax.default_backend()) == 'cpu'
  return value == 'true'


def compute_dtype(setting: str, platform: str | None = None) -> jnp.dtype:
  """`model.dtype`: a dtype name, or 'auto' for bfloat16 on GPU and TPU and float32 on CPU
  (where bfloat16 arithmetic is emulated and slower). `platform` as for `scans_blocks`."""
  if setting == 'auto':
    on_accelerator = (platform or jax.default_backend()) in ('gpu', 'tpu')
    return jnp.dtype(jnp.bfloat16 if on_accelerator else jnp.float32)
  return jnp.dtype(setting)


def resolve_settings(fields: Mapping[str, Any], devices) -> dict[str, Any]:
  """`HVT`'s keyword arguments with the 'auto' `dtype`, `scan_blocks` and `attention` decided
  for `devices`, the devices the model will run on.

  Left 'auto', they are decided when the model is traced, from the host's own default devices:
  a step compiled on a CPU host for a TPU slice (`python -m hvt_jax.aot`) would get the CPU's
  float32 and scanned blocks. On a cuDNN-capable GPU `attention` stays 'auto': it is chosen per
  block from its token count, and a GPU step is traced on its GPU host.
  """
  device = next(iter(np.ravel(devices)))
  fields = {**field_defaults(), **fields}
  fields['dtype'] = compute_dtype(fields['dtype'], device.platform).name
  fields['scan_blocks'] = str(scans_blocks(fields['scan_blocks'], device.platform)).lower()
  if fields['attention'] != 'xla' and not _check_cudnn(fields['attention'], device, fields['dtype']):
    fields['attention'] = 'xla'
  return fields


def attention_weights(q, k, scale: float, dtype):
  """softmax(q k^T * scale) over the keys of (B, heads, N, head_dim) queries and keys.

  The softmax runs in float32 whatever the compute dtype.
  """
  logits = (q @ k.swapaxes(-1, -2)) * scale
  return checkpoint_name(jax.nn.softmax(logits.astype(jnp.float32)).astype(dtype),
                         'attention_weights')


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_attention(q, k, v, scale: float):
  """softmax(q k^T * scale) v for (B, heads, N, head_dim) arrays, with a hand-written gradient.

  The values are those of `attention_weights(q, k, scale) @ v`; the gradient is the textbook
  one: four batched products and one elementwise pass for the softmax. XLA:CPU compiled
  autodiff's gradient of the softmax with extra zero-filled (B, heads, N, N) buffers and passes;
  the attention layer's forward and backward is ~10% faster with this one on CPU (docs/performance.md).
  """
  return _softmax_attention_fwd(q, k, v, scale)[0]


def _softmax_attention_fwd(q, k, v, scale):
  weights = attention_weights(q, k, scale, q.dtype)
  return weights @ v, (q, k, v, weights)


def _softmax_attention_bwd(scale, residuals, g):
  q, k, v, weights = residuals
  dv = weights.swapaxes(-1, -2) @ g
  dw = (g @ v.swapaxes(-1, -2)).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  # d softmax: w * (dw - sum(dw * w)) over the keys, in float32 as the forward.
  dlogits = ((w * (dw - jnp.sum(dw * w, axis=-1, keepdims=True))) * scale).astype(q.dtype)
  return dlogits @ k, dlogits.swapaxes(-1, -2) @ q, dv


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  dropout: float
  attention_dropout: float
  dtype: Any
  implementation: str = 'xla'  # attention_implementation's answer

  @nn.compact
  def __call__(self, x, train: bool):
    b, n, d = x.shape
    width = self.num_heads * self.head_dim
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=_trunc_normal, name=name)
    # One projection for q, k, v: features ordered [q, k, v], heads contiguous (as upstream).
    # Projections take (B * N, D) matrices: see Mlp.
    qkv = checkpoint_name(dense(3 * width, 'qkv')(x.reshape(b * n, d)), 'qkv')
    qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)
    dropout = self.attention_dropout and train
    if self.implementation == 'xla' or dropout:
      # XLA's attention in (B, heads, N, head_dim) order: one transpose in, one out, and batched
      # matrix products. With the 2-D projections the layer's forward and backward went from 154
      # to 110 ms on CPU at batch 16 (docs/performance.md). Attention dropout needs the weights, so it
      # always runs here, differentiated by autodiff.
      q, k, v = qkv.transpose(2, 0, 3, 1, 4)
      if dropout:
        weights = attention_weights(q, k, self.head_dim ** -0.5, self.dtype)
        out = nn.Dropout(self.attention_dropout)(weights, deterministic=False) @ v
      else:
        out = softmax_attention(q, k, v, self.head_dim ** -0.5)
      out = out.transpose(0, 2, 1, 3)
    else:
      out = attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.head_dim ** -0.5,
                   self.implementation)
    out = checkpoint_name(out.reshape(b * n, width), 'attention_out')
    out = dense(width, 'proj')(out).reshape(b, n, width)
    return nn.Dropout(self.dropout)(out, deterministic=not train)


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] and +-1 beyond (the rational form Eigen and XLA:CPU
# use for float32; within 4e-7 of the true erf). Written out rather than `lax.erf`, which
# lowers to a StableHLO composite that the SavedModel export's TensorFlow cannot read.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _normal_cdf(x):
  """Phi(x) of a float32 array."""
  z = jnp.clip(x * np.float32(np.sqrt(0.5)), -4.0, 4.0)
  z2 = z * z
  p = functools.reduce(lambda acc, c: acc * z2 + np.float32(c), _ERF_P[1:], np.float32(_ERF_P[0]))
  q = functools.reduce(lambda acc, c: acc * z2 + np.float32(c), _ERF_Q[1:], np.float32(_ERF_Q[0]))
  return 0.5 + 0.5 * (z * p / q)


@jax.custom_vjp
def gelu(x):
  """Exact GELU, x * Phi(x), with Phi from erf as in PyTorch, and a one-pass gradient.

  Within 2e-6 of `nn.gelu(x, approximate=False)`, whose erfc form XLA expands into two
  polynomials, an exp and a select: one pass over an MLP activation took 2.7 ms on CPU, this
  one 1.0 ms. Autodiff of the erfc form also kept three more activation-sized intermediates per
  block than the one input `_gelu_bwd` needs (docs/performance.md). 16-bit inputs are computed in
  float32.
  """
  x32 = x.astype(jnp.float32)
  return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _gelu_bwd(x, g):
  # d/dx x * Phi(x) = Phi(x) + x * phi(x), in one elementwise pass. Phi through `lax.erf` here
  # (no export runs the backward pass): with the forward's own expression XLA shares Phi
  # between the two passes and stores it, an extra activation-sized buffer that made an MLP's
  # forward and backward ~6% slower on CPU.
  x32 = x.astype(jnp.float32)
  cdf = 0.5 + 0.5 * jax.lax.erf(x32 * np.float32(np.sqrt(0.5)))
  pdf = jnp.exp(-0.5 * x32 * x32) * np.float32(1 / np.sqrt(2 * np.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)


class Mlp(nn.Module):
  hidden: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    # Tokens flattened to one (B * N, width) matrix: the weight gradient then contracts one
    # axis, not two, which XLA:CPU runs as a plain GEMM (an MLP's forward and backward at batch
    # 16: 152 -> 133 ms; docs/performance.md).
    b, n, width = x.shape
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_trunc_normal, name='fc1')(
        x.reshape(b * n, width))
    x = gelu(checkpoint_name(x, 'mlp_hidden'))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Dense(width, dtype=self.dtype, kernel_init=_trunc_normal, name='fc2')(x)
    return nn.Dropout(self.dropout)(x.reshape(b, n, width), deterministic=not train)


class PatchEmbed(nn.Module):
  """The stem: non-overlapping p x p patches -> width features, in row-major patch order.

  The official stride-p convolution, computed as one matrix product over flattened patches.
  The parameters keep the convolution's layout (HWIO kernel), so weights load unchanged, and
  the values are the same. XLA:GPU ran the convolution through cuDNN at about 38 TFLOP/s with an
  Ampere kernel on an H100; the product runs on cuBLAS (docs/performance.md). On CPU it is no slower.
  """
  width: int
  patch: int
  dtype: Any

  @nn.compact
  def __call__(self, images):
    p = self.patch
    kernel = self.param('kernel', _torch_conv_init, (p, p, images.shape[-1], self.width), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.width,), jnp.float32)
    b, h, w, c = images.shape
    patches = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    return patches @ kernel.reshape(p * p * c, self.width).astype(self.dtype) + bias.astype(self.dtype)


def max_pool_tokens(x, kernel: int, stride: int):
  """1-D max-pool over the token axis of (B, N, D), no padding.

  Written as the max of `kernel` strided slices: the same values as
  reduce_window, but XLA compiles it faster and its gradient is a cheap scatter
  of slices rather than select-and-scatter (6x faster backward on CPU).
  """
  n_out = (x.shape[1] - kernel) // stride + 1
  span = stride * (n_out - 1) + 1
  return functools.reduce(jnp.maximum, [x[:, t:t + span:stride] for t in range(kernel)])


def layer_norm(name: str, dtype) -> nn.LayerNorm:
  # Two-pass variance as in PyTorch: the one-pass form loses digits against the reference.
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, dtype=dtype, name=name)


class Block(nn.Module):
  """Pre-norm transformer block; a pooling block max-pools and adds a new position embedding."""
  num_heads: int
  head_dim: int
  mlp_ratio: float
  drop_path: float
  dropout: float
  attention_dropout: float
  pool: tuple[int, int] | None  # (kernel, stride), or None for no pooling
  dtype: Any
  attention: str = 'xla'  # attention_implementation's answer

  def _drop_path(self, y, train: bool):
    """Stochastic depth: drop the whole residual branch per example.

    As nn.Dropout with broadcast_dims=(1, 2), but the rate may be traced: scanned blocks
    receive their own rate as a loop input.
    """
    rate = self.drop_path
    if not train or (isinstance(rate, (int, float)) and rate == 0.0):
      return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0], 1, 1))
    return jnp.where(mask, y / jnp.asarray(keep, y.dtype), jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x, train: bool):
    drop_path = lambda y: self._drop_path(y, train)
    y = Attention(self.num_heads, self.head_dim, self.dropout, self.attention_dropout, self.dtype,
                  self.attention, name='attn')(layer_norm('norm1', self.dtype)(x), train)
    x = checkpoint_name(x + drop_path(y), 'residual')
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dropout, self.dtype,
            name='mlp')(layer_norm('norm2', self.dtype)(x), train)
    x = x + drop_path(y)
    if self.pool is not None:
      kernel, stride = self.pool
      self.sow('intermediates', 'before_pool', x)
      x = max_pool_tokens(x, kernel, stride)
      pos = self.param('pos_embed', _trunc_normal, (1,) + x.shape[1:], jnp.float32)
      x = x + pos.astype(x.dtype)
    return x


# What a scanned block keeps for its backward pass, besides its input: the outputs of the matrix
# products and of the softmax that the backward needs (so none is recomputed), and the residual
# stream between attention and MLP. LayerNorm, GELU, dropout masks and the per-head views are
# recomputed from them. The loop stores each saved value in a stacked buffer that XLA zero-fills,
# writes and reads back every step: autodiff's default kept ~166 MB per block at batch 16, these
# ~63 MB, and the CPU train step is faster for it (docs/performance.md). For XLA's attention only:
# cuDNN's fused attention has residuals of its own, which a names-only policy would recompute.
SCAN_SAVES = jax.checkpoint_policies.save_only_these_names(
    'qkv', 'attention_weights', 'attention_out', 'residual', 'mlp_hidden')


class HVT(nn.Module):
  """Hierarchical Visual Transformer.

  `model.apply({'params': p}, images, train=False)` maps (B, H, W, 3) normalized
  images to (B, num_classes) float32 logits. With `train=True`, pass
  `rngs={'dropout': key}` for stochastic depth and dropout.

  Pass `mutable=['intermediates']` to also get, per pooling block, the tokens
  before the pool (`blocks_{i}/before_pool`), the last block's tokens
  (`final_tokens`) and the features before the head (`pre_logits`);
  `stage_features` collects them per stage.

  Settings no model can have (see `tokens_per_block`) raise ConfigError when the HVT is built.
  """
  image_size: int = 224
  patch_size: int = 16
  num_heads: int = 6
  head_dim: int = 64
  depth: int = 12
  mlp_ratio: float = 4.0
  pool_every: int = 0
  pool_kernel: int = 3
  pool_stride: int = 2
  num_classes: int = 1000
  class_token: bool = False
  drop_path: float = 0.0
  dropout: float = 0.0
  attention_dropout: float = 0.0
  dtype: str = 'float32'  # compute dtype; parameters stay float32. 'auto': bfloat16 on GPU/TPU, else float32
  # 'auto': cuDNN fused attention where it is supported and trains (even token counts), else XLA;
  # 'xla'; 'cudnn': cuDNN in every block, odd token counts padded by one masked token.
  attention: str = 'auto'
  remat: bool = False  # recompute each block's activations in the backward pass: less memory
  # True: run each stage's identical blocks as one lax.scan over their stacked parameters
  # (compiles faster; on CPU trains faster too). False: every block unrolled (trains faster on a
  # GPU). 'auto': scan on CPU only (docs/performance.md). Parameters keep their `blocks_{i}` names.
  scan_blocks: bool | str = 'auto'

  def __post_init__(self):
    # The one check of a model's settings, wherever they come from (a config, a model dir, a
    # checkpoint): impossible ones fail here, in words, so every HVT that exists can be built.
    self.tokens_per_block()
    scans_blocks(self.scan_blocks)
    super().__post_init__()

  def config(self) -> dict[str, Any]:
    """The fields that rebuild this model: `HVT(**model.config())`."""
    return {name: getattr(self, name) for name in model_fields()}

  def tokens_per_block(self) -> list[int]:
    return tokens_per_block(**self.config())

  def _block_runs(self) -> list[tuple[int, int]]:
    """[first, last) ranges of blocks: each pooling block alone, and each run of plain blocks."""
    runs, first = [], 0
    for i in range(self.depth):
      if pools_at(i, self.pool_every):
        runs += [(first, i), (i, i + 1)] if i > first else [(i, i + 1)]
        first = i + 1
    return runs + ([(first, self.depth)] if first < self.depth else [])

  def scanned_runs(self) -> list[tuple[int, int]]:
    """The [first, last) runs of blocks this model runs as one lax.scan each; [] if it unrolls."""
    if not scans_blocks(self.scan_blocks):
      return []
    return [(first, last) for first, last in self._block_runs() if last > first + 1]

  def _scan(self, first: int, last: int, x, train: bool, rates, block_kw):
    """Blocks first..last-1 (no pooling, same shapes) as one lax.scan.

    The parameters are either already stacked (`stack_blocks`, the train state's layout) or
    `blocks_{i}`, stacked here inside the traced function so their gradients flow back to the
    same names. Besides compiling one block instead of many, the loop makes XLA keep the
    residual stream's gradient in memory between blocks: unrolled, XLA:CPU re-fuses that
    growing sum of cotangents into every consumer, work that grows with the square of the depth.
    """
    params = self.variables['params']
    stacked = params.get(stacked_name(first, last))
    if stacked is None:
      stacked = jax.tree.map(lambda *a: jnp.stack(a),
                             *[params[f'blocks_{i}'] for i in range(first, last)])
    n = last - first
    # A python 0.0 keeps drop path off without asking for an rng; else each block gets its rate.
    rate = jnp.asarray(rates[first:last], jnp.float32) if self.drop_path else jnp.zeros((n,))
    random = train and (self.drop_path or self.dropout or self.attention_dropout)
    keys = jax.random.split(self.make_rng('dropout'), n) if random else jnp.zeros((n,))

    def body(x, inputs):
      p, r, key = inputs
      block = Block(drop_path=r if self.drop_path else 0.0, pool=None, **block_kw)
      return block.apply({'params': p}, x, train, rngs={'dropout': key} if random else {}), None

    if self.remat:
      body = jax.checkpoint(body, prevent_cse=False)
    elif block_kw['attention'] == 'xla':
      body = jax.checkpoint(body, prevent_cse=False, policy=SCAN_SAVES)
    return jax.lax.scan(body, x, (stacked, rate, keys))[0]

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ConfigError(f'expected images of shape (batch, {self.image_size}, {self.image_size}, 3) '
                        f'(NHWC), got {tuple(images.shape)}; resize/crop to image_size or set it.')
    dtype = compute_dtype(self.dtype)
    width = self.num_heads * self.head_dim
    p = self.patch_size
    x = PatchEmbed(width, p, dtype, name='patch_embed')(images)
    b = x.shape[0]
    if self.class_token:
      cls = self.param('cls_token', _trunc_normal, (1, 1, width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, width)), x], axis=1)
    pos = self.param('pos_embed', _trunc_normal, (1,) + x.shape[1:], jnp.float32)
    x = nn.Dropout(self.dropout)(x + pos.astype(dtype), deterministic=not train)

    rates = np.linspace(0.0, self.drop_path, self.depth)
    common = dict(num_heads=self.num_heads, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                  dropout=self.dropout, attention_dropout=self.attention_dropout, dtype=dtype)
    block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    scanned = self.scanned_runs()
    for first, last in self._block_runs():
      block_kw = dict(common, attention=attention_implementation(self.attention, dtype, x.shape[1]))
      if (first, last) in scanned and not self.is_initializing():
        x = self._scan(first, last, x, train, rates, block_kw)
        continue
      for i in range(first, last):
        pool = (self.pool_kernel, self.pool_stride) if pools_at(i, self.pool_every) else None
        x = block_cls(drop_path=float(rates[i]), pool=pool, **block_kw, name=f'blocks_{i}')(x, train)
    self.sow('intermediates', 'final_tokens', x)

    x = layer_norm('norm', dtype)(x)
    x = x[:, 0] if self.class_token else x.mean(axis=1)
    self.sow('intermediates', 'pre_logits', x)
    logits = nn.Dense(self.num_classes, dtype=dtype, kernel_init=_trunc_normal, name='head')(x)
    return logits.astype(jnp.float32)


def create(name_or_config: str | dict[str, Any], **overrides) -> HVT:
  """`create('hvt-s-1', num_classes=100)` or `create({...fields...})`."""
  if isinstance(name_or_config, str):
    return HVT(**variant(name_or_config, **overrides))
  return HVT(**{**name_or_config, **overrides})


def init_params(model: HVT, rng: jax.Array) -> dict:
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  return jax.jit(lambda r: model.init(r, images)['params'])(rng)


def abstract_params(model: HVT) -> dict:
  """Shapes and dtypes of the parameters, without computing them."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


# The train state's layout (training/train_step.py): each scanned run's blocks as one entry of
# stacked arrays, `blocks_{first}_to_{last - 1}`, which the scan reads as it is. Kept per block,
# every step stacked the parameters and split the gradients again, and the optimizer and EMA
# compiled a kernel per block's leaf: the HVT-S-1 train step compiled in ~6.5 s instead of ~4 s
# (docs/performance.md). Everything saved or handed to users holds `blocks_{i}` (`unstack_blocks`).
_STACKED = re.compile(r'blocks_(\d+)_to_(\d+)')


def stacked_name(first: int, last: int) -> str:
  return f'blocks_{first}_to_{last - 1}'


def _is_params(node) -> bool:
  return isinstance(node, Mapping) and 'patch_embed' in node


def _on_params(fn, tree):
  """`fn` applied to every parameter dict in `tree`: the parameters themselves, or a train state
  whose parameters, EMA and optimizer moments each hold one."""
  return jax.tree.map(lambda node: fn(node) if _is_params(node) else node, tree,
                      is_leaf=_is_params)


def stack_blocks(tree, runs: list[tuple[int, int]]):
  """`tree` with blocks first..last-1 of each run as one entry, `stacked_name(first, last)`."""
  def stack(params):
    params = dict(params)
    for first, last in runs:
      blocks = [params.pop(f'blocks_{i}') for i in range(first, last)]
      params[stacked_name(first, last)] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    return params
  return _on_params(stack, tree)


def stacked_runs(params) -> list[tuple[int, int]]:
  """The runs that `params` holds stacked, as `stack_blocks` takes them."""
  found = [_STACKED.fullmatch(name) for name in params]
  return sorted((int(m[1]), int(m[2]) + 1) for m in found if m)


def stacked_dims(path) -> int:
  """1 for a leaf of a stacked run (its leading axis counts blocks), else 0; `path` as
  `jax.tree_util.tree_map_with_path` gives it."""
  return int(any(_STACKED.fullmatch(str(getattr(k, 'key', ''))) for k in path))


def unstack_blocks(tree):
  """`tree` with every stacked run split back into `blocks_{i}`: the inverse of `stack_blocks`."""
  def unstack(params):
    out = {name: value for name, value in params.items() if not _STACKED.fullmatch(name)}
    for first, last in stacked_runs(params):
      stacked = params[stacked_name(first, last)]
      for j in range(last - first):
        out[f'blocks_{first + j}'] = jax.tree.map(lambda a: a[j], stacked)
    return out
  return _on_params(unstack, tree)


def param_count(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@functools.partial(jax.jit, static_argnums=0)
def stage_features(model: HVT, params, images) -> list[jax.Array]:
  """Tokens at the end of each stage: before each max-pool, then after the last block."""
  _, state = model.apply({'params': params}, images, mutable=['intermediates'])
  inter = state['intermediates']
  pooled = [inter[f'blocks_{i}']['before_pool'][0] for i in range(model.depth)
            if pools_at(i, model.pool_every)]
  return pooled + [inter['final_tokens'][0]]
