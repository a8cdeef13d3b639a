"""The train crop's resize on the device: PIL's resize of a window the host decoded.

With the resize on the device (`aug.resize_on`, `augment.window_canvas`) the host only
decodes the random-resized-crop window and hands it over uncompressed, at the top left of a
fixed canvas x canvas array (the batch's 'image'), with its height and width (its 'window'); a
window larger than the canvas arrives already resized to S x S. The train step then resizes
each window to S x S here, before the rest of the augmentation (`augment.train_images`).

The same resize as the host's (`preprocess.resize`): PIL's filters and coefficients
(`filters`), two separable passes (rows, then columns) with the first rounded to uint8, and
blocks of output rows that each read only the input rows they need, so the cost follows the
output size and the filter's reach, not the canvas. Nearest neighbour stays on the host.

No TensorFlow here: this runs on the accelerator, from the train step.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from hvt_jax.data import filters

# Output rows resampled together by one small matmul (as on the host: preprocess._BLOCK).
_BLOCK = 8


def resize_windows(images: jax.Array, windows: jax.Array, size: int,
                   interpolation: str) -> jax.Array:
  """uint8 (B, C, C, 3) canvases, int32 (B, 2) window (height, width) -> uint8 (B, S, S, 3)."""
  return jax.vmap(lambda x, hw: resize_window(x, hw, size, interpolation))(images, windows)


def resize_window(image: jax.Array, hw: jax.Array, size: int, interpolation: str) -> jax.Array:
  """PIL's resize to (size, size) of image[:hw[0], :hw[1]], a uint8 (C_h, C_w, 3) canvas."""
  kernel, support = filters.FILTERS[interpolation]
  canvas_h, canvas_w, channels = image.shape
  x = _resample(image.reshape(canvas_h, -1), hw[0], size, kernel, support)  # (S, C_w * 3)
  x = jnp.swapaxes(x.reshape(size, canvas_w, channels), 0, 1).reshape(canvas_w, -1)
  x = _resample(x, hw[1], size, kernel, support)  # (S, S * 3)
  return jnp.swapaxes(x.reshape(size, size, channels), 0, 1).astype(jnp.uint8)


def _resample(x: jax.Array, in_size: jax.Array, out_size: int, kernel, support: float):
  """uint8-valued (N, M) whose first `in_size` rows are the image -> (out_size, M): PIL's
  resampling of the leading axis, rounded as PIL rounds (float32 holding 0..255)."""
  n = x.shape[0]
  blocks = math.ceil(out_size / _BLOCK)
  span = min(n, filters.block_span(_BLOCK, n / out_size, support))  # static: rows per block
  in_f = jnp.asarray(in_size, jnp.float32)
  out = jnp.arange(blocks * _BLOCK, dtype=jnp.float32).reshape(blocks, _BLOCK)
  where = filters.bounds(out, in_f / out_size, in_f, support, jnp)
  # Each block reads `span` rows from its first row's low bound, kept inside the canvas; rows
  # past the window have weight 0, so what the canvas holds there does not matter.
  start = jnp.clip(where.low[:, 0], 0, n - span)
  rows = start[:, None] + jnp.arange(span, dtype=jnp.float32)  # (blocks, span)
  weight = filters.weights(rows[:, None, :], filters.Bounds(*(v[..., None] for v in where)),
                           kernel, jnp)
  # The padding rows of the last block may have no weight at all; they are dropped.
  weight = weight / jnp.maximum(weight.sum(-1, keepdims=True), 1e-12)
  taken = x[rows.astype(jnp.int32)].astype(jnp.float32)  # (blocks, span, M)
  y = jnp.einsum('bos,bsm->bom', weight, taken, precision=jax.lax.Precision.HIGHEST)
  # PIL rounds half up and clips to 0..255.
  return jnp.clip(jnp.floor(y.reshape(blocks * _BLOCK, -1)[:out_size] + 0.5), 0, 255)
