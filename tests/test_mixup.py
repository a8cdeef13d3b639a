"""Mixup / CutMix targets and images against timm's batch-mode rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hvt_jax import defaults
from hvt_jax.data import mixup

B, H, W, C = 6, 16, 12, 10
LABELS = jnp.arange(B)  # all different, so a target row shows its lambda


def images():
  """Image i is the constant i + 1: every pixel tells which image it came from."""
  return jnp.broadcast_to(jnp.arange(1, B + 1, dtype=jnp.float32)[:, None, None, None],
                          (B, H, W, 3))


LS = 0.1
OFF, ON = LS / C, 1 - LS + LS / C


@functools.lru_cache(maxsize=None)
def _run(seeds, settings):
  fn = jax.jit(functools.partial(mixup.mix, **dict(settings)))
  return [tuple(np.asarray(a) for a in fn(jax.random.key(seed), images(), LABELS))
          for seed in range(seeds)]


def run(seeds, **kw):
  """`mix` under jit for seeds 0..seeds-1, cached: each setting compiles a Gamma sampler
  (seconds), so tests share what they can."""
  settings = dict(num_classes=C, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5,
                  label_smoothing=LS)
  settings.update(kw)
  return _run(seeds, tuple(sorted(settings.items())))


def lam_of(targets):
  """Labels are distinct, so row i holds lam at label i and 1 - lam at label B-1-i (smoothed)."""
  lam = (targets[np.arange(B), np.arange(B)] - OFF) / (ON - OFF)
  mirror = (targets[np.arange(B), np.arange(B)[::-1]] - OFF) / (ON - OFF)
  np.testing.assert_allclose(lam + mirror, 1, atol=1e-5)
  assert np.allclose(lam, lam[0], atol=1e-6)  # one lambda per batch
  return float(lam[0])


def test_all_off_gives_smoothed_one_hot():
  [(out, targets)] = run(1, mixup=0.0, cutmix=0.0)
  np.testing.assert_array_equal(out, images())
  expected = np.full((B, C), 0.1 / C, np.float32)
  expected[np.arange(B), np.arange(B)] = 1 - 0.1 + 0.1 / C
  np.testing.assert_allclose(targets, expected, rtol=1e-6)
  assert np.isclose(targets[0, 0], 0.91) and np.isclose(targets[0, 1], 0.01)
  [(out, targets2)] = run(1, mix_prob=0.0)
  np.testing.assert_array_equal(out, images())
  np.testing.assert_allclose(targets2, expected, rtol=1e-6)


def test_mixup_blends_with_the_reversed_batch():
  for out, targets in run(60, cutmix=0.0):
    lam = lam_of(targets)
    x = np.asarray(images())
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[::-1], rtol=1e-5)
    assert 0 <= lam <= 1


def test_cutmix_lambda_is_the_true_box_area():
  lams = []
  for out, targets in run(60, mixup=0.0):
    lam = lam_of(targets)
    lams.append(lam)
    x = np.asarray(images())
    pasted = out[..., 0] == x[::-1][..., 0]  # pixels taken from the partner image
    assert np.all(pasted | (out[..., 0] == x[..., 0]))
    box = pasted[0]
    assert np.all(pasted == box)  # the same box in every image
    assert np.isclose(lam, 1 - box.sum() / (H * W), atol=1e-5)
    if box.any():  # a rectangle: its rows and columns span exactly its area
      rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
      assert box.sum() == len(rows) * len(cols) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
  assert len(set(lams)) > 10


def test_cutmix_box_size_follows_lambda():
  """timm: cut = int(side * sqrt(1 - lam)), centred anywhere, clipped at the border."""
  for seed in range(30):
    box, lam = mixup.cutmix_box(jax.random.key(seed), 32, 32, jnp.float32(0.75))
    box = np.asarray(box)
    rows, cols = box.any(1).sum(), box.any(0).sum()
    assert rows <= 16 and cols <= 16  # cut 16: half-extent 8 either side of the centre
    assert np.isclose(float(lam), 1 - rows * cols / 1024)
  box, lam = mixup.cutmix_box(jax.random.key(0), 32, 32, jnp.float32(1.0))
  assert not np.asarray(box).any() and float(lam) == 1.0


@pytest.mark.parametrize('kw', [{}, {'cutmix': 0.0}, {'mixup': 0.0}, {'mix_prob': 0.5}])
def test_targets_sum_to_one_with_smoothing(kw):
  for _, targets in run(60, **kw):
    np.testing.assert_allclose(targets.sum(-1), 1, rtol=1e-6)
    assert targets.min() >= 0.1 / C - 1e-7
    # Smoothed targets mixed: lam * smooth(y) + (1 - lam) * smooth(flip(y)).
    lam = (targets[0, 0] - 0.1 / C) / 0.9
    smooth = np.full((B, C), 0.1 / C)
    smooth[np.arange(B), np.arange(B)] += 0.9
    np.testing.assert_allclose(targets, lam * smooth + (1 - lam) * smooth[::-1], atol=1e-6)


def test_switch_and_mix_probabilities():
  kinds = []
  for out, targets in run(60, mix_prob=0.5):
    x = np.asarray(images())
    lam = lam_of(targets)
    if np.array_equal(out, x):
      kinds.append('none' if lam == 1 else 'empty box')
    elif np.all((out == x) | (out == x[::-1])):
      kinds.append('cutmix')
    else:
      kinds.append('mixup')
  counts = {k: kinds.count(k) for k in set(kinds)}
  assert 15 <= counts.get('none', 0) <= 45, counts
  assert counts.get('cutmix', 0) >= 5 and counts.get('mixup', 0) >= 5, counts


def test_mix_from_config():
  config = defaults.train_config()
  config.model.num_classes = C
  batch = {'image': images(), 'label': LABELS}
  out, targets = jax.jit(lambda key, b: mixup.mix_from_config(key, b, config))(
      jax.random.key(3), batch)
  assert out.shape == (B, H, W, 3) and targets.shape == (B, C)
  np.testing.assert_allclose(np.asarray(targets).sum(-1), 1, rtol=1e-6)
