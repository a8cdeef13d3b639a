import importlib.util

import pytest

from conftest import REPO
from hvt_jax import defaults
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError


def get_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert 'python -m hvt_jax.main --config=configs/' in module.__doc__  # the docstring shows how
  return module.get_config(arg)


@pytest.mark.parametrize('stages', range(5))
def test_hvt_s_reaches_every_published_variant(stages):
  config = get_config('hvt_s', f'stages={stages}')
  expected = model_lib.variant(f'hvt-s-{stages}', drop_path=0.1, dtype='auto')
  assert dict(config.model) == expected


@pytest.mark.parametrize('arg, name', [(None, 'hvt-ti-1'), ('model=deit-ti', 'deit-ti')])
def test_hvt_ti_variants(arg, name):
  assert dict(get_config('hvt_ti', arg).model) == model_lib.variant(name, drop_path=0.1,
                                                                    dtype='auto')


def test_paper_recipe_is_the_default():
  config = get_config('hvt_s')
  assert (config.data.name, config.model.num_classes, config.data.eval_split) == (
      'imagenet2012', 1000, 'validation')
  assert (config.batch_size, config.num_epochs, config.optim.weight_decay) == (1024, 300, 0.025)
  assert (config.optim.lr, config.optim.lr_base_batch, config.optim.warmup_epochs) == (5e-4, 512, 5)
  assert (config.aug.randaugment, config.aug.random_erase, config.aug.repeated_aug) == (
      'rand-m9-mstd0.5-inc1', 0.25, 3)
  assert (config.aug.mixup, config.aug.cutmix, config.aug.label_smoothing) == (0.8, 1.0, 0.1)
  assert config.ema_decay == 0.99996 and config.model.drop_path == 0.1


def test_dataset_and_recipe_args():
  config = get_config('hvt_s', 'stages=2,data=cifar100,recipe=plain,epochs=100')
  assert (config.data.name, config.model.num_classes, config.data.eval_split) == (
      'cifar100', 100, 'test')
  assert config.num_epochs == 100 and config.model.pool_every == 6
  assert (config.aug.randaugment, config.aug.mixup, config.aug.repeated_aug) == ('', 0.0, 1)
  assert get_config('demo').data.name == 'hvt_digits'


@pytest.mark.parametrize('arg, message', [
    ('stages=7', 'HVT-S has 0 to 4 pooling stages'),
    ('data=mnist', "data='mnist': choose one of"),
    ('recipe=fancy', "recipe='fancy': choose paper or plain"),
    ('stages=two', "'two' is not a int"),
    ('stage=2', 'expected key=value with key one of'),
])
def test_bad_arguments_say_what_to_do(arg, message):
  with pytest.raises(UserError, match=message):
    get_config('hvt_s', arg)


def test_every_key_a_config_file_sets_exists_in_the_defaults():
  keys = lambda c, p='': {p + k for k in c.keys()} | {
      x for k in c.keys() if hasattr(c[k], 'keys') for x in keys(c[k], f'{p}{k}.')}
  base = keys(defaults.train_config())
  for name in ('hvt_s', 'hvt_ti', 'demo'):
    assert keys(get_config(name)) == base, name
