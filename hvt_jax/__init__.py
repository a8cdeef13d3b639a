"""hvt_jax: the Hierarchical Visual Transformer (HVT) in JAX/Flax.

`hvt_jax.load`, `HVT`, `VARIANTS` and `create` are imported on first use (PEP 562), so importing
the package loads neither jax nor TensorFlow and leaves the environment alone: `python -m
hvt_jax.<command>` imports this package before the command, which sets the native libraries' log
levels before they read them.
"""
from __future__ import annotations

import importlib

_LAZY = {'load': 'hvt_jax.loading', 'HVT': 'hvt_jax.model', 'VARIANTS': 'hvt_jax.model',
         'create': 'hvt_jax.model'}
_AREAS = ('model', 'data', 'training', 'interop')  # `hvt_jax.model.create`, as before

__all__ = ['HVT', 'VARIANTS', 'create', 'load']


def __getattr__(name: str):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
  elif name in _AREAS:
    value = importlib.import_module(f'{__name__}.{name}')
  else:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  globals()[name] = value  # later lookups skip this function
  return value


def __dir__() -> list[str]:
  return sorted({*globals(), *_LAZY, *_AREAS})
