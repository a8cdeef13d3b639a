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
from hvt_jax.training import optim, sharding
from hvt_jax import model as model_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  ema_params: Any  # None when EMA is off
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step), so resuming replays them


def soft_cross_entropy(logits, targets):
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


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
    return soft_cross_entropy(logits, targets).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = optim.ema_update(ema, params, config.ema_decay)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skip = bool(config.get('skip_nonfinite', False))
  if skip:
    params, opt_state, ema = choose(finite, (params, opt_state, ema),
                                    (state.params, state.opt_state, state.ema_params))
  metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      # The new state is safe to save: the loop checks this before every save.
      'finite': finite | skip,
      'lr': schedule(state.step),
      # Against the unmixed labels: with mixup on, a rough signal only.
      'train_top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
  }
  if skip:
    metrics['skipped_updates'] = 1.0 - finite.astype(jnp.float32)
  if 'ok' in batch:  # images that could not be decoded (input_pipeline.skip_undecodable)
    metrics['skipped_examples'] = jnp.sum(1.0 - batch['ok'].astype(jnp.float32))
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return new_state, metrics


def choose(ok, new, old):
  """`new` where `ok`, else `old`, leaf by leaf.

  Not `optax.apply_if_finite`: that keeps only the optimizer safe, puts its counters into the
  optimizer state (so a checkpoint's layout would depend on the option) and applies the update
  anyway after a number of failures; here EMA is kept too and nothing is ever applied.
  """
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def eval_step(params, batch, *, model) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a padded batch: top-1/top-5 hits, loss, count."""
  logits = model.apply({'params': params}, batch['image']).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
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
