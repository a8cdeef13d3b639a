"""The host's image transforms: timm's random-resized crop, PIL's resize, the eval crop, the
input forms (JPEG/PNG bytes, uint8 arrays, grayscale), determinism and tf.data use.

Flip, RandAugment, normalization and random erasing run on the device: tests/test_augment.py."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_sample_image

from hvt_jax import defaults
from hvt_jax.data import input_spec, preprocess
from hvt_jax.errors import UserError

SIZE = 32
OFF = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


def _aug(**overrides):
  aug = defaults.train_config().aug
  aug.update(overrides)
  return aug


MEAN = np.array(input_spec.IMAGENET_MEAN, np.float32)
STD = np.array(input_spec.IMAGENET_STD, np.float32)


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
  """train_crop traced once per (settings, input kind, seed dtype), for any image shape."""
  cache = {}

  def fn(image, seed, **overrides):
    image_spec = (tf.TensorSpec([], tf.string) if isinstance(image, bytes) else
                  tf.TensorSpec([None, None, None], tf.uint8))
    key = (tuple(sorted(overrides.items())), image_spec, seed.dtype)
    if key not in cache:
      aug = _aug(**overrides)
      cache[key] = tf.function(
          lambda im, s: preprocess.train_crop(im, s, size=SIZE, aug=aug), autograph=False,
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
def test_train_crop_shape_and_dtype(kind, train_fn):
  image = INPUTS[kind]()
  for seed in range(3):
    out = train_fn(image, _seed(seed))
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert out.std() > 0  # a picture, not a constant fill


@pytest.mark.parametrize('kind', ['gray', 'gray_png', 'gray_jpeg'])
def test_grayscale_becomes_rgb(kind, train_fn):
  gray = train_fn(INPUTS[kind](), _seed(1))
  np.testing.assert_array_equal(gray[..., 1], gray[..., 0])
  np.testing.assert_array_equal(gray[..., 2], gray[..., 0])


def test_train_crop_is_deterministic_and_seed_dependent(train_fn):
  image = _encode(_photo(48, 64), 'JPEG')
  outs = [train_fn(image, _seed(i)) for i in range(6)]
  np.testing.assert_array_equal(train_fn(image, _seed(3)), outs[3])
  assert len({o.tobytes() for o in outs}) == len(outs)
  # int32 seeds work and are the same numbers.
  np.testing.assert_array_equal(train_fn(image, _seed(3, tf.int32)), outs[3])


def test_the_whole_image_at_full_scale_is_a_plain_resize(train_fn):
  square = _photo(48, 48)
  reference = train_fn(square, _seed(0), **OFF)
  for seed in range(1, 3):
    np.testing.assert_array_equal(train_fn(square, _seed(seed), **OFF), reference)
  # A 1:1 ratio on a wide image falls back to timm's center crop.
  wide = np.concatenate([_photo(48, 10, 1), square, _photo(48, 10, 2)], axis=1)
  np.testing.assert_array_equal(train_fn(wide, _seed(0), **OFF), reference)
  # PIL's resize, but for rounding between the passes (see test_resize_matches_pil...).
  pil = np.asarray(Image.fromarray(square).resize((SIZE, SIZE), Image.BICUBIC), np.float32)
  assert np.abs(reference - pil).max() <= 1 and np.abs(reference - pil).mean() < 0.5


def test_train_crop_is_pils_resize_of_the_window():
  """What timm does: PIL's crop of the window, then PIL's resize, on a real photo."""
  photo = load_sample_image('china.jpg')
  aug = _aug()
  windows = set()
  for seed in range(6):
    ours = preprocess.train_crop(photo, _seed(seed), size=SIZE, aug=aug).numpy()
    # train_crop draws its window from the first of four streams split from its seed.
    crop_seed = tf.random.experimental.stateless_split(_seed(seed), 4)[0]
    top, left, h, w = [int(v) for v in _crop_window(*photo.shape[:2], crop_seed,
                                                    tuple(aug.crop_scale), tuple(aug.crop_ratio))]
    windows.add((top, left, h, w))
    window = Image.fromarray(photo).crop((left, top, left + w, top + h))
    reference = np.asarray(window.resize((SIZE, SIZE), Image.BICUBIC), np.float32)
    assert np.abs(ours - reference).mean() < 0.5, (seed, (h, w))
  assert len(windows) == 6


PIL_FILTERS = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR, 'lanczos': Image.LANCZOS,
               'nearest': Image.NEAREST}
# (top, left, height, width) windows of the 427 x 640 photos, resized to 224: shrinking both
# sides (by up to 2.9), enlarging both, shrinking one and enlarging the other, and the same
# size, for tall and wide windows.
WINDOWS = [(0, 0, 427, 640), (40, 90, 300, 400), (100, 200, 280, 250), (5, 7, 120, 90),
           (10, 300, 400, 150), (200, 20, 60, 560), (50, 50, 224, 224), (0, 0, 231, 225)]


@pytest.mark.parametrize('interpolation', PIL_FILTERS)
@pytest.mark.parametrize('photo', ['china.jpg', 'flower.jpg'])
def test_resize_matches_pil_on_real_photos(photo, interpolation):
  image = load_sample_image(photo)
  resize = tf.function(lambda x: preprocess.resize(x, 224, 224, interpolation), autograph=False,
                       input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  for top, left, h, w in WINDOWS:
    window = image[top:top + h, left:left + w]
    reference = np.asarray(Image.fromarray(window).resize((224, 224), PIL_FILTERS[interpolation]),
                           np.float32)
    ours = resize(window).numpy()
    assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
    diff = np.abs(ours - reference)
    # PIL rounds between its two passes; which pass comes first depends on Pillow's version,
    # and only then can a pixel differ.
    assert diff.mean() < 0.5, (photo, interpolation, (h, w), diff.mean())
    if interpolation == 'nearest':
      # The same source pixels but where a center falls on a pixel border (see `_nearest`).
      assert np.any(diff > 0, axis=-1).mean() < 0.01


def test_jpeg_bytes_and_decoded_pixels_give_close_results(train_fn):
  image = _photo(60, 80)
  jpeg = _encode(image, 'JPEG', quality=95)
  decoded = tf.io.decode_jpeg(jpeg).numpy()
  for seed in range(4):
    # decode_and_crop_jpeg may upsample chroma slightly differently at the crop edge.
    a = train_fn(jpeg, _seed(seed)).astype(np.float32)
    b = train_fn(decoded, _seed(seed)).astype(np.float32)
    # The old bound on normalized images (0.02 mean, 0.3 max), on 0..255 at the smallest std.
    scale = 255 * STD.min()
    assert np.abs(a - b).mean() < 0.02 * scale and np.abs(a - b).max() < 0.3 * scale
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
                              mean=input_spec.IMAGENET_MEAN, std=input_spec.IMAGENET_STD)
  return out.numpy()


def _eval_crop(image, size=SIZE, crop_pct=0.5, interpolation='bicubic'):
  return preprocess.eval_crop(image, size=size, crop_pct=crop_pct,
                              interpolation=interpolation).numpy()


@pytest.mark.parametrize('height, width', [(120, 160), (160, 120)])
def test_eval_image_crops_the_center(height, width):
  # size 32 at crop_pct 0.5: the shorter side goes to 64, so the crop is the central half of
  # it: 60 source pixels. A red square a little larger fills the output...
  crop = _eval_crop(_centered_square(height, width, 60 + 2 * 8))
  assert crop.shape == (SIZE, SIZE, 3) and crop.dtype == np.uint8
  out = _to_uint8_scale(_eval(_centered_square(height, width, 60 + 2 * 8)))
  np.testing.assert_allclose(out, crop, atol=1e-3)  # eval_image: eval_crop, normalized
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
  assert np.abs(_eval_crop(image, crop_pct=0.875) - reference).mean() < 0.5


@pytest.mark.parametrize('interpolation', PIL_FILTERS)
def test_eval_crop_is_pils_resize_then_center_crop_on_a_real_photo(interpolation):
  photo = load_sample_image('flower.jpg')  # 427 x 640: the shorter side shrinks to 256
  for image in (photo, photo.transpose(1, 0, 2)[:500]):  # and a portrait 500 x 427
    height, width = image.shape[:2]
    short, long = sorted((height, width))
    new_short, new_long = 256, 256 * long // short
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                       PIL_FILTERS[interpolation]), np.float32)
    top, left = int(round((new_h - 224) / 2)), int(round((new_w - 224) / 2))
    reference = resized[top:top + 224, left:left + 224]
    ours = _eval_crop(image, size=224, crop_pct=0.875, interpolation=interpolation)
    assert ours.dtype == np.uint8
    assert np.abs(ours - reference).mean() < 0.5, (image.shape, interpolation)


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

def test_train_crop_in_parallel_dataset_map_matches_direct_calls(train_fn):
  images = [_encode(_photo(40 + 4 * i, 56 - 2 * i, i), 'JPEG') for i in range(6)]
  aug = _aug()
  ds = tf.data.Dataset.from_tensor_slices(images).enumerate().map(
      lambda i, x: (i, preprocess.train_crop(x, tf.stack([i, tf.constant(99, tf.int64)]),
                                             size=SIZE, aug=aug)),
      num_parallel_calls=3, deterministic=False)
  for i, out in ds.as_numpy_iterator():
    np.testing.assert_array_equal(out, train_fn(images[i], _seed(i)))


# The bad random_erase and randaugment settings this tested are the device's now:
# tests/test_augment.py::test_bad_settings_are_one_line_user_errors_before_tracing.
@pytest.mark.parametrize('overrides', [
    dict(interpolation='cubic'), dict(crop_scale=(0.5, 0.1)), dict(crop_scale=(0.0, 1.0)),
    dict(crop_ratio=(0.0, 1.0)),
])
def test_bad_train_settings_are_user_errors(overrides):
  with pytest.raises(UserError) as e:
    preprocess.train_crop(_photo(20, 20), _seed(0), size=SIZE, aug=_aug(**overrides))
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('crop_pct, interpolation', [(0.0, 'bicubic'), (1.2, 'bicubic'),
                                                     (0.875, 'area51')])
def test_bad_eval_settings_are_user_errors(crop_pct, interpolation):
  with pytest.raises(UserError):
    preprocess.eval_image(_photo(20, 20), size=SIZE, crop_pct=crop_pct,
                          interpolation=interpolation, mean=MEAN, std=STD)
