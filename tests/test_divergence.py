"""A diverging run never saves a non-finite state, and says which checkpoint to resume from."""
import re

import jax
import numpy as np

from hvt_jax.training import checkpoint, curves
from tests.helpers import run_main
from tests.test_train import params_of

# 1497 digits / 192 = 7 steps per epoch. Epoch 0 runs at the tiny warmup lr; from step 8 on,
# the absurd peak lr blows the weights up. Saves every 5 steps and logs every 7 do not line up:
# step 5 is saved, step 7 is logged (still finite), the save at step 10 must be refused.
DIVERGING = ('--config.batch_size=192', '--config.optim.lr=1e30', '--config.optim.warmup_epochs=1',
             '--config.optim.lr_per_epoch=True', '--config.checkpoint_every_steps=5',
             '--config.log_every_steps=7', '--config.eval_every_steps=1000',
             '--config.max_steps=12')


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_divergence_stops_before_saving_and_names_the_last_good_checkpoint(tmp_path):
  result = run_main(tmp_path, *DIVERGING, check=False)
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  match = re.match(r'main: error: the loss or gradients became non-finite \(NaN/inf\) at step '
                   r'(\d+); stopped at step 10 without saving\. In (\S+), the last good checkpoint '
                   r'is step 5, which a rerun of the same command resumes from\.', last)
  assert match and 8 <= int(match.group(1)) <= 10 and match.group(2) == str(tmp_path), last
  assert checkpoint.manager(str(tmp_path), read_only=True).all_steps() == [5]
  assert _all_finite(params_of(tmp_path)) and _all_finite(params_of(tmp_path, ema=True))
  logged = [r for r in curves.read(tmp_path) if 'train/loss' in r]
  assert [r['step'] for r in logged] == [7] and np.isfinite(logged[0]['train/loss'])


def test_skip_nonfinite_keeps_the_last_finite_weights_and_counts_skips(tmp_path):
  run_main(tmp_path, *DIVERGING, '--config.skip_nonfinite=True')
  assert checkpoint.manager(str(tmp_path), read_only=True).latest_step() == 12
  assert _all_finite(params_of(tmp_path)) and _all_finite(params_of(tmp_path, ema=True))
  rows = {r['step']: r for r in curves.read(tmp_path) if 'train/loss' in r}
  assert rows[7]['train/skipped_updates'] == 0
  assert 3 <= rows[12]['train/skipped_updates'] <= 5, rows[12]
