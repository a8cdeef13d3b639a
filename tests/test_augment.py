"""The train step's on-device augmentation: flip, RandAugment, normalization and random erasing
per example, as a pure function of the seed and the example's id, whatever the mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvt_jax import defaults
from hvt_jax.data import augment, input_spec, randaugment
from hvt_jax.errors import UserError
from tests import tiny_config
from tests import helpers

MEAN, STD = input_spec.IMAGENET_MEAN, input_spec.IMAGENET_STD
OFF = dict(flip=False, randaugment='', random_erase=0.0)


def _aug(**overrides):
  aug = defaults.train_config().aug
  aug.update(overrides)
  return aug


def _ids(count, epoch=0, process=0, start=0):
  return np.stack([np.full(count, process), np.full(count, epoch),
                   np.arange(start, start + count)], -1).astype(np.int32)


def _images(count, size=24, seed=0):
  """Gradients plus noise: no symmetry, so flips and ops are visible."""
  y, x = np.mgrid[0:size, 0:size]
  base = np.stack([8 * x + 20, 7 * y + 10, 3 * (x + y) + 40], -1)
  noise = np.random.default_rng(seed).integers(0, 40, (count, size, size, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


@functools.cache
def _jitted(aug_items, seed=0):
  aug = dict(aug_items)
  return jax.jit(lambda x, ids: augment.train_images(x, ids, seed=seed, aug=aug, mean=MEAN,
                                                      std=STD))


def _train_images(images, ids, seed=0, **aug):
  return np.asarray(_jitted(tuple(sorted(_aug(**aug).items())), seed)(images, ids))


def _normalized(images):
  return (images.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)


def test_with_everything_off_it_only_normalizes():
  images = _images(4)
  out = _train_images(images, _ids(4), **OFF)
  assert out.dtype == np.float32 and out.shape == images.shape
  np.testing.assert_allclose(out, _normalized(images), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(augment.normalize(images, MEAN, STD)), _normalized(images),
                             rtol=0, atol=1e-6)


def test_flip_is_a_fair_coin():
  n = 2000
  image = _images(1)[0]
  out = _train_images(np.broadcast_to(image, (n,) + image.shape), _ids(n), **{**OFF, 'flip': True})
  plain, mirrored = _normalized(image), _normalized(image[:, ::-1])
  is_plain = np.all(np.abs(out - plain) < 1e-6, axis=(1, 2, 3))
  is_mirrored = np.all(np.abs(out - mirrored) < 1e-6, axis=(1, 2, 3))
  assert np.all(is_plain ^ is_mirrored)  # one or the other, never anything else
  assert abs(is_mirrored.sum() - n / 2) < 4.5 * np.sqrt(n / 4), is_mirrored.sum()


def test_steps_run_in_timms_order_with_the_examples_keys():
  """flip -> RandAugment -> normalize -> erase, each with its part of the example's key."""
  images, ids = _images(6), _ids(6, epoch=3, start=40)
  spec = 'rand-m9-inc1'  # no magnitude noise: the ops' arguments are host constants, exact
  out = _train_images(images, ids, seed=7, flip=True, randaugment=spec, random_erase=0.5)
  keys = augment.example_keys(7, ids)
  erased = 0
  for image, key, got in zip(images, keys, out):
    flip_key, augment_key, erase_key = jax.random.split(key, 3)
    x = augment.flip(image, flip_key)
    x = randaugment.rand_augment(x, augment_key, spec, fill=augment.fill_color(MEAN))
    expected = np.asarray(augment.random_erase(augment.normalize(x, MEAN, STD), erase_key, 0.5))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    erased += not np.allclose(expected, _normalized(np.asarray(x)), atol=1e-5)
  assert 0 < erased < 6  # erasing really ran, on some of them


def test_an_examples_images_follow_from_the_seed_and_its_id_alone():
  aug = dict(flip=True, randaugment='rand-m9-mstd0.5-inc1', random_erase=0.25)
  images = _images(8)
  ids = _ids(8, epoch=2, start=100)
  out = _train_images(images, ids, seed=3, **aug)
  np.testing.assert_array_equal(_train_images(images, ids, seed=3, **aug), out)
  # Rows permuted: outputs permute with them. Another batch holding some of the examples: the
  # same images for those.
  order = np.random.default_rng(0).permutation(8)
  np.testing.assert_array_equal(_train_images(images[order], ids[order], seed=3, **aug), out[order])
  mixed = np.concatenate([images[5:], _images(5, seed=9)])
  mixed_ids = np.concatenate([ids[5:], _ids(5, epoch=2, start=500)])
  np.testing.assert_array_equal(_train_images(mixed, mixed_ids, seed=3, **aug)[:3], out[5:])
  # Another seed, epoch, position or process changes every image.
  for seed, other in [(4, ids), (3, _ids(8, epoch=3, start=100)), (3, _ids(8, epoch=2, start=101)),
                      (3, _ids(8, epoch=2, process=1, start=100))]:
    moved = _train_images(images, other, seed=seed, **aug)
    assert not any(np.array_equal(a, b) for a, b in zip(moved, out))


def test_random_erasing_rate_box_and_noise():
  p, count, size = 0.25, 400, 48
  gray = np.full((count, size, size, 3), 90, np.uint8)
  base = _normalized(gray[0])
  out = _train_images(gray, _ids(count), **{**OFF, 'random_erase': p})
  erased_images, noise = 0, []
  for image in out:
    mask = np.any(np.abs(image - base) > 1e-6, axis=-1)
    if not mask.any():
      continue
    erased_images += 1
    rows, cols = np.nonzero(mask)
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask.sum() == h * w, 'erased region is not one box'
    assert h < size and w < size
    assert 0.015 < h * w / size**2 < 0.36 and 0.25 < w / h < 4
    noise.append(image[mask])
  assert abs(erased_images - count * p) < 4.5 * np.sqrt(count * p * (1 - p)), erased_images
  noise = np.concatenate(noise)
  assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_random_erase_zero_and_one():
  image = jnp.zeros([16, 16, 3])
  for i in range(5):
    key = jax.random.key(i)
    np.testing.assert_array_equal(augment.random_erase(image, key, 0.0), image)
    assert np.any(np.asarray(augment.random_erase(image, key, 1.0)) != 0)


@pytest.mark.parametrize('overrides, error', [
    (dict(random_erase=1.5), augment.AugmentConfigError),
    (dict(random_erase=-0.1), augment.AugmentConfigError),
    (dict(randaugment='rand-x3'), randaugment.RandAugmentSpecError),
    (dict(randaugment='autoaug'), randaugment.RandAugmentSpecError),
])
def test_bad_settings_are_one_line_user_errors_before_tracing(overrides, error):
  with pytest.raises(error) as info:
    augment.check_settings(_aug(**overrides))
  assert isinstance(info.value, UserError) and '\n' not in str(info.value)
  with pytest.raises(error):
    augment.train_images(_images(2), _ids(2), seed=0, aug=_aug(**overrides), mean=MEAN, std=STD)
  # Building the train step fails the same way, before anything is compiled.
  from hvt_jax import model as model_lib
  from hvt_jax import sharding
  from hvt_jax.training import train_step
  import optax
  config = tiny_config.get_config()
  config.aug.update(overrides)
  model = model_lib.HVT(**config.model)
  mesh = sharding.make_mesh((('data', 1),), jax.devices()[:1])
  with pytest.raises(error):
    train_step.jit_steps(model, optax.sgd(0.1), lambda s: 0.1, config, None, mesh)


def test_the_train_step_refuses_float_images():
  from hvt_jax.training import train_step
  batch = {'image': jnp.zeros((2, 8, 8, 3)), 'label': jnp.zeros((2,), jnp.int32),
           'example_id': jnp.zeros((2, 3), jnp.int32)}
  with pytest.raises(TypeError, match="'image' uint8"):
    train_step.train_images(batch, tiny_config.get_config())
  with pytest.raises(TypeError, match="'example_id'"):
    train_step.train_images({'image': jnp.zeros((2, 8, 8, 3), jnp.uint8)}, tiny_config.get_config())


# The same global batch augmented on one device and split over eight: the same images, bit for bit.
ONE_VS_EIGHT = r'''
import json, jax, numpy as np
from hvt_jax import defaults, sharding
from hvt_jax.data import augment, input_spec

aug = dict(defaults.train_config().aug)  # the paper recipe: flip, rand-m9-mstd0.5-inc1, erase 0.25
rng = np.random.default_rng(0)
# Canvases with windows to resize on the device first (the host left the resize to it).
images = rng.integers(0, 256, (16, 48, 48, 3), dtype=np.uint8)
windows = rng.integers(20, 49, (16, 2)).astype(np.int32)
ids = np.stack([np.zeros(16), np.full(16, 4), np.arange(16) * 7], -1).astype(np.int32)
out = {}
for name, devices in [('1', jax.devices()[:1]), ('8', jax.devices())]:
  mesh = sharding.make_mesh((('data', len(devices)),), devices)
  spec = sharding.batch_sharding(mesh)
  fn = jax.jit(lambda x, i, w: augment.train_images(x, i, w, seed=5, aug=aug,
                                                    mean=input_spec.IMAGENET_MEAN,
                                                    std=input_spec.IMAGENET_STD, size=32),
               in_shardings=(spec, spec, spec), out_shardings=spec)
  result = fn(*(jax.device_put(x, spec) for x in (images, ids, windows)))
  out[name] = {'images': np.asarray(result).tobytes().hex(), 'shards': len(result.addressable_shards),
               'hlo': fn.lower(images, ids, windows).compile().as_text()}
print('RESULT' + json.dumps(out))
'''


def test_one_device_and_eight_augment_the_same():
  out = helpers.run_on_devices(ONE_VS_EIGHT)
  assert out['8']['shards'] == 8 and out['1']['shards'] == 1
  assert out['8']['images'] == out['1']['images']
  # Each device augments its own examples: nothing moves between devices.
  hlo = out['8']['hlo']
  assert not any(op in hlo for op in ('all-gather', 'all-to-all', 'collective-permute',
                                      'all-reduce')), [l for l in hlo.splitlines() if 'all-' in l][:5]
