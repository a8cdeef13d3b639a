"""Train or evaluate HVT: `python -m hvt_jax.main --config=configs/hvt_s.py --workdir=DIR`.

  # the offline demo, a few minutes on a laptop CPU
  python -m hvt_jax.main --config=configs/demo.py --workdir=/tmp/hvt_demo
  # a published variant on ImageNet; any key can be overridden
  python -m hvt_jax.main --config=configs/hvt_s.py:stages=2 --config.batch_size=512 --workdir=...
  # multi-host with explicit addresses (TPU VMs and SLURM need only --distributed)
  python -m hvt_jax.main ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0

Rerunning the same command resumes from the workdir's latest checkpoint.
"""
from __future__ import annotations

import os

from hvt_jax import cli
from hvt_jax.training import host_memory, peers

if __name__ == '__main__':
  cli.quiet_native_logs()  # before jax and TensorFlow, which read their log settings when imported
  # Before the imports below: the restart runs this module again from its top, and they take
  # seconds (TensorFlow, through clu's summary writer).
  host_memory.configure()
  # Multi-process runs: a parent that turns a dead peer's native abort into one line.
  peers.supervise()

from absl import app, flags
import jax
from ml_collections import config_flags

from hvt_jax import console
from hvt_jax.training import loop

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Only when run as a program: importing the module defines no flags."""
  config_flags.DEFINE_config_file('config', None, 'config file, optionally with :args', lock_config=True)
  flags.DEFINE_string('workdir', None, 'where checkpoints, metrics and curves go (resumes if present)')
  flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with the cluster '
                    'auto-detected (TPU VMs, SLURM, ...)')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for explicit multi-host')
  flags.DEFINE_integer('num_processes', None, 'number of processes, for explicit multi-host')
  flags.DEFINE_integer('process_id', None, 'this process, 0..num_processes-1, for explicit multi-host')
  flags.DEFINE_integer('heartbeat_timeout', 100, 'multi-host: seconds without a heartbeat after '
                       'which a process counts as dead; the others then stop, each with one line '
                       "(jax.distributed's default)")
  flags.mark_flags_as_required(['config', 'workdir'])


def init_distributed() -> None:
  """Joins JAX's own multi-process runtime when asked to; a single process needs nothing."""
  explicit = FLAGS.coordinator_address is not None
  if not (explicit or FLAGS.distributed):
    return
  if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise app.UsageError('--coordinator_address needs --num_processes and --process_id.')
  # CPU processes exchange collectives through gloo; GPU and TPU use their own transports.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
  peers.note(process=jax.process_index(), processes=jax.process_count())


def use_compile_cache() -> None:
  """Keeps compiled programs across runs, so a resumed or repeated run starts in seconds.

  $JAX_COMPILATION_CACHE_DIR wins; otherwise ~/.cache/hvt_jax/xla.
  """
  if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser('~/.cache/hvt_jax/xla'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = cli.config()
  use_compile_cache()
  peers.note(workdir=FLAGS.workdir)
  init_distributed()
  console.say(f'Process {jax.process_index()} of {jax.process_count()}; '
              f'{jax.local_device_count()} local / {jax.device_count()} global devices '
              f'({jax.devices()[0].platform}).')
  try:
    loop.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # a collective's JaxRuntimeError, or Orbax's error from a barrier
    if jax.process_count() > 1 and peers.lost_peer(e):
      peers.await_verdict(FLAGS.heartbeat_timeout)  # the supervisor's line names the dead one
    raise


if __name__ == '__main__':
  define_flags()
  cli.run(main)
