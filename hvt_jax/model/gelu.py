"""Exact GELU with its own gradient, written without `lax.erf` in the forward pass so that the
SavedModel export can read it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] and +-1 beyond (the rational form Eigen and XLA:CPU
# use for float32; within 4e-7 of the true erf). Written out rather than `lax.erf`, which
# lowers to a StableHLO composite that the SavedModel export's TensorFlow cannot read.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _normal_cdf(x):
  """Phi(x) of a float32 array."""
  z = jnp.clip(x * np.float32(np.sqrt(0.5)), -4.0, 4.0)
  z2 = z * z
  p = functools.reduce(lambda acc, c: acc * z2 + np.float32(c), _ERF_P[1:], np.float32(_ERF_P[0]))
  q = functools.reduce(lambda acc, c: acc * z2 + np.float32(c), _ERF_Q[1:], np.float32(_ERF_Q[0]))
  return 0.5 + 0.5 * (z * p / q)


@jax.custom_vjp
def gelu(x):
  """Exact GELU, x * Phi(x), with Phi from erf as in PyTorch, and a one-pass gradient.

  Within 2e-6 of `nn.gelu(x, approximate=False)`, whose erfc form XLA expands into two
  polynomials, an exp and a select, each a pass over the activation. Autodiff of the erfc form
  also kept three more activation-sized intermediates per block than the one input `_gelu_bwd`
  needs (figures: docs/performance.md, "GELU"). 16-bit inputs are computed in float32.
  """
  x32 = x.astype(jnp.float32)
  return (x32 * _normal_cdf(x32)).astype(x.dtype)


def _gelu_bwd(x, g):
  # d/dx x * Phi(x) = Phi(x) + x * phi(x), in one elementwise pass. Phi through `lax.erf` here
  # (no export runs the backward pass): with the forward's own expression XLA shares Phi
  # between the two passes and stores it, an extra activation-sized buffer written and read
  # back (docs/performance.md, "GELU").
  x32 = x.astype(jnp.float32)
  cdf = 0.5 + 0.5 * jax.lax.erf(x32 * np.float32(np.sqrt(0.5)))
  pdf = jnp.exp(-0.5 * x32 * x32) * np.float32(1 / np.sqrt(2 * np.pi))
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


gelu.defvjp(lambda x: (gelu(x), x), _gelu_bwd)
