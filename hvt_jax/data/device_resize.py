"""The resizes on the device: PIL's resize of a window or image the host decoded.

With the resize on the device (`aug.resize_on`, `augment.window_canvas`) the host only
decodes the random-resized-crop window and hands it over uncompressed, at the top left of a
fixed canvas x canvas array (the batch's 'image'), with its height and width (its 'window'); a
window larger than the canvas arrives already resized to S x S. The train step then resizes
each window to S x S here, before the rest of the augmentation (`augment.train_images`). Eval
batches come the same way, each whole image on a canvas, and the eval step resizes and
center-crops them here (`eval_crops`), as `preprocess.eval_crop` does on the host.

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

from hvt_jax.data import filters, input_spec

# Output rows resampled together by one small matmul (as on the host: preprocess._BLOCK).
_BLOCK = 8


def resize_windows(images: jax.Array, windows: jax.Array, size: int,
                   interpolation: str) -> jax.Array:
  """uint8 (B, C, C, 3) canvases, int32 (B, 2) window (height, width) -> uint8 (B, S, S, 3)."""
  return jax.vmap(lambda x, hw: resize_window(x, hw, size, interpolation))(images, windows)


def resize_window(image: jax.Array, hw: jax.Array, size: int, interpolation: str) -> jax.Array:
  """PIL's resize to (size, size) of image[:hw[0], :hw[1]], a uint8 (C_h, C_w, 3) canvas."""
  return _resize(image, hw, (size, size), (0, 0), size, interpolation,
                 max_scale=max(image.shape[:2]) / size)


def eval_crops(images: jax.Array, windows: jax.Array, size: int, crop_pct: float,
               interpolation: str) -> jax.Array:
  """uint8 (B, C, C, 3) canvases, int32 (B, 2) image (height, width) -> uint8 (B, S, S, 3):
  each image's eval crop (`preprocess.eval_crop`: the shorter side resized to floor(S /
  crop_pct), the center S x S kept). A (0, 0) image is one the host cropped already: its
  canvas's top left S x S is taken as it is."""
  # The resized shorter side is at least floor(S / crop_pct) and the longer one at least that
  # minus 1 (it truncates), so no image of the canvas shrinks by more than this.
  max_scale = max(images.shape[1:3]) / (math.floor(size / crop_pct) - 1)

  def one(image, hw):
    new_h, new_w, top, left = input_spec.eval_geometry(hw[0], hw[1], size, crop_pct, jnp)
    out = _resize(image, hw, (new_h, new_w), (top, left), size, interpolation,
                  max_scale=max_scale)
    return jnp.where(hw[0] > 0, out, image[:size, :size])
  return jax.vmap(one)(images, windows)


def _resize(image, hw, out_hw, first, count: int, interpolation: str, *, max_scale: float):
  """Rows first[0].. and columns first[1].. (count of each) of PIL's resize of
  image[:hw[0], :hw[1]] (a uint8 canvas) to out_hw, as uint8 (count, count, 3)."""
  kernel, support = filters.FILTERS[interpolation]
  canvas_h, canvas_w, channels = image.shape
  pass_ = lambda x, axis: _resample(x, hw[axis], out_hw[axis], first[axis], count, kernel,
                                    support, max_scale)
  x = pass_(image.reshape(canvas_h, -1), 0)  # (count, C_w * 3)
  x = jnp.swapaxes(x.reshape(count, canvas_w, channels), 0, 1).reshape(canvas_w, -1)
  x = pass_(x, 1)  # (count, count * 3)
  return jnp.swapaxes(x.reshape(count, count, channels), 0, 1).astype(jnp.uint8)


def _resample(x: jax.Array, in_size: jax.Array, out_size, first, count: int, kernel,
              support: float, max_scale: float):
  """uint8-valued (N, M) whose first `in_size` rows are the image -> (count, M): rows first..
  of PIL's resampling of the leading axis to `out_size`, rounded as PIL rounds (float32 holding
  0..255). `max_scale`: a bound on in_size / out_size, which sizes the rows a block reads."""
  n = x.shape[0]
  blocks = math.ceil(count / _BLOCK)
  span = min(n, filters.block_span(_BLOCK, max_scale, support))  # static: rows per block
  in_f = jnp.asarray(in_size, jnp.float32)
  out = jnp.arange(blocks * _BLOCK, dtype=jnp.float32).reshape(blocks, _BLOCK)
  out = out + jnp.asarray(first, jnp.float32)
  where = filters.bounds(out, in_f / jnp.asarray(out_size, jnp.float32), in_f, support, jnp)
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
  return jnp.clip(jnp.floor(y.reshape(blocks * _BLOCK, -1)[:count] + 0.5), 0, 255)
