"""Broken or surprising data: unreadable training images are skipped and counted without
moving any valid image, and eval batch sizes are padded to what the devices can split."""
import functools
import types

import jax
import numpy as np
import optax
import pytest
import tensorflow as tf

from hvt_jax import defaults
from hvt_jax import model as model_lib
from hvt_jax.data import feeding, input_pipeline, sources
from hvt_jax import sharding
from hvt_jax.training import train_step
from tests.helpers import TINY_MODEL

SIZE, N, BATCH = 16, 20, 4
BROKEN = {3: b'not an image at all', 11: 'truncated jpeg', 12: b'\x89PNG\r\n\x1a\n broken png'}


def _config():
  c = defaults.train_config()
  c.model.image_size = SIZE
  c.aug.update(randaugment='', random_erase=0.0, repeated_aug=1)
  c.data.shuffle_buffer = N
  return c


def _sources():
  rng = np.random.default_rng(0)
  images = [tf.io.encode_jpeg(rng.integers(0, 256, (24, 24, 3), np.uint8)).numpy()
            for _ in range(N)]
  labels = np.arange(N) % 10
  broken = list(images)
  for i, data in BROKEN.items():
    broken[i] = images[i][:40] if data == 'truncated jpeg' else data
  return (sources.memory_source(np.array(images, object), labels),
          sources.memory_source(np.array(broken, object), labels))


def _batches(source, n, start=0):
  ds = input_pipeline.train_dataset(source, _config(), process_index=0, local_batch=BATCH,
                                    start=start)
  return list(ds.take(n).as_numpy_iterator())


def test_unreadable_images_are_skipped_counted_and_move_nothing():
  good, broken = _sources()
  per_epoch = N // BATCH
  clean, dirty = _batches(good, 2 * per_epoch), _batches(broken, 2 * per_epoch)
  assert all(b['ok'].all() for b in clean)
  assert sum(int((~b['ok']).sum()) for b in dirty) == 2 * len(BROKEN)  # each epoch, each once
  for c, d in zip(clean, dirty):
    ok = d['ok']
    np.testing.assert_array_equal(d['image'][ok], c['image'][ok])  # same seeds, same places
    np.testing.assert_array_equal(d['label'][ok], c['label'][ok])
    for row in np.flatnonzero(~ok):  # a skipped row holds a copy of a valid row of its batch
      assert any(np.array_equal(d['image'][row], d['image'][v]) for v in np.flatnonzero(ok))
  # A resumed stream continues with exactly the same batches.
  resumed = _batches(broken, 3, start=3 * BATCH)
  for r, d in zip(resumed, dirty[3:]):
    np.testing.assert_array_equal(r['image'], d['image'])
    np.testing.assert_array_equal(r['ok'], d['ok'])


def test_a_stream_resumed_at_an_unreadable_image_continues_the_same():
  _, broken = _sources()
  dirty = _batches(broken, N // BATCH)
  ok = np.concatenate([b['ok'] for b in dirty])
  images = np.concatenate([b['image'] for b in dirty])
  for start in np.flatnonzero(~ok):  # the resumed stream's first record cannot be decoded
    resumed = _batches(broken, 1, start=int(start))[0]
    np.testing.assert_array_equal(resumed['ok'], ok[start:start + BATCH])
    np.testing.assert_array_equal(resumed['image'][resumed['ok']],
                                  images[start:start + BATCH][resumed['ok']])


JUNK = b'saved as .jpg, but text'


def _folder(root, per_class, data):
  """An image folder dataset: train/ and val/, classes cat and dog, `per_class` .jpg files
  each, file i of a split holding data(split, i)."""
  for split in ('train', 'val'):
    for name in ('cat', 'dog'):
      (root / split / name).mkdir(parents=True)
      for i in range(per_class):
        (root / split / name / f'{i}.jpg').write_bytes(data(split, i))
  return root


def test_training_data_with_no_readable_image_is_refused(tmp_path):
  junk = sources.memory_source(np.array([b'not an image'] * N, object), np.zeros(N))
  with pytest.raises(sources.InputError,
                     match=f'none of the first {N} training images of .* could be decoded'):
    _batches(junk, 1)
  # A run is refused before it writes anything.
  from tests.helpers import run_main
  root = _folder(tmp_path / 'data', 3, lambda split, i: JUNK)
  result = run_main(tmp_path / 'run', '--config.data.name=folder', f'--config.data.data_dir={root}',
                    '--config.data.eval_split=val', '--config.model.num_classes=2',
                    '--config.batch_size=2', check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      f'main: error: none of the first 6 training images of {root} could be decoded: the data '
      'must hold JPEG, PNG, GIF, BMP or WebP images (training skips a few unreadable ones, not all).')
  assert not (tmp_path / 'run').exists()


def test_every_process_stops_with_the_reason_when_one_share_has_no_readable_image(tmp_path):
  """Process 1 reads the odd files of the listing, all unreadable here; process 0 reads images.
  Process 0 must stop with the reason too, not wait in a collective until it times out."""
  from tests import helpers
  rng = np.random.default_rng(0)
  image = lambda: tf.io.encode_jpeg(rng.integers(0, 256, (24, 24, 3), np.uint8)).numpy()
  root = _folder(tmp_path / 'data', 4,
                 lambda split, i: JUNK if split == 'train' and i % 2 else image())
  port = helpers.free_port()
  procs = [helpers.run_main(tmp_path / 'run', '--config.data.name=folder',
                            f'--config.data.data_dir={root}', '--config.data.eval_split=val',
                            '--config.model.num_classes=2', '--config.batch_size=2',
                            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                            f'--process_id={i}', wait=False, check=False)
           for i in range(2)]
  errors = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]  # stderr in stdout
  assert [p.returncode for p in procs] == [1, 1], errors
  reason = (f'of {root} could be decoded: the data must hold JPEG, PNG, GIF, BMP or WebP images '
            '(training skips a few unreadable ones, not all).')
  assert errors == [f'main: error: process 1 of 2: none of its first training images {reason}',
                    f'main: error: process 1 of 2: none of the first 4 training images {reason}']
  assert not (tmp_path / 'run').exists()


def test_the_train_step_counts_skipped_examples():
  config = _config()
  config.model = model_lib.variant('hvt-s-1', **TINY_MODEL)
  config.aug.update(mixup=0.0, cutmix=0.0)
  model = model_lib.HVT(**config.model)
  mesh = sharding.make_mesh((('data', -1),))
  tx = optax.sgd(0.1)
  state, _ = train_step.create_state(model, tx, jax.random.key(0), ema=False, mesh=mesh)
  step = jax.jit(functools.partial(train_step.train_step, model=model, tx=tx,
                                   schedule=lambda s: 0.1, config=config))
  batch = {'image': np.zeros((4, 32, 32, 3), np.uint8), 'label': np.arange(4, dtype=np.int32),
           'example_id': np.zeros((4, 3), np.int32), 'ok': np.array([True, False, True, False])}
  _, metrics = step(state, batch)
  assert float(metrics['skipped_examples']) == 2


@pytest.mark.parametrize('eval_batch, processes, devices, expected', [
    (100, 1, 8, 104), (128, 1, 8, 128), (7, 2, 4, 4), (1, 1, 3, 3)])
def test_eval_batch_sizes_are_padded_to_what_the_devices_split(eval_batch, processes, devices,
                                                                expected):
  mesh = types.SimpleNamespace(local_devices=[None] * devices)
  assert feeding.eval_local_batch_size(eval_batch, mesh, processes) == expected
  with pytest.raises(sources.InputError, match='batch_size=100 gives 100 per process'):
    feeding.local_batch_size(100, types.SimpleNamespace(local_devices=[None] * 8), 1)


def test_a_tfds_dataset_with_unreadable_images_trains_and_counts_them(tmp_path, monkeypatch):
  from tests import fake_imagenet
  import tensorflow_datasets as tfds
  from hvt_jax.training import curves
  from tests.helpers import run_main
  jpeg = fake_imagenet._jpeg
  monkeypatch.setattr(fake_imagenet, '_jpeg',
                      lambda i, rng: b'not a jpeg' if i in (5, 20) else jpeg(i, rng))
  fake_imagenet.write(str(tmp_path / 'manual'), per_class=12, num_val=29)
  tfds.builder('imagenet2012', data_dir=str(tmp_path / 'tfds')).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  # 48 training images, 2 of them unreadable: 6 steps of 8 per epoch.
  result = run_main(tmp_path / 'run', '--config.data.name=imagenet2012',
                    '--config.data.eval_split=validation', '--config.model.num_classes=1000',
                    '--config.batch_size=8', '--config.eval_batch_size=8', '--config.max_steps=12',
                    '--config.log_every_steps=6', '--config.eval_every_steps=1000',
                    env={'TFDS_DATA_DIR': str(tmp_path / 'tfds')})
  rows = [r for r in curves.read(tmp_path / 'run') if 'train/skipped_examples' in r]
  assert [(r['step'], r['train/skipped_examples']) for r in rows] == [(6, 2), (12, 2)]
  assert 'skipped 2 unreadable images' in result.stderr
