"""A training workdir's checkpoints: the train state's save and restore, and the weights of a step.

A workdir keeps an Orbax CheckpointManager under `checkpoints/`: the latest steps plus the best
by eval top-1. Each saved step holds the pair a model dir holds (`model_dir.py`: the `params/`
PyTree, and the JSON metadata as the item `model`, in `model/metadata`) plus `ema_params/` and
`opt/` (optimizer state, step, rng), so weights are read without the optimizer
(`resolve_step`).
"""
from __future__ import annotations

import os
from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from hvt_jax import model as model_lib
from hvt_jax import model_dir
from hvt_jax.model_dir import CheckpointError
from hvt_jax.training import train_step

STEP_META_FILE = 'model/metadata'  # a training step's metadata: Orbax's JsonSave of item `model`

CHECKPOINTS_DIR = 'checkpoints'
BEST_METRIC = 'top1'


def manager(workdir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
  """Keeps the latest `keep` steps plus the best by eval top-1; saves asynchronously."""
  best = lambda metrics: metrics[BEST_METRIC]
  policy = checkpoint_managers.AnyPreservationPolicy([
      checkpoint_managers.LatestN(keep),
      checkpoint_managers.BestN(get_metric_fn=best, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(best_fn=best, best_mode='max', preservation_policy=policy,
                                         read_only=read_only, create=not read_only)
  # Steps saved before this version also hold `data` (input positions); restore skips it.
  return ocp.CheckpointManager(os.path.join(model_dir.absolute(workdir), CHECKPOINTS_DIR),
                               options=options, item_names=('params', 'ema_params', 'opt', 'model'))


def save_train(mngr: ocp.CheckpointManager, state, meta: dict[str, Any],
               metrics: dict | None = None) -> None:
  """`meta` is what a model dir's model.json holds (`model`, `preprocess`, `class_names`).

  The input position needs no saving: it follows from the step (see
  input_pipeline.train_iterator). Only the process count is noted, so that a
  resume on another count can say that its batches differ.
  """
  step = int(state.step)
  state = train_step.per_block(state)  # checkpoints name every block, whatever the run scans
  items = dict(
      params=ocp.args.StandardSave(state.params),
      opt=ocp.args.StandardSave({'opt_state': state.opt_state, 'step': state.step, 'rng': state.rng}),
      model=ocp.args.JsonSave(meta),
  )
  if state.ema_params is not None:
    items['ema_params'] = ocp.args.StandardSave(state.ema_params)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True,
            custom_metadata={'process_count': jax.process_count()})


def restore_train(mngr: ocp.CheckpointManager, step: int, template, shardings):
  """The train state at `step` on `shardings`, and how many processes saved it (None if unknown).

  `template`: a train state (or its `jax.eval_shape`) giving the shapes and dtypes.
  """
  runs = model_lib.stacked_runs(template.params)
  if runs:  # saved per block (`save_train`): restore so, then stack as the template is
    template = jax.eval_shape(model_lib.unstack_blocks, template)
    mesh = jax.tree.leaves(shardings)[0].mesh
    saved_shardings = train_step.state_shardings(template, mesh)
  else:
    saved_shardings = shardings
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        template, saved_shardings)
  items = dict(
      params=ocp.args.StandardRestore(target.params),
      opt=ocp.args.StandardRestore({'opt_state': target.opt_state, 'step': target.step,
                                    'rng': target.rng}),
  )
  if target.ema_params is not None:
    items['ema_params'] = ocp.args.StandardRestore(target.ema_params)
  where = os.path.join(str(mngr.directory), str(step))
  try:
    r = mngr.restore(step, args=ocp.args.Composite(**items))
    custom = mngr.metadata(step).custom_metadata or {}
  except Exception as e:  # Orbax raises many types for damaged or mismatched files
    raise CheckpointError(
        f'cannot restore the checkpoint at {where} ({type(e).__name__}: {str(e)[:300]}). If it is '
        'damaged, move that step directory out of checkpoints/ to resume from an earlier step; '
        'if the config changed, use a new --workdir. Nothing was modified.') from None
  state = template.replace(
      step=r['opt']['step'], params=r['params'], opt_state=r['opt']['opt_state'],
      rng=r['opt']['rng'], ema_params=r['ema_params'] if 'ema_params' in items else None)
  if runs:
    state = train_step.stacked_like(state, runs, shardings)
  return state, custom.get('process_count')


def _step_dir(path: str, step: int | None, best: bool) -> tuple[str, int]:
  """The step directory to read weights from, for a workdir or its checkpoints/ dir."""
  ckpt_dir = epath.Path(model_dir.absolute(path)) / CHECKPOINTS_DIR
  if not ckpt_dir.is_dir():
    ckpt_dir = epath.Path(model_dir.absolute(path))
  with model_dir.orbax_warnings_off():  # a read-only manager warns that it is read-only
    mngr = manager(str(ckpt_dir.parent), read_only=True)
    steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f'{path} holds no model dir ({model_dir.MODEL_FILE}) and no training '
                          'checkpoints.')
  if step is None:
    step = mngr.best_step() if best else mngr.latest_step()
    if step is None:
      raise CheckpointError(f'{path}: no checkpoint has eval metrics, so there is no best one; '
                            'load the latest instead.')
  elif step not in steps:
    raise CheckpointError(f'{path} has no checkpoint at step {step}; it has steps {steps}.')
  return str(ckpt_dir / str(step)), step


def resolve_step(path: str, *, step: int | None = None, best: bool = False,
                 ema: bool = False) -> model_dir.Saved:
  """The weights of training workdir `path` (or its `checkpoints/`) at the latest step, or
  `step`, or the best by eval top-1 (`best`), raw or EMA (`ema`); `model_dir.restore` reads them.
  """
  step_dir, step = _step_dir(path, step, best)
  meta = model_dir.read_meta(epath.Path(step_dir) / STEP_META_FILE, 'choose another step.')
  item = 'ema_params' if ema else 'params'
  if not (epath.Path(step_dir) / item).is_dir():
    raise CheckpointError(f'{step_dir} has no {item} (was EMA off in that run?).')
  return model_dir.Saved(os.path.join(step_dir, item), meta, step)
