"""The host's part of the DeiT/HVT (timm 0.3.2) image transforms, in TF: decode, crop, resize.

`train_crop` decodes timm's random-resized-crop window and resizes it to a uint8 S x S image;
`train_window` decodes it only, for the device to resize (`hvt_jax.data.device_resize`);
`decoded_windows` decodes an image once for several windows (repeated augmentation). The
rest of the train transform (flip, RandAugment, normalization, random erasing) runs on the
device, inside the train step (`hvt_jax.data.augment`). `eval_crop` resizes and center-crops
to uint8, or `eval_window` only decodes, for the device to do that; `eval_image` (predict)
normalizes `eval_crop`'s on the host. All take encoded image bytes (a
scalar tf.string) or a uint8 (H, W, C) tensor. Training randomness is stateless and comes only
from the `seed` argument, so tf.data may run the transform in any order or in parallel.

The resize is PIL's `Image.resize` (what timm's torchvision transforms call): its filters,
antialiased by widening the filter when shrinking (`filters`), in two separable passes with the
result of the first rounded to uint8 as PIL does.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import tensorflow as tf

# One error class for bad augmentation settings, on the host and on the device alike.
from hvt_jax.data import filters, input_spec
from hvt_jax.data.augment import AugmentConfigError

_ATTEMPTS = 10  # timm's tries for the crop window
# Output rows resampled together by one small dense matmul: the rows a block reads overlap, so a
# block of b rows reads about b * scale + taps input rows. Few rows per block waste few
# multiplications on zeros; many rows make fewer, larger matmuls.
_BLOCK = 8

Window = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]  # top, left, height, width


# Plain TF throughout: AutoGraph would only add tracing time in tf.data and tf.function
# (docs/performance.md, "Figures moved out of code comments").
@tf.autograph.experimental.do_not_convert
def train_crop(image: tf.Tensor, seed: tf.Tensor, *, size: int, aug: Any) -> tf.Tensor:
  """timm's RandomResizedCrop: the window `crop_window` draws, resized to uint8 (size, size, 3).

  `seed`: shape (2,) int32/int64. `aug`: the config's `aug` section (a ConfigDict or dict); its
  crop_scale, crop_ratio and interpolation are used here, the rest on the device.
  """
  return resize_window(_random_window(image, seed, aug), size=size, aug=aug)


def resize_window(x: tf.Tensor, *, size: int, aug: Any) -> tf.Tensor:
  """A decoded uint8 window resized to (size, size, 3) with `aug.interpolation`: the end of
  `train_crop`, for a window cut from a whole decode (repeated augmentation) too."""
  return tf.ensure_shape(resize(x, size, size, aug['interpolation']), [size, size, 3])


@tf.autograph.experimental.do_not_convert
def train_window(image: tf.Tensor, seed: tf.Tensor, *, size: int, canvas: int,
                 aug: Any) -> tuple[tf.Tensor, tf.Tensor]:
  """`train_crop` with the resize left to the device: (the window `crop_window` draws, as
  uint8 (h, w, 3), and int32 (h, w)), for `device_resize` to resize to (size, size, 3).

  A window larger than `canvas` on either side (the side the batch pads windows to) is resized
  here instead: it comes as (size, size, 3), which the device's resize leaves as it is.
  """
  return finish_window(_random_window(image, seed, aug), size=size, canvas=canvas, aug=aug)


def finish_window(x: tf.Tensor, *, size: int, canvas: int,
                  aug: Any) -> tuple[tf.Tensor, tf.Tensor]:
  """(a decoded window as `train_window` gives it, its int32 (h, w)): as it is if it fits the
  canvas, else resized to (size, size, 3)."""
  x = tf.cond(tf.reduce_all(tf.shape(x)[:2] <= canvas), lambda: x,
              lambda: resize_window(x, size=size, aug=aug))
  return x, tf.shape(x)[:2]


@tf.autograph.experimental.do_not_convert
def decoded_windows(image: tf.Tensor, seeds: tf.Tensor, *,
                    aug: Any) -> tuple[tf.Tensor, tf.Tensor]:
  """(the whole image as uint8 (H, W, 3), int32 (k, 4): the (top, left, height, width) of the
  window `crop_window` draws from each of `seeds`, (k, 2)), for k crops of one decode.

  Repeated augmentation's copies of an image are cut from this. Decoding it whole costs about
  what decoding the bounding box of their windows would, and gives exactly a whole decode's
  pixels (what PIL decodes), where a decoded window can differ by a few levels at its edges:
  libjpeg's chroma upsampling there lacks the pixels past them.
  """
  check_crop_settings(aug)
  x = _decode_whole(image)
  height, width = tf.shape(x)[0], tf.shape(x)[1]
  windows = [tf.stack(crop_window(height, width, _crop_seed(seed), scale=tuple(aug['crop_scale']),
                                  ratio=tuple(aug['crop_ratio'])))
             for seed in tf.unstack(seeds, num=seeds.shape[0])]
  return x, tf.stack(windows)


def _crop_seed(seed: tf.Tensor) -> tf.Tensor:
  # int64 throughout, so an int32 seed with the same numbers gives the same image. The crop
  # takes the first of four streams, as it did when the host also drew flip, RandAugment and
  # erasing from the others: the same seed still gives the same window.
  return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)[0]


def _random_window(image: tf.Tensor, seed: tf.Tensor, aug: Any) -> tf.Tensor:
  """The decoded uint8 window of `crop_window`, drawn from `seed`."""
  check_crop_settings(aug)
  window_fn = functools.partial(crop_window, seed=_crop_seed(seed), scale=tuple(aug['crop_scale']),
                                ratio=tuple(aug['crop_ratio']))
  return _decode_cropped(tf.convert_to_tensor(image), window_fn)


def check_crop_settings(aug: Any) -> None:
  """Raises AugmentConfigError for crop settings `train_crop` cannot use."""
  _check_interpolation(aug['interpolation'])
  _check_range('crop_scale', aug['crop_scale'], upper=1.0)
  _check_range('crop_ratio', aug['crop_ratio'])


@tf.autograph.experimental.do_not_convert
def eval_crop(image: tf.Tensor, *, size: int, crop_pct: float, interpolation: str) -> tf.Tensor:
  """Resize the shorter side to floor(size / crop_pct), center crop size x size: uint8."""
  check_eval_settings(crop_pct, interpolation)
  return _eval_crop(_decode_whole(image), size, crop_pct, interpolation)


@tf.autograph.experimental.do_not_convert
def eval_window(image: tf.Tensor, *, size: int, canvas: int, crop_pct: float,
                interpolation: str) -> tuple[tf.Tensor, tf.Tensor]:
  """`eval_crop` with the resize left to the device: (the whole decoded image, uint8 (H, W, 3),
  and int32 (H, W)), for `device_resize.eval_crops` to resize and crop to (size, size, 3).

  An image larger than `canvas` on either side (the side the batch pads images to) is cropped
  here instead: it comes as `eval_crop`'s (size, size, 3) with (0, 0), which the device takes
  as it is.
  """
  check_eval_settings(crop_pct, interpolation)
  x = _decode_whole(image)
  fits = tf.reduce_all(tf.shape(x)[:2] <= canvas)
  x = tf.cond(fits, lambda: x, lambda: _eval_crop(x, size, crop_pct, interpolation))
  return x, tf.where(fits, tf.shape(x)[:2], 0)


def check_eval_settings(crop_pct: float, interpolation: str) -> None:
  """Raises AugmentConfigError for eval settings `eval_crop` cannot use."""
  _check_interpolation(interpolation)
  if not 0 < crop_pct <= 1:
    raise AugmentConfigError(f'eval crop_pct={crop_pct} must lie in (0, 1]; the recipe uses '
                             '0.875 (resize to 256, crop 224).')


def _eval_crop(x: tf.Tensor, size: int, crop_pct: float, interpolation: str) -> tf.Tensor:
  new_h, new_w, top, left = input_spec.eval_geometry(tf.shape(x)[0], tf.shape(x)[1], size,
                                                     crop_pct, tf)
  # Only the kept rows and columns of the resized image are computed: each output pixel
  # depends on its own position alone, so they equal the full resize's, cropped.
  x = resize(x, new_h, new_w, interpolation, first=(top, left), count=(size, size))
  return tf.ensure_shape(x, [size, size, 3])


def _decode_whole(image: tf.Tensor) -> tf.Tensor:
  """Encoded bytes or a uint8 (H, W, C) tensor -> the whole image, uint8 (H, W, 3)."""
  image = tf.convert_to_tensor(image)
  return _decode(image) if image.dtype == tf.string else _to_rgb(image)


@tf.autograph.experimental.do_not_convert
def eval_image(image: tf.Tensor, *, size: int, crop_pct: float, interpolation: str,
               mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """`eval_crop`, normalized: float32 (size, size, 3), what predict feeds the model."""
  return normalize(eval_crop(image, size=size, crop_pct=crop_pct, interpolation=interpolation),
                   mean, std)


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


def _uniform_int(seed: tf.Tensor, high: tf.Tensor) -> tf.Tensor:
  """A uniform integer in [0, high] (inclusive, like random.randint), as float64."""
  u = tf.random.stateless_uniform([], seed, dtype=tf.float64)
  return tf.minimum(tf.floor(u * (high + 1)), high)


def resize(image: tf.Tensor, height, width, interpolation: str, *, first=(0, 0),
           count=None) -> tf.Tensor:
  """PIL's `Image.resize((width, height), interpolation)` of a uint8 (H, W, 3) image, as uint8.

  `first`, `count`: compute only rows first[0]..first[0] + count[0] and the same for columns
  (default: all), which are those pixels of the full resize.
  """
  count = (height, width) if count is None else count
  if filters.FILTERS[interpolation] is None:
    rows = _nearest(tf.shape(image)[0], height, first[0], count[0])
    cols = _nearest(tf.shape(image)[1], width, first[1], count[1])
    return tf.gather(tf.gather(image, rows), cols, axis=1)
  kernel, support = filters.FILTERS[interpolation]
  in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
  # Both passes resample the leading axis of a (rows, everything else) matrix: the columns
  # first, on the image as it is, then the rows, on the transposed (smaller) result. PIL
  # rounds to uint8 between its passes too, but its order depends on its version (its C
  # source resamples the rows first); the order only moves that rounding, not the filter.
  x = _resample(tf.reshape(image, [in_h, -1]), in_h, height, first[0], count[0], kernel,
                support)  # (h, W * 3)
  x = tf.reshape(tf.transpose(tf.reshape(x, [count[0], in_w, 3]), [1, 0, 2]), [in_w, -1])
  x = _resample(x, in_w, width, first[1], count[1], kernel, support)  # (w, h * 3)
  return tf.transpose(tf.reshape(x, [count[1], count[0], 3]), [1, 0, 2])


def _nearest(in_size, out_size, first, count) -> tf.Tensor:
  """PIL's nearest neighbour: the input pixel under each output pixel's center.

  PIL (ImagingScaleAffine) steps from one center to the next by adding the scale, and the
  error these additions accumulate decides centers that fall on a pixel border; a cumulative
  sum in the same order picks the same pixels, unless graph optimizations round the scale
  differently (a division by a constant output size becomes a multiplication).
  """
  scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
  steps = tf.concat([[0.5 * scale], tf.fill([first + count - 1], scale)], axis=0)
  centers = tf.math.cumsum(steps)[first:]
  return tf.minimum(tf.cast(centers, tf.int32), in_size - 1)


def _resample(x: tf.Tensor, in_size, out_size, first, count, kernel: Callable,
              support: float) -> tf.Tensor:
  """uint8 (in_size, M) -> uint8 (count, M): rows first.. of PIL's resampling of the leading
  axis to `out_size`, with PIL's coefficients (`filters`).

  TF has no op for such a banded weighted sum of rows, so blocks of `_BLOCK` output rows each
  take one small dense matmul over the input rows the block reads.
  """
  in_f = tf.cast(in_size, tf.float64)
  scale = in_f / tf.cast(out_size, tf.float64)
  blocks = (count + _BLOCK - 1) // _BLOCK
  out = tf.cast(tf.reshape(tf.range(blocks * _BLOCK) + first, [blocks, _BLOCK]), tf.float64)
  where = filters.bounds(out, scale, in_f, support, tf)
  start = where.low[:, 0]
  span = tf.cast(tf.reduce_max(where.high[:, -1] - start), tf.int32)  # input rows per block
  rows = start[:, None] + tf.cast(tf.range(span), tf.float64)  # (blocks, span)
  weight = filters.weights(rows[:, None, :], filters.Bounds(*(v[..., None] for v in where)),
                           kernel, tf)
  weight = weight / tf.reduce_sum(weight, axis=-1, keepdims=True)  # (blocks, _BLOCK, span)
  # Rows past the image (the last block's) have weight 0; any valid row may stand in.
  rows = tf.minimum(tf.cast(rows, tf.int32), in_size - 1)
  x = tf.cast(tf.gather(x, tf.reshape(rows, [-1])), tf.float32)
  x = tf.matmul(tf.cast(weight, tf.float32), tf.reshape(x, [blocks, span, -1]))
  # PIL rounds half up and clips to 0..255 (padding rows of the last block dropped).
  return tf.saturate_cast(tf.reshape(x, [blocks * _BLOCK, -1])[:count] + 0.5, tf.uint8)


def _decode_cropped(image: tf.Tensor,
                    window_fn: Callable[[tf.Tensor, tf.Tensor], Window]) -> tf.Tensor:
  """The window `window_fn(height, width)` of an image, as uint8 RGB.

  JPEG bytes decode only the window; other bytes decode whole, then crop.
  """
  if image.dtype != tf.string:
    x = _to_rgb(image)
    top, left, h, w = window_fn(tf.shape(x)[0], tf.shape(x)[1])
    return x[top:top + h, left:left + w]
  # The window is drawn once, outside the conds: drawn inside each branch of one cond it cost
  # more per image (docs/performance.md).
  is_jpeg = tf.io.is_jpeg(image)

  def decoded_whole():  # other formats decode whole; a JPEG's size is in its header
    x = _decode(image)
    return x, tf.shape(x)[:2]

  whole, shape = tf.cond(is_jpeg, lambda: (tf.zeros([0, 0, 3], tf.uint8),
                                           tf.image.extract_jpeg_shape(image)[:2]),
                         decoded_whole)
  top, left, h, w = window_fn(shape[0], shape[1])
  return tf.cond(is_jpeg,
                 lambda: tf.image.decode_and_crop_jpeg(image, tf.stack([top, left, h, w]),
                                                       channels=3),
                 lambda: whole[top:top + h, left:left + w])


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


def _check_range(name: str, bounds: Sequence[float], upper: float = math.inf) -> None:
  low, high = bounds
  if not 0 < low <= high <= upper:
    raise AugmentConfigError(f'aug.{name}={tuple(bounds)} must be (low, high) with '
                             f'0 < low <= high{" <= 1" if upper == 1 else ""}.')


def _check_interpolation(name: str) -> None:
  if name not in filters.FILTERS:
    raise AugmentConfigError(f'interpolation {name!r} is not supported; use one of '
                             f'{", ".join(filters.FILTERS)}.')
