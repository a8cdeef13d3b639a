"""Facts about the architecture that need no network: the published variants, which blocks pool,
and how many tokens each block sees. Plain Python, so configs and converters can check a model's
settings without building one.
"""
from __future__ import annotations

from typing import Any

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

# Fields that choose how the model runs, not what it computes: a resumed run may change them.
RUN_SETTINGS = ('attention', 'remat', 'scan_blocks')


class ConfigError(UserError):
  """A model setting that cannot work; the message says which and what to do."""


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
