"""Attention as array functions: XLA's softmax attention with a hand-written gradient, and cuDNN's
fused attention (`jax.nn.dot_product_attention`), padded to an even token count where it needs one.
`layers.Attention` chooses between them (`settings.attention_implementation`).
"""
from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp


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
  autodiff's gradient of the softmax with extra zero-filled (B, heads, N, N) buffers and passes,
  which this gradient does without (figures: docs/performance.md, "Attention's gradient").
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
