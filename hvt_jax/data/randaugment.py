"""RandAugment as in timm 0.3.2 (used by DeiT and HVT), in JAX on uint8 images: the spec, the
draws, the magnitude -> argument mappings, and one layer as a switch over the ops.

The ops themselves are `image_ops`' (PIL's on uint8 (H, W, C) images, the geometric ones
bilinear). Magnitudes are on timm's 0..10 scale. Everything runs under `jax.jit` and `jax.vmap`
with static shapes, so the train step augments each example on the device
(`augment.train_images`); randomness comes only from the PRNG key, so one (image, key) pair
always gives one result.

Each op is one of three kinds (lut, affine, blend: see `image_ops`), and the kernel of a kind
is shared by its ops. `apply_op` and the ops of `image_ops` run exactly the kernel
`rand_augment` runs, so their results are the same bits.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hvt_jax.data import image_ops
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


# ---- timm's magnitude -> argument mappings; `level` = magnitude / 10, `sign` = +-1. ----

def _enhance(level, sign):
  del sign
  return level * 1.8 + 0.1  # 0.1 .. 1.9


def _enhance_increasing(level, sign):
  return 1.0 + sign * level * 0.9  # 1 is no change; stronger away from it both ways


def _int(x):
  return image_ops.array_module(x).floor(x)  # Python's int() on the non-negative levels


def _none(level, sign):
  del level, sign
  return 0.0


def _blend_with(degenerate: Callable) -> Callable:
  """The blend kind's parameter builder: (image, factor) -> (degenerate image, factor)."""
  return lambda im, a: (degenerate(im), image_ops.blend_factor(a))


# name -> (kind, timm's argument from (level, sign, image), the kind's parameter from
# (image, argument)). Blend parameters are (degenerate image, factor).
_Spec = tuple[str, Callable, Callable]
_SPECS: dict[str, _Spec] = {
    'AutoContrast': ('lut', _none, lambda im, a: image_ops.auto_contrast_lut(im)),
    'Equalize': ('lut', _none, lambda im, a: image_ops.equalize_lut(im)),
    'Invert': ('lut', _none, lambda im, a: image_ops.invert_lut(im)),
    'Posterize': ('lut', lambda l, s: _int(l * 4), image_ops.posterize_lut),
    'PosterizeIncreasing': ('lut', lambda l, s: 4 - _int(l * 4), image_ops.posterize_lut),
    'Solarize': ('lut', lambda l, s: _int(l * 256), image_ops.solarize_lut),
    'SolarizeIncreasing': ('lut', lambda l, s: 256 - _int(l * 256), image_ops.solarize_lut),
    'SolarizeAdd': ('lut', lambda l, s: _int(l * 110), image_ops.solarize_add_lut),
    'Color': ('blend', _enhance, _blend_with(image_ops.grayscale)),
    'ColorIncreasing': ('blend', _enhance_increasing, _blend_with(image_ops.grayscale)),
    'Contrast': ('blend', _enhance, _blend_with(image_ops.mean_luma)),
    'ContrastIncreasing': ('blend', _enhance_increasing, _blend_with(image_ops.mean_luma)),
    'Brightness': ('blend', _enhance, _blend_with(image_ops.black)),
    'BrightnessIncreasing': ('blend', _enhance_increasing, _blend_with(image_ops.black)),
    'Sharpness': ('blend', _enhance, _blend_with(image_ops.smooth)),
    'SharpnessIncreasing': ('blend', _enhance_increasing, _blend_with(image_ops.smooth)),
    'Rotate': ('affine', lambda l, s: s * l * 30.0, image_ops.rotate_coeffs),
    'ShearX': ('affine', lambda l, s: s * l * 0.3, image_ops.shear_x_coeffs),
    'ShearY': ('affine', lambda l, s: s * l * 0.3, image_ops.shear_y_coeffs),
    # The argument is in units of the image width (height): the parameter builder scales it.
    'TranslateXRel': ('affine', lambda l, s: s * l * 0.45,
                      lambda im, a: image_ops.translate_x_coeffs(im, a * im.shape[1])),
    'TranslateYRel': ('affine', lambda l, s: s * l * 0.45,
                      lambda im, a: image_ops.translate_y_coeffs(im, a * im.shape[0])),
}

_KERNELS: dict[str, Callable] = {
    'lut': lambda im, lut, fill: image_ops.apply_lut(im, lut),
    'affine': lambda im, coeffs, fill: image_ops.apply_affine(im, coeffs, fill),
    'blend': lambda im, params, fill: image_ops.apply_blend(params[0], im, params[1]),
}
_KINDS = tuple(_KERNELS)


def _op(name: str) -> Callable:
  kind, argument, parameter = _SPECS[name]
  return lambda im, level, sign, fill: _KERNELS[kind](
      jnp.asarray(im), parameter(jnp.asarray(im), argument(level, sign)),
      image_ops.fill_values(fill))


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
  if image_ops.concrete(magnitude, sign):
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
  return _rand_augment(image, key, spec, image_ops.fill_values(fill))


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
  kernels are elementwise or gathers over one image, so the whole stays small against the
  model's work per pixel (`benchmarks/augment_cost.py` measures it; docs/performance.md,
  "Augmentation on the device").
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
