"""Mixup / CutMix with label smoothing, on device inside the train step (timm's batch mode).

One draw per batch, as timm's `Mixup(mode='batch')` that DeiT and HVT train with: with
probability `mix_prob` the batch is mixed with itself in reverse order; when both are on,
CutMix is chosen with probability `switch_prob`; lambda ~ Beta(alpha, alpha). CutMix pastes one
box whose size follows from lambda, then corrects lambda to the box's true area (timm's
`correct_lam=True`). Targets are smoothed one-hot labels (off = ls / C, on = 1 - ls + ls / C)
mixed with lambda, so every row sums to 1.

The settings are Python numbers (fixed for a run), so `jax.jit` sees them as constants.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def cutmix_box(rng: jax.Array, height: int, width: int,
               lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  """timm's `rand_bbox` + `correct_lam`: (box mask (H, W) bool, lambda = 1 - box area / image).

  The box is (H, W) * sqrt(1 - lam) (truncated), centred uniformly in the image and clipped.
  """
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  key_y, key_x = jax.random.split(rng)
  cy = jax.random.randint(key_y, (), 0, height)
  cx = jax.random.randint(key_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  area = (bottom - top) * (right - left)
  return box, 1.0 - area.astype(jnp.float32) / (height * width)


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
        mixup: float, cutmix: float, mix_prob: float, switch_prob: float,
        label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """(images (B, H, W, C), labels (B,) int) -> (mixed images, float32 targets (B, C)).

  `mixup` / `cutmix`: Beta alphas, 0 turns each off; with both off, or `mix_prob` 0, the images
  pass unchanged and the targets are the smoothed one-hot labels.
  """
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32),
                                label_smoothing)
  if (mixup <= 0 and cutmix <= 0) or mix_prob <= 0:
    return images, targets

  key_apply, key_switch, key_lam, key_box = jax.random.split(rng, 4)
  apply = jax.random.uniform(key_apply) < mix_prob
  if mixup > 0 and cutmix > 0:
    use_cutmix = jax.random.uniform(key_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix > 0)
  # One Beta(alpha, alpha) draw, alpha of the chosen kind, as G1 / (G1 + G2) from two Gamma
  # draws in log space: one sampler (a rejection loop, slow to compile) instead of two
  # (docs/performance.md, "Figures moved out of code comments").
  alpha = jnp.where(use_cutmix, cutmix, mixup)
  log_g = jax.random.loggamma(key_lam, alpha, shape=(2,))
  lam_raw = jax.nn.sigmoid(log_g[0] - log_g[1])

  flipped = images[::-1]
  box, lam_box = cutmix_box(key_box, images.shape[1], images.shape[2], lam_raw)
  cut = jnp.where(box[None, :, :, None], flipped, images)
  blend = (lam_raw * images + (1.0 - lam_raw) * flipped).astype(images.dtype)

  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_raw), 1.0).astype(jnp.float32)
  mixed = jnp.where(apply, jnp.where(use_cutmix, cut, blend), images)
  return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def mix_from_config(rng: jax.Array, batch: dict[str, jax.Array],
                    config: Any) -> tuple[jax.Array, jax.Array]:
  """`mix` with the settings of `config.mix` and `config.model.num_classes`.

  `config`: the training ConfigDict (typed Any so this module, like the train step, imports
  without ml_collections, e.g. on a GPU box that only has jax and torch).
  """
  m = config.mix
  return mix(rng, batch['image'], batch['label'], num_classes=config.model.num_classes,
             mixup=float(m.mixup), cutmix=float(m.cutmix), mix_prob=float(m.mix_prob),
             switch_prob=float(m.switch_prob), label_smoothing=float(m.label_smoothing))
