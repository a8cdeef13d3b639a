"""Which patches survive HVT's max-pools: winners per channel, traced back to the image.

HVT max-pools its token sequence (kernel 3, stride 2, no padding) after some
blocks. Each output token takes, in every channel separately, the largest of its
3 input tokens. These functions find those winners from the tokens just before
a pool (`model.stage_features` returns them), count how much each input token
wins, and follow the winners of later pools back to the image patches.

Blocks between two pools mix a token's channels (attention, MLP), so channel c
after one pool is not channel c at the next: tracing therefore goes token by
token, each token standing for its inputs in proportion to the channels they won.

They work on one image at a time, its tokens as (N, D) arrays (numpy or jax), and
return numpy arrays; `draw_patch_scores` paints per-patch numbers over the image.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def pool_windows(n_in: int, kernel: int = 3, stride: int = 2) -> np.ndarray:
  """(N_out, kernel) input indices each output token pools, as `model.max_pool_tokens`."""
  n_out = (n_in - kernel) // stride + 1
  if n_out < 1:
    raise ValueError(f'{n_in} tokens are fewer than one pooling window of {kernel}.')
  return np.arange(n_out)[:, None] * stride + np.arange(kernel)[None, :]


def pool_winners(tokens, kernel: int = 3, stride: int = 2) -> np.ndarray:
  """(N_out, D) int: for each output token and channel, the input token holding the max.

  `tokens` is (N_in, D), the sequence entering the pool. A tie goes to the earlier
  token; the pooled value is the same either way.
  """
  tokens = np.asarray(tokens, np.float32)  # bfloat16 models too; the cast keeps every order
  if tokens.ndim != 2:
    raise ValueError(f"expected one image's tokens of shape (N, D), got {tokens.shape}.")
  windows = pool_windows(tokens.shape[0], kernel, stride)
  best = tokens[windows].argmax(axis=1)  # (N_out, D): position inside each window
  return windows[np.arange(len(windows))[:, None], best]


def win_fraction(winners, n_in: int) -> np.ndarray:
  """(n_in,): channels each input token won, in units of one token's D channels.

  0 means the token lost every channel it competed for (or lay in no window, like
  the last of an even count); a token inside two overlapping windows can reach 2.
  The values sum to N_out, the number of tokens the pool keeps.
  """
  winners = np.asarray(winners)
  return np.bincount(winners.ravel(), minlength=n_in)[:n_in] / winners.shape[1]


def win_shares(winners, n_in: int) -> np.ndarray:
  """(N_out, n_in): share of each output token's channels that came from each input token.

  Every row sums to 1; the column sums are `win_fraction`.
  """
  winners = np.asarray(winners)
  n_out, channels = winners.shape
  shares = np.zeros((n_out, n_in))
  np.add.at(shares, (np.repeat(np.arange(n_out), channels), winners.ravel()), 1.0 / channels)
  return shares


def trace_shares(winners_per_pool: Sequence, n_patches: int) -> list[np.ndarray]:
  """For pool k, (N_out_k, n_patches): how much of each surviving token traces to each patch.

  `winners_per_pool` are `pool_winners` of the successive pools, the first one on
  the patch tokens. Each pool's tokens stand for their inputs in proportion to the
  channels those won, so the result is the product of the pools' `win_shares`;
  rows sum to 1.
  """
  traced, n_in = [], n_patches
  total = np.eye(n_patches)
  for winners in winners_per_pool:
    total = win_shares(winners, n_in) @ total
    n_in = total.shape[0]
    traced.append(total)
  return traced


def source_patches(shares) -> np.ndarray:
  """(N_out,) int: the patch each surviving token draws the most channels from."""
  return np.asarray(shares).argmax(axis=1)


def unnormalize(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """A model input (normalized HWC) back to displayable [0, 1] RGB."""
  image = np.asarray(image, np.float32) * np.asarray(std) + np.asarray(mean)
  return np.clip(image, 0.0, 1.0)


def draw_patch_scores(image, scores, patch: int, ax, *, cmap: str = 'magma', alpha: float = 0.6,
                      vmin: float | None = None, vmax: float | None = None, grid: bool = True):
  """Paints one number per patch (row-major, as the model orders tokens) over `image`.

  `image` is (H, W, 3) in [0, 1] or uint8 with H and W multiples of `patch`;
  `scores` has (H/patch)*(W/patch) entries. Returns the overlay, for `colorbar`.
  """
  image = np.asarray(image)
  height, width = image.shape[:2]
  rows, cols = height // patch, width // patch
  scores = np.asarray(scores, np.float64)
  if rows * patch != height or cols * patch != width or scores.size != rows * cols:
    raise ValueError(f'{scores.size} scores do not tile a {height}x{width} image with '
                     f'{patch}x{patch} patches ({rows}x{cols} expected).')
  ax.imshow(image)
  overlay = ax.imshow(scores.reshape(rows, cols), extent=(0, width, height, 0), cmap=cmap,
                      alpha=alpha, vmin=vmin, vmax=vmax, interpolation='nearest')
  if grid:
    for x in range(0, width + 1, patch):
      ax.axvline(x, color='white', lw=0.3, alpha=0.5)
    for y in range(0, height + 1, patch):
      ax.axhline(y, color='white', lw=0.3, alpha=0.5)
  ax.set_xlim(0, width)
  ax.set_ylim(height, 0)
  ax.set_xticks([])
  ax.set_yticks([])
  return overlay
