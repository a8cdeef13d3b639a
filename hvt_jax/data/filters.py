"""PIL's resampling filters and the coefficients of its resize, for TF and JAX alike.

One definition for the two places a window is resized: the host's TF resize
(`preprocess.resize`) and the device's (`device_resize`). Each function takes the array module
to compute with, `xp` (`tensorflow` or `jax.numpy`), and uses only what both name alike.

PIL's coefficients (precompute_coeffs in its Resample.c): output row o is centered at input
coordinate c = (o + 0.5) * scale, scale = in_size / out_size; when shrinking, the filter is
widened by the scale (its antialiasing); the input rows within its support are weighted
kernel((row + 0.5 - c) / max(scale, 1)), then normalized to sum 1.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple


def _bicubic(x, xp):
  """PIL's bicubic filter (Keys, a = -0.5)."""
  a = -0.5
  x = xp.abs(x)
  return xp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  xp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, xp.zeros_like(x)))


def _bilinear(x, xp):
  return xp.maximum(1 - xp.abs(x), 0)


def _sinc(x, xp):
  safe = xp.where(x == 0, xp.ones_like(x), x * math.pi)
  return xp.where(x == 0, xp.ones_like(x), xp.sin(safe) / safe)


def _lanczos(x, xp):
  return xp.where((x >= -3) & (x < 3), _sinc(x, xp) * _sinc(x / 3, xp), xp.zeros_like(x))


# name -> (filter, support in input pixels at scale 1) as PIL defines them; None: nearest
# neighbour, which PIL samples without a filter (and so never antialiases).
FILTERS: dict[str, tuple[Callable, float] | None] = {
    'bicubic': (_bicubic, 2.0),
    'bilinear': (_bilinear, 1.0),
    'lanczos': (_lanczos, 3.0),
    'nearest': None,
}


class Bounds(NamedTuple):
  """Where each output row's filter sits: its center, stretch and input rows [low, high)."""
  center: Any
  stretch: Any
  low: Any
  high: Any


def bounds(out, scale, in_size, support: float, xp) -> Bounds:
  """PIL's bounds of output rows `out` (float), for `scale` = in_size / out_size."""
  stretch = xp.maximum(scale, 1.0)
  center = (out + 0.5) * scale
  reach = support * stretch
  # PIL's int(center -+ support + 0.5), clamped to the image.
  low = xp.maximum(xp.floor(center - reach + 0.5), 0.0)
  high = xp.minimum(xp.floor(center + reach + 0.5), in_size)
  return Bounds(center, stretch, low, high)


def weights(rows, where: Bounds, kernel: Callable, xp):
  """The filter's (unnormalized) weights of input rows `rows` (float, broadcast against
  `where`'s fields), 0 outside each output row's [low, high)."""
  w = kernel((rows - where.center + 0.5) / where.stretch, xp)
  return xp.where((rows >= where.low) & (rows < where.high), w, xp.zeros_like(w))


def block_span(block: int, max_scale: float, support: float) -> int:
  """Input rows that `block` consecutive output rows can read at a scale up to `max_scale`:
  the block's centers spread over (block - 1) * scale, each filter reaches support * stretch
  to both sides, and PIL's rounding of the bounds adds a row at each end."""
  return math.ceil((block - 1) * max_scale + 2 * support * max(max_scale, 1.0)) + 2
