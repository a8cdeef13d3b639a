"""Train state, the jitted train and eval steps, and how they lie on the mesh.

Everything runs under `jax.jit` on global arrays: the batch is split over the
mesh, parameters are replicated (or FSDP-split), and XLA inserts the gradient
all-reduce. A mean over the global batch is therefore the true mean; no
per-device loss scaling is needed.

Batches hold uint8 images as the input pipeline gives them: the train step augments and
normalizes them itself (data/augment.py), the eval step normalizes them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from hvt_jax.data import augment, device_resize, input_spec, mixup
from hvt_jax import sharding
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError
from hvt_jax.training import optim


class AccumError(UserError):
  pass


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any
  ema_params: Any  # None when EMA is off
  opt_state: Any
  rng: jax.Array  # uint32 key data; step keys are fold_in(rng, step), so resuming replays them


def init_state(model: model_lib.HVT, tx: optax.GradientTransformation, rng: jax.Array,
               ema: bool) -> TrainState:
  """A fresh state. The blocks the model scans are held stacked (`model.stack_blocks`), so
  neither the step nor the optimizer works per block; checkpoints hold them per block."""
  init_key, step_key = jax.random.split(rng)
  params = model_lib.stack_blocks(model_lib.init_params(model, init_key), model.scanned_runs())
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params if ema else None, opt_state=tx.init(params),
                    rng=jax.random.key_data(step_key))


def state_shardings(abstract_state, mesh):
  """Every leaf (params, EMA, Adam moments) split like its parameter; scalars replicated.

  A stacked run's leaves split like one block's, never across blocks: the scan takes one block
  per iteration.
  """
  def place(path, x):
    stacked = model_lib.stacked_dims(path)
    spec = sharding.param_spec(x.shape[stacked:], mesh)
    return jax.sharding.NamedSharding(mesh, jax.P(*[None] * stacked, *spec))

  return jax.tree_util.tree_map_with_path(place, abstract_state)


def per_block(tree):
  """A train state (or its parameters) with every block under its own name `blocks_{i}`, the
  layout of checkpoints and of everything users get; the same arrays if nothing is stacked."""
  paths = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not any(model_lib.stacked_dims(path) for path, _ in paths):
    return tree
  return jax.jit(model_lib.unstack_blocks)(tree)


def stacked_like(tree, runs: list[tuple[int, int]], shardings):
  """The inverse of `per_block`: `runs` stacked again (`model.stack_blocks`), on `shardings`."""
  return jax.jit(functools.partial(model_lib.stack_blocks, runs=runs), out_shardings=shardings)(tree)


def abstract_state(model, tx, *, ema: bool, mesh) -> tuple[TrainState, Any]:
  """A fresh state's shapes and dtypes, computing nothing, and its shardings on the mesh."""
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, ema=ema), jax.random.key(0))
  return abstract, state_shardings(abstract, mesh)


def create_state(model, tx, rng, *, ema: bool, mesh) -> tuple[TrainState, Any]:
  """A fresh state laid out on the mesh, and its shardings (for the steps and checkpoints)."""
  _, shardings = abstract_state(model, tx, ema=ema, mesh=mesh)
  return place_state(model, tx, rng, ema=ema, shardings=shardings), shardings


def place_state(model, tx, rng, *, ema: bool, shardings) -> TrainState:
  """A fresh state computed straight into `shardings` (from `abstract_state` or `build`)."""
  make = functools.partial(init_state, model, tx, ema=ema)
  return jax.jit(make, out_shardings=shardings)(rng)


def check_accum(batch_size: int, accum_steps: int, num_devices: int) -> int:
  """The micro-batch size; every micro-batch must split evenly over the devices."""
  if accum_steps < 1 or batch_size % accum_steps:
    raise AccumError(f'accum_steps={accum_steps} does not divide batch_size={batch_size}; '
                     'choose a divisor of the batch size.')
  micro = batch_size // accum_steps
  if micro % num_devices:
    raise AccumError(f'batch_size={batch_size} / accum_steps={accum_steps} gives micro-batches '
                     f'of {micro}, which {num_devices} devices cannot split evenly: make '
                     f'batch_size a multiple of {accum_steps * num_devices}.')
  return micro


def micro_batches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B / k, ...); micro-batch j holds examples j, j + k, j + 2k, ...

  Strided rather than contiguous: each device's contiguous share of the global batch
  then feeds every micro-batch equally, so splitting moves no examples between devices.
  """
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def _uint8_images(batch, needs_ids: bool) -> jax.Array:
  """The batch's images, which must be uint8 as the input pipeline gives them: the steps
  normalize (and augment) on the device, so float images would be normalized twice."""
  image = batch['image']
  if image.dtype != jnp.uint8 or (needs_ids and 'example_id' not in batch):
    raise TypeError(
        "the train and eval steps take the input pipeline's batches: 'image' uint8 "
        "(B, S, S, 3), not normalized float" + (", and 'example_id' int32 (B, 3)" if needs_ids
                                               else '') + f'; got {image.dtype} images.')
  return image


# Examples per device that one round of the on-device augmentation takes at a time.
_AUGMENT_PER_DEVICE = 8


def augment_rounds(batch_size: int, num_devices: int) -> int:
  """How many rounds the augmentation of a batch takes: each round has `_AUGMENT_PER_DEVICE`
  examples per device (or all of a device's share, if smaller, or the nearest divisor of it)."""
  per_device = max(1, batch_size // num_devices)
  rounds = max(1, per_device // _AUGMENT_PER_DEVICE)
  while per_device % rounds:
    rounds -= 1
  return rounds


def train_images(batch, config, rounds: int = 1, round_sharding=None) -> jax.Array:
  """The batch's uint8 images, augmented per example and normalized: what the model trains on.

  Each example's augmentation follows from config.seed and its 'example_id' alone, so the
  mesh, the batch's row order and accumulation leave it unchanged. In `rounds` rounds, one after
  the other: vmapped, RandAugment computes every branch for every image, and all at once its
  temporaries for a large batch would outgrow the model's own (over a chip's HBM at batch 1024 on
  a TPU v5e-8). The rounds are strided like micro-batches, so each device augments its own rows.
  """
  images = _uint8_images(batch, needs_ids=True)
  augment_ = functools.partial(augment.train_images, seed=int(config.seed), aug=config.aug,
                               mean=config.eval.mean, std=config.eval.std,
                               size=int(config.model.image_size))
  # 'window': the host left the resize to the device (the images are canvases).
  inputs = (images, batch['example_id']) + ((batch['window'],) if 'window' in batch else ())
  if rounds == 1:
    return augment_(*inputs)
  parts = [micro_batches(x, rounds) for x in inputs]
  if round_sharding is not None:
    parts = jax.lax.with_sharding_constraint(parts, round_sharding)
  out = jax.lax.map(lambda xs: augment_(*xs), tuple(parts))
  # micro_batches' inverse: round j, row i is example i * rounds + j.
  return jnp.swapaxes(out, 0, 1).reshape(images.shape[:1] + out.shape[2:])


def train_step(state: TrainState, batch, *, model, tx, schedule: Callable, config,
               micro_sharding=None, augment_rounds: int = 1) -> tuple:
  """One optimizer update from a batch {'image': uint8, 'label', 'example_id'[, 'ok']}."""
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  mix_key, dropout_key = jax.random.split(step_key)

  def grads_of(params, images, labels, mix_key, dropout_key):
    images, targets = mixup.mix_from_config(mix_key, {'image': images, 'label': labels}, config)

    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': dropout_key})
      return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, loss, jnp.sum(jnp.argmax(logits, -1) == labels)

  # Gradient accumulation by hand rather than optax.MultiSteps: MultiSteps counts every
  # micro-batch as a step of the inner optimizer's schedule and would need k calls per update;
  # here one call is one update, so the lr schedule, EMA, step count and checkpoints stay per
  # optimizer step and `batch_size` stays the batch of one update.
  # Augmented before mixup and before the micro-batch split, as the host pipeline did.
  images = train_images(batch, config, augment_rounds, micro_sharding)
  k = int(config.accum_steps)
  if k == 1:
    grads, loss, hits = grads_of(state.params, images, batch['label'], mix_key, dropout_key)
  else:
    micro = [micro_batches(x, k) for x in (images, batch['label'])]
    if micro_sharding is not None:
      micro = jax.lax.with_sharding_constraint(micro, micro_sharding)

    def accumulate(total, xs):
      # Each micro-batch draws its own mixup/cutmix and dropout.
      i, images, labels = xs
      out = grads_of(state.params, images, labels, jax.random.fold_in(mix_key, i),
                     jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, total, out), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
             jnp.zeros((), jnp.int32))
    (grads, loss, hits), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), *micro))
    grads, loss = jax.tree.map(lambda g: g / k, grads), loss / k

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    # step_size * new + (1 - step_size) * old: the EMA keeps `ema_decay` of its old value.
    ema = optax.incremental_update(params, ema, step_size=1.0 - config.ema_decay)
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
      'train_top1': hits / batch['label'].shape[0],
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


def eval_step(params, batch, *, model, transform) -> dict[str, jax.Array]:
  """Sums over the real (mask 1) examples of a padded batch: top-1/top-5 hits, loss, count.

  `batch['image']`: uint8, normalized here with `transform`'s mean and std (config.eval's, as
  `input_spec.eval_transform` gives them). With a 'window' the images are canvases, resized
  and center-cropped here first (`device_resize.eval_crops`).
  """
  images = _uint8_images(batch, needs_ids=False)
  if 'window' in batch:
    images = device_resize.eval_crops(images, batch['window'], model.image_size,
                                      transform['crop_pct'], transform['interpolation'])
  images = augment.normalize(images, transform['mean'], transform['std'])
  logits = model.apply({'params': params}, images).astype(jnp.float32)
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top = jax.lax.top_k(logits, k)[1]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  sums = {
      'top1': jnp.sum((top[:, 0] == labels) * mask),
      'top5': jnp.sum(jnp.any(top == labels[:, None], axis=-1) * mask),
      'loss': jnp.sum(nll * mask),
      'count': jnp.sum(mask),
  }
  if 'real' in batch:  # ReaL: right if the top class is any of the image's ReaL labels
    real = batch['real'].astype(jnp.float32)
    labelled = jnp.max(real, axis=-1) * mask
    sums['real_top1'] = jnp.sum(jnp.take_along_axis(real, top[:, :1], axis=-1)[:, 0] * labelled)
    sums['real_count'] = jnp.sum(labelled)
  return sums


def jit_steps(model, tx, schedule, config, shardings, mesh):
  """The train step (state donated) and the eval step, compiled for this mesh."""
  check_accum(config.batch_size, config.accum_steps, mesh.size)
  augment.check_settings(config.aug)  # one line now rather than a traceback when tracing
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  micro = jax.sharding.NamedSharding(mesh, jax.P(None, *sharding.batch_spec(mesh)))
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, schedule=schedule, config=config,
                        micro_sharding=micro,
                        augment_rounds=augment_rounds(config.batch_size, mesh.size)),
      in_shardings=(shardings, batch), out_shardings=(shardings, replicated), donate_argnums=0,
      compiler_options=_train_compiler_options(mesh))
  evaluate = jax.jit(functools.partial(eval_step, model=model,
                                       transform=input_spec.eval_transform(config.eval)),
                     in_shardings=(shardings.params, batch), out_shardings=replicated)
  return train, evaluate


# The TPU compiler moves large gathers to the SparseCores of the chips that have them (v5p,
# v6e). In the libtpu that jax 0.12.0.1 pins (0.0.50), doing so for RandAugment's lookups in
# the augmentation's rounds fails with an internal RET_CHECK at the recipe's batch 1024 on
# v5p-8 and v6e-8; the TensorCores run those small gathers instead (docs/performance.md).
_TPU_TRAIN_OPTIONS = {'xla_tpu_offload_gather_to_sparsecore': False,
                      'xla_tpu_offload_all_supported_gathers_to_sparsecore': False}


def _train_compiler_options(mesh) -> dict[str, Any] | None:
  return _TPU_TRAIN_OPTIONS if mesh.devices.flat[0].platform == 'tpu' else None


class Program(NamedTuple):
  """What a run compiles, built once by `build` for `main` (loop) and `aot` alike."""
  model: Any  # the steps' model: its 'auto' settings decided for the mesh's devices
  tx: optax.GradientTransformation
  state: TrainState  # shapes and dtypes only (jax.ShapeDtypeStruct leaves)
  shardings: Any  # the state's, on the mesh
  train_step: Callable
  eval_step: Callable


def build(config, mesh, steps_per_epoch: int) -> Program:
  """The step model, optimizer, state layout and jitted steps of a run on `mesh`.

  `steps_per_epoch` only sets the schedule's constants (an epoch-stepped lr changes at multiples
  of it), not the programs' shapes.
  """
  model = model_lib.HVT(**model_lib.resolve_settings(config.model, mesh.devices))
  schedule = optim.lr_schedule(config.optim, config.batch_size, config.num_epochs, steps_per_epoch)
  tx = optim.make(config.optim, schedule)
  state, shardings = abstract_state(model, tx, ema=config.ema_decay > 0, mesh=mesh)
  p_train, p_eval = jit_steps(model, tx, schedule, config, shardings, mesh)
  return Program(model, tx, state, shardings, p_train, p_eval)
