"""The layers of an HVT block, with the official release's parameter names (`convert.py` maps
them one to one): `Attention` (`attn/{qkv,proj}`), `Mlp` (`mlp/{fc1,fc2}`), `PatchEmbed`, the
LayerNorm, the token max-pool, and `Block`. `SCAN_SAVES` names what a scanned block keeps for
its backward pass.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from hvt_jax.model.attention import attend, attention_weights, softmax_attention
from hvt_jax.model.gelu import gelu

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
# PyTorch's default Conv2d init (kaiming uniform, a=sqrt(5)): the official code keeps it.
_torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


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
    dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=trunc_normal, name=name)
    # One projection for q, k, v: features ordered [q, k, v], heads contiguous (as upstream).
    # Projections take (B * N, D) matrices: see Mlp.
    qkv = checkpoint_name(dense(3 * width, 'qkv')(x.reshape(b * n, d)), 'qkv')
    qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim)
    dropout = self.attention_dropout and train
    if self.implementation == 'xla' or dropout:
      # XLA's attention in (B, heads, N, head_dim) order: one transpose in, one out, and batched
      # matrix products, which XLA:CPU runs as plain GEMMs (docs/performance.md, "Part by part").
      # Attention dropout needs the weights, so it always runs here, differentiated by autodiff.
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


class Mlp(nn.Module):
  hidden: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x, train: bool):
    # Tokens flattened to one (B * N, width) matrix: the weight gradient then contracts one
    # axis, not two, which XLA:CPU runs as a plain GEMM (docs/performance.md, "Part by part").
    b, n, width = x.shape
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=trunc_normal, name='fc1')(
        x.reshape(b * n, width))
    x = gelu(checkpoint_name(x, 'mlp_hidden'))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = nn.Dense(width, dtype=self.dtype, kernel_init=trunc_normal, name='fc2')(x)
    return nn.Dropout(self.dropout)(x.reshape(b, n, width), deterministic=not train)


class PatchEmbed(nn.Module):
  """The stem: non-overlapping p x p patches -> width features, in row-major patch order.

  The official stride-p convolution, computed as one matrix product over flattened patches.
  The parameters keep the convolution's layout (HWIO kernel), so weights load unchanged, and
  the values are the same. XLA:GPU ran the convolution through cuDNN with an Ampere kernel on
  an H100, well below the GPU's matrix rate; the product runs on cuBLAS (figures:
  docs/performance.md, "The patch embedding as one GEMM"). On CPU it is no slower.
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

  Written as the max of `kernel` strided slices: the same values as reduce_window, but XLA
  compiles it faster and its gradient is a cheap scatter of slices rather than
  select-and-scatter (figure: docs/performance.md, "Figures moved out of code comments").
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
      pos = self.param('pos_embed', trunc_normal, (1,) + x.shape[1:], jnp.float32)
      x = x + pos.astype(x.dtype)
    return x


# What a scanned block keeps for its backward pass, besides its input: the outputs of the matrix
# products and of the softmax that the backward needs (so none is recomputed), and the residual
# stream between attention and MLP. LayerNorm, GELU, dropout masks and the per-head views are
# recomputed from them. The loop stores each saved value in a stacked buffer that XLA zero-fills,
# writes and reads back every step, so saving less saves that traffic: autodiff's default kept
# several more activation-sized values per block, among them the GELU's intermediates (figures:
# docs/performance.md, "What the scanned loop stores"). For XLA's attention only:
# cuDNN's fused attention has residuals of its own, which a names-only policy would recompute.
SCAN_SAVES = jax.checkpoint_policies.save_only_these_names(
    'qkv', 'attention_weights', 'attention_out', 'residual', 'mlp_hidden')
