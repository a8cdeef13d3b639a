import importlib.util
import json

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
import pytest

from hvt_jax import cli, defaults
from hvt_jax.data import input_spec
from hvt_jax import model as model_lib
from hvt_jax.model_dir import save_model
from hvt_jax.errors import UserError
from tests.helpers import REPO


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
  assert (config.mix.mixup, config.mix.cutmix, config.mix.label_smoothing) == (0.8, 1.0, 0.1)
  assert (config.mix.mix_prob, config.mix.switch_prob) == (1.0, 0.5)
  assert input_spec.eval_transform(config.eval) == input_spec.eval_transform() == dict(
      crop_pct=0.875, interpolation='bicubic', mean=[0.485, 0.456, 0.406],
      std=[0.229, 0.224, 0.225])
  assert config.ema_decay == 0.99996 and config.model.drop_path == 0.1


def test_dataset_and_recipe_args():
  config = get_config('hvt_s', 'stages=2,data=cifar100,recipe=plain,epochs=100')
  assert (config.data.name, config.model.num_classes, config.data.eval_split) == (
      'cifar100', 100, 'test')
  assert config.num_epochs == 100 and config.model.pool_every == 6
  assert (config.aug.randaugment, config.mix.mixup, config.aug.repeated_aug) == ('', 0.0, 1)
  assert config.mix.cutmix == 0.0
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


# Every shipped config, with its arguments where they change the key set or value types.
SHIPPED = ['configs/demo.py', 'configs/hvt_s.py', 'configs/hvt_s.py:stages=0,recipe=plain',
           'configs/hvt_ti.py', 'configs/hvt_ti.py:model=deit-ti,data=cifar100',
           'tests/tiny_config.py']


def parse(spec, *overrides):
  """The config `python -m hvt_jax.main --config=spec *overrides` trains with."""
  argv = ['main', f'--config={REPO / spec}', *overrides]
  values = flags.FlagValues()
  # As main.py defines it; config_flags finds the overrides in argv (else in sys.argv).
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def leaves(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield prefix + key, value


def other(value):
  """A value of the same form that differs from `value`; None stands for a str placeholder."""
  if value is None:
    return '/tmp/elsewhere'
  if isinstance(value, bool):
    return not value
  if isinstance(value, (int, float)):
    return value + 1 if isinstance(value, int) else value + 0.5
  if isinstance(value, str):
    return value + '_x'
  assert isinstance(value, tuple), value
  return tuple(other(v) for v in value)


@pytest.mark.parametrize('spec', SHIPPED)
def test_every_leaf_key_can_be_set_from_the_command_line(spec):
  config = parse(spec)
  wanted = {key: other(value) for key, value in leaves(config.to_dict())}
  assert {'data.data_dir', 'data.manual_dir', 'eval.mean', 'mix.mixup', 'mesh'} <= set(wanted)
  args = [f'--config.{key}={value if isinstance(value, str) else repr(value)}'
          for key, value in wanted.items()]
  changed = dict(leaves(parse(spec, *args).to_dict()))
  assert changed == wanted
  # ... and the config still saves as the workdir's config.json does.
  assert json.loads(parse(spec, *args).to_json_best_effort())['data']['data_dir'] == (
      '/tmp/elsewhere')


def test_old_keys_name_their_new_place():
  for old, new in defaults.MOVED_KEYS.items():
    with pytest.raises((AttributeError, KeyError)) as e:  # what cli.run turns into one line
      parse('tests/tiny_config.py', f'--config.{old}=1')
    argv = ['main', '--config=tests/tiny_config.py', f'--config.{old}=1']
    assert cli.override_error_line(e.value, argv) == f'config key {old} moved: use --config.{new}'
    assert parse('tests/tiny_config.py', f'--config.{new}=1')  # the new key exists
  assert len(defaults.MOVED_KEYS) == 8
  with pytest.raises((AttributeError, KeyError)) as e:
    parse('tests/tiny_config.py', '--config.mix.mixupp=1')
  assert cli.override_error_line(e.value, ['main', '--config.mix.mixupp=1']) == (
      "no config key 'mixupp' (in --config.mix.mixupp); Did you mean \"mixup\" instead of "
      '"mixupp"?')
  with pytest.raises((AttributeError, KeyError)) as e:
    parse('tests/tiny_config.py', '--config.mix.zzz=1')
  assert cli.override_error_line(e.value, ['main', '--config.mix.zzz=1']) == (
      "no config key 'zzz' (in --config.mix.zzz); the config file lists the valid keys.")


@pytest.mark.parametrize('old', sorted(defaults.MOVED_KEYS))
def test_a_config_file_setting_a_moved_key_is_refused(old, tmp_path):
  from hvt_jax.training import loop
  config = get_config('demo')
  group, key = old.split('.')
  config[group][key] = 0.5  # as a config file written for the old layout would
  with pytest.raises(UserError, match=f'sets {old}, which has moved to {defaults.MOVED_KEYS[old]}'):
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_workdir_of_the_old_layout_still_resumes(tmp_path):
  from hvt_jax.training import loop
  config = get_config('demo')
  new = json.loads(config.to_json_best_effort())
  old = {**new, 'aug': {**new['aug'], **new['mix'], 'mean': new['eval']['mean'],
                        'std': new['eval']['std'], 'eval_crop_pct': new['eval']['crop_pct']}}
  del old['mix'], old['eval']
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(old))
  loop.check_or_write_config(str(tmp_path), config)  # same run: no error
  config.mix.label_smoothing = 0.2
  with pytest.raises(loop.TrainError, match='different mix;'):
    loop.check_or_write_config(str(tmp_path), config)


def test_a_resume_may_change_how_the_model_runs_but_not_what_it_is(tmp_path):
  from hvt_jax.training import loop
  config = get_config('demo')
  saved = json.loads(config.to_json_best_effort())
  for field in model_lib.RUN_SETTINGS:  # a workdir from before these fields existed
    del saved['model'][field]
  (tmp_path / loop.CONFIG_FILE).write_text(json.dumps(saved))
  config.model.remat, config.model.scan_blocks = True, 'false'
  loop.check_or_write_config(str(tmp_path), config)  # same model, run another way: no error
  config.model.depth += 1
  with pytest.raises(loop.TrainError, match='different model;'):
    loop.check_or_write_config(str(tmp_path), config)


@pytest.fixture
def model_dir(tmp_path):
  model = model_lib.create('hvt-ti-1')
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), model_lib.abstract_params(model))
  return save_model(str(tmp_path / 'ti'), model, params)


def test_finetune_is_deits_384_recipe_from_saved_weights(model_dir):
  config = get_config('finetune', f'init_from={model_dir},data=cifar100')
  assert set(config.keys()) == set(defaults.train_config().keys())
  assert config.init_from == model_dir and config.model.image_size == 384
  assert config.model.pool_every == 12 and config.model.num_heads == 3  # the saved architecture
  assert config.model.num_classes == 100
  assert (config.optim.lr, config.optim.min_lr, config.optim.weight_decay) == (5e-6, 5e-6, 1e-8)
  assert (config.batch_size, config.optim.lr_base_batch, config.num_epochs) == (512, 512, 30)
  with pytest.raises(UserError, match='needs init_from=DIR'):
    get_config('finetune')
  with pytest.raises(UserError, match='/nonexistent/m: no such model dir or workdir'):
    get_config('finetune', 'init_from=/nonexistent/m')
  with pytest.raises(UserError, match='image size 380 is not divisible by patch size 16'):
    model_lib.HVT(**get_config('finetune', f'init_from={model_dir},size=380').model
                  ).tokens_per_block()
