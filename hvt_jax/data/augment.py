"""The train transform's per-example augmentation, on the device inside the jitted train step.

The host decodes and crops each training image to uint8 (preprocess.py), and resizes it to
S x S there or leaves that to the device (`window_canvas`, `device_resize`); the train step
then runs, per example and in timm's order (DeiT/HVT recipe): the resize if the host left it,
horizontal flip, RandAugment, normalization, random erasing (`train_images`). Each example's
randomness is a pure function of the run seed and the example's place in the input stream
(`example_ids`), never of the device or the batch row, so any mesh, batch split or resume
gives the same images.

No TensorFlow here: this runs on the accelerator, from the train step.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from hvt_jax.data import device_resize, filters, randaugment
from hvt_jax.errors import UserError

_ERASE_ATTEMPTS = 10  # timm's tries for the erased box
_ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing defaults, as a fraction of the image
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
RESIZE_ON = ('auto', 'host', 'device')


class AugmentConfigError(UserError):
  """An `aug` or eval setting the transforms cannot use."""


def check_settings(aug: Any) -> None:
  """The one-line errors for the device-side settings, before anything is traced."""
  if not 0 <= aug['random_erase'] <= 1:
    raise AugmentConfigError(f'aug.random_erase={aug["random_erase"]} is a probability; '
                             'set it in [0, 1] (0 turns random erasing off).')
  if aug['randaugment']:
    randaugment.parse_spec(aug['randaugment'])  # RandAugmentSpecError
  window_canvas(aug, 1, 'cpu')


def window_canvas(aug: Any, size: int, platform: str, interpolation: str | None = None) -> int:
  """The canvas side the host pads each train crop window to, for the device to resize it to
  S = `size`; 0: the host resizes to S x S itself. With another `interpolation` than the train
  crop's (`aug.interpolation`), the same for a resize with that filter (`eval_canvas`).

  `aug.resize_on`: 'device', 'host', or 'auto': the device on accelerators, the host on a CPU
  backend (where the "device" is the host's own cores, and the host's banded TF resize costs
  no more). The canvas is `aug.window_canvas`, at least S. Nearest neighbour stays on the
  host, where PIL's stepping is replayed in float64 (preprocess._nearest).
  """
  where, canvas = aug.get('resize_on', 'host'), int(aug.get('window_canvas', 0))
  if where not in RESIZE_ON:
    raise AugmentConfigError(f'aug.resize_on={where!r}: use one of {", ".join(RESIZE_ON)}.')
  if where == 'host' or (where == 'auto' and platform == 'cpu'):
    return 0
  if canvas <= 0:
    raise AugmentConfigError(f'aug.window_canvas={canvas}: resizing on the device needs a canvas '
                             'side, e.g. 512 (or set aug.resize_on=host).')
  if filters.FILTERS.get(interpolation or aug['interpolation']) is None:
    return 0
  return max(canvas, size)


def eval_canvas(config: Any, platform: str) -> int:
  """`window_canvas` for eval images: the canvas the host pads each whole eval image to, for
  the eval step to resize and center-crop it with `config.eval.interpolation`; 0: the host
  crops to S x S itself."""
  return window_canvas(config.aug, config.model.image_size, platform, config.eval.interpolation)


def fill_color(mean: Sequence[float]) -> tuple[int, ...]:
  """What rotate/shear/translate bring in from outside: DeiT's dataset mean in 0..255."""
  return tuple(min(255, round(255 * m)) for m in mean)


def example_keys(seed: int, example_ids: jax.Array) -> jax.Array:
  """(B, 3) int32 (process, epoch, position) -> (B,) PRNG keys, one per example."""
  def key(ids):
    k = jax.random.key(seed)
    for i in range(3):
      k = jax.random.fold_in(k, ids[i])
    return k
  return jax.vmap(key)(jnp.asarray(example_ids, jnp.int32))


def train_images(images: jax.Array, example_ids: jax.Array, windows: jax.Array | None = None, *,
                 seed: int, aug: Any, mean: Sequence[float], std: Sequence[float],
                 size: int | None = None) -> jax.Array:
  """uint8 (B, S, S, 3) -> float32 (B, S, S, 3): flip, RandAugment, normalize, erase.

  `example_ids`: int32 (B, 3) = (process, epoch, position), the batch's 'example_id'.
  `aug`: config.aug (ConfigDict or dict); `mean`, `std`: config.eval's; `seed`: config.seed.
  `windows`: int32 (B, 2), the batch's 'window' when the host left the resize to the device:
  `images` are then (B, C, C, 3) canvases, each resized from its window to `size` first.
  """
  check_settings(aug)
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise TypeError(f'train_images takes the uint8 images the input pipeline gives, not '
                    f'{images.dtype.name}.')
  spec, erase, flips = aug['randaugment'], float(aug['random_erase']), bool(aug['flip'])
  fill = fill_color(mean)
  if windows is not None:
    images = device_resize.resize_windows(images, windows, size, aug['interpolation'])

  def one(image, key):
    # One split whatever is switched on, so each part's draws stay put when another is off.
    flip_key, augment_key, erase_key = jax.random.split(key, 3)
    if flips:
      image = flip(image, flip_key)
    if spec:
      image = randaugment.rand_augment(image, augment_key, spec, fill=fill)
    x = normalize(image, mean, std)
    if erase > 0:
      x = random_erase(x, erase_key, erase)
    return x

  # Computed once: mixup and the model read the images more than once, and XLA would fuse
  # the augmentation into each reader.
  return jax.lax.optimization_barrier(jax.vmap(one)(images, example_keys(seed, example_ids)))


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 0..255 -> float32 (x / 255 - mean) / std, mean and std per channel on the 0..1 scale."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def flip(image: jax.Array, key: jax.Array) -> jax.Array:
  """Mirror left-right with probability 1/2 (timm's RandomHorizontalFlip); (H, W, C)."""
  return jnp.where(jax.random.uniform(key) < 0.5, image[:, ::-1], image)


def random_erase(image: jax.Array, key: jax.Array, prob: float) -> jax.Array:
  """timm's RandomErasing, pixel mode, one box: with probability `prob`, 10 tries at a box of
  2%..1/3 of the area and log-uniform aspect in [0.3, 1/0.3] that fits strictly inside; the
  first that fits is filled with standard-normal noise. For normalized float (H, W, C) images.
  """
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  height, width = image.shape[:2]
  area = height * width * jax.random.uniform(k_area, (_ERASE_ATTEMPTS,), minval=_ERASE_AREA[0],
                                             maxval=_ERASE_AREA[1])
  aspect = jnp.exp(jax.random.uniform(k_aspect, (_ERASE_ATTEMPTS,), minval=_ERASE_LOG_ASPECT[0],
                                      maxval=_ERASE_LOG_ASPECT[1]))
  h = jnp.round(jnp.sqrt(area * aspect))
  w = jnp.round(jnp.sqrt(area / aspect))
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  top = _uniform_int(k_top, height - h)
  left = _uniform_int(k_left, width - w)
  erase = (jax.random.uniform(k_apply) < prob) & jnp.any(fits)
  rows = jnp.arange(height, dtype=jnp.int32)[:, None]
  cols = jnp.arange(width, dtype=jnp.int32)[None, :]
  top, left, h, w = (v.astype(jnp.int32) for v in (top, left, h, w))
  box = erase & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  # Noise for the largest box there can be, not the whole image (drawing normals is most of
  # erasing's cost): h * w <= area + (h + w) / 2 + 1/4 with area <= 1/3 of the image.
  noise = jax.random.normal(k_noise, (height * width // 3 + height + width + 1, image.shape[-1]),
                            image.dtype)
  index = jnp.clip((rows - top) * w + cols - left, 0, noise.shape[0] - 1)
  return jnp.where(box[..., None], noise[index], image)


def _uniform_int(key: jax.Array, high: jax.Array) -> jax.Array:
  """A uniform integer in [0, high] (inclusive, like random.randint), as float32."""
  return jnp.minimum(jnp.floor(jax.random.uniform(key) * (high + 1)), high)
