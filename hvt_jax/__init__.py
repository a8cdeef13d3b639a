"""hvt_jax: the Hierarchical Visual Transformer (HVT) in JAX/Flax."""
from hvt_jax import xla_flags

xla_flags.use_cpu_flags()  # before anything starts JAX's backend, which reads $XLA_FLAGS once

from hvt_jax.training.checkpoint import load  # noqa: E402
from hvt_jax.model import HVT, VARIANTS, create  # noqa: E402

__all__ = ['HVT', 'VARIANTS', 'create', 'load']
