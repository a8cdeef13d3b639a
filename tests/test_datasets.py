"""Dataset lookup, preparation and the one-line errors; the offline `hvt_digits` builder."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from hvt_jax import defaults
from hvt_jax.data import datasets, digits, input_spec
from tests.helpers import run


def make_config(name, data_dir, **data):
  c = defaults.train_config()
  c.data.update(name=name, data_dir=str(data_dir), **data)
  return c


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  """hvt_digits prepared through `ensure_prepared`, the path training takes."""
  data_dir = tmp_path_factory.mktemp('tfds')
  b = datasets.ensure_prepared(make_config('hvt_digits', data_dir))
  assert b.is_prepared()
  return str(data_dir)


def load(data_dir, split):
  ds = tfds.load('hvt_digits', split=split, data_dir=data_dir, batch_size=-1)
  return tfds.as_numpy(ds)


def test_digits_sizes_and_classes(digits_dir):
  config = make_config('hvt_digits', digits_dir, eval_split='test')
  config.model.num_classes = 10
  dataset = datasets.open_dataset(config)
  assert (dataset.num_train, dataset.num_eval, len(dataset.class_names)) == (1497, 300, 10)
  assert dataset.class_names == tuple(str(i) for i in range(10))
  assert dataset.builder.is_prepared() and dataset.builder.data_dir.startswith(digits_dir)
  test = load(digits_dir, 'test')
  assert test['image'].shape == (300, 32, 32, 3) and test['image'].dtype == np.uint8
  assert all(28 <= n <= 32 for n in np.bincount(test['label']))  # stratified: ~30 per class
  # Gray digits: all three channels equal (up to JPEG chroma rounding), ink bright.
  assert np.abs(test['image'].astype(int) - test['image'][..., :1]).max() <= 3
  low, high = np.percentile(test['image'], [10, 90])
  assert low < 10 and high > 200


def test_model_meta_comes_from_the_opened_dataset(digits_dir):
  from hvt_jax import model as model_lib
  from hvt_jax.training import loop
  config = make_config('hvt_digits', digits_dir, eval_split='test')
  config.model.num_classes = 10
  config.eval.crop_pct = 0.5
  meta = loop.model_meta(config, model_lib.HVT(**config.model), datasets.open_dataset(config))
  assert meta['class_names'] == [str(i) for i in range(10)]
  assert meta['preprocess'] == input_spec.eval_transform(config.eval) == dict(
      crop_pct=0.5, interpolation='bicubic', mean=list(input_spec.IMAGENET_MEAN),
      std=list(input_spec.IMAGENET_STD))
  assert meta['model'] == dict(config.model) and meta['dataset'] == 'hvt_digits'


def test_digits_split_is_fixed_and_disjoint():
  a, b = digits.split_indices(), digits.split_indices()
  np.testing.assert_array_equal(a['test'], b['test'])
  assert len(a['train']) == 1497 and len(a['test']) == 300
  assert not set(a['train']) & set(a['test'])


def test_digits_are_learnable(digits_dir):
  """Images and labels line up: nearest-neighbour on raw pixels gets most test digits right."""
  train, test = load(digits_dir, 'train'), load(digits_dir, 'test')
  features = lambda d: d['image'][..., 0].reshape(len(d['label']), -1).astype(np.float32)
  a, b = features(test), features(train)
  distances = (a ** 2).sum(1)[:, None] - 2 * a @ b.T + (b ** 2).sum(1)[None]
  predicted = train['label'][distances.argmin(1)]
  assert np.mean(predicted == test['label']) > 0.9


def test_num_classes_mismatch(digits_dir):
  config = make_config('hvt_digits', digits_dir, eval_split='test')  # model: 1000 classes
  with pytest.raises(datasets.DataError, match=r'set --config.model.num_classes=10\.$'):
    datasets.open_dataset(config)


def test_bad_split(digits_dir):
  config = make_config('hvt_digits', digits_dir)  # default eval split: validation
  with pytest.raises(datasets.DataError) as e:
    datasets.open_dataset(config)
  assert "hvt_digits has no split 'validation' (its splits: " in str(e.value)
  assert '--config.data.eval_split' in str(e.value) and '\n' not in str(e.value)


def test_unknown_dataset(tmp_path):
  with pytest.raises(datasets.DataError) as e:
    datasets.builder('imagenet2013', str(tmp_path))
  assert str(e.value) == ("unknown dataset 'imagenet2013': set --config.data.name to a TFDS "
                          'image classification dataset, e.g. imagenet2012, cifar100 or '
                          'hvt_digits.')


def test_missing_imagenet_tars(tmp_path):
  config = make_config('imagenet2012', tmp_path / 'tfds')
  manual = os.path.join(tmp_path, 'tfds', 'downloads', 'manual')
  with pytest.raises(datasets.DataError) as e:
    datasets.ensure_prepared(config)
  message = str(e.value)
  assert '\n' not in message
  assert message == (
      f'imagenet2012 is not prepared in {tmp_path}/tfds and needs files downloaded by hand: put '
      'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from '
      f'https://image-net.org/download-images) in {manual}, then run: python -m '
      f'hvt_jax.prepare_data --dataset=imagenet2012 --data_dir={tmp_path}/tfds '
      f'--manual_dir={manual}')
  # With one tar there, the message names the other; a custom manual dir is used as given.
  os.makedirs(tmp_path / 'tars')
  (tmp_path / 'tars' / 'ILSVRC2012_img_val.tar').write_bytes(b'')
  config.data.manual_dir = str(tmp_path / 'tars')
  with pytest.raises(datasets.DataError, match=r'put ILSVRC2012_img_train.tar \(from .*\) in '
                     + str(tmp_path / 'tars')):
    datasets.ensure_prepared(config)


def run_tool(*args):
  return run('prepare_data', *args)


def test_prepare_data_cli(tmp_path, digits_dir):
  proc = run_tool('--dataset=imagenet2012', f'--data_dir={tmp_path}')
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('prepare_data: error: imagenet2012 is not prepared in')
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in last
  assert 'Traceback' not in proc.stderr

  proc = run_tool('--dataset=hvt_digits', f'--data_dir={digits_dir}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'hvt_digits: 10 classes; test: 300, train: 1497' in proc.stdout


def test_unreadable_imagenet_tars(tmp_path):
  config = make_config('imagenet2012', tmp_path / 'tfds', manual_dir=str(tmp_path / 'tars'))
  os.makedirs(tmp_path / 'tars')
  for name in datasets.IMAGENET_TARS:
    (tmp_path / 'tars' / name).write_bytes(b'not a tar')
  with pytest.raises(datasets.DataError) as e:
    datasets.ensure_prepared(config)
  assert str(e.value).startswith(f'a tar file in {tmp_path}/tars is unreadable (')
  assert 'download it again, then run: python -m hvt_jax.prepare_data' in str(e.value)
  assert '\n' not in str(e.value)
