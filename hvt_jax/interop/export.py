"""Write a small params-only model dir from a training workdir.

  python -m hvt_jax.export --workdir=/tmp/hvt_demo --output=/tmp/hvt_demo_model --ema

Takes the latest checkpoint (or `--step`, or `--best` by eval top-1), the raw or
the EMA weights, and leaves the optimizer state behind; `hvt_jax.load(output)`
and `python -m hvt_jax.predict --model=output` read the result.
"""
from __future__ import annotations

import os

from absl import flags

from hvt_jax.training import checkpoint
from hvt_jax import model as model_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  flags.DEFINE_string('workdir', None, 'training workdir to export from')
  flags.DEFINE_string('output', None, 'new directory for the model')
  flags.DEFINE_bool('ema', False, 'export the EMA weights instead of the raw ones')
  flags.DEFINE_bool('best', False, 'the checkpoint with the best eval top-1 instead of the latest')
  flags.DEFINE_integer('step', None, 'a specific saved step')
  flags.mark_flags_as_required(['workdir', 'output'])


def export(workdir: str, output: str, *, ema: bool = False, best: bool = False,
           step: int | None = None) -> str:
  saved = checkpoint.resolve(workdir, step=step, best=best, ema=ema)
  model, params = checkpoint.restore(saved, sharding='cpu')
  which = f'{"EMA" if ema else "raw"} weights of step {saved.step}'
  extra = {k: v for k, v in saved.meta.items() if k != 'model'}  # eval transform, names
  return checkpoint.save_model(output, model, params, **extra,
                               source=f'exported {which} of {os.path.abspath(workdir)}')


def main(argv):
  del argv
  out = export(FLAGS.workdir, FLAGS.output, ema=FLAGS.ema, best=FLAGS.best, step=FLAGS.step)
  saved = checkpoint.resolve(out)
  _, params = checkpoint.restore(saved, sharding='cpu')
  print(f'wrote {out}: {model_lib.param_count(params):,} parameters ({saved.meta["source"]})')

