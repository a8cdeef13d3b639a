"""The resizes on the device: PIL's resize of the train window or eval image the host decoded
into a canvas, where the resize happens (`aug.resize_on`), and the canvas batches the host
gives."""
import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_sample_image

from hvt_jax import defaults, sharding
from hvt_jax.data import augment, device_resize, input_pipeline, preprocess, sources
from hvt_jax.errors import UserError
from hvt_jax.training import train_step
from tests import tiny_config
from tests.test_preprocess import PIL_FILTERS, WINDOWS, _encode, _photo, _seed

CANVAS = 640  # the sample photos' windows (up to 427 x 640) fit


def _aug(**overrides):
  aug = defaults.train_config().aug
  aug.update(overrides)
  return aug


def _on_canvas(window, canvas=CANVAS, fill_seed=0):
  """The window at the top left of a canvas whose other pixels are noise: the resize must
  not read them."""
  out = np.random.default_rng(fill_seed).integers(0, 256, (canvas, canvas, 3), dtype=np.uint8)
  out[:window.shape[0], :window.shape[1]] = window
  return out


@pytest.fixture(scope='module')
def resize():
  cache = {}

  def fn(canvases, windows, size, interpolation):
    if (size, interpolation) not in cache:
      cache[size, interpolation] = jax.jit(
          lambda x, hw: device_resize.resize_windows(x, hw, size, interpolation))
    return np.asarray(cache[size, interpolation](canvases, windows))

  return fn


@pytest.mark.parametrize('interpolation', ['bicubic', 'bilinear', 'lanczos'])
@pytest.mark.parametrize('photo', ['china.jpg', 'flower.jpg'])
def test_device_resize_is_pils_and_the_hosts_on_real_photos(photo, interpolation, resize):
  image = load_sample_image(photo)
  windows = [image[t:t + h, l:l + w] for t, l, h, w in WINDOWS]
  out = resize(np.stack([_on_canvas(w, fill_seed=i) for i, w in enumerate(windows)]),
               np.array([w.shape[:2] for w in windows], np.int32), 224, interpolation)
  assert out.dtype == np.uint8 and out.shape == (len(windows), 224, 224, 3)
  for window, ours in zip(windows, out):
    pil = np.asarray(Image.fromarray(window).resize((224, 224), PIL_FILTERS[interpolation]))
    host = preprocess.resize(tf.constant(window), 224, 224, interpolation).numpy()
    assert np.abs(ours - pil.astype(np.float32)).mean() < 0.5, (window.shape, interpolation)
    # The host's resize computes its weights in float64, the device's in float32: a rounding
    # may tip, rarely, by a level in each pass.
    diff = np.abs(ours.astype(np.int32) - host)
    assert diff.max() <= 2 and diff.mean() < 0.01, (window.shape, diff.mean())


def test_a_window_of_the_output_size_is_left_as_it_is(resize):
  """What a window larger than the canvas comes as: already resized, on the host."""
  canvas = np.random.default_rng(1).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
  for interpolation in ('bicubic', 'lanczos', 'bilinear'):
    out = resize(canvas, np.array([[32, 32]] * 2, np.int32), 32, interpolation)
    np.testing.assert_array_equal(out, canvas[:, :32, :32])


def test_train_window_then_the_device_resize_is_train_crop(resize):
  photo = load_sample_image('china.jpg')
  aug = _aug()
  for canvas in (CANVAS, 200):  # 200: some windows are larger, and resized on the host
    pairs = [preprocess.train_window(photo, _seed(s), size=64, canvas=canvas, aug=aug)
             for s in range(8)]
    shapes = {tuple(w.numpy()) for _, w in pairs}
    if canvas == 200:
      assert (64, 64) in shapes and len(shapes) > 1  # both kinds occur
    canvases = np.stack([_on_canvas(x.numpy(), max(canvas, 64)) for x, _ in pairs])
    out = resize(canvases, np.stack([w.numpy() for _, w in pairs]), 64, 'bicubic')
    for s, ours in enumerate(out):
      crop = preprocess.train_crop(photo, _seed(s), size=64, aug=aug).numpy()
      diff = np.abs(ours.astype(np.int32) - crop)
      assert diff.max() <= 2 and diff.mean() < 0.01, (canvas, s)


def test_where_the_resize_happens():
  aug = _aug()
  assert aug.resize_on == 'auto' and aug.window_canvas == 512
  assert augment.window_canvas(aug, 224, 'cpu') == 0
  assert augment.window_canvas(aug, 224, 'gpu') == augment.window_canvas(aug, 224, 'tpu') == 512
  assert augment.window_canvas(_aug(resize_on='device'), 224, 'cpu') == 512
  assert augment.window_canvas(_aug(resize_on='host'), 224, 'tpu') == 0
  assert augment.window_canvas(_aug(resize_on='device'), 640, 'cpu') == 640  # at least S
  # PIL's nearest neighbour steps in float64: on the host.
  assert augment.window_canvas(_aug(resize_on='device', interpolation='nearest'), 224, 'gpu') == 0
  # Eval follows resize_on with its own filter.
  config = defaults.train_config()
  assert augment.eval_canvas(config, 'gpu') == 512 and augment.eval_canvas(config, 'cpu') == 0
  config.eval.interpolation = 'nearest'
  assert augment.eval_canvas(config, 'gpu') == 0 and augment.window_canvas(config.aug, 224, 'gpu')


@pytest.mark.parametrize('overrides', [dict(resize_on='gpu'), dict(resize_on='device',
                                                                   window_canvas=0)])
def test_bad_resize_settings_are_one_line_user_errors(overrides):
  with pytest.raises(UserError) as e:
    augment.check_settings(_aug(**overrides))
  assert '\n' not in str(e.value) and 'aug.' in str(e.value)


def test_canvas_batches_hold_the_windows_the_host_would_have_resized(resize):
  config = defaults.train_config()
  config.model.image_size = 32
  config.data.update(threads=2, shuffle_buffer=64)
  images = [_encode(_photo(40 + 3 * i, 60 - 2 * i, seed=i), 'JPEG', quality=90)
            for i in range(12)]
  source = sources.memory_source(np.array(images, dtype=object), np.arange(12, dtype=np.int64))
  take = lambda canvas: next(input_pipeline.train_dataset(
      source, config, process_index=0, local_batch=8, canvas=canvas).as_numpy_iterator())
  host, dev = take(0), take(64)
  assert dev['image'].dtype == np.uint8 and dev['image'].shape == (8, 64, 64, 3)
  assert dev['window'].dtype == np.int32 and dev['window'].shape == (8, 2)
  assert host['image'].shape == (8, 32, 32, 3) and 'window' not in host
  for key in ('label', 'example_id', 'ok'):
    np.testing.assert_array_equal(dev[key], host[key])
  for canvas, (h, w) in zip(dev['image'], dev['window']):
    assert 1 <= h <= 60 and 1 <= w <= 60
    assert not canvas[h:].any() and not canvas[:, w:].any()  # zero padding
  out = resize(dev['image'], dev['window'], 32, 'bicubic')
  assert np.abs(out.astype(np.int32) - host['image']).max() <= 2


# Eval images: (height, width) of the photos' top-left corners, resized to 224 at crop_pct:
# landscape and portrait, shrinking and enlarging, odd offsets into the resized image.
EVAL_SHAPES = [(427, 500), (427, 300), (300, 200), (255, 257), (224, 224), (100, 150)]


@pytest.mark.parametrize('interpolation, crop_pct', [('bicubic', 0.875), ('bilinear', 1.0),
                                                     ('lanczos', 0.9)])
def test_eval_window_then_the_device_crop_is_eval_crop_on_real_photos(interpolation, crop_pct):
  size, canvas = 224, 512
  crop = jax.jit(lambda x, hw: device_resize.eval_crops(x, hw, size, crop_pct, interpolation))
  images = [load_sample_image(photo)[:h, :w] for photo in ('china.jpg', 'flower.jpg')
            for h, w in EVAL_SHAPES]
  images.append(load_sample_image('china.jpg'))  # 427 x 640: larger than the canvas
  settings = dict(size=size, crop_pct=crop_pct, interpolation=interpolation)
  pairs = [preprocess.eval_window(x, canvas=canvas, **settings) for x in images]
  hws = np.stack([hw.numpy() for _, hw in pairs])
  np.testing.assert_array_equal(hws[:-1], [x.shape[:2] for x in images[:-1]])
  assert tuple(hws[-1]) == (0, 0) and pairs[-1][0].shape == (size, size, 3)  # cropped here
  out = np.asarray(crop(np.stack([_on_canvas(x.numpy(), canvas, fill_seed=i)
                                  for i, (x, _) in enumerate(pairs)]), hws))
  assert out.dtype == np.uint8 and out.shape == (len(images), size, size, 3)
  for image, ours in zip(images, out):
    host = preprocess.eval_crop(image, **settings).numpy()
    # float32 weights on the device, float64 on the host (as for the train crop).
    diff = np.abs(ours.astype(np.int32) - host)
    assert diff.max() <= 2 and diff.mean() < 0.01, (image.shape, diff.mean())


def test_canvas_eval_batches_go_through_the_eval_step_as_host_batches_do():
  config = tiny_config.get_config()  # 16 x 16 inputs
  config.aug.resize_on = 'device'
  # 40..68 pixels a side; canvas 64: the last image is cropped on the host.
  images = [_encode(_photo(40 + 2 * i, 54 - i, seed=i), 'JPEG', quality=90) for i in range(11)]
  images.append(_encode(_photo(68, 30, seed=11), 'PNG'))
  labels = np.arange(12, dtype=np.int64) % 10
  source = sources.memory_source(np.array(images, dtype=object), labels)
  take = lambda canvas: next(input_pipeline.eval_dataset(
      source, config, local_batch=12, canvas=canvas).as_numpy_iterator())
  host, dev = take(0), take(64)
  assert host['image'].shape == (12, 16, 16, 3) and 'window' not in host
  assert dev['image'].dtype == np.uint8 and dev['image'].shape == (12, 64, 64, 3)
  np.testing.assert_array_equal(dev['window'][:-1], [[40 + 2 * i, 54 - i] for i in range(11)])
  assert tuple(dev['window'][-1]) == (0, 0)
  np.testing.assert_array_equal(dev['label'], host['label'])
  for canvas, (h, w) in zip(dev['image'][:-1], dev['window'][:-1]):
    assert not canvas[h:].any() and not canvas[:, w:].any()  # zero padding

  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  program = train_step.build(config, mesh, 10)
  params = train_step.place_state(program.model, program.tx, jax.random.key(0),
                                  ema=config.ema_decay > 0, shardings=program.shardings).params
  sums = [program.eval_step(params, {**b, 'mask': np.ones(12, np.int32)}) for b in (host, dev)]
  assert float(sums[1]['count']) == 12 and np.isfinite(float(sums[0]['loss']))
  np.testing.assert_allclose(float(sums[1]['loss']), float(sums[0]['loss']), rtol=1e-3)
  assert float(sums[1]['top5']) == float(sums[0]['top5'])
  # The crops matter: the canvases' top-left corners would score otherwise.
  corners = {**dev, 'window': np.zeros_like(dev['window']), 'mask': np.ones(12, np.int32)}
  assert abs(float(program.eval_step(params, corners)['loss']) - float(sums[0]['loss'])) > 1e-3
