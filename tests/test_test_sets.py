"""eval_only on ImageNet's other test sets, built small and fake by their real TFDS builders.

The model always predicts one class (its head is a bias), so the expected accuracies follow
from the labels alone.
"""
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from hvt_jax import defaults
from hvt_jax import model as model_lib
from hvt_jax.model_dir import save_model
from hvt_jax.training import loop
from tests import fake_imagenet
from tests.helpers import TINY_MODEL

CLASS = 7  # what the model always predicts


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  model = model_lib.create({**TINY_MODEL, 'image_size': 16, 'num_classes': 1000})
  params = model_lib.init_params(model, jax.random.key(0))
  params['head'] = {'kernel': np.zeros_like(params['head']['kernel']),
                    'bias': 10 * np.eye(1000, dtype=np.float32)[CLASS]}
  return save_model(str(tmp_path_factory.mktemp('m') / 'model'), model, params)


def _eval(name, data_dir, model_dir, workdir, manual_dir=None):
  config = defaults.train_config()
  config.model = model_lib.variant('hvt-s-1', **{**TINY_MODEL, 'image_size': 16, 'num_classes': 1000})
  defaults.use_dataset(config, name)
  config.data.update(data_dir=str(data_dir), manual_dir=manual_dir)
  config.update(eval_only=True, init_from=model_dir, eval_batch_size=8)
  loop.train_and_evaluate(config, str(workdir))
  return json.loads((workdir / 'eval_results.json').read_text())


def test_imagenet2012_real(tmp_path, model_dir, monkeypatch):
  manual = tmp_path / 'manual'
  val = fake_imagenet.write(str(manual), per_class=1, num_val=12)['validation']
  labels = [val[i] for i in sorted(val)]  # in file-name order
  # ReaL labels per validation image: none (left out), the predicted class, or others.
  real = [[], [CLASS], [CLASS, 3], [4], [], [CLASS], [5, 6], [1], [2], [CLASS], [0], [9]]
  (tmp_path / 'real.json').write_text(json.dumps(real))
  url = 'https://raw.githubusercontent.com/google-research/reassessed-imagenet/master/real.json'
  original = tfds.download.DownloadManager.download

  def download(self, urls):  # only real.json is downloaded; tests never use the network
    return str(tmp_path / 'real.json') if urls == url else original(self, urls)

  monkeypatch.setattr(tfds.download.DownloadManager, 'download', download)
  results = _eval('imagenet2012_real', tmp_path / 'tfds', model_dir, tmp_path / 'run',
                  str(manual))
  assert results['eval/examples'] == 12
  assert results['eval/top1'] == pytest.approx(100 * labels.count(CLASS) / 12)
  assert results['eval/real_examples'] == 10  # the two without ReaL labels are left out
  assert results['eval/real_top1'] == pytest.approx(100 * 4 / 10)


def test_imagenet_v2(tmp_path, model_dir, monkeypatch):
  root = tmp_path / 'v2'
  labels = [CLASS, CLASS, 3, 999, 0]
  for k, label in enumerate(labels):
    folder = root / 'imagenetv2-matched-frequency-format-val' / str(label)
    folder.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (20, 24), fake_imagenet.color(k)).save(folder / f'{k}.jpeg')
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      lambda self, url: str(root))
  results = _eval('imagenet_v2', tmp_path / 'tfds', model_dir, tmp_path / 'run')
  assert results['eval/examples'] == 5
  assert results['eval/top1'] == pytest.approx(100 * 2 / 5)
  assert 'eval/real_top1' not in results


@pytest.mark.parametrize('name,split', [('imagenet_v2', 'test'), ('imagenet2012_real', 'validation')])
def test_names_set_the_eval_split(name, split):
  config = defaults.use_dataset(defaults.train_config(), name)
  assert (config.data.eval_split, config.model.num_classes) == (split, 1000)
