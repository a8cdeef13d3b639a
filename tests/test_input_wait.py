"""`perf/input_wait`: the share of a log interval in which the device waited for the next batch.

The real loop writes it into metrics.jsonl beside `perf/host_cpu_ms_per_image`. The bounds are
coarse on purpose: the metric is the subject, not the machine's speed.
"""
import time

import jax
import jax.numpy as jnp

from hvt_jax.data import input_pipeline
from hvt_jax.training import curves, loop
from tests import tiny_config


@jax.jit
def _busy(a):
  """Work that keeps the CPU device busy for a good part of a second."""
  return jax.lax.fori_loop(0, 10, lambda i, a: jnp.tanh(a @ a), a)


def _slow(items, seconds):
  for item in items:
    time.sleep(seconds)
    yield item


def test_time_in_next_counts_only_once_the_device_has_nothing_left_to_run():
  a = jnp.full((1000, 1000), 1e-3)
  _busy(a).block_until_ready()  # compiled
  meter = loop._Meter()
  out = _busy(a)  # dispatched, still running while next() waits below
  meter.dispatched(out)
  meter.next_batch(_slow([0], 0.1))
  assert not out.is_ready(), 'the step ended before next() did: make _busy longer'
  out.block_until_ready()
  _, _, wait = meter.take()
  assert wait < 0.05, wait  # the device was busy throughout: no input wait

  meter.dispatched(out)  # finished already: the device idles while next() waits
  meter.next_batch(_slow([0], 0.1))
  wall, cpu, wait = meter.take()
  assert 0.09 < wait <= wall, (wait, wall)
  assert cpu >= 0


def _train(tmp_path, **model):
  config = tiny_config.get_config()
  config.model.update(model)
  config.update(max_steps=12, eval_every_steps=1000, checkpoint_every_steps=1000)
  loop.train_and_evaluate(config, str(tmp_path))
  rows = [r for r in curves.read(str(tmp_path)) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [4, 8, 12]
  for r in rows:
    assert 0 <= r['perf/input_wait'] <= 1 and r['perf/host_cpu_ms_per_image'] > 0, r
  return rows[1:]  # the first interval holds the compilation and the pipeline's start


def test_input_wait_is_near_zero_when_the_step_sets_the_pace(tmp_path):
  # The tiny digits from memory without RandAugment (the demo recipe), against a step wider than the
  # test config's, so the input is the cheaper side even on a loaded 2-core machine.
  rows = _train(tmp_path, num_heads=4, head_dim=64)
  assert all(r['perf/input_wait'] < 0.25 for r in rows), rows


def test_input_wait_is_large_when_the_input_is_slowed(tmp_path, monkeypatch):
  # Only the input is slowed: each batch comes 0.5 s late; the loop's code path is the real one.
  original = input_pipeline.train_iterator
  monkeypatch.setattr(input_pipeline, 'train_iterator',
                      lambda *args, **kwargs: _slow(original(*args, **kwargs), 0.5))
  rows = _train(tmp_path)
  assert all(r['perf/input_wait'] > 0.5 for r in rows), rows
