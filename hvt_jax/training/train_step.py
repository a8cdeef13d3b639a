"""Train state, the jitted train and eval steps, and how they lie on the mesh.

Everything runs under `jax.jit` on global arrays: the batch is split over the
mesh, parameters are replicated (or FSDP-split), and XLA inserts the gradient
all-reduce. A mean over the global batch is therefore the true mean; no
per-device loss scaling is needed.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from hvt_jax.data import mixup
from hvt_jax.training import sharding
from hvt_jax import model as model_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  ema_params: Any  # None when EMA is off
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step), so resuming replays them


def init_state(model: model_lib.HVT, tx: optax.GradientTransformation, rng: jax.Array,
               ema: bool) -> TrainState:
  init_key, step_key = jax.random.split(rng)
  params = model_lib.init_params(model, init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params if ema else None, opt_state=tx.init(params),
                    rng=jax.random.key_data(step_key))


def state_shardings(abstract_state, mesh):
  """Every leaf (params, EMA, Adam moments) split like its parameter; scalars replicated."""
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(mesh, sharding.param_spec(x.shape, mesh)), abstract_state)


def create_state(model, tx, rng, *, ema: bool, mesh) -> tuple[TrainState, Any]:
  """A fresh state laid out on the mesh, and its shardings (for the steps and checkpoints)."""
  make = functools.partial(init_state, model, tx, ema=ema)
  shardings = state_shardings(jax.eval_shape(make, rng), mesh)
  return jax.jit(make, out_shardings=shardings)(rng), shardings


def train_step(state: TrainState, batch, *, model, tx, schedule: Callable, config) -> tuple:
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  mix_key, dropout_key = jax.random.split(step_key)
  images, targets = mixup.mix_from_config(mix_key, batch, config)

  def loss_fn(params):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': dropout_key})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    # step_size * new + (1 - step_size) * old: the EMA keeps `ema_decay` of its old value.
    ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
  metrics = {
      'loss': loss,
      'grad_norm': optax.global_norm(grads),
      'lr': schedule(state.step),
      # Against the unmixed labels: with mixup on, a rough signal only.
      'train_top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
  }
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, *, model) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a padded batch: top-1/top-5 hits, loss, count."""
  logits = model.apply({'params': params}, batch['image']).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
      'top1': jnp.sum((top[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask),
      'loss': jnp.sum(nll * mask),
      'count': jnp.sum(mask),
  }


def jit_steps(model, tx, schedule, config, shardings, mesh):
  """The train step (state donated) and the eval step, compiled for this mesh."""
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config),
      in_shardings=(shardings, batch), out_shardings=(shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model),
                     in_shardings=(shardings.params, batch), out_shardings=replicated)
  return train, evaluate
