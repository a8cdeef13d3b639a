"""Pool winners, their counts and their trace back to patches, on sequences with known answers."""
import matplotlib

matplotlib.use('Agg')  # headless: draw into memory only

import jax
import matplotlib.pyplot as plt
import numpy as np
import pytest

from hvt_jax import model as model_lib
from hvt_jax.model import visualize
from tests.helpers import TINY_MODEL


def test_windows_match_the_model_token_counts():
  counts = sorted(set(model_lib.create('hvt-s-4').tokens_per_block()), reverse=True)
  assert counts == [196, 97, 48, 23, 11]
  for before, after in zip(counts, counts[1:]):
    assert len(visualize.pool_windows(before)) == after
  np.testing.assert_array_equal(visualize.pool_windows(7), [[0, 1, 2], [2, 3, 4], [4, 5, 6]])
  with pytest.raises(ValueError, match='fewer than one pooling window'):
    visualize.pool_windows(2)


def test_winners_of_hand_made_tokens():
  # Channel 0 rises (the last of each window wins), channel 1 falls (the first wins),
  # channel 2 peaks at token 3 (it wins both windows that contain it).
  tokens = np.array([[0, 6, 0], [1, 5, 1], [2, 4, 2], [3, 3, 9], [4, 2, 1], [5, 1, 0],
                     [6, 0, 0]], np.float32)
  winners = visualize.pool_winners(tokens)
  np.testing.assert_array_equal(winners, [[2, 0, 2], [4, 2, 3], [6, 4, 4]])


def test_a_tie_goes_to_the_earlier_token():
  winners = visualize.pool_winners(np.ones((5, 2)))
  np.testing.assert_array_equal(winners, [[0, 0], [2, 2]])


def test_winners_hold_the_values_the_model_pools():
  tokens = np.asarray(jax.random.normal(jax.random.key(0), (23, 16)))
  winners = visualize.pool_winners(tokens)
  pooled = np.asarray(model_lib.max_pool_tokens(tokens[None], 3, 2)[0])
  np.testing.assert_array_equal(np.take_along_axis(tokens, winners, axis=0), pooled)


def test_bfloat16_tokens_give_the_same_winners():
  tokens = jax.random.normal(jax.random.key(3), (23, 16)).astype(jax.numpy.bfloat16)
  np.testing.assert_array_equal(visualize.pool_winners(tokens),
                                visualize.pool_winners(np.asarray(tokens, np.float32)))


def test_win_fraction_counts_channels_and_sums_to_the_kept_tokens():
  winners = np.array([[2, 0, 2], [4, 2, 3], [6, 4, 4]])
  fraction = visualize.win_fraction(winners, 7)
  np.testing.assert_allclose(fraction, np.array([1, 0, 3, 1, 3, 0, 1]) / 3)
  assert fraction.sum() == pytest.approx(3)

  tokens = np.asarray(jax.random.normal(jax.random.key(1), (196, 32)))
  fraction = visualize.win_fraction(visualize.pool_winners(tokens), 196)
  assert fraction.shape == (196,) and fraction.sum() == pytest.approx(97)
  assert fraction[-1] == 0  # 196 tokens: the last lies in no window
  assert fraction[1::2].max() <= 1 and fraction.max() <= 2  # odd tokens sit in one window


def test_shares_rows_sum_to_one_and_columns_to_the_fraction():
  winners = visualize.pool_winners(np.asarray(jax.random.normal(jax.random.key(2), (48, 8))))
  shares = visualize.win_shares(winners, 48)
  assert shares.shape == (23, 48)
  np.testing.assert_allclose(shares.sum(axis=1), 1)
  np.testing.assert_allclose(shares.sum(axis=0), visualize.win_fraction(winners, 48))


def test_tracing_two_pools_of_a_known_sequence():
  # 11 patches, one channel rising: pool 1 keeps 2, 4, 6, 8, 10 (the last of each window).
  # Before pool 2 the 5 tokens fall, so each of its windows keeps its first token: 0 and 2,
  # which are patches 2 and 6.
  first = visualize.pool_winners(np.arange(11.0)[:, None])
  np.testing.assert_array_equal(first[:, 0], [2, 4, 6, 8, 10])
  second = visualize.pool_winners(-np.arange(5.0)[:, None])
  np.testing.assert_array_equal(second[:, 0], [0, 2])
  traced = visualize.trace_shares([first, second], 11)
  assert [t.shape for t in traced] == [(5, 11), (2, 11)]
  np.testing.assert_array_equal(visualize.source_patches(traced[0]), [2, 4, 6, 8, 10])
  np.testing.assert_array_equal(visualize.source_patches(traced[1]), [2, 6])
  np.testing.assert_allclose(traced[1].sum(axis=0), np.eye(11)[[2, 6]].sum(axis=0))


def test_tracing_splits_a_token_by_the_channels_its_inputs_won():
  # Pool 1 on 7 patches, 2 channels: output 0 takes channel 0 from patch 2 and channel 1 from
  # patch 0. Pool 2 (one window over the 3 tokens) takes both channels from token 0.
  first = np.array([[2, 0], [4, 4], [6, 5]])
  second = np.array([[0, 0]])
  traced = visualize.trace_shares([first, second], 7)
  np.testing.assert_allclose(traced[1], [[0.5, 0, 0.5, 0, 0, 0, 0]])
  # The first trace is the first pool's shares; the sums of every trace equal its kept tokens.
  np.testing.assert_allclose(traced[0], visualize.win_shares(first, 7))
  assert [t.sum() for t in traced] == pytest.approx([3, 1])


def test_traces_of_a_real_model_cover_every_stage():
  model = model_lib.HVT(**TINY_MODEL)  # 64 patches -> 31 -> 15
  rng = np.random.default_rng(0)  # any weights will do; skips compiling the initializers
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype),
                        model_lib.abstract_params(model))
  images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  features = [np.asarray(f[0]) for f in model_lib.stage_features(model, params, images)]
  winners = [visualize.pool_winners(f) for f in features[:-1]]
  traced = visualize.trace_shares(winners, 64)
  assert [t.shape for t in traced] == [(31, 64), (15, 64)]
  assert traced[-1].shape[0] == features[-1].shape[0]


def test_unnormalize_inverts_the_normalization():
  image = np.random.default_rng(0).uniform(size=(4, 4, 3))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  normalized = (image - mean) / std
  np.testing.assert_allclose(visualize.unnormalize(normalized, mean, std), image, atol=1e-6)


def test_draw_patch_scores_places_each_score_on_its_patch():
  fig, ax = plt.subplots()
  scores = np.arange(6.0)  # 2 rows x 3 columns of 4-pixel patches
  overlay = visualize.draw_patch_scores(np.zeros((8, 12, 3)), scores, 4, ax)
  np.testing.assert_array_equal(overlay.get_array(), [[0, 1, 2], [3, 4, 5]])
  assert overlay.get_extent() == [0, 12, 8, 0]
  with pytest.raises(ValueError, match='do not tile'):
    visualize.draw_patch_scores(np.zeros((8, 12, 3)), np.arange(5.0), 4, ax)
  plt.close(fig)
