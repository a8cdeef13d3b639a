"""Export a model for use here or outside JAX: a model dir, StableHLO, a TF SavedModel or a `.pth`.

  python -m hvt_jax.export --workdir=/tmp/hvt_demo --output=/tmp/hvt_demo_model --ema
  python -m hvt_jax.export --model=hvt-s-1 --output=/tmp/hvt_s_1_hlo --format=stablehlo
  python -m hvt_jax.export --model=/tmp/hvt_demo_model --output=/tmp/demo.pth --format=pytorch

The source is a training workdir (`--workdir`: the latest checkpoint, or
`--step`, or `--best` by eval top-1; raw or `--ema` weights) or anything
`hvt_jax.load` reads (`--model`: a model dir, a workdir, a published name).
Formats:
  orbax       a params-only model dir (`model.json` + Orbax `params/`) that
              `hvt_jax.load` and `predict` read;
  stablehlo   `OUT/model.stablehlo`, a serialized `jax.export.Exported` with
              the weights inside, for normalized NHWC float32 images of any
              batch size, lowered for CPU, CUDA and TPU; plus `OUT/model.json`;
  savedmodel  a TF SavedModel (via jax2tf) whose `serving_default` signature
              maps float32 `images` (None, S, S, 3) to `logits`; the weights
              are its variables; `OUT/assets.extra/model.json` describes it;
  pytorch     `OUT` is a `.pth` file in the official release's layout,
              `{'model': state_dict}`, written without PyTorch.
The inputs of the non-Orbax formats are images after the eval transform that
model.json records (`preprocess`). An existing `OUT` is never touched.
"""
from __future__ import annotations

import contextlib
import os

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp

from hvt_jax import loading, model_dir
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError
from hvt_jax.interop import convert, pth_writer

FORMATS = ('orbax', 'stablehlo', 'savedmodel', 'pytorch')
# The exported programs run on any of these (XLA lowers each ahead of time, without the device).
PLATFORMS = ('cpu', 'cuda', 'tpu')

FLAGS = flags.FLAGS


class ExportError(UserError):
  """The export cannot be written as asked; the message says what to do."""


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_string('workdir', None, 'training workdir to export from')
  flags.DEFINE_string('model', None, 'or: a model dir, workdir or published name (hvt-s-1)')
  flags.DEFINE_string('output', None, 'new directory (a new .pth file for --format=pytorch)')
  flags.DEFINE_enum('format', 'orbax', FORMATS, 'what to write')
  flags.DEFINE_bool('ema', False, 'export the EMA weights instead of the raw ones')
  flags.DEFINE_bool('best', False, 'the checkpoint with the best eval top-1 instead of the latest')
  flags.DEFINE_integer('step', None, 'a specific saved step')
  flags.mark_flags_as_required(['output'])
  flags.mark_flags_as_mutual_exclusive(['workdir', 'model'], required=True)


def export(source: str, output: str, *, format: str = 'orbax', ema: bool = False,
           best: bool = False, step: int | None = None) -> str:
  """Writes `source`'s weights to `output` in `format`; returns the output's absolute path."""
  return _export(source, output, format, ema=ema, best=best, step=step)[0]


def _export(source, output, fmt, *, ema, best, step):
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}.')
  output = os.path.abspath(output)
  _refuse_existing(output, is_file=fmt == 'pytorch')
  saved = loading.resolve(source, step=step, best=best, ema=ema)
  model, params = model_dir.restore(saved, sharding='cpu')
  if saved.step is not None:
    which = f'{"EMA" if ema else "raw"} weights of step {saved.step} of {os.path.abspath(source)}'
  else:
    which = f'{source} ({saved.meta.get("source", "a model dir")})'
  # Kept: the eval transform, class names, provenance of published weights.
  extra = {k: v for k, v in saved.meta.items() if k not in ('model', 'source')}
  write = {'orbax': model_dir.save_model, 'stablehlo': write_stablehlo,
           'savedmodel': write_savedmodel, 'pytorch': write_pytorch}[fmt]
  return write(output, model, params, **extra, source=f'exported {which}'), model, params


def _refuse_existing(output: str, is_file: bool) -> None:
  if is_file and os.path.lexists(output):
    raise ExportError(f'{output} already exists; choose a new --output or remove it yourself '
                      '(nothing was written).')
  if not is_file and os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    raise ExportError(f'{output} already exists and is not empty; choose a new --output or remove '
                      'it yourself (nothing was written).')


def _forward(model: model_lib.HVT, params):
  return lambda images: model.apply({'params': params}, images)


def _description(model: model_lib.HVT, fmt: str, **meta) -> dict:
  size = model.image_size
  return {**meta, 'model': model.config(), 'format': fmt,
          'inputs': {'images': {'shape': [None, size, size, 3], 'dtype': 'float32',
                                'layout': 'NHWC, after the eval transform in preprocess'}},
          'outputs': {'logits': {'shape': [None, model.num_classes], 'dtype': 'float32'}}}


def stablehlo(model: model_lib.HVT, params) -> jax.export.Exported:
  """The forward pass with the weights as constants, for any batch size."""
  batch, = jax.export.symbolic_shape('batch')
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.float32)
  return jax.export.export(jax.jit(_forward(model, params)), platforms=PLATFORMS)(images)


def write_stablehlo(output: str, model: model_lib.HVT, params, **meta) -> str:
  exported = stablehlo(model, params)

  def fill(tmp):
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'model.stablehlo'), 'wb') as f:
      f.write(exported.serialize())
    model_dir.write_json(os.path.join(tmp, 'model.json'),
                _description(model, 'stablehlo', **meta, platforms=list(exported.platforms)))

  return model_dir.write_dir(output, fill)


@contextlib.contextmanager
def _without_shape_assertions():
  """Lowers JAX's shape checks to nothing while a SavedModel is built.

  JAX writes them as a StableHLO custom call (`vhlo.custom_call_v2`) newer than the StableHLO that
  TensorFlow carries (jax 0.12 against TF 2.21), so TF could not load the graph at all; JAX offers
  no switch to leave them out (`DisabledSafetyCheck` covers platforms and custom calls only). The
  one check a polymorphic batch needs, at least one image, is made in TF instead (`serve`).
  """
  from jax._src.export import shape_poly
  from jax._src.interpreters import mlir
  previous = mlir._lowerings[shape_poly.shape_assertion_p]
  mlir.register_lowering(shape_poly.shape_assertion_p, lambda ctx, *args, **params: [])
  try:
    yield
  finally:
    mlir._lowerings[shape_poly.shape_assertion_p] = previous


def write_savedmodel(output: str, model: model_lib.HVT, params, **meta) -> str:
  import tensorflow as tf  # only this format needs TensorFlow's graph side
  from jax.experimental import jax2tf
  size = model.image_size
  forward = jax2tf.convert(lambda p, x: model.apply({'params': p}, x), with_gradient=False,
                           polymorphic_shapes=[None, f'(batch, {size}, {size}, 3)'],
                           native_serialization_platforms=PLATFORMS)
  module = tf.Module()
  # Variables rather than constants: TF stores them beside the graph, not inside it.
  module.params = tf.nest.map_structure(lambda a: tf.Variable(jax.device_get(a), trainable=False),
                                        params)

  @tf.function(input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32, name='images')],
               autograph=False)
  def serve(images):
    batch = tf.shape(images)[0]
    with tf.control_dependencies([tf.debugging.assert_positive(
        batch, message='serving_default needs at least one image')]):
      return {'logits': forward(module.params, images)}

  module.serve = serve

  def fill(tmp):
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # TF logs every file it writes at INFO
    try:
      tf.saved_model.save(module, tmp, signatures={'serving_default': serve})
    finally:
      logging.set_verbosity(verbosity)
    os.makedirs(os.path.join(tmp, 'assets.extra'), exist_ok=True)
    model_dir.write_json(os.path.join(tmp, 'assets.extra', 'model.json'),
                _description(model, 'savedmodel', **meta, platforms=list(PLATFORMS)))

  with _without_shape_assertions():  # jax2tf lowers the model when the save traces `serve`
    return model_dir.write_dir(output, fill)


def write_pytorch(output: str, model: model_lib.HVT, params, **meta) -> str:
  """`{'model': state_dict}` as the official release saves it; `meta` stays behind."""
  del meta  # the official layout has no place for it
  if (model.pool_kernel, model.pool_stride) != (3, 2):
    raise ExportError(f'the official model always pools with kernel 3, stride 2; this one uses '
                      f'{model.pool_kernel}, {model.pool_stride} and has no PyTorch equivalent.')
  state_dict = convert.to_official(jax.device_get(params), model.config())
  tmp = f'{output}.tmp-{os.getpid()}'
  try:
    pth_writer.write(tmp, {'model': state_dict})
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return output




def main(argv):
  del argv
  out, model, params = _export(FLAGS.workdir or FLAGS.model, FLAGS.output, FLAGS.format,
                               ema=FLAGS.ema, best=FLAGS.best, step=FLAGS.step)
  files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names] or [out]
  size = sum(os.path.getsize(f) for f in files)
  print(f'wrote {out} ({FLAGS.format}, {size / 2**20:.1f} MiB): '
        f'{model_lib.param_count(params):,} parameters of a {model.depth}-block '
        f'{"DeiT" if model.class_token else "HVT"}')
