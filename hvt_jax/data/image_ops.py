"""uint8 image ops in JAX, each matching PIL's (which timm's RandAugment calls).

Every op matches PIL's on uint8 (H, W, C) images, except that the geometric ops interpolate
bilinearly (as the TF version did). Images come as numpy or jax arrays and leave as uint8 jax
arrays. Everything runs under `jax.jit` and `jax.vmap` with static shapes.

Each op is one of three kinds, and the kernel of a kind is shared by its ops:
  lut     a per-channel 256-entry lookup table (`apply_lut`): AutoContrast, Equalize, Invert,
          Posterize, Solarize, SolarizeAdd;
  affine  one bilinear resampling with fill (`apply_affine`): Rotate, ShearX/Y, TranslateX/Y;
  blend   Image.blend(degenerate, image, factor) (`apply_blend`): Color, Contrast, Brightness,
          Sharpness.
Each op's parameter for its kernel has its own function (`equalize_lut`, `rotate_coeffs`,
`grayscale`, ...), which `randaugment` switches between before its kind's kernel. The ops
(`invert`, `rotate`, `color`, ...) run that same kernel on that same parameter, so their results
are the same bits as RandAugment's.

Arguments that are Python or NumPy numbers are turned into parameters on the host in float64,
as timm's Python floats are; traced ones on the device in float32 (`concrete`).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def concrete(*values) -> bool:
  """Python or NumPy numbers: op arguments then are computed on the host in float64, like
  timm's Python floats, and only the result rounds to float32 as PIL rounds it. Traced
  (drawn) arguments are computed on the device in float32."""
  return all(isinstance(v, (int, float, np.ndarray, np.generic)) for v in values)


def array_module(*values):
  """numpy for `concrete` values, else jax.numpy."""
  return np if concrete(*values) else jnp


# ---- The three kernels. Images are uint8 (H, W, C); parameters as each kind takes them. ----

@jax.jit
def apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
  """out[..., c] = lut[c, image[..., c]]; `lut` int32 (C, 256) with values in 0..255."""
  x = jnp.asarray(image).astype(jnp.int32)
  flat = x + 256 * jnp.arange(x.shape[-1], dtype=jnp.int32)
  # The table is computed once: fused into the gather, XLA would recompute it for every pixel.
  lut = jax.lax.optimization_barrier(lut)
  return lut.reshape(-1).at[flat].get(mode='promise_in_bounds').astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames='fill')
def apply_affine(image: jax.Array, coeffs: jax.Array, fill: tuple[float, ...]) -> jax.Array:
  """Output pixel (x, y) samples input (a x + b y + c, d x + e y + f), bilinearly.

  Coordinates are pixel indices (column x, row y). As TF's ImageProjectiveTransformV3 with
  fill_mode CONSTANT (what the TF version ran): each of the four neighbours outside the image
  reads `fill`, so borders blend into it. Rounded half to even, to uint8. `fill`: one value
  per channel, 0..255.
  """
  image = jnp.asarray(image)
  height, width, channels = image.shape
  coeffs = jax.lax.optimization_barrier(coeffs)  # as the LUT's: computed once, not per pixel
  a, b, c, d, e, f = (coeffs[i] for i in range(6))
  ys = jnp.arange(height, dtype=jnp.float32)[:, None]
  xs = jnp.arange(width, dtype=jnp.float32)[None, :]
  x_in = a * xs + b * ys + c
  y_in = d * xs + e * ys + f
  x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
  fx, fy = (x_in - x0)[..., None], (y_in - y0)[..., None]
  # Each output pixel reads its 2x2 neighbourhood in one gather from the image framed by two
  # pixels of fill: a neighbour outside the image reads fill, and a start clipped to the frame
  # reads only fill, as every neighbour there would.
  integral = all(float(v).is_integer() and 0 <= v <= 255 for v in fill)
  framed = jnp.broadcast_to(jnp.asarray(fill, jnp.uint8 if integral else jnp.float32),
                            (height + 4, width + 4, channels))
  framed = framed.at[2:-2, 2:-2].set(image.astype(framed.dtype))
  start = jnp.stack([jnp.clip(y0, -2, height) + 2, jnp.clip(x0, -2, width) + 2],
                    -1).astype(jnp.int32)
  patches = jax.lax.gather(
      framed, start, jax.lax.GatherDimensionNumbers(offset_dims=(2, 3, 4), collapsed_slice_dims=(),
                                                    start_index_map=(0, 1)),
      slice_sizes=(2, 2, channels), mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
  patches = patches.astype(jnp.float32)  # (H, W, 2, 2, C)
  top = (1 - fx) * patches[:, :, 0, 0] + fx * patches[:, :, 0, 1]
  bottom = (1 - fx) * patches[:, :, 1, 0] + fx * patches[:, :, 1, 1]
  return jnp.clip(jnp.round((1 - fy) * top + fy * bottom), 0, 255).astype(jnp.uint8)


@jax.jit
def apply_blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """Image.blend(degenerate, image, factor): extrapolates past 1, truncates like PIL.

  PIL computes in C floats: (float)in1 + alpha * (in2 - in1), then clips and truncates.
  The product is rounded to float32 before the sum, as in PIL: XLA would otherwise fuse the
  two into one fused multiply-add, whose single rounding lands some values one level off.
  """
  d = jnp.asarray(degenerate).astype(jnp.float32)
  product = factor.astype(jnp.float32) * (jnp.asarray(image).astype(jnp.float32) - d)
  out = d + jax.lax.optimization_barrier(product)
  return jnp.clip(jnp.floor(out), 0, 255).astype(jnp.uint8)


# ---- lut: each op's table, as PIL computes it. ----

def _values(channels: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (channels, 256))


def invert_lut(image) -> jax.Array:
  return 255 - _values(image.shape[-1])


def posterize_lut(image, bits) -> jax.Array:
  shift = 8 - jnp.clip(jnp.asarray(bits).astype(jnp.int32), 0, 8)
  return jnp.left_shift(jnp.right_shift(_values(image.shape[-1]), shift), shift)


def solarize_lut(image, threshold) -> jax.Array:
  i = _values(image.shape[-1])
  return jnp.where(i >= jnp.asarray(threshold).astype(jnp.int32), 255 - i, i)


def solarize_add_lut(image, addition, threshold: int = 128) -> jax.Array:
  i = _values(image.shape[-1])
  return jnp.where(i < threshold, jnp.minimum(i + jnp.asarray(addition).astype(jnp.int32), 255), i)


@functools.cache
def _auto_contrast_below() -> np.ndarray:
  """Sorted keys (lo * 256 + hi) * 256 + value where PIL's float64 `value * scale + offset`
  lands just below the integer (value - lo) * 255 / (hi - lo) it equals exactly, so int()
  gives one less (e.g. lo 0, hi 25, value 25 -> 254).

  Only exact integers can be hit: any other quotient lies at least 1/255 from the next
  integer, far beyond float64's error. The table keeps the device arithmetic in int32.
  """
  keys = []
  for d in range(1, 256):
    lo = np.arange(256 - d)
    scale = 255.0 / d
    offset = -lo * scale
    step = d // math.gcd(d, 255)  # (value - lo) a multiple of it: an integer quotient
    j = np.arange(step, d + 1, step)
    exact = j * 255 // d
    pil = np.floor((lo[:, None] + j[None]) * scale + offset[:, None])
    rows, cols = np.nonzero(pil < exact[None])
    keys.append((lo[rows] * 256 + lo[rows] + d) * 256 + lo[rows] + j[cols])
  return np.sort(np.concatenate(keys)).astype(np.int32)


@jax.jit
def auto_contrast_lut(image) -> jax.Array:
  """ImageOps.autocontrast (no cutoff): each channel's [lo, hi] stretched to [0, 255]."""
  x = jnp.asarray(image)
  lo = jnp.min(x, axis=(0, 1)).astype(jnp.int32)[:, None]
  hi = jnp.max(x, axis=(0, 1)).astype(jnp.int32)[:, None]
  i = _values(x.shape[-1])
  exact = jnp.clip((i - lo) * 255 // jnp.maximum(hi - lo, 1), 0, 255)
  below = jnp.asarray(_auto_contrast_below())
  key = (lo * 256 + hi) * 256 + i
  found = below[jnp.clip(jnp.searchsorted(below, key, method='scan_unrolled'), 0,
                         below.size - 1)] == key
  return jnp.where(hi > lo, jnp.maximum(exact - found, 0), i)


@jax.jit
def equalize_lut(image) -> jax.Array:
  """ImageOps.equalize's per-channel table from the histogram, in its integer arithmetic."""
  x = jnp.asarray(image).astype(jnp.int32)
  channels = x.shape[-1]
  # One flat index per value: under vmap, XLA:CPU's scatter runs far better with a single
  # index dimension than with (channel, value) pairs (docs/performance.md, "Figures moved
  # out of code comments").
  flat = (x + 256 * jnp.arange(channels, dtype=jnp.int32)).reshape(-1)
  hist = jnp.zeros((channels * 256,), jnp.int32).at[flat].add(1).reshape(channels, 256)
  # PIL leaves the count of the highest value present out of the step.
  top_count = jnp.take_along_axis(hist, jnp.max(x, axis=(0, 1))[:, None], axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - top_count) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  lut = (step // 2 + below) // jnp.maximum(step, 1)
  return jnp.where(step > 0, jnp.minimum(lut, 255), _values(channels))


# ---- blend: each op's degenerate image (broadcastable to the image) and factor. ----

def grayscale(image) -> jax.Array:
  """PIL's convert('L'): ITU-R 601-2 luma in its 16-bit fixed point; (H, W, 1) int32."""
  x = jnp.asarray(image).astype(jnp.int32)
  luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
  return luma[..., None]


def mean_luma(image) -> jax.Array:
  """int(mean + 0.5) of the luma, exactly: the sum is an integer (int32 up to 8M pixels)."""
  luma = grayscale(image)
  total, count = jnp.sum(luma), luma.size
  return total // count + (2 * (total % count) >= count)


def smooth(image) -> jax.Array:
  """PIL's SMOOTH filter, [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded; border pixels kept."""
  x = jnp.asarray(image).astype(jnp.int32)
  padded = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  vertical = padded[:-2] + padded[1:-1] + padded[2:]
  total = vertical[:, :-2] + vertical[:, 1:-1] + vertical[:, 2:] + 4 * x
  # round(total / 13) as PIL rounds it. total / 13 + 0.5 lies at least 1/26 from any integer,
  # far beyond float32's error, so the float product rounds exactly (and costs less than an
  # integer division).
  smooth = jnp.floor(total.astype(jnp.float32) * (1 / 13) + 0.5).astype(jnp.int32)
  height, width = x.shape[:2]
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return jnp.where(interior, smooth, x)


def black(image) -> jax.Array:
  """Brightness's degenerate image: black, a scalar that broadcasts to the image."""
  del image
  return jnp.zeros((), jnp.int32)


def blend_factor(value) -> jax.Array:
  return jnp.asarray(np.float32(value) if concrete(value) else value, jnp.float32)


# ---- affine: PIL's coefficients, output pixel -> input pixel. ----

def _coeffs(values: Sequence) -> jax.Array:
  if concrete(*values):
    return jnp.asarray(np.array(values, np.float64).astype(np.float32))
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def rotate_coeffs(image, degrees) -> jax.Array:
  """Counter-clockwise about the image centre, as Image.rotate."""
  xp = array_module(degrees)
  theta = degrees * (math.pi / 180.0)
  cos, sin = xp.cos(theta), xp.sin(theta)
  cx, cy = (image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2
  return _coeffs([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


# PIL applies its coefficients to pixel centres (index + 0.5), hence the half-pixel offsets.
def shear_x_coeffs(image, factor) -> jax.Array:
  return _coeffs([1.0, factor, 0.5 * factor, 0.0, 1.0, 0.0])


def shear_y_coeffs(image, factor) -> jax.Array:
  return _coeffs([1.0, 0.0, 0.0, factor, 1.0, 0.5 * factor])


def translate_x_coeffs(image, pixels) -> jax.Array:
  return _coeffs([1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def translate_y_coeffs(image, pixels) -> jax.Array:
  return _coeffs([1.0, 0.0, 0.0, 0.0, 1.0, pixels])


# ---- The ops by hand: uint8 (H, W, C) numpy or jax arrays in, uint8 jax arrays out. ----

def fill_values(fill: Sequence[float]) -> tuple[float, ...]:
  """A fill colour as the tuple of floats `apply_affine` takes (static: hashable)."""
  return tuple(float(v) for v in fill)


def invert(image) -> jax.Array:
  return apply_lut(image, invert_lut(image))


def auto_contrast(image) -> jax.Array:
  """Stretch each channel's [min, max] to [0, 255] (ImageOps.autocontrast, no cutoff)."""
  return apply_lut(image, auto_contrast_lut(image))


def equalize(image) -> jax.Array:
  """Per-channel histogram equalization with PIL's lookup table (ImageOps.equalize)."""
  return apply_lut(image, equalize_lut(image))


def posterize(image, bits) -> jax.Array:
  """Keep the `bits` most significant bits of each value (0 bits: black)."""
  return apply_lut(image, posterize_lut(image, bits))


def solarize(image, threshold) -> jax.Array:
  """Invert the values >= threshold (256: unchanged)."""
  return apply_lut(image, solarize_lut(image, threshold))


def solarize_add(image, addition, threshold: int = 128) -> jax.Array:
  """Add `addition` to the values below threshold, saturating at 255."""
  return apply_lut(image, solarize_add_lut(image, addition, threshold))


def color(image, factor) -> jax.Array:
  """ImageEnhance.Color: 0 is grayscale, 1 the image."""
  return apply_blend(grayscale(image), image, blend_factor(factor))


def contrast(image, factor) -> jax.Array:
  """ImageEnhance.Contrast: 0 is flat gray at the rounded mean luma, 1 the image."""
  return apply_blend(mean_luma(image), image, blend_factor(factor))


def brightness(image, factor) -> jax.Array:
  """ImageEnhance.Brightness: 0 is black, 1 the image."""
  return apply_blend(black(image), image, blend_factor(factor))


def sharpness(image, factor) -> jax.Array:
  """ImageEnhance.Sharpness: 0 is PIL's SMOOTH filter (border pixels kept), 1 the image."""
  return apply_blend(smooth(image), image, blend_factor(factor))


def affine(image, coeffs: Sequence, fill: Sequence[float]) -> jax.Array:
  """Sample input (a x + b y + c, d x + e y + f) for output pixel (x, y); outside: `fill`.

  Coordinates are pixel indices (column x, row y). Bilinear, rounded to uint8.
  """
  return apply_affine(image, _coeffs(list(coeffs)), fill_values(fill))


def rotate(image, degrees, fill: Sequence[float]) -> jax.Array:
  """Counter-clockwise about the image centre, as Image.rotate."""
  return apply_affine(image, rotate_coeffs(image, degrees), fill_values(fill))


def shear_x(image, factor, fill: Sequence[float]) -> jax.Array:
  return apply_affine(image, shear_x_coeffs(image, factor), fill_values(fill))


def shear_y(image, factor, fill: Sequence[float]) -> jax.Array:
  return apply_affine(image, shear_y_coeffs(image, factor), fill_values(fill))


def translate_x(image, pixels, fill: Sequence[float]) -> jax.Array:
  """Positive `pixels` moves the content left, as PIL's affine (1, 0, pixels, 0, 1, 0)."""
  return apply_affine(image, translate_x_coeffs(image, pixels), fill_values(fill))


def translate_y(image, pixels, fill: Sequence[float]) -> jax.Array:
  return apply_affine(image, translate_y_coeffs(image, pixels), fill_values(fill))
