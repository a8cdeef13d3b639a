"""Training and evaluating straight from image folders (ROOT/<split>/<class>/<image>).

Each image is a flat colour spelling its id (`fake_imagenet.color`), half JPEG and half PNG,
so the tests can follow every file through decoding, cropping and batching.
"""

import numpy as np
import pytest
from PIL import Image

from hvt_jax import defaults
from hvt_jax.data import datasets, folders, input_pipeline, sources
from hvt_jax import sharding
from hvt_jax.training import curves
from tests import fake_imagenet
from tests.fake_imagenet import ids_of, take
from tests.helpers import run, run_main

SIZE = 16
CLASSES = ('cat', 'dog', 'eel')


def _write_split(root, split, per_class, first_id):
  """per_class images per class; returns {id: label}."""
  ids, next_id = {}, first_id
  for label, name in enumerate(CLASSES):
    folder = root / split / name
    folder.mkdir(parents=True)
    for k in range(per_class):
      image = Image.new('RGB', (24 + k, 20), fake_imagenet.color(next_id))
      suffix = '.JPEG' if k % 2 else '.png'
      image.save(folder / f'img{next_id}{suffix}', quality=95)
      ids[next_id] = label
      next_id += 1
  return ids


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """ROOT with 24 train images (+ 1 corrupt, + 1 non-image file) and 12 val images."""
  root = tmp_path_factory.mktemp('folders')
  train = _write_split(root, 'train', 8, 0)
  val = _write_split(root, 'val', 4, 100)
  (root / 'train' / 'dog' / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  (root / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  return root, train, val


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh((('data', -1),))


def make_config(root, **aug):
  c = defaults.train_config()
  defaults.use_dataset(c, f'folder:{root}')
  c.data.shuffle_buffer = 16
  c.model.image_size = SIZE
  c.aug.update(**{'randaugment': '', 'random_erase': 0.0, 'repeated_aug': 1, **aug})
  c.batch_size = c.eval_batch_size = 8
  return c


def test_listing_classes_and_counts(tree):
  root, train, val = tree
  config = make_config(root)
  assert config.model.num_classes == 3 and config.data.eval_split == 'val'
  opened = datasets.open_dataset(config)
  assert (opened.num_train, opened.num_eval, opened.class_names) == (25, 12, CLASSES)  # the corrupt file is listed
  listing = folders.listing(config, 'train')
  assert listing.class_names == CLASSES
  assert not any(p.endswith('notes.txt') for p in listing.paths)
  assert list(listing.labels) == sorted(listing.labels)


def test_config_argument_folder_root(tree):
  from tests.test_configs import get_config
  config = get_config('hvt_s', f'data=folder:{tree[0]}')
  assert (config.data.name, config.data.data_dir, config.data.train_split,
          config.data.eval_split, config.model.num_classes) == ('folder', str(tree[0]), 'train',
                                                                'val', 3)


def test_one_epoch_has_every_decodable_image_once_with_its_label(tree, mesh):
  root, train, _ = tree
  config = make_config(root)
  # 25 files, one undecodable: the first 25 records of the stream are one epoch; the corrupt
  # file's row is marked not ok (the train step counts it) and every good file appears once.
  batches = take(input_pipeline.train_iterator(config, mesh), 4)
  rows = {k: np.concatenate([b[k] for b in batches])[:25] for k in ('image', 'label', 'ok')}
  assert list(rows['ok']).count(False) == 1
  good = rows['ok'].astype(bool)
  ids = fake_imagenet.decode_ids(rows['image'][good], config.eval.mean, config.eval.std)
  assert sorted(ids) == sorted(train)  # JPEG and PNG, each exactly once; the corrupt one left out
  assert [train[i] for i in ids] == list(rows['label'][good])


def test_a_quick_look_reads_only_the_first_records_of_the_share(tree):
  root, _, _ = tree
  config = make_config(root)
  opened = datasets.open_dataset(config)
  full = sources.split_source(config, opened, 'train', 1, 2)
  head = sources.split_source(config, opened, 'train', 1, 2, first=5)
  assert (full.num_examples, head.num_examples) == (12, 5)  # files 1, 3, ..., 23 of 25
  records = lambda source: [r['image'] for r in source.read(None).as_numpy_iterator()]
  assert records(head) == records(full)[:5]


def test_processes_share_disjoint_and_covering(tree, mesh):
  root, train, _ = tree
  config = make_config(root)
  listing = folders.listing(config, 'train')
  shares = [sources.folder_source(listing, i, 2) for i in range(2)]
  assert [s.num_examples for s in shares] == [13, 12]
  files = [set(r['image'] for r in s.read(None).as_numpy_iterator()) for s in shares]
  assert not files[0] & files[1] and len(files[0] | files[1]) == 25
  # Every process gets every class.
  for i in range(2):
    assert set(listing.labels[i::2]) == {0, 1, 2}


def test_resume_gives_identical_batches(tree, mesh):
  config = make_config(tree[0], random_erase=0.5)
  original = input_pipeline.train_iterator(config, mesh)
  take(original, 2)
  expected = take(original, 3)
  for a, b in zip(expected, take(input_pipeline.train_iterator(config, mesh, step=2), 3)):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_repeated_augmentation(tree, mesh):
  config = make_config(tree[0], repeated_aug=3)
  config.batch_size = 6
  ids = ids_of(take(input_pipeline.train_iterator(config, mesh), 2), config)
  assert set(np.unique(ids, return_counts=True)[1]) == {3}


@pytest.mark.parametrize('count', [1, 2])
def test_eval_counts_every_file_once(tree, mesh, count):
  root, _, val = tree
  config = make_config(root)
  seen, labels = [], []
  for index in range(count):
    for b in input_pipeline.eval_iterator(config, mesh, process_index=index, process_count=count):
      keep = np.asarray(b['mask']) == 1
      seen.extend(fake_imagenet.decode_ids(np.asarray(b['image'])[keep], config.eval.mean,
                                           config.eval.std))
      labels.extend(np.asarray(b['label'])[keep])
  assert sorted(seen) == sorted(val)
  assert [val[i] for i in seen] == labels


def test_undecodable_eval_file_is_named(tree, mesh):
  config = make_config(tree[0])
  config.data.eval_split = 'train'  # holds broken.jpg
  with pytest.raises(sources.InputError, match=r'cannot decode .*dog/broken.jpg: replace'):
    list(input_pipeline.eval_iterator(config, mesh))


def test_bad_folders_get_one_line(tmp_path):
  config = defaults.train_config()
  with pytest.raises(folders.FolderError, match=r'missing does not exist'):
    defaults.use_dataset(config, f'folder:{tmp_path / "missing"}')
  (tmp_path / 'empty' / 'train').mkdir(parents=True)
  with pytest.raises(folders.FolderError, match=r'empty/val is not a folder'):
    folders.class_names(str(tmp_path / 'empty'), 'val')
  with pytest.raises(folders.FolderError, match='has no class folders'):
    defaults.use_dataset(config, f'folder:{tmp_path / "empty"}')
  for split, names in (('train', ('a', 'b')), ('val', ('a', 'c'))):
    for name in names:
      (tmp_path / 'odd' / split / name).mkdir(parents=True)
      Image.new('RGB', (8, 8)).save(tmp_path / 'odd' / split / name / 'x.png')
  defaults.use_dataset(config, f'folder:{tmp_path / "odd"}')
  with pytest.raises(folders.FolderError, match=r"other classes .* missing \['b'\], extra \['c'\]"):
    datasets.open_dataset(config)
  (tmp_path / 'noimg' / 'train' / 'a').mkdir(parents=True)
  config.data.data_dir = str(tmp_path / 'noimg')
  with pytest.raises(folders.FolderError, match='holds no images'):
    datasets.open_dataset(config)
  config.data.data_dir = None
  with pytest.raises(folders.FolderError, match='needs the image folder'):
    datasets.open_dataset(config)


def test_train_from_folders_and_predict_names_the_classes(tree, tmp_path):
  root = tree[0]
  run_main(tmp_path, '--config.data.name=folder', f'--config.data.data_dir={root}',
           '--config.data.eval_split=val', '--config.model.num_classes=3', '--config.batch_size=8',
           '--config.max_steps=2', '--config.data.cache=False', timeout=600)
  assert [r['eval/examples'] for r in curves.read(tmp_path) if 'eval/examples' in r] == [12]
  out = run('predict', f'--model={tmp_path}', str(root / 'val' / 'eel' / 'img108.png'),
            timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert {line.split()[-1] for line in out.stdout.splitlines()[1:]} == set(CLASSES)
