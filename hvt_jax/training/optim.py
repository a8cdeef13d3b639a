"""The optimizer of the recipe: AdamW, linear lr scaling, warmup then cosine, selective decay."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from hvt_jax import model as model_lib

# Position embeddings (the stem's and each pooling block's) and the class token are
# not decayed, like biases and other 1-D parameters.
_NO_DECAY_NAMES = ('pos_embed', 'cls_token')


def peak_lr(optim, batch_size: int) -> float:
  """Linear scaling: `lr` is the rate at `lr_base_batch` examples per step."""
  return optim.lr * batch_size / optim.lr_base_batch


def lr_schedule(optim, batch_size: int, num_epochs: int, steps_per_epoch: int):
  """Step -> lr: linear warmup from `warmup_lr`, then cosine from the peak to `min_lr`.

  The cosine spans all `num_epochs` (warmup included), and with `lr_per_epoch` the
  rate changes once per epoch, as the recipe's epoch-stepped scheduler does.
  """
  peak = peak_lr(optim, batch_size)

  def schedule(step):
    epoch = step / steps_per_epoch
    if optim.lr_per_epoch:
      epoch = jnp.floor(epoch)
    warm = optim.warmup_lr + epoch * (peak - optim.warmup_lr) / max(optim.warmup_epochs, 1e-9)
    cos = optim.min_lr + 0.5 * (peak - optim.min_lr) * (1 + jnp.cos(jnp.pi * epoch / num_epochs))
    cos = jnp.where(epoch >= num_epochs, optim.min_lr, cos)
    return jnp.where(epoch < optim.warmup_epochs, warm, cos)

  return schedule


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not biases/norms/embeddings.

  Counts a parameter's own axes: a stacked run's (see `model.stack_blocks`) less the one
  that counts blocks.
  """
  def decays(path, leaf):
    names = [getattr(k, 'key', None) for k in path]
    ndim = leaf.ndim - model_lib.stacked_dims(path)
    return ndim > 1 and not any(n in _NO_DECAY_NAMES for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def make(optim, schedule) -> optax.GradientTransformation:
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
  return adamw
