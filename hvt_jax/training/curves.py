"""Training curves: scalars appended to `<workdir>/metrics.jsonl`, and a plot drawn from them.

The JSON-lines log sits beside the TensorBoard events so that notebooks, tests
and `plot` can read a run's history without TensorBoard.
"""
from __future__ import annotations

import io
import json

from clu.metric_writers import interface
from etils import epath

METRICS_FILE = 'metrics.jsonl'
PLOT_FILE = 'curves.png'


class JsonlWriter(interface.MetricWriter):
  """A clu writer that keeps scalars only, one JSON object per write."""

  def __init__(self, workdir: str):
    self._path = epath.Path(workdir) / METRICS_FILE

  def write_scalars(self, step, scalars):
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    with self._path.open('a') as f:
      f.write(json.dumps(row) + '\n')

  # Everything that is not a scalar goes to TensorBoard only.
  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): pass
  def close(self): pass


def read(workdir: str) -> list[dict]:
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric; a resumed run's rewritten steps keep their latest value."""
  latest = {r['step']: r[key] for r in rows if key in r}
  steps = sorted(latest)
  return steps, [latest[s] for s in steps]


def plot(workdir: str) -> str | None:
  """Draws loss, eval accuracy and lr against step into `<workdir>/curves.png`."""
  rows = read(workdir)
  if not rows:
    return None
  # A bare Figure, not pyplot: no global backend switch, so notebooks keep their inline plots.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(15, 4))
  axes = fig.subplots(1, 3)
  for key, label in [('train/loss', 'train (smoothed or mixed targets)'), ('eval/loss', 'eval'),
                     ('eval_ema/loss', 'eval, EMA weights')]:
    if any(key in r for r in rows):
      axes[0].plot(*series(rows, key), label=label, marker='.' if key != 'train/loss' else None)
  axes[0].set_title('cross-entropy loss')
  for key, label in [('eval/top1', 'top-1'), ('eval/top5', 'top-5'),
                     ('eval_ema/top1', 'top-1, EMA weights')]:
    if any(key in r for r in rows):
      axes[1].plot(*series(rows, key), label=label, marker='.')
  axes[1].set_title('eval accuracy (%)')
  if any('train/lr' in r for r in rows):
    axes[2].plot(*series(rows, 'train/lr'))
  axes[2].set_title('learning rate')
  for ax in axes:
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.suptitle(epath.Path(workdir).name)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=100)
  path = epath.Path(workdir) / PLOT_FILE
  path.write_bytes(png.getvalue())
  return str(path)
