"""Train and eval image transforms: timm's crop, flip, erasing and eval crop, the input forms
(JPEG/PNG bytes, uint8 arrays, grayscale), determinism and tf.data use."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from hvt_jax import defaults
from hvt_jax.data import preprocess
from hvt_jax.errors import UserError

SIZE = 32
OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False, randaugment='',
           random_erase=0.0)


def _aug(**overrides):
  aug = defaults.train_config().aug
  aug.update(overrides)
  return aug


MEAN = np.array(defaults.IMAGENET_MEAN, np.float32)
STD = np.array(defaults.IMAGENET_STD, np.float32)
NORM = dict(mean=defaults.IMAGENET_MEAN, std=defaults.IMAGENET_STD)  # as config.eval has it


def _photo(height, width, seed=0):
  """Smooth colour gradients plus mild noise: compresses like a photo, no flat regions."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  rng = np.random.default_rng(seed)
  base = np.stack([200 * x + 30, 180 * y + 40, 120 * (1 - x * y) + 60], -1)
  return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def _encode(image, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, fmt, **kw)
  return buf.getvalue()


def _seed(i, dtype=tf.int64):
  return tf.constant([i, 99], dtype)


def _to_uint8_scale(x):
  return (np.asarray(x) * STD + MEAN) * 255


@pytest.fixture(scope='module')
def train_fn():
  """train_image traced once per (settings, input kind, seed dtype), for any image shape."""
  cache = {}

  def fn(image, seed, **overrides):
    image_spec = (tf.TensorSpec([], tf.string) if isinstance(image, bytes) else
                  tf.TensorSpec([None, None, None], tf.uint8))
    key = (tuple(sorted(overrides.items())), image_spec, seed.dtype)
    if key not in cache:
      aug = _aug(**overrides)
      cache[key] = tf.function(
          lambda im, s: preprocess.train_image(im, s, size=SIZE, aug=aug, **NORM), autograph=False,
          input_signature=[image_spec, tf.TensorSpec([2], seed.dtype)])
    return cache[key](image, seed).numpy()

  return fn


# ---- input forms, shapes, ranges ----

INPUTS = {
    'landscape': lambda: _photo(40, 56),
    'portrait': lambda: _photo(56, 40),
    'gray': lambda: _photo(40, 40)[..., :1],
    'rgba': lambda: np.concatenate([_photo(40, 40), np.full((40, 40, 1), 7, np.uint8)], -1),
    'jpeg': lambda: _encode(_photo(40, 56), 'JPEG', quality=90),
    'png': lambda: _encode(_photo(56, 40), 'PNG'),
    'gray_png': lambda: _encode(_photo(40, 40)[..., :1], 'PNG'),
    'gray_jpeg': lambda: _encode(_photo(40, 40)[..., :1], 'JPEG'),
}


@pytest.mark.parametrize('kind', INPUTS)
def test_train_image_shape_dtype_and_range(kind, train_fn):
  image = INPUTS[kind]()
  for seed in range(3):
    out = train_fn(image, _seed(seed), random_erase=0.0)  # erasing writes N(0, 1) noise
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32
    assert np.all(out >= (0 - MEAN) / STD - 1e-6) and np.all(out <= (1 - MEAN) / STD + 1e-6)
  assert np.all(np.isfinite(train_fn(image, _seed(5), random_erase=1.0)))


@pytest.mark.parametrize('kind', ['gray', 'gray_png', 'gray_jpeg'])
def test_grayscale_becomes_rgb(kind, train_fn):
  out = train_fn(INPUTS[kind](), _seed(1), randaugment='', random_erase=0.0)
  gray = _to_uint8_scale(out)
  np.testing.assert_allclose(gray[..., 1], gray[..., 0], atol=1e-3)
  np.testing.assert_allclose(gray[..., 2], gray[..., 0], atol=1e-3)


def test_train_image_is_deterministic_and_seed_dependent(train_fn):
  image = _encode(_photo(48, 64), 'JPEG')
  outs = [train_fn(image, _seed(i)) for i in range(6)]
  np.testing.assert_array_equal(train_fn(image, _seed(3)), outs[3])
  assert len({o.tobytes() for o in outs}) == len(outs)
  # int32 seeds work and are the same numbers.
  np.testing.assert_array_equal(train_fn(image, _seed(3, tf.int32)), outs[3])


def test_all_ops_off_is_a_plain_resize_and_normalize(train_fn):
  square = _photo(48, 48)
  reference = tf.image.resize(square, [SIZE, SIZE], method='bicubic', antialias=True)
  reference = (np.clip(np.round(reference.numpy()), 0, 255) / 255 - MEAN) / STD
  for seed in range(3):
    np.testing.assert_allclose(train_fn(square, _seed(seed), **OFF), reference, atol=1e-6)
  # A 1:1 ratio on a wide image falls back to timm's center crop.
  wide = np.concatenate([_photo(48, 10, 1), square, _photo(48, 10, 2)], axis=1)
  np.testing.assert_allclose(train_fn(wide, _seed(0), **OFF), reference, atol=1e-6)


def test_bicubic_resize_is_close_to_pil(train_fn):
  image = _photo(96, 96)
  pil = np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
  ours = _to_uint8_scale(train_fn(image, _seed(0), **OFF))
  assert np.abs(ours - pil).mean() < 1.0


def test_flip_is_a_fair_coin(train_fn):
  image = _photo(40, 40)
  plain = train_fn(image, _seed(0), **OFF)
  flipped = 0
  for i in range(40):
    out = train_fn(image, _seed(i), **{**OFF, 'flip': True})
    is_flipped = np.array_equal(out, plain[:, ::-1])
    assert is_flipped or np.array_equal(out, plain)
    flipped += is_flipped
  assert 10 <= flipped <= 30


def test_jpeg_bytes_and_decoded_pixels_give_close_results(train_fn):
  image = _photo(60, 80)
  jpeg = _encode(image, 'JPEG', quality=95)
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  for seed in range(4):
    # decode_and_crop_jpeg may upsample chroma slightly differently at the crop edge.
    a = train_fn(jpeg, _seed(seed), randaugment='', random_erase=0.0)
    b = train_fn(decoded, _seed(seed), randaugment='', random_erase=0.0)
    assert np.abs(a - b).mean() < 0.02 and np.abs(a - b).max() < 0.3
  png = _encode(image, 'PNG')
  for seed in range(4):
    np.testing.assert_array_equal(train_fn(png, _seed(seed)), train_fn(image, _seed(seed)))


# ---- random resized crop ----

def _window(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  return [int(v) for v in _crop_window(height, width, _seed(seed), scale, ratio)]


@tf.function(autograph=False, reduce_retracing=True)
def _crop_window(height, width, seed, scale, ratio):
  return preprocess.crop_window(height, width, seed, scale=scale, ratio=ratio)


def test_crop_window_samples_area_and_aspect_like_timm():
  height, width = 120, 160
  windows = np.array([_window(height, width, s) for s in range(300)])
  top, left, h, w = windows.T
  assert np.all((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width))
  area = h * w / (height * width)
  aspect = w / h
  # Rounding h and w to whole pixels moves these a little past timm's ranges.
  assert area.min() > 0.07 and area.max() <= 1.0
  assert area.min() < 0.15 and area.max() > 0.9
  assert aspect.min() > 0.7 and aspect.max() < 1.4
  assert abs(np.log(aspect).mean()) < 0.05
  assert len(set(map(tuple, windows))) == len(windows)


@pytest.mark.parametrize('height, width, scale, ratio', [
    (40, 60, (1.0, 1.0), (1.0, 1.0)),
    (10, 100, (0.9, 1.0), (3 / 4, 4 / 3)),
    (100, 10, (0.9, 1.0), (3 / 4, 4 / 3)),
    (50, 60, (1.0, 1.0), (3 / 4, 4 / 3)),
])
def test_crop_window_falls_back_to_a_center_crop_within_the_ratio(height, width, scale, ratio):
  in_ratio = width / height
  w = round(height * ratio[1]) if in_ratio > ratio[1] else width
  h = round(width / ratio[0]) if in_ratio < ratio[0] else height
  expected = [(height - h) // 2, (width - w) // 2, h, w]
  for seed in range(3):
    assert _window(height, width, seed, scale, ratio) == expected


# ---- random erasing ----

def test_random_erasing_rate_box_and_noise():
  p, count = 0.25, 240
  size = 48
  aug = _aug(**{**OFF, 'random_erase': p})
  gray = np.full((size, size, 3), 90, np.uint8)
  base = (90 / 255 - MEAN) / STD
  ds = tf.data.Dataset.range(count).map(
      lambda i: preprocess.train_image(gray, tf.stack([i, tf.constant(4, tf.int64)]), size=size,
                                       aug=aug, **NORM), num_parallel_calls=2)
  erased_images, noise = 0, []
  for out in ds.as_numpy_iterator():
    mask = np.any(np.abs(out - base) > 1e-6, axis=-1)
    if not mask.any():
      continue
    erased_images += 1
    rows, cols = np.nonzero(mask)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == h * w, 'erased region is not one box'
    assert h < size and w < size
    assert 0.015 < h * w / size**2 < 0.36 and 0.25 < w / h < 4
    noise.append(out[mask])
  assert abs(erased_images / count - p) < 0.08
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_random_erase_zero_and_one():
  image = tf.zeros([16, 16, 3])
  for i in range(5):
    np.testing.assert_array_equal(preprocess.random_erase(image, _seed(i), 0.0), image)
    assert np.any(preprocess.random_erase(image, _seed(i), 1.0).numpy() != 0)


# ---- eval ----

def _centered_square(height, width, side):
  """Blue image with a red square of `side` pixels at its center."""
  image = np.zeros((height, width, 3), np.uint8)
  image[..., 2] = 255
  top, left = (height - side) // 2, (width - side) // 2
  image[top:top + side, left:left + side] = (255, 0, 0)
  return image


def _eval(image, size=SIZE, crop_pct=0.5):
  out = preprocess.eval_image(image, size=size, crop_pct=crop_pct, interpolation='bicubic',
                              mean=defaults.IMAGENET_MEAN, std=defaults.IMAGENET_STD)
  return out.numpy()


@pytest.mark.parametrize('height, width', [(120, 160), (160, 120)])
def test_eval_image_crops_the_center(height, width):
  # size 32 at crop_pct 0.5: the shorter side goes to 64, so the crop is the central half of
  # it: 60 source pixels. A red square a little larger fills the output...
  out = _to_uint8_scale(_eval(_centered_square(height, width, 60 + 2 * 8)))
  assert out.shape == (SIZE, SIZE, 3)
  np.testing.assert_allclose(out, np.broadcast_to([255, 0, 0], out.shape), atol=3)
  # ... and one a little smaller leaves blue at every edge of the output.
  out = _to_uint8_scale(_eval(_centered_square(height, width, 60 - 2 * 8)))
  for edge in (out[0], out[-1], out[:, 0], out[:, -1]):
    assert np.all(edge[:, 2] > 200) and np.all(edge[:, 0] < 60)
  np.testing.assert_allclose(out[SIZE // 2, SIZE // 2], [255, 0, 0], atol=3)


@pytest.mark.parametrize('height, width', [(75, 100), (100, 75)])
def test_eval_image_matches_torchvision_resize_and_center_crop_done_in_pil(height, width):
  image = _photo(height, width)
  scale = int(SIZE / 0.875)
  short, long = sorted((height, width))
  new_short, new_long = scale, int(scale * long / short)
  new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC), np.float32)
  top, left = int(round((new_h - SIZE) / 2)), int(round((new_w - SIZE) / 2))
  reference = resized[top:top + SIZE, left:left + SIZE]
  ours = _to_uint8_scale(_eval(image, crop_pct=0.875))
  assert np.abs(ours - reference).mean() < 1.0


def test_eval_image_takes_bytes_and_arrays_alike():
  image = _photo(50, 70)
  png = _encode(image, 'PNG')
  np.testing.assert_array_equal(_eval(png), _eval(image))
  assert _eval(_encode(image, 'JPEG'), size=224, crop_pct=0.875).shape == (224, 224, 3)
  ds = tf.data.Dataset.from_tensors(png).map(
      lambda x: preprocess.eval_image(x, size=SIZE, crop_pct=0.5, interpolation='bicubic',
                                      mean=MEAN, std=STD))
  np.testing.assert_allclose(next(ds.as_numpy_iterator()), _eval(image), rtol=0, atol=1e-5)


# ---- tf.data and errors ----

def test_train_image_in_parallel_dataset_map_matches_direct_calls(train_fn):
  images = [_encode(_photo(40 + 4 * i, 56 - 2 * i, i), 'JPEG') for i in range(6)]
  aug = _aug()
  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
      lambda i, x: (i, preprocess.train_image(x, tf.stack([i, tf.constant(99, tf.int64)]),
                                              size=SIZE, aug=aug, **NORM)),
      num_parallel_calls=3, deterministic=False)
  for i, out in ds.as_numpy_iterator():
    # Graph optimizations may fuse the normalization differently: last-bit differences only.
    np.testing.assert_allclose(out, train_fn(images[i], _seed(i)), rtol=0, atol=1e-5)


@pytest.mark.parametrize('overrides', [
    dict(interpolation='cubic'), dict(random_erase=1.5), dict(randaugment='rand-x3'),
    dict(randaugment='autoaug'), dict(crop_scale=(0.5, 0.1)), dict(crop_scale=(0.0, 1.0)),
    dict(crop_ratio=(0.0, 1.0)),
])
def test_bad_train_settings_are_user_errors(overrides):
  with pytest.raises(UserError):
    preprocess.train_image(_photo(20, 20), _seed(0), size=SIZE, aug=_aug(**overrides), **NORM)


@pytest.mark.parametrize('crop_pct, interpolation', [(0.0, 'bicubic'), (1.2, 'bicubic'),
                                                     (0.875, 'area51')])
def test_bad_eval_settings_are_user_errors(crop_pct, interpolation):
  with pytest.raises(UserError):
    preprocess.eval_image(_photo(20, 20), size=SIZE, crop_pct=crop_pct,
                          interpolation=interpolation, mean=MEAN, std=STD)
