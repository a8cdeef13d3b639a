"""Gradient accumulation: k micro-batches make one optimizer update of the whole batch."""

import numpy as np
import pytest

from hvt_jax import defaults
from hvt_jax.training import train_step
from tests import helpers

# One update of a batch of 64, whole and as 4 micro-batches of 16, on the given mesh; with
# mixup and dropout off both see the same examples and labels, so the updates must agree.
SCRIPT = r'''
import json, sys
import jax, numpy as np
from hvt_jax import defaults, model as model_lib
from hvt_jax import sharding
from hvt_jax.training import optim, train_step

def one_update(accum_steps, axes, devices):
  config = defaults.train_config()
  config.model = model_lib.variant('hvt-s-1', image_size=16, patch_size=4, num_heads=2,
                                   head_dim=8, depth=2, pool_every=2, num_classes=5, drop_path=0.0)
  config.batch_size, config.accum_steps = 64, accum_steps
  config.optim.update(lr=1e-3, warmup_epochs=0)
  config.mix.update(mixup=0.0, cutmix=0.0)
  mesh = sharding.make_mesh(axes, jax.devices()[:devices])
  model = model_lib.HVT(**config.model)
  schedule = optim.lr_schedule(config.optim, 64, 10, 10)
  tx = optim.make(config.optim, schedule)
  state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True, mesh=mesh)
  p_train, _ = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
  rng = np.random.default_rng(0)
  put = lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x)
  # uint8, augmented in the step (the paper recipe's flip, RandAugment and erasing) before the
  # split into micro-batches, so both see the same images.
  batch = {'image': put(rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)),
           'label': put(rng.integers(0, 5, 64).astype(np.int32)),
           'example_id': put(np.stack([np.zeros(64), np.zeros(64), np.arange(64)],
                                      -1).astype(np.int32))}
  temp = p_train.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  state, metrics = p_train(state, batch)
  return {'step': int(state.step), 'loss': float(metrics['loss']), 'temp_bytes': temp,
          'top1': float(metrics['train_top1']), 'lr': float(metrics['lr']),
          'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
          'ema': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.ema_params)]}

out = {}
for name, axes, devices in [('1', (('data', 1),), 1), ('8', (('data', 4), ('fsdp', 2)), 8)]:
  out[name] = {k: one_update(k, axes, devices) for k in (1, 4)}
print('RESULT' + json.dumps(out))
'''


def test_four_micro_batches_of_16_equal_one_batch_of_64_on_one_and_eight_devices():
  out = helpers.run_on_devices(SCRIPT)
  for mesh in ('1', '8'):
    whole, accum = out[mesh]['1'], out[mesh]['4']
    assert whole['step'] == accum['step'] == 1  # one optimizer step, one schedule step
    assert whole['lr'] == accum['lr']
    np.testing.assert_allclose(accum['loss'], whole['loss'], rtol=1e-5)
    assert accum['top1'] == whole['top1']
    for tree in ('params', 'ema'):
      for a, b in zip(accum[tree], whole[tree]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Accumulating really runs smaller batches: the step's scratch memory shrinks.
  assert out['1']['4']['temp_bytes'] < out['1']['1']['temp_bytes']


@pytest.mark.parametrize('batch,k,devices,needle', [
    (64, 3, 1, 'does not divide batch_size=64'),
    (64, 0, 1, 'does not divide'),
    (64, 16, 8, 'make batch_size a multiple of 128'),
])
def test_bad_accum_steps_get_one_line(batch, k, devices, needle):
  with pytest.raises(train_step.AccumError, match=needle) as e:
    train_step.check_accum(batch, k, devices)
  assert '\n' not in str(e.value)


def test_micro_batches_are_strided_so_device_shares_stay_put():
  x = np.arange(8)
  micro = np.asarray(train_step.micro_batches(x, 2))
  # Device 0 holds rows 0-3 and device 1 rows 4-7: each feeds both micro-batches, 2 rows each.
  assert micro.tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_default_is_no_accumulation():
  assert defaults.train_config().accum_steps == 1
