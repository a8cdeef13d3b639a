"""hvt_jax: the Hierarchical Visual Transformer (HVT) in JAX/Flax."""
from hvt_jax.training.checkpoint import load
from hvt_jax.model import HVT, VARIANTS, create

__all__ = ['HVT', 'VARIANTS', 'create', 'load']
