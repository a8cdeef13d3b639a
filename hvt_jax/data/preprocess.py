"""Per-example train and eval image transforms of the DeiT/HVT recipe (timm 0.3.2), in TF.

Both take encoded image bytes (a scalar tf.string) or a uint8 (H, W, C) tensor and return a
normalized float32 (size, size, 3) image. Training randomness is stateless and comes only
from the `seed` argument, so tf.data may run them in any order or in parallel.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import tensorflow as tf

from hvt_jax.data import randaugment
from hvt_jax.errors import UserError

# name -> (tf.image.resize method, antialias); PIL always antialiases when shrinking.
_RESIZE = {
    'bicubic': ('bicubic', True),
    'bilinear': ('bilinear', True),
    'lanczos': ('lanczos3', True),
    'nearest': ('nearest', False),
}
_ATTEMPTS = 10  # timm's tries for both the crop and the erased box
_ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults, as a fraction of the image
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))

Window = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]  # top, left, height, width


class AugmentConfigError(UserError):
  """An `aug` or eval setting the transforms cannot use."""


# Plain TF throughout: AutoGraph would only add seconds of tracing in tf.data and tf.function.
@tf.autograph.experimental.do_not_convert
def train_image(image: tf.Tensor, seed: tf.Tensor, *, size: int, aug: Any,
                mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Random-resized crop, flip, RandAugment, normalize, random erasing: timm's order.

  `seed`: shape (2,) int32/int64. `aug`: the config's `aug` section (a ConfigDict or dict).
  `mean`, `std`: the normalization, the same as the eval transform's (`config.eval`).
  """
  _check_interpolation(aug['interpolation'])
  _check_range('crop_scale', aug['crop_scale'], upper=1.0)
  _check_range('crop_ratio', aug['crop_ratio'])
  if not 0 <= aug['random_erase'] <= 1:
    raise AugmentConfigError(f'aug.random_erase={aug["random_erase"]} is a probability; '
                             'set it in [0, 1] (0 turns random erasing off).')
  spec = aug['randaugment']
  if spec:
    randaugment.parse_spec(spec)  # fail before tracing the rest
  # int64 throughout, so an int32 seed with the same numbers gives the same image.
  crop_seed, flip_seed, ra_seed, erase_seed = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4))

  window_fn = functools.partial(crop_window, seed=crop_seed, scale=tuple(aug['crop_scale']),
                                ratio=tuple(aug['crop_ratio']))
  x = _resize(_decode_cropped(tf.convert_to_tensor(image), window_fn), [size, size],
              aug['interpolation'])
  if aug['flip']:
    flipped = tf.random.stateless_uniform([], flip_seed) < 0.5
    x = tf.cond(flipped, lambda: tf.reverse(x, axis=[1]), lambda: x)
  if spec:
    # DeiT fills rotate/shear/translate with the dataset mean in 0..255.
    fill = tuple(min(255, round(255 * m)) for m in mean)
    x = randaugment.rand_augment(x, ra_seed, spec, fill=fill)
  x = normalize(x, mean, std)
  if aug['random_erase'] > 0:
    x = random_erase(x, erase_seed, aug['random_erase'])
  return tf.ensure_shape(x, [size, size, 3])


@tf.autograph.experimental.do_not_convert
def eval_image(image: tf.Tensor, *, size: int, crop_pct: float, interpolation: str,
               mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """Resize the shorter side to floor(size / crop_pct), center crop size x size, normalize."""
  _check_interpolation(interpolation)
  if not 0 < crop_pct <= 1:
    raise AugmentConfigError(f'eval crop_pct={crop_pct} must lie in (0, 1]; the recipe uses '
                             '0.875 (resize to 256, crop 224).')
  image = tf.convert_to_tensor(image)
  x = _decode(image) if image.dtype == tf.string else _to_rgb(image)
  scale = int(math.floor(size / crop_pct))
  height, width = tf.shape(x)[0], tf.shape(x)[1]
  # torchvision's Resize(int): the shorter side becomes `scale`, the longer one truncates.
  new_h = tf.where(height <= width, scale, scale * height // width)
  new_w = tf.where(height <= width, scale * width // height, scale)
  x = _resize(x, tf.stack([new_h, new_w]), interpolation)
  # torchvision's CenterCrop rounds the offsets half to even, as tf.round does.
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
  x = x[top:top + size, left:left + size]
  return tf.ensure_shape(normalize(x, mean, std), [size, size, 3])


def normalize(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """uint8 0..255 -> float32 (x / 255 - mean) / std, mean and std per channel on the 0..1 scale."""
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, *,
                scale: tuple[float, float], ratio: tuple[float, float]) -> Window:
  """timm's RandomResizedCrop window: 10 tries at an area fraction in `scale` and a log-uniform
  width/height in `ratio`, else the center crop clamped to `ratio`. Returns int32 scalars.
  """
  h_img, w_img = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  s_area, s_ratio, s_top, s_left = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4))
  area = h_img * w_img * tf.random.stateless_uniform(
      [_ATTEMPTS], s_area, scale[0], scale[1], tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [_ATTEMPTS], s_ratio, math.log(ratio[0]), math.log(ratio[1]), tf.float64))
  w = tf.round(tf.sqrt(area * aspect))
  h = tf.round(tf.sqrt(area / aspect))
  # Unlike timm, an empty window (possible only on images a few pixels across) does not fit.
  fits = (w <= w_img) & (h <= h_img) & (w >= 1) & (h >= 1)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  # Fallback: the whole image, narrowed to the nearest allowed aspect ratio.
  in_ratio = w_img / h_img
  fb_w = tf.where(in_ratio > ratio[1], tf.round(h_img * ratio[1]), w_img)
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w_img / ratio[0]), h_img)

  found = tf.reduce_any(fits)
  h = tf.where(found, h[first], fb_h)
  w = tf.where(found, w[first], fb_w)
  top = tf.where(found, _uniform_int(s_top, h_img - h), tf.floor((h_img - h) / 2))
  left = tf.where(found, _uniform_int(s_left, w_img - w), tf.floor((w_img - w) / 2))
  return tuple(tf.cast(v, tf.int32) for v in (top, left, h, w))


def random_erase(image: tf.Tensor, seed: tf.Tensor, prob: float) -> tf.Tensor:
  """timm's RandomErasing, pixel mode, one box: with probability `prob`, 10 tries at a box of
  2%..1/3 of the area and log-uniform aspect in [0.3, 1/0.3] that fits strictly inside; the
  first that fits is filled with standard-normal noise. For normalized float (H, W, C) images.
  """
  s_apply, s_area, s_aspect, s_top, s_left, s_noise = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 6))
  shape = tf.shape(image)
  h_img, w_img = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
  area = h_img * w_img * tf.random.stateless_uniform(
      [_ATTEMPTS], s_area, *_ERASE_AREA, dtype=tf.float64)
  aspect = tf.exp(tf.random.stateless_uniform(
      [_ATTEMPTS], s_aspect, *_ERASE_LOG_ASPECT, dtype=tf.float64))
  h = tf.round(tf.sqrt(area * aspect))
  w = tf.round(tf.sqrt(area / aspect))
  fits = (w < w_img) & (h < h_img)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  h, w = h[first], w[first]
  top = tf.cast(_uniform_int(s_top, h_img - h), tf.int32)
  left = tf.cast(_uniform_int(s_left, w_img - w), tf.int32)
  h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
  erase = (tf.random.stateless_uniform([], s_apply) < prob) & tf.reduce_any(fits)

  def erased():
    # The noise is drawn for the whole image (so a pixel's value depends only on the seed), and
    # the box is spliced in with slices: a masked tf.where over every pixel costs ~4x as much.
    noise = tf.random.stateless_normal(shape, s_noise, dtype=image.dtype)
    middle = tf.concat([image[top:top + h, :left], noise[top:top + h, left:left + w],
                        image[top:top + h, left + w:]], axis=1)
    return tf.concat([image[:top], middle, image[top + h:]], axis=0)

  return tf.cond(erase, erased, lambda: image)


def _uniform_int(seed: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """A uniform integer in [0, high] (inclusive, like random.randint), as float64."""
  u = tf.random.stateless_uniform([], seed, dtype=tf.float64)
  return tf.minimum(tf.floor(u * (high + 1)), high)


def _decode_cropped(image: tf.Tensor,
                    window_fn: Callable[[tf.Tensor, tf.Tensor], Window]) -> tf.Tensor:
  """The window `window_fn(height, width)` of an image, as uint8 RGB.

  JPEG bytes decode only the window; other bytes decode whole, then crop.
  """
  if image.dtype != tf.string:
    x = _to_rgb(image)
    top, left, h, w = window_fn(tf.shape(x)[0], tf.shape(x)[1])
    return x[top:top + h, left:left + w]

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image)
    window = tf.stack(window_fn(shape[0], shape[1]))
    return tf.image.decode_and_crop_jpeg(image, window, channels=3)

  def other():
    x = _decode(image)
    top, left, h, w = window_fn(tf.shape(x)[0], tf.shape(x)[1])
    return x[top:top + h, left:left + w]

  return tf.cond(tf.io.is_jpeg(image), jpeg, other)


def _decode(data: tf.Tensor) -> tf.Tensor:
  """Any format tf.io.decode_image reads (JPEG, PNG, GIF's first frame, BMP, WebP) as RGB."""
  x = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
  return tf.ensure_shape(x, [None, None, 3])


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, C) -> (H, W, 3): gray is repeated, a 4th (alpha) channel dropped."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8 or image.shape.rank != 3:
    raise TypeError(f'expected encoded bytes or a uint8 (H, W, C) image, got {image.dtype.name} '
                    f'of shape {image.shape}.')
  channels = tf.minimum(tf.range(3), tf.shape(image)[-1] - 1)
  return tf.ensure_shape(tf.gather(image, channels, axis=-1), [None, None, 3])


def _resize(image: tf.Tensor, size, interpolation: str) -> tf.Tensor:
  """Resize like PIL does on uint8 images: the result is rounded back to uint8."""
  method, antialias = _RESIZE[interpolation]
  x = tf.image.resize(image, size, method=method, antialias=antialias)
  return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def _check_range(name: str, bounds: Sequence[float], upper: float = math.inf) -> None:
  low, high = bounds
  if not 0 < low <= high <= upper:
    raise AugmentConfigError(f'aug.{name}={tuple(bounds)} must be (low, high) with '
                             f'0 < low <= high{" <= 1" if upper == 1 else ""}.')


def _check_interpolation(name: str) -> None:
  if name not in _RESIZE:
    raise AugmentConfigError(f'interpolation {name!r} is not supported; use one of '
                             f'{", ".join(_RESIZE)}.')
