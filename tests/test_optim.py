import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hvt_jax import defaults
from hvt_jax.training import optim
from hvt_jax import model as model_lib
from tests.helpers import TINY_MODEL


def _recipe_lr(epoch, peak, warmup=5, warmup_lr=1e-6, min_lr=1e-5, epochs=300):
  """The recipe's epoch-stepped scheduler, written out independently."""
  if epoch < warmup:
    return warmup_lr + epoch * (peak - warmup_lr) / warmup
  return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def test_lr_is_linearly_scaled_warmed_up_and_cosine_per_epoch():
  cfg = defaults.train_config().optim
  peak = optim.peak_lr(cfg, 1024)
  assert peak == 1e-3  # 5e-4 x 1024 / 512, as in the recipe
  schedule = optim.lr_schedule(cfg, 1024, num_epochs=300, steps_per_epoch=10)
  for step in [0, 9, 10, 25, 49, 50, 51, 1000, 2999]:
    assert math.isclose(float(schedule(step)), _recipe_lr(step // 10, peak), rel_tol=1e-5), step
  assert float(schedule(0)) == float(schedule(9))  # constant within an epoch
  assert math.isclose(float(schedule(3000)), 1e-5, rel_tol=1e-5)  # at the end: min_lr


def test_per_step_schedule_moves_every_step():
  cfg = defaults.train_config().optim
  cfg.lr_per_epoch = False
  schedule = optim.lr_schedule(cfg, 512, num_epochs=10, steps_per_epoch=10)
  assert float(schedule(1)) > float(schedule(0))
  assert math.isclose(float(schedule(15)), _recipe_lr(1.5, 5e-4, epochs=10), rel_tol=1e-5)


def test_weight_decay_skips_biases_norms_and_position_embeddings():
  params = model_lib.abstract_params(model_lib.HVT(**TINY_MODEL))
  mask = optim.decay_mask(params)
  assert mask['blocks_0']['attn']['qkv']['kernel'] and mask['patch_embed']['kernel']
  assert not mask['blocks_0']['attn']['qkv']['bias']
  assert not mask['blocks_0']['norm1']['scale']
  assert not mask['pos_embed'] and not mask['blocks_0']['pos_embed']
  assert not mask['blocks_2']['pos_embed']


def test_weight_decay_of_stacked_blocks_is_each_blocks():
  model = model_lib.HVT(**dict(TINY_MODEL, depth=4, pool_every=3))
  params = model_lib.init_params(model, jax.random.key(0))
  stacked = model_lib.stack_blocks(params, model.scanned_runs())
  mask = optim.decay_mask(stacked)['blocks_1_to_2']
  assert mask == optim.decay_mask(params)['blocks_1']
  assert mask['attn']['qkv']['kernel'] and not mask['attn']['qkv']['bias']


def test_adamw_decays_only_masked_leaves():
  cfg = defaults.train_config().optim
  params = {'w': jnp.ones((2, 2)), 'b': jnp.ones((2,)), 'pos_embed': jnp.ones((1, 2, 2))}
  tx = optim.make(cfg, lambda step: 0.1)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  assert float(new['w'][0, 0]) < 1.0  # decayed: w -= lr * wd * w
  np.testing.assert_allclose(new['w'], 1 - 0.1 * cfg.weight_decay, rtol=1e-6)
  assert float(new['b'][0]) == 1.0 and float(new['pos_embed'][0, 0, 0]) == 1.0


def test_grad_clip_changes_what_adam_sees():
  """Adam ignores a constant gradient scale, so clipping shows once the scale changes."""
  def two_updates(clip):
    cfg = defaults.train_config().optim
    cfg.update(grad_clip=clip, weight_decay=0.0)
    tx = optim.make(cfg, lambda step: 1.0)
    params = {'w': jnp.zeros((4,))}
    state = tx.init(params)
    for g in (100.0, 0.5):  # global norms 200 and 1
      updates, state = tx.update({'w': jnp.full((4,), g)}, state, params)
    return np.asarray(updates['w'])

  unclipped, clipped = two_updates(0.0), two_updates(1.0)
  assert not np.allclose(unclipped, clipped)
  # Clipped, both gradients have norm 1: Adam's second step is a full-size step again.
  np.testing.assert_allclose(np.abs(clipped), 1.0, rtol=1e-3)


class _Linear:
  """A stand-in for the HVT with one weight matrix: logits = flattened image @ w."""

  def apply(self, variables, images, **kwargs):
    return images.reshape(len(images), -1) @ variables['params']['w']


def test_ema_moves_toward_params():
  """The train step keeps `ema_decay` of the old EMA and takes the rest from the new weights."""
  from tests import tiny_config
  from hvt_jax.training import train_step
  config = tiny_config.get_config()
  config.ema_decay = 0.9
  size, classes = config.model.image_size, config.model.num_classes
  params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(size * size * 3, classes)),
                             jnp.float32)}
  tx = optax.sgd(0.0)  # the weights stay put, so the EMA's move is all there is to see
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                ema_params={'w': jnp.zeros_like(params['w'])},
                                opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
  batch = {'image': jnp.ones((2, size, size, 3), jnp.uint8), 'label': jnp.zeros((2,), jnp.int32),
           'example_id': jnp.zeros((2, 3), jnp.int32)}
  new, _ = train_step.train_step(state, batch, model=_Linear(), tx=tx, schedule=lambda _: 0.0,
                                 config=config)
  np.testing.assert_allclose(new.params['w'], params['w'])
  np.testing.assert_allclose(new.ema_params['w'], 0.1 * params['w'], rtol=1e-5, atol=1e-7)
