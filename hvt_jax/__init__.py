"""hvt_jax: the Hierarchical Visual Transformer (HVT) in JAX/Flax."""
from hvt_jax import cli as _cli

_cli.quiet_native_logs()  # first: jax and TensorFlow read their log settings when imported

from hvt_jax.training.checkpoint import load
from hvt_jax.model import HVT, VARIANTS, create

__all__ = ['HVT', 'VARIANTS', 'create', 'load']
