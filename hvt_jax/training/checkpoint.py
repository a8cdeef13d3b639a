"""Orbax storage of HVT weights, and `load`, which rebuilds a model from any of them.

Saved weights always come as one pair: `params/` (an Orbax PyTree of float32
arrays) beside a JSON dict of metadata (`model`: the `HVT` fields; the eval
transform, class names, provenance). A *model dir* is just that pair, the JSON
in `model.json`; the converter and the exporter write one. A training workdir
keeps an Orbax CheckpointManager under `checkpoints/`; each saved step is the
same pair (the JSON as the item `model`, in `model/metadata`) plus
`ema_params/` and `opt/` (optimizer state, step, rng), so weights are read
without the optimizer. `resolve` finds the pair for any path, `restore` reads
the weights. Nothing here overwrites a saved model: writes go to a temporary
directory that is renamed into place only once complete.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from hvt_jax import model as model_lib
from hvt_jax.errors import UserError
from hvt_jax.interop import weights
from hvt_jax.model import resample
from hvt_jax.training import train_step

MODEL_FILE = 'model.json'
PARAMS_DIR = 'params'
STEP_META_FILE = 'model/metadata'  # a training step's metadata: Orbax's JsonSave of item `model`


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or incompatible; the message says what to do."""


def write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def save_model(directory: str, model: model_lib.HVT, params, **meta) -> str:
  """Writes a model dir; refuses to touch a directory that already has content.

  `meta` goes into model.json beside the model config: `source` (provenance),
  `preprocess` (eval crop_pct, interpolation, mean, std) and `class_names`.
  """
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointError(f'{directory} already exists and is not empty; choose a new --output '
                          'or remove it yourself (nothing was written).')
  if jax.tree.structure(params) != jax.tree.structure(
      model_lib.abstract_params(model)):
    raise CheckpointError('the parameters do not match the model config; nothing was written.')

  def fill(tmp):
    os.makedirs(tmp)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
      write_json(os.path.join(tmp, MODEL_FILE), {**meta, 'model': model.config()})

  return write_dir(directory, fill)


def write_dir(output: str, fill) -> str:
  """Runs `fill(tmp)` on a fresh path that becomes `output` (absent or an empty directory)
  only once complete, so an interrupted write never leaves something that looks valid."""
  tmp = f'{output}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    fill(tmp)
    if os.path.isdir(output):
      os.rmdir(output)  # empty, checked by the caller
    os.replace(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return output


def _absolute(path: str) -> str:
  """Orbax needs absolute local paths; URLs (gs://...) pass through."""
  return str(path) if '://' in str(path) else os.path.abspath(path)


def _target_sharding(sharding):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if sharding == 'cpu':
    return jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  return sharding


def restore_tree(path: str, sharding=None):
  """Restores an Orbax PyTree onto `sharding` (one Sharding for all, or a matching tree).

  The target is built from the saved shapes, so the saving run's device count
  and layout do not matter.
  """
  path = _absolute(path)
  ckptr = ocp.StandardCheckpointer()
  try:
    with _orbax_warnings_off():  # an item dir inside a step has no step-level metadata file
      saved = ckptr.metadata(path).item_metadata.tree
  except FileNotFoundError:
    raise CheckpointError(f'no Orbax checkpoint at {path}.') from None
  except Exception as e:  # Orbax raises many types for damaged metadata
    raise CheckpointError(f'cannot read the checkpoint at {path} ({type(e).__name__}: '
                          f'{str(e)[:200]}); it is corrupt or incomplete.') from None
  sharding = _target_sharding(sharding)
  if isinstance(sharding, jax.sharding.Sharding):
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved)
  else:
    target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                          saved, sharding)
  try:
    return ckptr.restore(path, target)
  except Exception as e:
    raise CheckpointError(f'cannot restore {path} ({type(e).__name__}: {str(e)[:200]}); '
                          'the checkpoint is corrupt or incomplete.') from None


# --- training checkpoints -------------------------------------------------------

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
  return ocp.CheckpointManager(os.path.join(_absolute(workdir), CHECKPOINTS_DIR), options=options,
                               item_names=('params', 'ema_params', 'opt', 'model'))


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


@contextlib.contextmanager
def _orbax_warnings_off():
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _step_dir(path: str, step: int | None, best: bool) -> tuple[str, int]:
  """The step directory to read weights from, for a workdir or its checkpoints/ dir."""
  ckpt_dir = epath.Path(_absolute(path)) / CHECKPOINTS_DIR
  if not ckpt_dir.is_dir():
    ckpt_dir = epath.Path(_absolute(path))
  with _orbax_warnings_off():  # a read-only manager warns that it is read-only
    mngr = manager(str(ckpt_dir.parent), read_only=True)
    steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f'{path} holds no model dir ({MODEL_FILE}) and no training checkpoints.')
  if step is None:
    step = mngr.best_step() if best else mngr.latest_step()
    if step is None:
      raise CheckpointError(f'{path}: no checkpoint has eval metrics, so there is no best one; '
                            'load the latest instead.')
  elif step not in steps:
    raise CheckpointError(f'{path} has no checkpoint at step {step}; it has steps {steps}.')
  return str(ckpt_dir / str(step)), step


@dataclasses.dataclass(frozen=True)
class Saved:
  """One set of saved weights and its metadata: a model dir, or one step of a training workdir."""
  params_dir: str  # the Orbax PyTree of the chosen weights (raw or EMA)
  meta: dict[str, Any]  # model.json's contents: `model` (the HVT fields), `preprocess`, ...
  step: int | None  # the training step; None for a model dir

  @property
  def model(self) -> model_lib.HVT:
    # What the model computes comes from the saved fields; how it runs (attention kernel, remat,
    # scan) was the saving machine's choice and is this one's: a model trained on a GPU with
    # attention='cudnn' must still run on a CPU. `model.clone(...)` sets them.
    defaults = model_lib.field_defaults()
    return model_lib.HVT(**{**self.meta['model'], **{k: defaults[k] for k in model_lib.RUN_SETTINGS}})


def _read_meta(path: epath.Path, fix: str) -> dict[str, Any]:
  """The metadata JSON of either form, checked to describe a valid model."""
  try:
    meta = json.loads(path.read_text())
    model_lib.HVT(**meta['model'])  # raises on impossible settings
  except FileNotFoundError:
    raise CheckpointError(f'{path} is missing; {fix}') from None
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{path} is corrupt ({type(e).__name__}: {e}); {fix}') from None
  return meta


def is_model_dir(path: str) -> bool:
  return (epath.Path(path) / MODEL_FILE).exists()


def resolve(path: str, *, step: int | None = None, best: bool = False,
            ema: bool = False) -> Saved:
  """What `path` holds: a model dir, or a training workdir (or its `checkpoints/`) at the
  latest step, or `step`, or the best by eval top-1 (`best`), raw or EMA (`ema`) weights.

  The metadata is read here, once; the weights are read by `restore`.
  """
  path = weights.local_path(path)  # a published name: its cached model dir
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path}: no such model dir or workdir.')
  if is_model_dir(path):
    if step is not None or best or ema:
      raise CheckpointError(f'{path} is a model dir with one set of weights; step, best and ema '
                            'apply to training workdirs only.')
    meta = _read_meta(epath.Path(path) / MODEL_FILE, 're-export or re-convert the model.')
    return Saved(os.path.join(path, PARAMS_DIR), meta, None)
  step_dir, step = _step_dir(path, step, best)
  meta = _read_meta(epath.Path(step_dir) / STEP_META_FILE, 'choose another step.')
  item = 'ema_params' if ema else 'params'
  if not (epath.Path(step_dir) / item).is_dir():
    raise CheckpointError(f'{step_dir} has no {item} (was EMA off in that run?).')
  return Saved(os.path.join(step_dir, item), meta, step)


def restore(saved: Saved, sharding=None, image_size: int | None = None):
  """`(model, params)` of what `resolve` found; `sharding` and `image_size` as for `load`."""
  model = saved.model
  params = restore_tree(saved.params_dir, sharding)
  if jax.tree.map(lambda a: a.shape, params) != jax.tree.map(
      lambda a: a.shape, model_lib.abstract_params(model)):
    raise CheckpointError(f'{os.path.dirname(saved.params_dir)}: the saved weights do not match '
                          'the saved model config; the checkpoint is corrupt.')
  return resample.at_size(model, params, image_size)


def load(path: str, *, step: int | None = None, best: bool = False, ema: bool = False,
         sharding=None, image_size: int | None = None):
  """`(model, params)` for `model.apply({'params': params}, images)`, from any saved form.

  `path` is a model dir (converted or exported), a training workdir, or its
  `checkpoints/` dir. For training checkpoints: the latest step, or `step`, or
  the best by eval top-1 with `best=True`; the EMA weights with `ema=True`. The
  optimizer state is never read. `sharding` places the weights: None for the
  default device, 'cpu' for host memory, a Sharding for every array, or a tree
  of Shardings matching the parameters; the device count that saved them does
  not matter. A published name (`'hvt-s-1'`) gives the release's weights, downloaded once.
  `image_size` returns the model at another size, its position embeddings resampled
  (`model/resample.py`).
  """
  return restore(resolve(path, step=step, best=best, ema=ema), sharding, image_size)
