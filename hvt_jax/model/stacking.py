"""The train state's layout of scanned blocks: each scanned run's blocks as one entry of stacked
arrays, `blocks_{first}_to_{last - 1}`, which `HVT`'s scan reads as it is.

Kept per block, every step stacked the parameters and split the gradients again, and the
optimizer and EMA compiled a kernel per block's leaf, so the train step compiled markedly slower
(figures: docs/performance.md, "Compile time: the train state's layout"). Everything saved or
handed to users holds `blocks_{i}` (`unstack_blocks`).
"""
from __future__ import annotations

import re
from typing import Mapping

import jax
import jax.numpy as jnp

_STACKED = re.compile(r'blocks_(\d+)_to_(\d+)')


def stacked_name(first: int, last: int) -> str:
  return f'blocks_{first}_to_{last - 1}'


def _is_params(node) -> bool:
  return isinstance(node, Mapping) and 'patch_embed' in node


def _on_params(fn, tree):
  """`fn` applied to every parameter dict in `tree`: the parameters themselves, or a train state
  whose parameters, EMA and optimizer moments each hold one."""
  return jax.tree.map(lambda node: fn(node) if _is_params(node) else node, tree,
                      is_leaf=_is_params)


def stack_blocks(tree, runs: list[tuple[int, int]]):
  """`tree` with blocks first..last-1 of each run as one entry, `stacked_name(first, last)`."""
  def stack(params):
    params = dict(params)
    for first, last in runs:
      blocks = [params.pop(f'blocks_{i}') for i in range(first, last)]
      params[stacked_name(first, last)] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
    return params
  return _on_params(stack, tree)


def stacked_runs(params) -> list[tuple[int, int]]:
  """The runs that `params` holds stacked, as `stack_blocks` takes them."""
  found = [_STACKED.fullmatch(name) for name in params]
  return sorted((int(m[1]), int(m[2]) + 1) for m in found if m)


def stacked_dims(path) -> int:
  """1 for a leaf of a stacked run (its leading axis counts blocks), else 0; `path` as
  `jax.tree_util.tree_map_with_path` gives it."""
  return int(any(_STACKED.fullmatch(str(getattr(k, 'key', ''))) for k in path))


def unstack_blocks(tree):
  """`tree` with every stacked run split back into `blocks_{i}`: the inverse of `stack_blocks`."""
  def unstack(params):
    out = {name: value for name, value in params.items() if not _STACKED.fullmatch(name)}
    for first, last in stacked_runs(params):
      stacked = params[stacked_name(first, last)]
      for j in range(last - first):
        out[f'blocks_{first + j}'] = jax.tree.map(lambda a: a[j], stacked)
    return out
  return _on_params(unstack, tree)
