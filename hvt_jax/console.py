"""What a person sees on the terminal: short plain lines in place of the absl log.

Commands start quiet (`cli.run`): absl shows warnings only, and training prints one line
per log step, one per evaluation and a last one saying where the results are.
`--verbosity=0` brings back the full absl log instead (`1`: debug). Library use (a
notebook) is quiet too unless absl's verbosity was raised.
"""
from __future__ import annotations

import sys
import time

from absl import logging
from clu.metric_writers import interface


def quiet() -> bool:
  """True while the full (INFO) log is off, so the short lines stand in for it."""
  return logging.get_verbosity() < logging.INFO


def say(message: str) -> None:
  """A line for a person: printed plainly when quiet, else logged at INFO."""
  if quiet():
    print(message, file=sys.stderr, flush=True)
  else:
    logging.info('%s', message)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def train_line(step: int, total: int, scalars: dict, eta: float | None) -> str:
  """`step 400/1000  epoch 2.00  loss 2.3012  lr 1.00e-03  1234 img/s  input wait 3%  ETA 5m02s`.

  `input wait`: the share of the interval the loop waited for its next batch
  (`perf/input_wait`); a large one means the host, not the step, sets the pace.
  """
  parts = [f'step {step}/{total}', f'epoch {scalars["train/epoch"]:.2f}',
           f'loss {scalars["train/loss"]:.4f}', f'lr {scalars["train/lr"]:.2e}']
  if 'train/images_per_sec' in scalars:
    parts.append(f'{scalars["train/images_per_sec"]:.0f} img/s')
  if 'perf/input_wait' in scalars:
    parts.append(f'input wait {100 * scalars["perf/input_wait"]:.0f}%')
  if scalars.get('train/skipped_updates'):
    parts.append(f'skipped {scalars["train/skipped_updates"]:.0f} updates')
  if scalars.get('train/skipped_examples'):
    parts.append(f'skipped {scalars["train/skipped_examples"]:.0f} unreadable images')
  parts.append(f'ETA {_duration(eta)}' if eta is not None else 'ETA ?')
  return '  '.join(parts)


def eval_line(step: int, scalars: dict) -> str:
  """`eval at step 400: top-1 71.20%  top-5 90.10%  loss 1.2345 | EMA top-1 ...`."""
  def one(prefix):
    return (f'top-1 {scalars[f"{prefix}/top1"]:.2f}%  top-5 {scalars[f"{prefix}/top5"]:.2f}%  '
            f'loss {scalars[f"{prefix}/loss"]:.4f}')
  line = f'eval at step {step}: {one("eval")}'
  if 'eval_ema/top1' in scalars:
    line += f' | EMA {one("eval_ema")}'
  return line


class Writer(interface.MetricWriter):
  """A clu writer that turns the loop's train and eval scalars into `train_line`/`eval_line`.

  Silent when the full log is on: clu's own logging writer then shows every scalar.
  """

  def __init__(self, total_steps: int, devices: int):
    self._total, self._devices = total_steps, devices
    self._last = None  # (step, time) of the previous train line, for the ETA

  def write_scalars(self, step, scalars):
    if not quiet():
      return
    scalars = dict(scalars)
    if 'train/loss' in scalars:
      now, eta = time.time(), None
      if self._last is not None and step > self._last[0]:
        eta = (self._total - step) * (now - self._last[1]) / (step - self._last[0])
      self._last = (step, now)
      if 'train/images_per_sec_per_device' in scalars:
        scalars['train/images_per_sec'] = (
            scalars['train/images_per_sec_per_device'] * self._devices)
      say(train_line(step, self._total, scalars, eta))
    if 'eval/top1' in scalars:
      say(eval_line(step, scalars))

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass
