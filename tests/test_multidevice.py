"""Sharded training on 8 virtual CPU devices, and two processes training together."""
import json

import numpy as np
import pytest

from hvt_jax.data import datasets
from tests import helpers, tiny_config

ONE_VS_EIGHT = r'''
import os
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
import json, jax, numpy as np
from hvt_jax import defaults, sharding
from hvt_jax.training import optim, train_step
from hvt_jax import model as model_lib

config = defaults.train_config()
config.model = model_lib.variant('hvt-s-1', image_size=16, patch_size=4, num_heads=2,
                                 head_dim=64, depth=4, pool_every=3, num_classes=10,
                                 drop_path=0.1)
config.batch_size = 16
config.optim.update(lr=1e-3, warmup_epochs=0)
config.mix.update(mixup=0.8, cutmix=1.0)
assert config.aug.randaugment and config.aug.random_erase and config.aug.flip  # on-device aug too
model = model_lib.HVT(**config.model)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)  # augmented in the step
ids = np.stack([np.zeros(16), np.ones(16), np.arange(16)], -1).astype(np.int32)
labels = rng.integers(0, 10, 16).astype(np.int32)
devices = jax.devices()
out = {}
for name, axes, devs in [('1', (('data', 1),), devices[:1]), ('8', (('data', 8),), devices),
                         ('fsdp', (('data', 4), ('fsdp', 2)), devices)]:
  mesh = sharding.make_mesh(axes, devs)
  schedule = optim.lr_schedule(config.optim, 16, 10, 10)
  tx = optim.make(config.optim, schedule)
  state, shardings = train_step.create_state(model, tx, jax.random.key(0), ema=True, mesh=mesh)
  p_train, p_eval = train_step.jit_steps(model, tx, schedule, config, shardings, mesh)
  put = lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x)
  batch = {'image': put(images), 'label': put(labels), 'example_id': put(ids)}
  losses = []
  for _ in range(2):
    state, metrics = p_train(state, batch)
    losses.append(float(metrics['loss']))
  qkv = state.params['blocks_0']['attn']['qkv']['kernel']
  stacked = state.params['blocks_1_to_2']['attn']['qkv']['kernel']  # blocks 1-2, scanned
  ev = p_eval(state.params, {**batch, 'mask': put(np.ones(16, np.float32))})
  out[name] = {'losses': losses, 'grad_norm': float(metrics['grad_norm']),
               'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
               'qkv_spec': str(qkv.sharding.spec), 'qkv_devices': len(qkv.sharding.device_set),
               'stacked_spec': list(stacked.sharding.spec),
               'eval_top1': float(ev['top1'])}
print('RESULT' + json.dumps(out))
'''


@pytest.mark.slow
def test_one_step_on_one_device_equals_eight_and_fsdp():
  out = helpers.run_on_devices(ONE_VS_EIGHT)
  one = out['1']
  for name in ('8', 'fsdp'):
    np.testing.assert_allclose(out[name]['losses'], one['losses'], rtol=1e-5)
    np.testing.assert_allclose(out[name]['grad_norm'], one['grad_norm'], rtol=1e-4)
    assert out[name]['eval_top1'] == one['eval_top1']
    for a, b in zip(out[name]['params'], one['params']):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert out['8']['qkv_spec'] == 'P()'  # data parallel: replicated weights
  assert 'fsdp' in out['fsdp']['qkv_spec'] and out['fsdp']['qkv_devices'] == 8
  # A scanned run's stacked leaves split like one block's, never across the blocks.
  assert out['fsdp']['stacked_spec'][0] is None and 'fsdp' in out['fsdp']['stacked_spec']


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
  # Several processes never build a dataset at once; a run prepares it first.
  datasets.ensure_prepared(tiny_config.get_config())
  port = helpers.free_port()
  procs = [helpers.run_main(tmp_path, '--config.max_steps=8',
                            f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                            f'--process_id={i}', wait=False,
                            env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert 'Process 1 of 2; 2 local / 4 global devices' in outs[1]
  assert 'on 4 devices' in outs[0]
  step_dir = tmp_path / 'checkpoints' / '8'
  assert not (step_dir / 'data').exists()  # the input position follows from the step
  # The process count is noted, for the warning of a resume on another count.
  assert json.loads((step_dir / '_CHECKPOINT_METADATA').read_text())['custom_metadata'] == {
      'process_count': 2}
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 8 and rows[-1]['eval/examples'] == 300
