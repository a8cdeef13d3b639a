"""RandAugment as in timm 0.3.2 (used by DeiT and HVT), in TensorFlow on uint8 images.

Every op matches PIL's (which timm calls) on uint8 (H, W, C) images, except that the
geometric ops interpolate bilinearly: TF's projective transform has no bicubic mode.
Magnitudes are on timm's 0..10 scale. All randomness is stateless, so one
(image, seed) pair always gives one result, whatever tf.data's parallelism.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import tensorflow as tf

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


# ---- Pixel ops: uint8 (H, W, C) in, uint8 out, each as PIL computes it. ----

def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(x, 0, 255), tf.uint8)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - tf.convert_to_tensor(image)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretch each channel's [min, max] to [0, 255] (ImageOps.autocontrast, no cutoff)."""
  x = tf.cast(image, tf.float64)
  lo = tf.reduce_min(x, axis=(0, 1))
  hi = tf.reduce_max(x, axis=(0, 1))
  # PIL's arithmetic, in double: it can land the maximum on 254 rather than 255.
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  stretched = tf.floor(x * scale + -lo * scale)
  return _to_uint8(tf.where(hi > lo, stretched, x))


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalization with PIL's lookup table (ImageOps.equalize)."""
  x = tf.cast(image, tf.int32)
  channels = tf.shape(x)[-1]
  flat = tf.reshape(x + 256 * tf.range(channels), [-1])
  hist = tf.reshape(tf.math.bincount(flat, minlength=256 * channels, maxlength=256 * channels),
                    [channels, 256])
  # PIL leaves the count of the highest value present out of the step.
  top_count = tf.gather(hist, tf.reduce_max(x, axis=(0, 1)), batch_dims=1)
  step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = (step[:, None] // 2 + below) // tf.maximum(step[:, None], 1)
  lut = tf.where(step[:, None] > 0, tf.minimum(lut, 255), tf.range(256)[None])
  return tf.cast(tf.gather(tf.reshape(lut, [-1]), x + 256 * tf.range(channels)), tf.uint8)


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keep the `bits` most significant bits of each value (0 bits: black)."""
  shift = 8 - tf.clip_by_value(tf.cast(bits, tf.int32), 0, 8)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Invert the values >= threshold (256: unchanged)."""
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x >= tf.cast(threshold, tf.int32), 255 - x, x), tf.uint8)


def solarize_add(image: tf.Tensor, addition, threshold: int = 128) -> tf.Tensor:
  """Add `addition` to the values below threshold, saturating at 255."""
  x = tf.cast(image, tf.int32)
  return _to_uint8(tf.where(x < threshold, x + tf.cast(addition, tf.int32), x))


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL's convert('L'): ITU-R 601-2 luma in its 16-bit fixed point; (H, W, 1) int32."""
  x = tf.cast(image, tf.int32)
  luma = (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536
  return luma[..., None]


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """Image.blend(degenerate, image, factor): extrapolates past 1, truncates like PIL."""
  d = tf.cast(degenerate, tf.float32)
  out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
  return _to_uint8(tf.floor(out))


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Color: 0 is grayscale, 1 the image."""
  return _blend(_grayscale(image), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Contrast: 0 is flat gray at the rounded mean luma, 1 the image."""
  mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float64)) + 0.5)
  return _blend(mean, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Brightness: 0 is black, 1 the image."""
  return _blend(tf.zeros([], tf.float32), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """ImageEnhance.Sharpness: 0 is PIL's SMOOTH filter (border pixels kept), 1 the image."""
  x = tf.cast(image, tf.float32)
  # SMOOTH is [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13: a 3x3 box sum plus 4x the centre.
  padded = tf.pad(x, [[1, 1], [1, 1], [0, 0]])
  vertical = padded[:-2] + padded[1:-1] + padded[2:]
  smooth = (vertical[:, :-2] + vertical[:, 1:-1] + vertical[:, 2:] + 4 * x) / 13.0
  height, width = tf.shape(x)[0], tf.shape(x)[1]
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  degenerate = tf.where(interior, tf.floor(smooth + 0.5), x)
  return _blend(degenerate, image, factor)


# ---- Geometric ops: PIL's affine coefficients, output pixel -> input pixel. ----

def affine(image: tf.Tensor, coeffs: Sequence, fill: Sequence[float]) -> tf.Tensor:
  """Sample input (a x + b y + c, d x + e y + f) for output pixel (x, y); outside: `fill`.

  Coordinates are pixel indices (column x, row y). Bilinear, rounded to uint8.
  """
  fill = tf.constant(fill, tf.float32)
  # The transform op takes one scalar fill, so shift the image to make the fill colour zero.
  x = tf.cast(image, tf.float32) - fill
  coeffs = [tf.cast(c, tf.float32) for c in coeffs] + [tf.zeros([]), tf.zeros([])]
  transform = tf.stack(coeffs)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=x[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation='BILINEAR', fill_mode='CONSTANT')[0]
  return _to_uint8(tf.round(out + fill))


def rotate(image: tf.Tensor, degrees, fill: Sequence[float]) -> tf.Tensor:
  """Counter-clockwise about the image centre, as Image.rotate."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1) / 2
  cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1) / 2
  return affine(image, [cos, -sin, cx - cos * cx + sin * cy,
                        sin, cos, cy - sin * cx - cos * cy], fill)


# PIL applies its coefficients to pixel centres (index + 0.5), hence the half-pixel offsets.
def shear_x(image: tf.Tensor, factor, fill: Sequence[float]) -> tf.Tensor:
  return affine(image, [1.0, factor, 0.5 * factor, 0.0, 1.0, 0.0], fill)


def shear_y(image: tf.Tensor, factor, fill: Sequence[float]) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.5 * factor], fill)


def translate_x(image: tf.Tensor, pixels, fill: Sequence[float]) -> tf.Tensor:
  """Positive `pixels` moves the content left, as PIL's affine (1, 0, pixels, 0, 1, 0)."""
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)


def translate_y(image: tf.Tensor, pixels, fill: Sequence[float]) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)


# ---- timm's magnitude -> argument mappings; `level` = magnitude / 10, `sign` = +-1. ----
# Levels are float64, like timm's Python floats, so factors round to float32 as PIL's do.

def _enhance(level, sign):
  del sign
  return level * 1.8 + 0.1  # 0.1 .. 1.9


def _enhance_increasing(level, sign):
  return 1.0 + sign * level * 0.9  # 1 is no change; stronger away from it both ways


def _size(image: tf.Tensor, axis: int) -> tf.Tensor:
  return tf.cast(tf.shape(image)[axis], tf.float64)


def _int(x):
  return tf.floor(x)  # Python's int() on the non-negative levels


Op = Callable[[tf.Tensor, tf.Tensor, tf.Tensor, Sequence[float]], tf.Tensor]
OPS: dict[str, Op] = {
    'AutoContrast': lambda im, level, sign, fill: auto_contrast(im),
    'Equalize': lambda im, level, sign, fill: equalize(im),
    'Invert': lambda im, level, sign, fill: invert(im),
    'Rotate': lambda im, level, sign, fill: rotate(im, sign * level * 30.0, fill),
    'Posterize': lambda im, level, sign, fill: posterize(im, _int(level * 4)),
    'PosterizeIncreasing': lambda im, level, sign, fill: posterize(im, 4 - _int(level * 4)),
    'Solarize': lambda im, level, sign, fill: solarize(im, _int(level * 256)),
    'SolarizeIncreasing': lambda im, level, sign, fill: solarize(im, 256 - _int(level * 256)),
    'SolarizeAdd': lambda im, level, sign, fill: solarize_add(im, _int(level * 110)),
    'Color': lambda im, level, sign, fill: color(im, _enhance(level, sign)),
    'ColorIncreasing': lambda im, level, sign, fill: color(im, _enhance_increasing(level, sign)),
    'Contrast': lambda im, level, sign, fill: contrast(im, _enhance(level, sign)),
    'ContrastIncreasing':
        lambda im, level, sign, fill: contrast(im, _enhance_increasing(level, sign)),
    'Brightness': lambda im, level, sign, fill: brightness(im, _enhance(level, sign)),
    'BrightnessIncreasing':
        lambda im, level, sign, fill: brightness(im, _enhance_increasing(level, sign)),
    'Sharpness': lambda im, level, sign, fill: sharpness(im, _enhance(level, sign)),
    'SharpnessIncreasing':
        lambda im, level, sign, fill: sharpness(im, _enhance_increasing(level, sign)),
    'ShearX': lambda im, level, sign, fill: shear_x(im, sign * level * 0.3, fill),
    'ShearY': lambda im, level, sign, fill: shear_y(im, sign * level * 0.3, fill),
    'TranslateXRel':
        lambda im, level, sign, fill: translate_x(im, sign * level * 0.45 * _size(im, 1), fill),
    'TranslateYRel':
        lambda im, level, sign, fill: translate_y(im, sign * level * 0.45 * _size(im, 0), fill),
}

RAND_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')
RAND_INCREASING_TRANSFORMS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')

DEFAULT_FILL = (124, 116, 104)  # ImageNet mean * 255, rounded: what DeiT passes as img_mean


def apply_op(image: tf.Tensor, name: str, magnitude, sign=1.0,
             fill: Sequence[float] = DEFAULT_FILL) -> tf.Tensor:
  """One op at a magnitude on timm's 0..10 scale; `sign` picks the direction where it has one."""
  level = tf.cast(magnitude, tf.float64) / MAX_LEVEL
  return OPS[name](image, level, tf.cast(sign, tf.float64), fill)


def layer_params(seed: tf.Tensor, cfg: dict[str, Any], num_choices: int):
  """One layer's draws: (op index, whether applied, magnitude, sign)."""
  s_index, s_apply, s_magnitude, s_sign = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  index = tf.random.stateless_uniform([], s_index, 0, num_choices, dtype=tf.int32)
  applied = tf.random.stateless_uniform([], s_apply) < cfg['prob']
  magnitude = tf.constant(cfg['magnitude'], tf.float64)
  if cfg['magnitude_std'] > 0:
    magnitude += cfg['magnitude_std'] * tf.random.stateless_normal(
        [], s_magnitude, dtype=tf.float64)
  magnitude = tf.clip_by_value(magnitude, 0.0, cfg['magnitude_max'])
  sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
  return index, applied, magnitude, sign


# Plain TF throughout: AutoGraph would only add seconds of tracing in tf.data and tf.function.
@tf.autograph.experimental.do_not_convert
def rand_augment(image: tf.Tensor, seed: tf.Tensor, spec: str, *,
                 fill: Sequence[float] = DEFAULT_FILL) -> tf.Tensor:
  """timm's RandAugment: `num_ops` ops drawn with replacement, each applied with prob `p`.

  `image`: uint8 (H, W, 3); `seed`: shape (2,) int32/int64; `fill`: RGB 0..255 that
  rotate/shear/translate bring in from outside the image. Works in graph mode.
  """
  cfg = parse_spec(spec)
  names = RAND_INCREASING_TRANSFORMS if cfg['increasing'] else RAND_TRANSFORMS
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f'rand_augment takes uint8 images, not {image.dtype.name}.')
  if cfg['num_ops'] == 0:
    return image
  layer_seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), cfg['num_ops'])

  def layer(i, image):
    index, applied, magnitude, sign = layer_params(layer_seeds[i], cfg, len(names))
    # One past the last op means "not applied": an identity branch, so only one op runs.
    index = tf.where(applied, index, len(names))
    branches = [_branch(image, name, magnitude, sign, fill) for name in names]
    return i + 1, tf.switch_case(index, branches + [lambda: image])

  # A loop rather than unrolled layers: the 15 branches are traced once, not once per layer.
  _, image = tf.while_loop(lambda i, _: i < cfg['num_ops'], layer, [0, image])
  return image


def _branch(image, name, magnitude, sign, fill):
  return lambda: tf.ensure_shape(apply_op(image, name, magnitude, sign, fill), image.shape)
