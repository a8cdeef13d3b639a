"""HVT: a ViT that max-pools its tokens after some blocks (Pan et al., ICCV 2021).

The module tree mirrors the official PyTorch release so weights map one to one
(see `convert.py`): `patch_embed`, `pos_embed`, `blocks_{i}/{norm1,attn/{qkv,proj},
norm2,mlp/{fc1,fc2},pos_embed}`, `norm`, `head`.

Inputs are normalized NHWC float images; outputs are float32 logits. With
`class_token=True` and `pool_every=0` the same code is a DeiT baseline.

Here: the network, its fields (`model_fields`, `variant`, `resolve_settings`) and the functions
on a model and its parameters. The layers are in `layers.py`, the device-dependent settings in
`settings.py`, the stacked layout of scanned blocks in `stacking.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hvt_jax.model import layers, settings
from hvt_jax.model.layers import Block, PatchEmbed, layer_norm, trunc_normal
from hvt_jax.model.settings import attention_implementation, compute_dtype, scans_blocks
from hvt_jax.model.stacking import stacked_name
from hvt_jax.model.variants import VARIANTS, ConfigError, pools_at, tokens_per_block


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

  `dtype`, `attention` and `scan_blocks` may be 'auto': `resolve_settings` decides them once for
  the devices the model will run on. Left 'auto', each is decided when the model is traced, from
  this host's default devices (`settings.py`).
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
      body = jax.checkpoint(body, prevent_cse=False, policy=layers.SCAN_SAVES)
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
      cls = self.param('cls_token', trunc_normal, (1, 1, width), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, width)), x], axis=1)
    pos = self.param('pos_embed', trunc_normal, (1,) + x.shape[1:], jnp.float32)
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
    logits = nn.Dense(self.num_classes, dtype=dtype, kernel_init=trunc_normal, name='head')(x)
    return logits.astype(jnp.float32)


def model_fields() -> list[str]:
  return [f.name for f in dataclasses.fields(HVT) if f.name not in ('parent', 'name')]


def field_defaults() -> dict[str, Any]:
  """Every `HVT` field at its default."""
  return {f.name: f.default for f in dataclasses.fields(HVT) if f.name in model_fields()}


def variant(name: str, **overrides) -> dict[str, Any]:
  """All keyword arguments of `HVT` for a published model, with `overrides` applied."""
  key = name.lower()
  if key not in VARIANTS:
    raise ConfigError(f'unknown model {name!r}; choose one of {", ".join(VARIANTS)}.')
  unknown = set(overrides) - {f.name for f in dataclasses.fields(HVT)} - {'parent', 'name'}
  if unknown:
    raise ConfigError(f'unknown model setting(s) {sorted(unknown)}; valid: {model_fields()}.')
  return {**field_defaults(), **VARIANTS[key], **overrides}


def resolve_settings(fields: Mapping[str, Any], devices) -> dict[str, Any]:
  """`HVT`'s keyword arguments with the 'auto' `dtype`, `scan_blocks` and `attention` decided
  for `devices`, the devices the model will run on.

  Left 'auto', they are decided when the model is traced, from the host's own default devices:
  a step compiled on a CPU host for a TPU slice (`python -m hvt_jax.aot`) would get the CPU's
  float32 and scanned blocks. On a cuDNN-capable GPU `attention` stays 'auto': it is chosen per
  block from its token count, and a GPU step is traced on its GPU host.
  """
  return settings.resolve({**field_defaults(), **fields}, next(iter(np.ravel(devices))))


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
