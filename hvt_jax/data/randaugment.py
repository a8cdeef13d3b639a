"""RandAugment as in timm 0.3.2 (used by DeiT and HVT), in JAX on uint8 images.

Every op matches PIL's (which timm calls) on uint8 (H, W, C) images, except that the
geometric ops interpolate bilinearly (as the TF version did). Magnitudes are on timm's 0..10
scale. Everything runs under `jax.jit` and `jax.vmap` with static shapes, so the train step
augments each example on the device (`augment.train_images`); randomness comes only from the
PRNG key, so one (image, key) pair always gives one result.

Each op is one of three kinds, and the kernel of a kind is shared by its ops:
  lut     a per-channel 256-entry lookup table: AutoContrast, Equalize, Invert, Posterize,
          Solarize, SolarizeAdd;
  affine  one bilinear resampling with fill: Rotate, ShearX/Y, TranslateX/YRel;
  blend   Image.blend(degenerate, image, factor): Color, Contrast, Brightness, Sharpness.
The public ops (`invert`, `rotate`, `color`, ...) and `apply_op` run exactly the kernel
`rand_augment` runs, so their results are the same bits.
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hvt_jax.errors import UserError

MAX_LEVEL = 10.0  # magnitude that maps to each op's strongest argument

_SPEC_HELP = ("expected 'rand' then any of -m<magnitude> -n<ops per image> -mstd<magnitude std> "
              "-mmax<magnitude cap> -p<op probability> -inc<0|1>, e.g. 'rand-m9-mstd0.5-inc1'")


class RandAugmentSpecError(UserError):
  """A RandAugment spec string that cannot be parsed."""


def parse_spec(spec: str) -> dict[str, Any]:
  """'rand-m9-mstd0.5-inc1' -> {num_ops, magnitude, magnitude_std, magnitude_max, prob, increasing}.

  timm's syntax and defaults; unlike timm, a part it would silently skip is an error.
  """
  parts = spec.split('-') if isinstance(spec, str) else []
  if not parts or parts[0] != 'rand':
    raise RandAugmentSpecError(f'RandAugment spec {spec!r} does not start with "rand"; '
                               f'{_SPEC_HELP}.')
  out = dict(num_ops=2, magnitude=MAX_LEVEL, magnitude_std=0.0, magnitude_max=MAX_LEVEL,
             prob=0.5, increasing=False)
  keys = {'m': 'magnitude', 'n': 'num_ops', 'mstd': 'magnitude_std', 'mmax': 'magnitude_max',
          'p': 'prob', 'inc': 'increasing'}
  for part in parts[1:]:
    match = re.fullmatch(r'([a-z]+)(\d[\d.]*)', part)
    value = _number(match.group(2)) if match else None
    if match is None or match.group(1) not in keys or value is None:
      raise RandAugmentSpecError(f'RandAugment spec {spec!r}: cannot read part {part!r}; '
                                 f'{_SPEC_HELP}.')
    out[keys[match.group(1)]] = value
  problem = _spec_problem(out)
  if problem:
    raise RandAugmentSpecError(f'RandAugment spec {spec!r}: {problem}; {_SPEC_HELP}.')
  out['num_ops'] = int(out['num_ops'])
  out['increasing'] = bool(out['increasing'])
  return out


def _number(text: str) -> float | None:
  try:
    return float(text)
  except ValueError:
    return None


def _spec_problem(cfg: dict[str, Any]) -> str:
  if cfg['num_ops'] != int(cfg['num_ops']):
    return f'n must be a whole number, not {cfg["num_ops"]}'
  if cfg['increasing'] not in (0, 1):
    return f'inc must be 0 or 1, not {cfg["increasing"]}'
  if not 0 <= cfg['prob'] <= 1:
    return f'p must lie in [0, 1], not {cfg["prob"]}'
  if cfg['magnitude_max'] <= 0:
    return 'mmax must be positive'
  return ''


def _concrete(*values) -> bool:
  """Python or NumPy numbers: op arguments then are computed on the host in float64, like
  timm's Python floats, and only the result rounds to float32 as PIL rounds it. Traced
  (drawn) arguments are computed on the device in float32."""
  return all(isinstance(v, (int, float, np.ndarray, np.generic)) for v in values)


def _xp(*values):
  return np if _concrete(*values) else jnp


# ---- The three kernels. Images are uint8 (H, W, C); parameters as each kind takes them. ----

@jax.jit
def _apply_lut(image: jax.Array, lut: jax.Array) -> jax.Array:
  """out[..., c] = lut[c, image[..., c]]; `lut` int32 (C, 256) with values in 0..255."""
  x = jnp.asarray(image).astype(jnp.int32)
  flat = x + 256 * jnp.arange(x.shape[-1], dtype=jnp.int32)
  # The table is computed once: fused into the gather, XLA would recompute it for every pixel.
  lut = jax.lax.optimization_barrier(lut)
  return lut.reshape(-1).at[flat].get(mode='promise_in_bounds').astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames='fill')
def _affine(image: jax.Array, coeffs: jax.Array, fill: tuple[float, ...]) -> jax.Array:
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
def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
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


def _invert_lut(image) -> jax.Array:
  return 255 - _values(image.shape[-1])


def _posterize_lut(image, bits) -> jax.Array:
  shift = 8 - jnp.clip(jnp.asarray(bits).astype(jnp.int32), 0, 8)
  return jnp.left_shift(jnp.right_shift(_values(image.shape[-1]), shift), shift)


def _solarize_lut(image, threshold) -> jax.Array:
  i = _values(image.shape[-1])
  return jnp.where(i >= jnp.asarray(threshold).astype(jnp.int32), 255 - i, i)


def _solarize_add_lut(image, addition, threshold: int = 128) -> jax.Array:
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
def _auto_contrast_lut(image) -> jax.Array:
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
def _equalize_lut(image) -> jax.Array:
  """ImageOps.equalize's per-channel table from the histogram, in its integer arithmetic."""
  x = jnp.asarray(image).astype(jnp.int32)
  channels = x.shape[-1]
  # One flat index per value: under vmap, XLA:CPU's scatter is several times faster with a
  # single index dimension than with (channel, value) pairs.
  flat = (x + 256 * jnp.arange(channels, dtype=jnp.int32)).reshape(-1)
  hist = jnp.zeros((channels * 256,), jnp.int32).at[flat].add(1).reshape(channels, 256)
  # PIL leaves the count of the highest value present out of the step.
  top_count = jnp.take_along_axis(hist, jnp.max(x, axis=(0, 1))[:, None], axis=1)
  step = (jnp.sum(hist, axis=1, keepdims=True) - top_count) // 255
  below = jnp.cumsum(hist, axis=1) - hist
  lut = (step // 2 + below) // jnp.maximum(step, 1)
  return jnp.where(step > 0, jnp.minimum(lut, 255), _values(channels))


# ---- blend: each op's degenerate image (broadcastable to the image) and factor. ----

def _grayscale(image) -> jax.Array:
  """PIL's convert('L'): ITU-R 601-2 luma in its 16-bit fixed point; (H, W, 1) int32."""
  x = jnp.asarray(image).astype(jnp.int32)
  luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) >> 16
  return luma[..., None]


def _mean_luma(image) -> jax.Array:
  """int(mean + 0.5) of the luma, exactly: the sum is an integer (int32 up to 8M pixels)."""
  luma = _grayscale(image)
  total, count = jnp.sum(luma), luma.size
  return total // count + (2 * (total % count) >= count)


def _smooth(image) -> jax.Array:
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


def _factor(value) -> jax.Array:
  return jnp.asarray(np.float32(value) if _concrete(value) else value, jnp.float32)


# ---- affine: PIL's coefficients, output pixel -> input pixel. ----

def _coeffs(values: Sequence) -> jax.Array:
  if _concrete(*values):
    return jnp.asarray(np.array(values, np.float64).astype(np.float32))
  return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def _rotate_coeffs(image, degrees) -> jax.Array:
  """Counter-clockwise about the image centre, as Image.rotate."""
  xp = _xp(degrees)
  theta = degrees * (math.pi / 180.0)
  cos, sin = xp.cos(theta), xp.sin(theta)
  cx, cy = (image.shape[1] - 1) / 2, (image.shape[0] - 1) / 2
  return _coeffs([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy])


# PIL applies its coefficients to pixel centres (index + 0.5), hence the half-pixel offsets.
def _shear_x_coeffs(image, factor) -> jax.Array:
  return _coeffs([1.0, factor, 0.5 * factor, 0.0, 1.0, 0.0])


def _shear_y_coeffs(image, factor) -> jax.Array:
  return _coeffs([1.0, 0.0, 0.0, factor, 1.0, 0.5 * factor])


def _translate_x_coeffs(image, pixels) -> jax.Array:
  return _coeffs([1.0, 0.0, pixels, 0.0, 1.0, 0.0])


def _translate_y_coeffs(image, pixels) -> jax.Array:
  return _coeffs([1.0, 0.0, 0.0, 0.0, 1.0, pixels])


# ---- The ops by hand: uint8 (H, W, C) numpy or jax arrays in, uint8 jax arrays out. ----

def _fill(fill: Sequence[float]) -> tuple[float, ...]:
  return tuple(float(v) for v in fill)


def invert(image) -> jax.Array:
  return _apply_lut(image, _invert_lut(image))


def auto_contrast(image) -> jax.Array:
  """Stretch each channel's [min, max] to [0, 255] (ImageOps.autocontrast, no cutoff)."""
  return _apply_lut(image, _auto_contrast_lut(image))


def equalize(image) -> jax.Array:
  """Per-channel histogram equalization with PIL's lookup table (ImageOps.equalize)."""
  return _apply_lut(image, _equalize_lut(image))


def posterize(image, bits) -> jax.Array:
  """Keep the `bits` most significant bits of each value (0 bits: black)."""
  return _apply_lut(image, _posterize_lut(image, bits))


def solarize(image, threshold) -> jax.Array:
  """Invert the values >= threshold (256: unchanged)."""
  return _apply_lut(image, _solarize_lut(image, threshold))


def solarize_add(image, addition, threshold: int = 128) -> jax.Array:
  """Add `addition` to the values below threshold, saturating at 255."""
  return _apply_lut(image, _solarize_add_lut(image, addition, threshold))


def color(image, factor) -> jax.Array:
  """ImageEnhance.Color: 0 is grayscale, 1 the image."""
  return _blend(_grayscale(image), image, _factor(factor))


def contrast(image, factor) -> jax.Array:
  """ImageEnhance.Contrast: 0 is flat gray at the rounded mean luma, 1 the image."""
  return _blend(_mean_luma(image), image, _factor(factor))


def brightness(image, factor) -> jax.Array:
  """ImageEnhance.Brightness: 0 is black, 1 the image."""
  return _blend(jnp.zeros((), jnp.int32), image, _factor(factor))


def sharpness(image, factor) -> jax.Array:
  """ImageEnhance.Sharpness: 0 is PIL's SMOOTH filter (border pixels kept), 1 the image."""
  return _blend(_smooth(image), image, _factor(factor))


def affine(image, coeffs: Sequence, fill: Sequence[float]) -> jax.Array:
  """Sample input (a x + b y + c, d x + e y + f) for output pixel (x, y); outside: `fill`.

  Coordinates are pixel indices (column x, row y). Bilinear, rounded to uint8.
  """
  return _affine(image, _coeffs(list(coeffs)), _fill(fill))


def rotate(image, degrees, fill: Sequence[float]) -> jax.Array:
  """Counter-clockwise about the image centre, as Image.rotate."""
  return _affine(image, _rotate_coeffs(image, degrees), _fill(fill))


def shear_x(image, factor, fill: Sequence[float]) -> jax.Array:
  return _affine(image, _shear_x_coeffs(image, factor), _fill(fill))


def shear_y(image, factor, fill: Sequence[float]) -> jax.Array:
  return _affine(image, _shear_y_coeffs(image, factor), _fill(fill))


def translate_x(image, pixels, fill: Sequence[float]) -> jax.Array:
  """Positive `pixels` moves the content left, as PIL's affine (1, 0, pixels, 0, 1, 0)."""
  return _affine(image, _translate_x_coeffs(image, pixels), _fill(fill))


def translate_y(image, pixels, fill: Sequence[float]) -> jax.Array:
  return _affine(image, _translate_y_coeffs(image, pixels), _fill(fill))


# ---- timm's magnitude -> argument mappings; `level` = magnitude / 10, `sign` = +-1. ----

def _enhance(level, sign):
  del sign
  return level * 1.8 + 0.1  # 0.1 .. 1.9


def _enhance_increasing(level, sign):
  return 1.0 + sign * level * 0.9  # 1 is no change; stronger away from it both ways


def _int(x):
  return _xp(x).floor(x)  # Python's int() on the non-negative levels


def _none(level, sign):
  del level, sign
  return 0.0


# name -> (kind, timm's argument from (level, sign, image), the kind's parameter from
# (image, argument)). Blend parameters are (degenerate image, factor).
_Spec = tuple[str, Callable, Callable]
_SPECS: dict[str, _Spec] = {
    'AutoContrast': ('lut', _none, lambda im, a: _auto_contrast_lut(im)),
    'Equalize': ('lut', _none, lambda im, a: _equalize_lut(im)),
    'Invert': ('lut', _none, lambda im, a: _invert_lut(im)),
    'Posterize': ('lut', lambda l, s: _int(l * 4), _posterize_lut),
    'PosterizeIncreasing': ('lut', lambda l, s: 4 - _int(l * 4), _posterize_lut),
    'Solarize': ('lut', lambda l, s: _int(l * 256), _solarize_lut),
    'SolarizeIncreasing': ('lut', lambda l, s: 256 - _int(l * 256), _solarize_lut),
    'SolarizeAdd': ('lut', lambda l, s: _int(l * 110), _solarize_add_lut),
    'Color': ('blend', _enhance, lambda im, a: (_grayscale(im), _factor(a))),
    'ColorIncreasing': ('blend', _enhance_increasing, lambda im, a: (_grayscale(im), _factor(a))),
    'Contrast': ('blend', _enhance, lambda im, a: (_mean_luma(im), _factor(a))),
    'ContrastIncreasing':
        ('blend', _enhance_increasing, lambda im, a: (_mean_luma(im), _factor(a))),
    'Brightness': ('blend', _enhance, lambda im, a: (jnp.zeros((), jnp.int32), _factor(a))),
    'BrightnessIncreasing':
        ('blend', _enhance_increasing, lambda im, a: (jnp.zeros((), jnp.int32), _factor(a))),
    'Sharpness': ('blend', _enhance, lambda im, a: (_smooth(im), _factor(a))),
    'SharpnessIncreasing': ('blend', _enhance_increasing, lambda im, a: (_smooth(im), _factor(a))),
    'Rotate': ('affine', lambda l, s: s * l * 30.0, _rotate_coeffs),
    'ShearX': ('affine', lambda l, s: s * l * 0.3, _shear_x_coeffs),
    'ShearY': ('affine', lambda l, s: s * l * 0.3, _shear_y_coeffs),
    # The argument is in units of the image width (height): the parameter builder scales it.
    'TranslateXRel': ('affine', lambda l, s: s * l * 0.45,
                      lambda im, a: _translate_x_coeffs(im, a * im.shape[1])),
    'TranslateYRel': ('affine', lambda l, s: s * l * 0.45,
                      lambda im, a: _translate_y_coeffs(im, a * im.shape[0])),
}

_KERNELS: dict[str, Callable] = {
    'lut': lambda im, lut, fill: _apply_lut(im, lut),
    'affine': lambda im, coeffs, fill: _affine(im, coeffs, fill),
    'blend': lambda im, params, fill: _blend(params[0], im, params[1]),
}
_KINDS = tuple(_KERNELS)


def _op(name: str) -> Callable:
  kind, argument, parameter = _SPECS[name]
  return lambda im, level, sign, fill: _KERNELS[kind](
      jnp.asarray(im), parameter(jnp.asarray(im), argument(level, sign)), _fill(fill))


Op = Callable[[Any, Any, Any, Sequence[float]], jax.Array]
OPS: dict[str, Op] = {name: _op(name) for name in _SPECS}  # (image, level, sign, fill)

RAND_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
RAND_INCREASING_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')

DEFAULT_FILL = (124, 116, 104)  # ImageNet mean * 255, rounded: what DeiT passes as img_mean


def _level(magnitude, sign):
  """Python/NumPy numbers -> float64 (timm's floats); anything else -> float32 on the device."""
  if _concrete(magnitude, sign):
    return np.float64(magnitude) / MAX_LEVEL, np.float64(sign)
  return (jnp.asarray(magnitude, jnp.float32) / MAX_LEVEL, jnp.asarray(sign, jnp.float32))


def apply_op(image, name: str, magnitude, sign=1.0,
             fill: Sequence[float] = DEFAULT_FILL) -> jax.Array:
  """One op at a magnitude on timm's 0..10 scale; `sign` picks the direction where it has one.

  `image`: uint8 (H, W, C), numpy or jax. Python/NumPy magnitudes map to the op's argument in
  float64 as timm's do; jax (traced) ones in float32.
  """
  level, sign = _level(magnitude, sign)
  return OPS[name](image, level, sign, fill)


def layer_params(key: jax.Array, cfg: dict[str, Any], num_choices: int):
  """One layer's draws as timm makes them: (op index, whether applied, magnitude, sign).

  The op uniformly among `num_choices` (with replacement across layers), applied with
  probability p, magnitude ~ N(m, mstd) clipped to [0, mmax], sign +-1 with probability 1/2.
  """
  k_index, k_apply, k_magnitude, k_sign = jax.random.split(key, 4)
  index = jax.random.randint(k_index, (), 0, num_choices)
  applied = jax.random.uniform(k_apply) < cfg['prob']
  magnitude = jnp.asarray(cfg['magnitude'], jnp.float32)
  if cfg['magnitude_std'] > 0:
    magnitude += cfg['magnitude_std'] * jax.random.normal(k_magnitude)
  magnitude = jnp.clip(magnitude, 0.0, cfg['magnitude_max'])
  sign = jnp.where(jax.random.uniform(k_sign) < 0.5, -1.0, 1.0)
  return index, applied, magnitude, sign


def rand_augment(image, key: jax.Array, spec: str, *,
                 fill: Sequence[float] = DEFAULT_FILL) -> jax.Array:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with prob `p`.

  `image`: uint8 (H, W, C); `key`: a jax PRNG key; `fill`: RGB 0..255 that
  rotate/shear/translate bring in from outside the image. Works under jit and vmap.
  """
  cfg = parse_spec(spec)  # fails here, before tracing
  image = jnp.asarray(image)
  if image.dtype != jnp.uint8:
    raise TypeError(f'rand_augment takes uint8 images, not {image.dtype.name}.')
  if cfg['num_ops'] == 0:
    return image
  return _rand_augment(image, key, spec, _fill(fill))


@functools.partial(jax.jit, static_argnames=('spec', 'fill'))
def _rand_augment(image, key, spec: str, fill: tuple[float, ...]):
  cfg = parse_spec(spec)
  names = RAND_INCREASING_TRANSFORMS if cfg['increasing'] else RAND_TRANSFORMS
  # Without noise every layer has the spec's magnitude: map it on the host, in float64.
  level = (None if cfg['magnitude_std'] > 0 else
           np.float64(min(max(cfg['magnitude'], 0.0), cfg['magnitude_max'])) / MAX_LEVEL)
  # Unrolled: num_ops is small, and XLA's cost analysis counts a loop body only once.
  for layer_key in jax.random.split(key, cfg['num_ops']):
    image = _layer(image, layer_params(layer_key, cfg, len(names)), names, fill, level)
  return image


def _layer(image, draws, names: Sequence[str], fill, level):
  """One layer: the drawn op (if applied) through its kind's kernel, with its parameter.

  A switch picks the kind and, inside it, the parameter builder of the op. Under vmap (the
  train step's per-example augmentation) a switch on a batched index becomes a select over
  all its branches: every image then computes all three kernels (one LUT gather, one
  bilinear sample, one blend) and every op's parameter (six LUTs, five coefficient vectors,
  four degenerate images), not fifteen full ops. That is what sharing the kernels buys: the
  kernels are elementwise or gathers over one image, so the whole is a few dozen operations
  per pixel, against the model's tens of thousands (benchmarks/augment_cost.py measures it).
  """
  index, applied, magnitude, sign = draws
  # Several kernels read the image: XLA would otherwise fuse its producer (the last layer, the
  # flip) into each of them and compute it again per reader.
  image = jax.lax.optimization_barrier(image)
  kinds = [_SPECS[name][0] for name in names]
  kind_of = np.array([_KINDS.index(k) for k in kinds] + [len(_KINDS)], np.int32)
  slot_of = np.array([kinds[:i].count(k) for i, k in enumerate(kinds)], np.int32)

  def parameter(name):
    _, argument, build = _SPECS[name]
    if level is None:
      return lambda im: build(im, argument(magnitude / MAX_LEVEL, sign))
    up, down = argument(level, np.float64(1)), argument(level, np.float64(-1))
    if up == down:
      return lambda im: build(im, up)
    # Both directions' parameters from host constants; the drawn sign picks one.
    return lambda im: jax.tree.map(lambda u, d: jnp.where(sign > 0, u, d),
                                   build(im, up), build(im, down))

  def branch(kind):
    members = [name for name, k in zip(names, kinds) if k == kind]

    def run(im):
      def one(name):
        # Blend degenerate images come as (H, W, 1), scalars or (H, W, C): one shape for switch.
        build = parameter(name)
        if kind != 'blend':
          return build
        return lambda x: (lambda p: (jnp.broadcast_to(p[0], x.shape), p[1]))(build(x))

      params = jax.lax.switch(jnp.asarray(slot_of)[index], [one(name) for name in members], im)
      return _KERNELS[kind](im, params, fill)
    return run

  which = jnp.where(applied, jnp.asarray(kind_of)[index], len(_KINDS))
  return jax.lax.switch(which, [branch(kind) for kind in _KINDS] + [lambda im: im], image)
