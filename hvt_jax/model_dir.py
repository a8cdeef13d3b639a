"""The saved-weights format: `params/` (an Orbax PyTree of float32 arrays) beside a JSON dict.

The JSON holds `model` (the `HVT` fields) and the metadata that travels with the weights (the
eval transform in `preprocess`, `class_names`, provenance). A *model dir* is just that pair, the
JSON in `model.json`; the converter and the exporter write one. A training workdir's step is the
same pair with the JSON elsewhere (`training/checkpoint.py` finds it); `Saved` names either, and
`restore` reads its weights. Nothing here overwrites a saved model: writes go to a temporary
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

from hvt_jax import model as model_lib
from hvt_jax.errors import UserError
from hvt_jax.model import resample

MODEL_FILE = 'model.json'
PARAMS_DIR = 'params'


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


def absolute(path: str) -> str:
  """Orbax needs absolute local paths; URLs (gs://...) pass through."""
  return str(path) if '://' in str(path) else os.path.abspath(path)


@contextlib.contextmanager
def orbax_warnings_off():
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


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
  path = absolute(path)
  ckptr = ocp.StandardCheckpointer()
  try:
    with orbax_warnings_off():  # an item dir inside a step has no step-level metadata file
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


def read_meta(path: epath.Path, fix: str) -> dict[str, Any]:
  """The metadata JSON of either form, checked to describe a valid model; `fix` ends the error."""
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


def read(path: str) -> Saved:
  """What the model dir `path` holds; its metadata is read here, once, the weights by `restore`."""
  meta = read_meta(epath.Path(path) / MODEL_FILE, 're-export or re-convert the model.')
  return Saved(os.path.join(path, PARAMS_DIR), meta, None)


def restore(saved: Saved, sharding=None, image_size: int | None = None):
  """`(model, params)` of `saved`; `sharding` and `image_size` as for `hvt_jax.load`."""
  model = saved.model
  params = restore_tree(saved.params_dir, sharding)
  if jax.tree.map(lambda a: a.shape, params) != jax.tree.map(
      lambda a: a.shape, model_lib.abstract_params(model)):
    raise CheckpointError(f'{os.path.dirname(saved.params_dir)}: the saved weights do not match '
                          'the saved model config; the checkpoint is corrupt.')
  return resample.at_size(model, params, image_size)
