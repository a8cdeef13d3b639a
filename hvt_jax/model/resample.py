"""Weights of a model at another image size: position embeddings resampled, all else kept.

The stem's embedding is a √N×√N grid of patch positions, resampled in 2-D bicubic as DeiT
does for its 384 fine-tuning; a DeiT class token's entry stays as it is. Each pooling
block's embedding lies on the 1-D token sequence that block max-pools, so it is resampled
along that sequence, linearly with the ends aligned, to the count `tokens_per_block` gives
at the new size. At the same size nothing changes, bit for bit.

The bicubic is PyTorch's (`interpolate(mode='bicubic', align_corners=False)`, the
call DeiT and timm use): cubic coefficient -0.75, edge pixels repeated, no antialiasing.
`jax.image.resize` differs on all three (-0.5, weights renormalized at the edges,
antialiased when shrinking), so weights fine-tuned by the official code at 384 start from
the same embeddings here. Both resamplers are matrices applied with one einsum, so sharded
parameters stay on their devices.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from hvt_jax.model.network import HVT
from hvt_jax.model.variants import pools_at, tokens_per_block


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in) weights of PyTorch's 1-D bicubic resampling, align_corners=False."""
  src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5  # not clamped, as PyTorch's cubic
  left = np.floor(src)
  taps = left[:, None] + np.arange(-1, 3)  # the 4 input positions around each output
  d = np.abs(src[:, None] - taps)
  near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
  weights = np.where(d <= 1, near, np.where(d < 2, far, 0.0))
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.repeat(np.arange(n_out), 4), np.clip(taps, 0, n_in - 1).astype(int).ravel()),
            weights.ravel())
  return matrix


def linear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of 1-D linear resampling with the first and last points aligned."""
  src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
  left = np.minimum(np.floor(src).astype(int), n_in - 1)
  right = np.minimum(left + 1, n_in - 1)
  t = src - left
  matrix = np.zeros((n_out, n_in))
  np.add.at(matrix, (np.arange(n_out), left), 1 - t)
  np.add.at(matrix, (np.arange(n_out), right), t)
  return matrix


def _apply(matrix: np.ndarray, x, axis_spec: str):
  return jnp.einsum(axis_spec, jnp.asarray(matrix, jnp.float32), x,
                    precision='highest').astype(x.dtype)


def _stem(pos, grid_in: int, grid_out: int, class_token: bool):
  """(1, [1 +] g², D) -> (1, [1 +] g'², D): bicubic on the patch grid, class entry kept."""
  cls, patches = (pos[:, :1], pos[:, 1:]) if class_token else (None, pos)
  d = patches.shape[-1]
  grid = patches.reshape(1, grid_in, grid_in, d)
  m = cubic_matrix(grid_in, grid_out)
  grid = _apply(m, grid, 'yh,bhwd->bywd')
  grid = _apply(m, grid, 'xw,bywd->byxd')
  patches = grid.reshape(1, grid_out * grid_out, d)
  return patches if cls is None else jnp.concatenate([cls, patches], axis=1)


def resample_params(params: dict[str, Any], old_config: dict[str, Any],
                    new_size: int) -> dict[str, Any]:
  """Parameters of the model `old_config` describes, for the same model at `new_size` pixels.

  Raises the model's ConfigError for a size the patch does not divide or one too small
  to pool.
  """
  new_config = {**old_config, 'image_size': new_size}
  tokens_new = tokens_per_block(**new_config)  # impossible sizes fail here, in words
  if new_size == old_config['image_size']:
    return params
  tokens_old = tokens_per_block(**old_config)
  p, class_token = old_config['patch_size'], bool(old_config.get('class_token'))
  out = dict(params)
  out['pos_embed'] = _stem(params['pos_embed'], old_config['image_size'] // p, new_size // p,
                           class_token)
  for i in range(old_config['depth']):
    if pools_at(i, old_config['pool_every']):
      block = dict(params[f'blocks_{i}'])
      # Block i's embedding is added after its pool: the count entering block i + 1.
      m = linear_matrix(tokens_old[i + 1], tokens_new[i + 1])
      block['pos_embed'] = _apply(m, block['pos_embed'], 'on,bnd->bod')
      out[f'blocks_{i}'] = block
  return out


def at_size(model: HVT, params, image_size: int | None) -> tuple[HVT, Any]:
  """`(model, params)` at `image_size` (None: as they are)."""
  if image_size is None:
    return model, params
  resampled = resample_params(params, model.config(), image_size)
  return HVT(**{**model.config(), 'image_size': image_size}), resampled
