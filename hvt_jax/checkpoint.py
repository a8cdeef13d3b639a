"""Orbax storage of HVT weights, and `load`, which rebuilds a model from any of them.

A *model dir* holds `model.json` (the `HVT` fields and where the weights came
from) and `params/` (an Orbax PyTree of float32 arrays). The converter and the
exporter write one; a training workdir holds one per saved step under
`checkpoints/<step>/` (see `train_state.py`), with the optimizer beside it.
Nothing here overwrites a saved model: writes go to a temporary directory that
is renamed into place only once complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from hvt_jax import model as model_lib
from hvt_jax.errors import UserError

MODEL_FILE = 'model.json'
PARAMS_DIR = 'params'


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or incompatible; the message says what to do."""


def _write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')


def read_model_json(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MODEL_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
    config = meta['model']
    model_lib.HVT(**config).tokens_per_block()
  except FileNotFoundError:
    raise CheckpointError(f'{directory} has no {MODEL_FILE}: not an hvt_jax model dir.') from None
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{path} is corrupt ({type(e).__name__}: {e}); re-export or '
                          're-convert the model.') from None
  return meta


def save_model(directory: str, model: model_lib.HVT, params, **provenance) -> str:
  """Writes a model dir; refuses to touch a directory that already has content."""
  directory = os.path.abspath(directory)
  if os.path.isdir(directory) and os.listdir(directory):
    raise CheckpointError(f'{directory} already exists and is not empty; choose a new --output '
                          'or remove it yourself (nothing was written).')
  if jax.tree.structure(params) != jax.tree.structure(
      model_lib.abstract_params(model)):
    raise CheckpointError('the parameters do not match the model config; nothing was written.')
  tmp = f'{directory}.tmp-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS_DIR), params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
      _write_json(os.path.join(tmp, MODEL_FILE), {'model': model.config(), **provenance})
    if os.path.isdir(directory):
      os.rmdir(directory)  # empty, checked above
    os.replace(tmp, directory)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory


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
  ckptr = ocp.StandardCheckpointer()
  try:
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


def load_model_dir(directory: str, sharding=None):
  meta = read_model_json(directory)
  model = model_lib.HVT(**meta['model'])
  params = restore_tree(os.path.join(directory, PARAMS_DIR), sharding)
  expected = model_lib.abstract_params(model)
  if jax.tree.map(lambda a: a.shape, params) != jax.tree.map(lambda a: a.shape, expected):
    raise CheckpointError(f'{directory}: the saved weights do not match {MODEL_FILE}; the model '
                          'dir is corrupt.')
  return model, params


def load(path: str, sharding=None):
  """`(model, params)` from a model dir, ready for `model.apply({'params': params}, x)`."""
  return load_model_dir(path, sharding)
