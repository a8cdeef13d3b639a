"""`hvt_jax.load`: a model and its weights from any saved form, named by one path.

A path is a published name (`'hvt-s-1'`: the release's weights, downloaded and converted once by
`interop/weights.py`), a model dir (`model_dir.py`), or a training workdir or its `checkpoints/`
dir (`training/checkpoint.py`). `resolve` says which weights and metadata a path stands for;
`load` reads them.
"""
from __future__ import annotations

from etils import epath

from hvt_jax import model_dir
from hvt_jax.interop import weights
from hvt_jax.model_dir import CheckpointError
from hvt_jax.training import checkpoint


def resolve(path: str, *, step: int | None = None, best: bool = False,
            ema: bool = False) -> model_dir.Saved:
  """What `path` holds: a model dir, or a training workdir (or its `checkpoints/`) at the
  latest step, or `step`, or the best by eval top-1 (`best`), raw or EMA (`ema`) weights.

  The metadata is read here, once; the weights are read by `model_dir.restore`.
  """
  path = weights.local_path(path)  # a published name: its cached model dir
  if not epath.Path(path).exists():
    raise CheckpointError(f'{path}: no such model dir or workdir.')
  if model_dir.is_model_dir(path):
    if step is not None or best or ema:
      raise CheckpointError(f'{path} is a model dir with one set of weights; step, best and ema '
                            'apply to training workdirs only.')
    return model_dir.read(path)
  return checkpoint.resolve_step(path, step=step, best=best, ema=ema)


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
  return model_dir.restore(resolve(path, step=step, best=best, ema=ema), sharding, image_size)
