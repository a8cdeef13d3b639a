"""The training system end to end on the offline digits, with the tiny test config."""
import hashlib
import json
import pathlib
import signal
import time

import jax
import numpy as np
import pytest

from hvt_jax import loading
from hvt_jax.model_dir import save_model
from hvt_jax.training import checkpoint, curves
from tests import tiny_config
from tests.helpers import run_main


def params_of(workdir, **kw):
  _, params = loading.load(str(workdir), sharding='cpu', **kw)
  return jax.tree.map(np.asarray, params)


def test_loss_falls_and_everything_is_written(tmp_path):
  run_main(tmp_path, '--config.max_steps=24')
  rows = curves.read(tmp_path)
  losses = [r['train/loss'] for r in rows if 'train/loss' in r]
  assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses
  evals = [r for r in rows if 'eval/top1' in r]
  assert [r['step'] for r in evals] == [8, 16, 24]
  assert evals[-1]['eval/examples'] == 300 and evals[-1]['eval_ema/examples'] == 300
  assert evals[-1]['eval/top1'] > 20  # chance is 10%
  train_row = [r for r in rows if 'train/images_per_sec_per_device' in r][-1]
  assert train_row['train/images_per_sec_per_device'] > 0 and train_row['train/lr'] > 0
  assert (tmp_path / 'curves.png').stat().st_size > 10_000
  assert list(tmp_path.glob('events.out.tfevents.*'))  # TensorBoard
  assert json.loads((tmp_path / 'config.json').read_text())['model']['depth'] == 4
  mngr = checkpoint.manager(str(tmp_path), read_only=True)
  assert 24 in mngr.all_steps() and mngr.best_step() in (8, 16, 24)
  saved = loading.resolve(str(tmp_path))
  meta = saved.meta
  assert saved.step == 24 and saved.params_dir.endswith('/checkpoints/24/params')
  assert meta['class_names'] == [str(i) for i in range(10)] and meta['preprocess']['crop_pct'] == 0.875


def _wait_for_checkpoint(proc, workdir, step, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if (pathlib.Path(workdir) / 'checkpoints' / str(step) / 'commit_success.txt').exists():
      return
    if proc.poll() is not None:
      raise AssertionError(f'run ended early:\n{proc.stdout.read()[-3000:]}')
    time.sleep(0.2)
  raise AssertionError(f'no checkpoint at step {step} within {timeout}s')


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
  whole, broken = tmp_path / 'whole', tmp_path / 'broken'
  run_main(whole, '--config.max_steps=16')
  proc = run_main(broken, '--config.max_steps=16', wait=False)
  _wait_for_checkpoint(proc, broken, 8)
  proc.kill()  # SIGKILL: no chance to save anything more
  proc.wait()
  assert checkpoint.manager(str(broken), read_only=True).latest_step() < 16
  resumed = run_main(broken, '--config.max_steps=16')
  assert 'Resumed' in resumed.stderr
  a, b = params_of(whole), params_of(broken)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jax.tree.leaves(params_of(whole, ema=True))[0],
                             jax.tree.leaves(params_of(broken, ema=True))[0], rtol=1e-6, atol=1e-7)


# The paper recipe's flip, RandAugment and random erasing, which run inside the train step,
# and the crop's resize there too, as on an accelerator (the digits are 32 x 32: some windows
# fit the canvas, the others come resized by the host).
DEVICE_AUG = ('--config.aug.flip=True', '--config.aug.randaugment=rand-m9-mstd0.5-inc1',
              '--config.aug.random_erase=0.25', '--config.aug.resize_on=device',
              '--config.aug.window_canvas=24')


@pytest.mark.slow
def test_resume_with_device_augmentation_is_bit_exact(tmp_path):
  """Each example's augmentation follows from the run seed and its place in the stream, so a run
  stopped after a checkpoint and resumed ends with the very parameters of one that was not."""
  whole, resumed = tmp_path / 'whole', tmp_path / 'resumed'
  run_main(whole, '--config.max_steps=8', *DEVICE_AUG)
  run_main(resumed, '--config.max_steps=4', *DEVICE_AUG)
  assert checkpoint.manager(str(resumed), read_only=True).latest_step() == 4
  assert 'Resumed' in run_main(resumed, '--config.max_steps=8', *DEVICE_AUG).stderr
  for x, y in zip(jax.tree.leaves(params_of(whole)), jax.tree.leaves(params_of(resumed))):
    np.testing.assert_array_equal(x, y)
  # And the augmentation is on: the same run without it ends elsewhere.
  plain = tmp_path / 'plain'
  run_main(plain, '--config.max_steps=8')
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params_of(whole)),
                                                      jax.tree.leaves(params_of(plain))))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  proc = run_main(tmp_path, '--config.max_steps=100000', '--config.checkpoint_every_steps=1000',
                  '--config.eval_every_steps=1000', wait=False)
  _wait_for_log(proc, ' loss ')  # the console's step line
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-2000:]
  assert 'rerun the same command to resume' in out
  step = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert step is not None and 4 <= step < 100000


def _wait_for_log(proc, text, timeout=300):
  deadline = time.time() + timeout
  for line in proc.stdout:
    if text in line:
      return
    if time.time() > deadline:
      break
  raise AssertionError(f'{text!r} never appeared in the log')


def test_bad_config_key_is_one_clear_line_and_creates_nothing(tmp_path):
  result = run_main(tmp_path / 'run', '--config.optim.lr_typo=1', check=False, timeout=120)
  assert result.returncode != 0
  assert 'lr_typo' in result.stderr and 'Traceback' not in result.stderr
  assert not (tmp_path / 'run').exists()


def _digest(directory):
  h = hashlib.sha256()
  for f in sorted(pathlib.Path(directory).rglob('*')):
    if f.is_file():
      h.update(f.name.encode() + f.read_bytes())
  return h.hexdigest()


def test_corrupt_checkpoint_is_a_clear_error_and_loses_nothing(tmp_path):
  run_main(tmp_path, '--config.max_steps=8')
  step_dir = tmp_path / 'checkpoints' / '8' / 'params'
  for f in step_dir.rglob('*'):
    if f.is_file() and 'manifest' in f.name:
      f.write_bytes(b'\0' * 10)
  before = _digest(tmp_path / 'checkpoints')
  result = run_main(tmp_path, '--config.max_steps=16', check=False)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('main: error: cannot restore the checkpoint at') and '/8' in last, last
  assert 'Traceback' not in result.stderr
  assert _digest(tmp_path / 'checkpoints') == before


def test_a_changed_config_needs_a_new_workdir(tmp_path):
  run_main(tmp_path, '--config.max_steps=4', '--config.eval_every_steps=4')
  result = run_main(tmp_path, '--config.max_steps=8', '--config.model.depth=5', check=False)
  assert result.returncode != 0 and 'different model' in result.stderr.strip().splitlines()[-1]


def test_eval_only_from_a_model_dir(tmp_path):
  from hvt_jax import model as model_lib
  model = model_lib.HVT(**tiny_config.get_config().model)
  model_dir = save_model(str(tmp_path / 'model'), model,
                          model_lib.init_params(model, jax.random.key(3)))
  run_main(tmp_path / 'eval', '--config.eval_only=True', f'--config.init_from={model_dir}')
  results = json.loads((tmp_path / 'eval' / 'eval_results.json').read_text())
  assert results['step'] == 0 and results['eval/examples'] == 300
  assert 0 <= results['eval/top1'] <= results['eval/top5'] <= 100
  assert not (tmp_path / 'eval' / 'checkpoints').exists() or not list(
      (tmp_path / 'eval' / 'checkpoints').iterdir())
  result = run_main(tmp_path / 'empty', '--config.eval_only=True', check=False)
  assert 'has no checkpoint; pass --config.init_from' in result.stderr.strip().splitlines()[-1]


def test_init_from_keeps_a_fresh_head_for_another_class_count(tmp_path):
  import optax
  from hvt_jax import model as model_lib
  from hvt_jax import sharding
  from hvt_jax.training import loop, train_step
  config = tiny_config.get_config()
  source = model_lib.HVT(**{**config.model, 'num_classes': 5})
  source_params = model_lib.init_params(source, jax.random.key(7))
  model_dir = save_model(str(tmp_path / 'src'), source, source_params)
  model = model_lib.HVT(**config.model)
  mesh = sharding.make_mesh((('data', -1),))
  state, shardings = train_step.create_state(model, optax.sgd(0.1), jax.random.key(0), ema=True,
                                             mesh=mesh)
  started = loop._start_from(state, model_dir, shardings)
  assert model_lib.stacked_runs(started.params) == [(1, 3)]  # the run's layout is kept
  assert jax.tree.map(lambda a: a.sharding, started.params) == shardings.params
  per_block = train_step.per_block(started.params)
  for name in ('blocks_1', 'blocks_2', 'blocks_3'):
    np.testing.assert_array_equal(per_block[name]['mlp']['fc1']['kernel'],
                                  source_params[name]['mlp']['fc1']['kernel'])
  np.testing.assert_array_equal(started.ema_params['pos_embed'], source_params['pos_embed'])
  assert started.params['head']['kernel'].shape == (32, 10)
  np.testing.assert_array_equal(started.params['head']['kernel'], state.params['head']['kernel'])
  narrower = model_lib.HVT(**{**config.model, 'head_dim': 8})
  other_dir = save_model(str(tmp_path / "other"), narrower,
                          model_lib.init_params(narrower, jax.random.key(1)))
  with pytest.raises(loop.TrainError, match='does not fit this model'):
    loop._start_from(state, other_dir, shardings)


def test_a_relative_workdir_saves_under_the_current_directory(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  monkeypatch.chdir(tmp_path)  # Orbax refuses relative paths; `--workdir=runs/x` must still work
  mngr = checkpoint.manager('run')
  mngr.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave({'w': np.ones(2)})))
  mngr.wait_until_finished()
  assert (tmp_path / 'run' / 'checkpoints' / '1' / 'params').is_dir()


def _tiny_state():
  import optax
  from hvt_jax import model as model_lib
  from hvt_jax import sharding
  from hvt_jax.training import train_step
  model = model_lib.HVT(**tiny_config.get_config().model)
  state, shardings = train_step.create_state(model, optax.sgd(0.1), jax.random.key(0), ema=True,
                                             mesh=sharding.make_mesh((('data', -1),)))
  return model, state.replace(step=jax.numpy.asarray(4, jax.numpy.int32)), shardings


def test_a_step_saved_with_the_old_data_item_resumes_and_loads(tmp_path):
  """Steps written before the input position followed from the step held a `data` item."""
  import contextlib
  import orbax.checkpoint as ocp
  from hvt_jax.training import train_step
  model, state, shardings = _tiny_state()
  saved = train_step.per_block(state)  # that version's train state held every block by name
  old = ocp.CheckpointManager(tmp_path / 'checkpoints',
                              item_names=('params', 'ema_params', 'opt', 'data', 'model'))
  old.save(4, args=ocp.args.Composite(
      params=ocp.args.StandardSave(saved.params),
      ema_params=ocp.args.StandardSave(saved.ema_params),
      opt=ocp.args.StandardSave({'opt_state': saved.opt_state, 'step': saved.step,
                                 'rng': saved.rng}),
      data=ocp.args.JsonSave([{'step': 4, 'epoch': 0, 'batch_size': 32, 'process_count': 1,
                               'seed': 0}]),
      model=ocp.args.JsonSave({'model': model.config(), 'class_names': None})))
  old.wait_until_finished()
  old.close()
  fresh = state.replace(step=jax.numpy.zeros((), jax.numpy.int32),
                        params=jax.tree.map(jax.numpy.zeros_like, state.params))
  with contextlib.closing(checkpoint.manager(str(tmp_path))) as mngr:
    restored, processes = checkpoint.restore_train(mngr, 4, fresh, shardings)
  assert int(restored.step) == 4 and processes is None  # that version did not note it
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  loaded_model, params = loading.load(str(tmp_path), ema=True)
  assert loaded_model == model
  np.testing.assert_array_equal(params['head']['kernel'], state.ema_params['head']['kernel'])


def test_a_stacked_train_state_is_saved_block_by_block_and_restored_stacked(tmp_path):
  """Runs keep scanned blocks stacked; checkpoints and everything loaded name every block."""
  import contextlib
  from hvt_jax import model as model_lib
  from hvt_jax.training import train_step
  model, state, shardings = _tiny_state()
  assert model_lib.stacked_runs(state.params) == model.scanned_runs() == [(1, 3)]
  state = state.replace(params=jax.tree.map(lambda a: a + 1.0, state.params))  # EMA differs
  with contextlib.closing(checkpoint.manager(str(tmp_path))) as mngr:
    checkpoint.save_train(mngr, state, {'model': model.config()})
    mngr.wait_until_finished()
  for ema, expected in ((False, state.params), (True, state.ema_params)):
    loaded_model, params = loading.load(str(tmp_path), ema=ema)
    assert jax.tree.structure(params) == jax.tree.structure(model_lib.abstract_params(model))
    jax.tree.map(np.testing.assert_array_equal, params, model_lib.unstack_blocks(expected))
  fresh = jax.tree.map(jax.numpy.zeros_like, state)
  with contextlib.closing(checkpoint.manager(str(tmp_path), read_only=True)) as mngr:
    restored, _ = checkpoint.restore_train(mngr, 4, fresh, shardings)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert jax.tree.map(lambda a: a.sharding, restored) == shardings
  assert train_step.per_block(state.params).keys() == params.keys()


def test_a_resume_on_another_process_count_warns(tmp_path, caplog):
  import contextlib
  from hvt_jax.training import loop
  model, state, shardings = _tiny_state()
  with contextlib.closing(checkpoint.manager(str(tmp_path))) as mngr:
    checkpoint.save_train(mngr, state, {'model': model.config()})
  with contextlib.closing(checkpoint.manager(str(tmp_path), read_only=True)) as mngr:
    assert checkpoint.restore_train(mngr, 4, state, shardings)[1] == 1
  meta_file = tmp_path / 'checkpoints' / '4' / '_CHECKPOINT_METADATA'
  meta = json.loads(meta_file.read_text())
  meta['custom_metadata']['process_count'] = 2  # as if a 2-process run had saved it
  meta_file.write_text(json.dumps(meta))
  with contextlib.closing(checkpoint.manager(str(tmp_path))) as mngr:
    resumed = loop._resume(mngr, 4, state, shardings)
  assert int(resumed.step) == 4
  assert 'saved by 2 processes, now 1' in caplog.text and 'batches differ' in caplog.text
