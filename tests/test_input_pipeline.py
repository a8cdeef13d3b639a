"""The train/eval input on a real (tiny, fake) ImageNet prepared by TFDS's own builder.

Each fake image is a flat colour spelling its example id (`fake_imagenet`), so with colour
changing augmentations off the tests can tell exactly which examples a batch holds.
"""
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from hvt_jax import defaults
from hvt_jax.data import datasets, input_pipeline, sources
from hvt_jax import sharding
from tests import fake_imagenet
from tests import test_preprocess as preprocess_test
from tests.fake_imagenet import ids_of, take

SIZE = 16


@pytest.fixture(scope='module')
def imagenet(tmp_path_factory):
  """(data_dir, expected ids -> labels): 48 train images in 3 files, 29 validation images."""
  root = tmp_path_factory.mktemp('imagenet')
  manual = str(root / 'manual')
  expected = fake_imagenet.write(manual, per_class=12, num_val=29)
  b = tfds.builder('imagenet2012', data_dir=str(root / 'tfds'))
  # Several files per split, so sub-splits and the per-epoch file order are exercised.
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual, num_shards=3))
  return str(root / 'tfds'), expected


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh((('data', -1),))


def make_config(data_dir, **aug):
  c = defaults.train_config()
  c.data.update(name='imagenet2012', data_dir=data_dir, shuffle_buffer=16)
  c.model.image_size = SIZE
  c.model.num_classes = 1000
  # Colour-preserving augmentation only, so ids can be read back from the pixels.
  c.aug.update(**{'randaugment': '', 'random_erase': 0.0, 'repeated_aug': 1, **aug})
  c.batch_size = 8
  c.eval_batch_size = 8
  return c


def test_prepared_sizes(imagenet):
  data_dir, expected = imagenet
  config = make_config(data_dir)
  dataset = datasets.open_dataset(config)
  assert (dataset.num_train, dataset.num_eval, len(dataset.class_names)) == (48, 29, 1000)
  assert tfds.builder('imagenet2012', data_dir=data_dir).info.splits['train'].num_shards == 3


def test_iterators_read_the_dataset_the_run_opened(imagenet, mesh, monkeypatch):
  config = make_config(imagenet[0])
  dataset = datasets.open_dataset(config)
  monkeypatch.setattr(datasets, 'open_dataset', lambda c: pytest.fail('opened a second time'))
  monkeypatch.setattr(datasets, 'ensure_prepared', lambda c: pytest.fail('opened a second time'))
  assert next(input_pipeline.train_iterator(config, mesh, dataset=dataset))['image'].shape == (
      8, SIZE, SIZE, 3)
  assert input_pipeline.eval_iterator(config, mesh, dataset=dataset).num_examples == 29


def test_full_recipe_batches(imagenet, mesh):
  config = make_config(imagenet[0])
  config.aug.update(randaugment='rand-m9-mstd0.5-inc1', random_erase=0.25, repeated_aug=3)
  batch = next(input_pipeline.train_iterator(config, mesh))
  # The host only crops and resizes: uint8, as the device augments them (CONTRACT: issue 25).
  assert set(batch) == {'image', 'label', 'ok', 'example_id'}
  assert batch['image'].shape == (8, SIZE, SIZE, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['ok'].shape == (8,) and batch['ok'].dtype == np.bool_
  assert batch['example_id'].shape == (8, 3) and batch['example_id'].dtype == np.int32
  for key in batch:
    assert batch[key].sharding.is_equivalent_to(sharding.batch_sharding(mesh), batch[key].ndim)
  assert set(np.asarray(batch['label'])) <= set(imagenet[1]['train'].values())


def test_values_ids_and_labels(imagenet, mesh):
  data_dir, expected = imagenet
  config = make_config(data_dir)
  batches = take(input_pipeline.train_iterator(config, mesh), 6)  # 48 = one epoch
  assert all(b['image'].dtype == np.uint8 and b['ok'].all() for b in batches)
  # example_id: (process, epoch, position in the epoch's stream), here one process's epoch 0.
  example_ids = np.concatenate([b['example_id'] for b in batches])
  np.testing.assert_array_equal(example_ids, np.stack([np.zeros(48), np.zeros(48),
                                                       np.arange(48)], 1))
  ids = ids_of(batches, config)
  assert sorted(ids) == sorted(expected['train'])  # one epoch: each image exactly once
  labels = np.concatenate([b['label'] for b in batches])
  assert [expected['train'][i] for i in ids] == list(labels)


def test_deterministic_for_a_seed(imagenet, mesh):
  config = make_config(imagenet[0])
  first = take(input_pipeline.train_iterator(config, mesh), 8)
  again = take(input_pipeline.train_iterator(config, mesh), 8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['example_id'], b['example_id'])
  config.seed = 1
  other = take(input_pipeline.train_iterator(config, mesh), 8)
  assert not np.array_equal(ids_of(first, config), ids_of(other, config))
  # Epochs differ in order too.
  assert not np.array_equal(ids_of(first[:6], config), ids_of(take(
      input_pipeline.train_iterator(config, mesh, step=6), 6), config))


def test_augmentation_does_not_depend_on_thread_count(imagenet, mesh):
  config = make_config(imagenet[0])
  config.data.threads = 1
  one = take(input_pipeline.train_iterator(config, mesh), 2)
  config.data.threads = 3
  three = take(input_pipeline.train_iterator(config, mesh), 2)
  for a, b in zip(one, three):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['example_id'], b['example_id'])


def test_process_shards_disjoint_and_covering(imagenet, mesh):
  data_dir, expected = imagenet
  config = make_config(data_dir)
  shards = []
  for index in range(2):
    it = input_pipeline.train_iterator(config, mesh, process_index=index, process_count=2)
    batches = take(it, 6)  # 24 per process = one epoch at 4 rows per batch
    assert batches[0]['image'].shape == (4, SIZE, SIZE, 3)
    shards.append(ids_of(batches, config))
  assert len(set(shards[0])) == 24 and len(set(shards[1])) == 24
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(expected['train'])


@pytest.mark.parametrize('step', [3, 9, 13])  # mid first epoch; mid second; 13 * 8 > 2 epochs
def test_resume_gives_identical_batches(imagenet, mesh, step):
  # The flat-colour images crop alike; example_id, the device's seed, shows any seed slip.
  config = make_config(imagenet[0])
  original = input_pipeline.train_iterator(config, mesh)
  take(original, step)
  expected = take(original, 5)  # runs across an epoch boundary for every `step` above
  resumed = input_pipeline.train_iterator(config, mesh, step=step)
  for a, b in zip(expected, take(resumed, 5)):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    # The device's augmentation is seeded from example_id: resumed, it continues the same.
    np.testing.assert_array_equal(a['example_id'], b['example_id'])


def test_resume_on_another_process_count_keeps_the_epoch_and_position(imagenet, mesh):
  """Saved by 1 process at step 9 (72 examples: epoch 1, 24 into it), resumed by 2."""
  data_dir, expected = imagenet
  config = make_config(data_dir)
  step = 9
  for index in range(2):
    def stream(start):
      return input_pipeline.train_iterator(config, mesh, start, process_index=index,
                                           process_count=2)
    uninterrupted = stream(0)
    epochs = [ids_of(take(uninterrupted, 6), config) for _ in range(3)]  # 24 per process each
    resumed = ids_of(take(stream(step), 9), config)
    # 36 of this process's 24-example epochs done: epoch 1 from its 12th example, then epoch 2.
    np.testing.assert_array_equal(resumed[:12], epochs[1][12:])
    np.testing.assert_array_equal(resumed[12:], epochs[2])
    assert not np.array_equal(epochs[1], epochs[2])  # the epochs can be told apart


def test_repeated_augmentation(imagenet, mesh):
  config = make_config(imagenet[0], repeated_aug=3)
  config.batch_size = 12
  it = input_pipeline.train_iterator(config, mesh)
  for epoch in range(2):
    batches = take(it, 4)  # one epoch: 48 records
    ids = ids_of(batches, config)
    unique, counts = np.unique(ids, return_counts=True)
    assert len(unique) == 16 and set(counts) == {3}, (epoch, unique, counts)
    # The copies are augmented differently (each has its own position, so its own crop here
    # and its own seed on the device), and spread: no image twice in a row.
    assert np.all(ids[1:] != ids[:-1])
    example_ids = np.concatenate([b['example_id'] for b in batches])
    np.testing.assert_array_equal(example_ids[:, 1], epoch)
    np.testing.assert_array_equal(example_ids[:, 2], np.arange(48))
  # Each epoch picks a different third of the images.
  assert set(ids_of(take(input_pipeline.train_iterator(config, mesh), 4), config)) != set(ids)


def _rows(batches, count):
  """The first `count` rows of a stream of numpy batches, as one dict of arrays."""
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  return {k: v[:count] for k, v in rows.items()}


@pytest.mark.parametrize('canvas', [0, 48])
def test_repeated_copies_are_the_crops_of_their_positions(canvas):
  """With repeated augmentation an image is decoded once, whole, for its copies, and each
  copy cut from that: every example is exactly the crop its own position draws, of the record
  the layout puts there (copies a window apart, a shorter last window, the epoch cut to n),
  also when a run resumes inside a window, and an undecodable image leaves placeholders in
  all its copies' places."""
  config = defaults.train_config()
  config.model.image_size = 24
  config.data.update(threads=2, shuffle_buffer=64)
  n, k, batch = 23, 3, 9  # windows of 3 images: 3, 3 and 2 per epoch, 24 copies cut to 23
  images = [preprocess_test._encode(preprocess_test._photo(30 + i, 44 - i, seed=i), 'JPEG',
                                    quality=90) for i in range(n)]
  images[5] = b'not an image'
  source = sources.memory_source(np.array(images, dtype=object), np.arange(n, dtype=np.int64))

  def stream(repeats, start=0, count=2 * n):
    config.aug.repeated_aug = repeats
    ds = input_pipeline.train_dataset(source, config, process_index=0, local_batch=batch,
                                      start=start, canvas=canvas)
    return _rows(list(ds.take(count // batch + 2).as_numpy_iterator()), count)

  transform = input_pipeline._augment_fn(config, 0, canvas)  # one record, one position
  expected = []
  # Each epoch's shuffled records, as the unrepeated stream lists them (5 is a placeholder
  # there, refilled with a copy of another row: read its place from 'ok').
  once = stream(1, count=3 * n)
  for epoch in range(3):
    order = np.where(once['ok'], once['label'], 5)[epoch * n:epoch * n + math.ceil(n / k)]
    key = input_pipeline._key(config.seed, 0, epoch, input_pipeline._AUGMENT)
    sizes = [3, 3, 2]
    for m, r in enumerate(sizes):
      for j in range(k):
        for o in range(r):
          position = m * k * 3 + j * r + o
          if position < n:
            expected.append((epoch, position, order[m * 3 + o], key))
  assert [e[1] for e in expected[:n]] == list(range(n))

  cache = {}

  def reference(epoch, position, label, key):
    """The crop of the image decoded whole (what PIL decodes), then cropped and resized as
    `train_crop` does; a window decoded alone may differ at its edges."""
    if (epoch, position) not in cache:
      cache[epoch, position] = transform(
          key, tf.constant(epoch, tf.int64), tf.constant(position, tf.int64),
          {'image': tf.io.decode_jpeg(images[label], channels=3),
           'label': tf.constant(label)})['image'].numpy()
    return cache[epoch, position]

  # From the start, inside the last (shorter) window, mid-window in the second epoch.
  for start in (0, 22, 30):
    got = stream(k, start=start)
    for row, (epoch, position, label, key) in enumerate(expected[start:start + 2 * n]):
      assert tuple(got['example_id'][row]) == (0, epoch, position)
      assert got['ok'][row] == (label != 5), (start, row)
      if label == 5:
        continue
      assert got['label'][row] == label
      want = reference(epoch, position, label, key)
      if canvas:
        h, w = want.shape[:2]
        np.testing.assert_array_equal(got['window'][row], (h, w))
        assert not got['image'][row][h:].any() and not got['image'][row][:, w:].any()
        np.testing.assert_array_equal(got['image'][row][:h, :w], want)
      else:
        np.testing.assert_array_equal(got['image'][row], want)


@pytest.mark.parametrize('count', [1, 2])
def test_eval_sees_every_example_once(imagenet, mesh, count):
  data_dir, expected = imagenet
  config = make_config(data_dir)
  seen, labels, lengths = [], [], set()
  for index in range(count):
    batches = input_pipeline.eval_iterator(config, mesh, process_index=index, process_count=count)
    lengths.add(len(batches))
    for _ in range(2):  # re-iterable: a second pass gives the same examples
      passes = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
      assert len(passes) == len(batches)
    for b in passes:
      assert b['image'].shape == (8 // count, SIZE, SIZE, 3) and b['mask'].shape == (8 // count,)
      assert b['image'].dtype == np.uint8  # the device normalizes
      keep = b['mask'] == 1
      assert np.all(b['image'][~keep] == 0)
      seen.extend(fake_imagenet.decode_ids(b['image'][keep], config.eval.mean, config.eval.std))
      labels.extend(b['label'][keep])
  assert len(lengths) == 1  # every process the same number of batches
  assert sorted(seen) == sorted(expected['validation'])  # 29 = none missing, none twice
  assert [expected['validation'][i] for i in seen] == labels


def test_batch_size_errors(imagenet, mesh):
  config = make_config(imagenet[0])
  config.batch_size = 7
  with pytest.raises(sources.InputError, match='multiple of 2'):
    input_pipeline.train_iterator(config, mesh, process_index=0, process_count=2)
  config.eval_batch_size = 9  # eval pads instead: 5 rows for each of the 2 processes
  batches = input_pipeline.eval_iterator(config, mesh, process_index=1, process_count=2)
  assert next(iter(batches))['label'].shape == (5,)


def test_bad_split_is_one_line(imagenet, mesh):
  config = make_config(imagenet[0])
  config.data.eval_split = 'test'
  with pytest.raises(datasets.DataError) as e:
    input_pipeline.eval_iterator(config, mesh)
  assert "no split 'test'" in str(e.value) and 'data.eval_split' in str(e.value)
  assert '\n' not in str(e.value)


_EIGHT_DEVICES = textwrap.dedent('''
    import json, sys
    import numpy as np
    from hvt_jax import defaults
    from hvt_jax.data import datasets, input_pipeline, sources
    from hvt_jax import sharding
    import jax
    assert jax.device_count() == 8
    data_dir = sys.argv[1]
    c = defaults.train_config()
    c.data.update(name='imagenet2012', data_dir=data_dir, shuffle_buffer=16)
    c.model.image_size = 16
    c.model.num_classes = 1000
    c.batch_size = 16
    c.eval_batch_size = 24
    mesh = sharding.make_mesh((('data', 4), ('fsdp', 2)))
    batch = next(input_pipeline.train_iterator(c, mesh))
    # The same rows straight from tf.data, before placement.
    b = datasets.ensure_prepared(c)
    source = sources.tfds_source(b, sources.process_split('train', 0, 1))
    local = next(input_pipeline.train_dataset(source, c, process_index=0, local_batch=16)
                 .as_numpy_iterator())
    out = {}
    for key in ('image', 'label', 'example_id', 'ok'):
      arr = batch[key]
      assert arr.sharding == sharding.batch_sharding(mesh), arr.sharding
      np.testing.assert_array_equal(np.asarray(arr), local[key])
      out[key] = sorted((s.index[0].start, s.index[0].stop, s.device.id)
                        for s in arr.addressable_shards)
      for s in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), local[key][s.index])
    total = 0
    for e in input_pipeline.eval_iterator(c, mesh):
      assert e['mask'].sharding == sharding.batch_sharding(mesh)
      total += int(e['mask'].sum())
    out['eval_total'] = total
    print(json.dumps(out))
''')


def test_batches_on_an_eight_device_mesh(imagenet):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES, imagenet[0]], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert [r[:2] for r in out['image']] == [[2 * i, 2 * i + 2] for i in range(8)]
  assert len({r[2] for r in out['image']}) == 8  # every device holds its own 2 rows
  assert out['eval_total'] == 29


def test_resume_far_ahead_does_not_replay(imagenet, mesh):
  """Epoch 10**8 starts directly: nothing before the current epoch is read again."""
  config = make_config(imagenet[0])
  it = input_pipeline.train_iterator(config, mesh, step=6 * 10 ** 8 + 2)
  batch = take(it, 1)[0]
  assert batch['image'].shape == (8, SIZE, SIZE, 3)
  # The third batch of epoch 10**8 (6 batches per epoch), not of the first epoch.
  epoch_start = take(input_pipeline.train_iterator(config, mesh, step=6 * 10 ** 8), 3)[2]
  np.testing.assert_array_equal(batch['image'], epoch_start['image'])
  first_epoch = take(input_pipeline.train_iterator(config, mesh), 3)[2]
  assert not np.array_equal(ids_of([batch], config), ids_of([first_epoch], config))


def test_eval_with_more_processes_than_examples(imagenet, mesh):
  data_dir, expected = imagenet
  config = make_config(data_dir)
  config.data.eval_split = 'validation[:3]'
  seen = []
  for index in range(4):  # the 4th process has no example, yet yields its padding batch
    batches = list(input_pipeline.eval_iterator(config, mesh, process_index=index,
                                                process_count=4))
    assert len(batches) == 1
    keep = np.asarray(batches[0]['mask']) == 1
    seen.extend(fake_imagenet.decode_ids(np.asarray(batches[0]['image'])[keep],
                                         config.eval.mean, config.eval.std))
  assert len(seen) == len(set(seen)) == 3 and set(seen) <= set(expected['validation'])
