"""The training loop: resume or start, train, evaluate raw and EMA weights, checkpoint, report.

`train_and_evaluate(config, workdir)` is what `python -m hvt_jax.main` runs. A
rerun of the same command in the same workdir resumes from the latest
checkpoint (model, optimizer, EMA, step and rng; the input position follows from
the step) and ends with the parameters an uninterrupted run would have had.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import signal
import threading
import time
from typing import Callable

from absl import logging
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hvt_jax import console, defaults, loading, sharding
from hvt_jax.training import checkpoint, curves, peers, safety, train_step
from hvt_jax.data import datasets, input_pipeline, input_spec
from hvt_jax import model as model_lib
from hvt_jax.errors import UserError

CONFIG_FILE = 'config.json'
# Settings a resumed run must share with the run that saved the checkpoints.
_MUST_MATCH = ('model', 'batch_size', 'seed', 'num_epochs', 'data.name', 'optim', 'aug', 'mix',
               'eval', 'ema_decay')


class TrainError(UserError):
  pass


def _lookup(config: dict, dotted: str):
  for part in dotted.split('.'):
    config = config[part]
  if dotted == 'model':
    # A model field added since the run started takes its default; how the model runs
    # (attention kernel, remat, scan) may change between runs.
    config = {k: v for k, v in {**model_lib.field_defaults(), **config}.items()
              if k not in model_lib.RUN_SETTINGS}
  return config


def check_or_write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the run's config once; later runs in the same workdir must match it."""
  path = epath.Path(workdir) / CONFIG_FILE
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = defaults.upgrade_saved(json.loads(path.read_text()))
    changed = [k for k in _MUST_MATCH if _lookup(saved, k) != _lookup(current, k)]
    if changed:
      raise TrainError(f'{workdir} holds a run with different {", ".join(changed)}; resume it with '
                       f'its own config ({path}) or pass a new --workdir.')
  elif jax.process_index() == 0:
    path.write_text(json.dumps(current, indent=2))


def evaluate(eval_step, state: train_step.TrainState, eval_batches) -> dict[str, float]:
  """Top-1/top-5 (%) and loss over the whole eval split, for the raw and the EMA weights.

  One pass over the data serves both sets of weights.
  """
  weights = {'eval': state.params, 'eval_ema': state.ema_params}
  weights = {k: v for k, v in weights.items() if v is not None}
  sums = dict.fromkeys(weights)
  for batch in eval_batches:
    for prefix, params in weights.items():
      out = eval_step(params, batch)
      sums[prefix] = out if sums[prefix] is None else jax.tree.map(jnp.add, sums[prefix], out)
  results = {}
  for prefix, s in jax.device_get(sums).items():
    count = float(s['count'])
    results.update({f'{prefix}/top1': 100 * float(s['top1']) / count,
                    f'{prefix}/top5': 100 * float(s['top5']) / count,
                    f'{prefix}/loss': float(s['loss']) / count,
                    f'{prefix}/examples': count})
    if 'real_count' in s:
      results.update({f'{prefix}/real_top1': 100 * float(s['real_top1']) / float(s['real_count']),
                      f'{prefix}/real_examples': float(s['real_count'])})
  return results


def _stop_on_sigterm() -> threading.Event:
  """Set on SIGTERM (preemption): the loop saves a checkpoint and exits cleanly."""
  stop = threading.Event()
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
  return stop


def _start_from(state, init_from: str, shardings, image_size: int | None = None):
  """Weights of a model dir or workdir as the starting point (fine-tuning): position
  embeddings are resampled to `image_size` (None: as saved); a head of another class count is
  left freshly initialized; any other mismatch is an error."""
  # Loaded replicated: a resampled embedding's layout follows its new shape, set at the end.
  whole = jax.sharding.NamedSharding(jax.tree.leaves(shardings.params)[0].mesh, jax.P())
  _, params = loading.load(init_from, sharding=whole, image_size=image_size)
  new = dict(train_step.per_block(state.params))
  for name, value in params.items():
    target = new.get(name)
    shapes = jax.tree.map(lambda a: a.shape, (value, target))
    if target is None or shapes[0] != shapes[1]:
      if name == 'head':
        logging.warning('init_from: head shapes differ (new class count); head stays fresh.')
        continue
      raise TrainError(f'init_from {init_from}: {name} does not fit this model '
                       f'({shapes[0]} vs {shapes[1]}); use weights of the same architecture.')
    new[name] = value
  new = train_step.stacked_like(new, model_lib.stacked_runs(state.params), shardings.params)
  ema = new if state.ema_params is not None else None
  return state.replace(params=new, ema_params=ema)


def model_meta(config: ml_collections.ConfigDict, model: model_lib.HVT,
               dataset: datasets.Dataset) -> dict:
  """What travels with the weights: the model, its eval transform and its class names."""
  names = list(dataset.class_names)
  if config.data.name in ('imagenet2012', 'imagenet_v2', 'imagenet2012_real'):
    names = None  # TFDS names ImageNet classes by WordNet id; predict has readable names
  return {'model': model.config(), 'preprocess': input_spec.eval_transform(config.eval),
          'class_names': names, 'dataset': config.data.name}


def _writer(workdir: str):
  primary = jax.process_index() == 0
  writers = [metric_writers.create_default_writer(workdir, just_logging=not primary)]
  if primary:
    writers.append(curves.JsonlWriter(workdir))
  return metric_writers.MultiWriter(writers)


@dataclasses.dataclass(frozen=True)
class Run:
  """What the loop needs, decided once from the config."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  meta: dict  # saved with every checkpoint: model config, eval transform, class names
  dataset: datasets.Dataset  # opened once, for both iterators
  train_step: Callable
  eval_step: Callable


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_step.TrainState:
  defaults.check_no_moved_keys(config)
  safety.check_workdir(workdir)  # before minutes of dataset preparation and compilation
  model = model_lib.HVT(**config.model)  # impossible model settings fail here, in words
  mesh = sharding.make_mesh(config.mesh)
  dataset = datasets.open_dataset(config)
  steps_per_epoch = dataset.num_train // config.batch_size
  if steps_per_epoch < 1 and not config.eval_only:
    raise TrainError(f'batch_size {config.batch_size} exceeds the {dataset.num_train} training '
                     'examples; lower --config.batch_size.')
  if not config.eval_only:
    input_pipeline.check_train_data(config, dataset)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)

  # The steps' model has its 'auto' settings decided for the mesh's devices; the saved one
  # keeps them. A resumed run replaces this fresh state with the checkpoint's.
  program = train_step.build(config, mesh, steps_per_epoch)
  shardings, p_train, p_eval = program.shardings, program.train_step, program.eval_step
  # The layout `build` computed: a fresh state is computed straight into it.
  state = train_step.place_state(program.model, program.tx, jax.random.key(config.seed),
                                 ema=config.ema_decay > 0, shardings=shardings)
  run = Run(config, workdir, mesh, steps_per_epoch, total_steps,
            config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch,
            model_meta(config, model, dataset), dataset, p_train, p_eval)

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  check_or_write_config(workdir, config)
  # Closing waits for pending async saves; an unclosed manager breaks interpreter exit.
  with safety.storage_errors(workdir, str(epath.Path(workdir) / checkpoint.CHECKPOINTS_DIR)), \
       contextlib.closing(checkpoint.manager(workdir, keep=config.keep_checkpoints)) as mngr, \
       contextlib.closing(_writer(workdir)) as writer:
    latest = mngr.latest_step()
    if latest is not None:
      state = _resume(mngr, latest, state, shardings)
      console.say(f'Resumed {workdir} from step {latest}.')
    elif config.init_from:
      state = _start_from(state, config.init_from, shardings, config.model.image_size)
    if config.eval_only:
      if latest is None and not config.init_from:
        raise TrainError(f'eval_only: {workdir} has no checkpoint; pass '
                         '--config.init_from=MODEL_DIR.')
      return _eval_only(run, state, writer)
    return _train(run, state, mngr, writer)


def _eval_only(run: Run, state, writer) -> train_step.TrainState:
  results = evaluate(run.eval_step, state,
                     input_pipeline.eval_iterator(run.config, run.mesh, dataset=run.dataset))
  step = int(state.step)
  writer.write_scalars(step, results)
  if jax.process_index() == 0:
    (epath.Path(run.workdir) / 'eval_results.json').write_text(
        json.dumps({'step': step, **results}, indent=2))
  logging.info('Eval at step %d: %s', step, results)
  return state


def _resume(mngr, step: int, state, shardings) -> train_step.TrainState:
  """The state saved at `step`. The input needs nothing saved: it restarts at example
  step * batch_size of the data (input_pipeline.train_iterator)."""
  state, processes = checkpoint.restore_train(mngr, step, state, shardings)
  if processes is not None and processes != jax.process_count():
    logging.warning('The checkpoint was saved by %d processes, now %d: the input continues at the '
                    'same epoch and example, but its batches differ from the original run\'s.',
                    processes, jax.process_count())
  return state


def _hparams(config: ml_collections.ConfigDict) -> dict:
  """The config as flat 'a.b' keys, values TensorBoard takes (others as strings)."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _train(run: Run, state, mngr, writer) -> train_step.TrainState:
  config, step = run.config, int(state.step)
  if step == 0:
    writer.write_hparams(_hparams(config))
  console.say(f'Training {run.workdir} for {run.total_steps} steps ({run.steps_per_epoch} per '
              f'epoch) on {jax.device_count()} devices, mesh {dict(run.mesh.shape)}.')
  if jax.process_index() == 0:
    writer = metric_writers.MultiWriter([writer, console.Writer(run.total_steps, jax.device_count())])
  train_batches = input_pipeline.train_iterator(config, run.mesh, step=step, dataset=run.dataset)
  eval_batches = input_pipeline.eval_iterator(config, run.mesh, dataset=run.dataset)
  report = periodic_actions.ReportProgress(num_train_steps=run.total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  stop = _stop_on_sigterm()
  pending, step0, meter = [], step, _Meter()
  finite, first_bad = jnp.array(True), jnp.array(0)  # on device, since the start of this run

  def check_finite():  # before anything is logged, evaluated or saved
    if not bool(finite):
      raise TrainError(safety.diverged(int(first_bad), step, mngr.latest_step(), run.workdir))

  peers.reached(step)  # for the one line a dead peer ends a multi-process run with
  while step < run.total_steps:
    with jax.profiler.StepTraceAnnotation('train', step_num=step):
      state, metrics = run.train_step(state, meter.next_batch(train_batches))
      meter.dispatched(metrics)
    step += 1
    peers.reached(step)
    finite, first_bad = safety.track_finite(finite, first_bad, metrics.pop('finite'), step)
    pending.append(metrics)
    report(step)
    last = step == run.total_steps
    if step % config.log_every_steps == 0 or last:
      check_finite()
      averaged = {k: _finite_mean([m[k] for m in jax.device_get(pending)]) for k in pending[0]}
      for count in ('skipped_updates', 'skipped_examples'):
        if count in averaged:
          averaged[count] *= len(pending)  # a count over the interval, not a rate
      wall, cpu, wait = meter.take()  # after device_get: the interval's steps have all run
      images = (step - step0) * config.batch_size
      averaged['images_per_sec_per_device'] = images / wall / jax.device_count()
      averaged['epoch'] = step / run.steps_per_epoch
      writer.write_scalars(step, {**{f'train/{k}': v for k, v in averaged.items()},
                                  **perf_scalars(wall, cpu, wait, images / jax.process_count())})
      pending, step0 = [], step
    eval_metrics = None
    if step % run.eval_every == 0 or last:
      check_finite()
      with meter.paused(state):
        results = evaluate(run.eval_step, state, eval_batches)
        writer.write_scalars(step, results)
      eval_metrics = {checkpoint.BEST_METRIC: results['eval/top1']}
    preempted = stop.is_set() or mngr.reached_preemption(step)
    if eval_metrics or preempted or last or step % config.checkpoint_every_steps == 0:
      check_finite()
      with meter.paused(state):
        checkpoint.save_train(mngr, state, run.meta, eval_metrics)
    if preempted:
      logging.warning('Stopped at step %d (SIGTERM/preemption) after saving; rerun the same '
                      'command to resume.', step)
      break
  mngr.wait_until_finished()
  writer.flush()
  if jax.process_index() == 0:
    console.say(_final_line(run.workdir, curves.plot(run.workdir), mngr.best_step()))
  return state


def _finished_at(array: jax.Array) -> float:
  array.block_until_ready()
  return time.perf_counter()


class _Meter:
  """The training part of each log interval: its wall and process CPU time (evaluations and
  checkpoint saves left out, `paused`), and how long the device waited for input in it.

  Input wait. JAX dispatches a step asynchronously: `train_step(...)` returns once the step is
  queued, so the loop runs ahead of the device and can sit in `next(train_batches)` while the
  device still computes queued steps; that time costs nothing. The device waits for input only
  from the moment its last queued step finishes until `next()` returns the batch of the next
  one. So each `next()` call counts from the later of its start and the previous step's finish
  (recorded by a thread that blocks on the step's output) to its return. In a run the step
  limits, that is about 0; in one the input limits, about the share of the time the device sat
  idle. `next()` includes starting the batch's copy to the devices (`data.feeding.TrainIterator`).
  """

  def __init__(self):
    # One thread blocks on each step's output in turn; it ends with the pool, when the loop
    # drops the meter.
    self._finishes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='step_finish')
    self._previous = None  # when the last dispatched step finished (a Future); None: no step
    self._start()

  def _start(self):
    self._wall = self._cpu = 0.0
    self._calls = []  # per next(): (entered, returned, previous step's finish)
    self._since = (time.perf_counter(), time.process_time())

  def next_batch(self, batches):
    entered = time.perf_counter()
    batch = next(batches)
    self._calls.append((entered, time.perf_counter(), self._previous))
    return batch

  def dispatched(self, outputs) -> None:
    """After each step's call, with any of its outputs."""
    self._previous = self._finishes.submit(_finished_at, jax.tree.leaves(outputs)[0])

  def _stop(self):
    wall, cpu = self._since
    self._wall += time.perf_counter() - wall
    self._cpu += time.process_time() - cpu

  @contextlib.contextmanager
  def paused(self, state):
    """Leaves the block's time out; the steps queued before it still count (`state` done)."""
    jax.block_until_ready(state)
    self._stop()
    try:
      yield
    finally:
      self._since = (time.perf_counter(), time.process_time())

  def take(self) -> tuple[float, float, float]:
    """(wall s, CPU s, input wait s) since the last take, and starts the next interval. Call it
    once the interval's steps have run (the metrics read back), so their finishes are known."""
    self._stop()
    wait = 0.0
    for entered, returned, previous in self._calls:
      idle_from = entered if previous is None else max(entered, previous.result())
      wait += max(0.0, returned - idle_from)
    out = (self._wall, self._cpu, wait)
    self._start()
    return out


def perf_scalars(wall: float, cpu: float, wait: float, local_images: float) -> dict[str, float]:
  """`perf/input_wait`: the share (0..1) of the interval's wall time in which the device waited
  for the next batch (`_Meter`). `perf/host_cpu_ms_per_image`: this process's CPU time (all its
  threads: tf.data's, the runtime's, Python's) per image it fed; on a CPU backend that includes
  the step's own compute, on an accelerator it is what the host spends to feed it."""
  return {'perf/input_wait': wait / wall,
          'perf/host_cpu_ms_per_image': 1e3 * cpu / local_images}


def _final_line(workdir: str, curves_png: str, best_step: int | None) -> str:
  line = f'Done. Curves: {curves_png}'
  if best_step is None:
    return line
  top1 = [r['eval/top1'] for r in curves.read(workdir)
          if r.get('step') == best_step and 'eval/top1' in r]
  score = f' (eval top-1 {top1[-1]:.2f}%)' if top1 else ''
  where = epath.Path(workdir) / checkpoint.CHECKPOINTS_DIR / str(best_step)
  return f'{line}; best checkpoint: step {best_step}{score}, {where}'


def _finite_mean(values) -> float:
  """Skipped steps (config.skip_nonfinite) report a non-finite loss; they do not count."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float('nan')

