"""PoP simulation (tasks/annotate.py): partner draws, label noise, determinism, training-set composition."""

from __future__ import annotations

import numpy as np
import pytest

from popflow.errors import PopflowError
from tasks.annotate import label, simulate_pop_labels, winner_counts


def sim(gt, sampling="iterative", k=3, noise="flip", p=0.0, tau=1.0, ties="coin", seed=0, groups=None,
        partners="all"):
    groups = np.zeros(len(gt), dtype=np.int64) if groups is None else np.asarray(groups)
    return simulate_pop_labels(np.asarray(gt, dtype=float), groups, sampling, k, noise, p, tau, ties, seed, partners)


def test_iterative_gives_every_pair_exactly_k_distinct_partners():
    gt = np.arange(50, dtype=float)
    out = sim(gt, k=4)
    assert np.array_equal(np.bincount(out["a"], minlength=50), np.full(50, 4))
    pairs = set(zip(out["a"].tolist(), out["b"].tolist(), strict=True))
    assert len(pairs) == 200 and all(a != b for a, b in pairs)  # distinct partners, never itself
    # without noise every label is the truth: a is stronger exactly when its margin is larger
    assert np.array_equal(out["a_stronger"], gt[out["a"]] > gt[out["b"]]) and not out["flipped"].any()


def test_random_sampling_draws_k_times_n_uniform_comparisons():
    """k x n comparisons; each item is in one as a with probability... on average 2k appearances in all."""
    out = sim(np.arange(400, dtype=float), sampling="random", k=5)
    assert len(out["a"]) == 2000 and (out["a"] != out["b"]).all()
    appearances = np.bincount(out["a"], minlength=400) + np.bincount(out["b"], minlength=400)
    assert appearances.mean() == 10 and appearances.std() > 1  # uneven, unlike iterative


def test_random_training_set_over_represents_strong_preferences():
    """pop_winners copies: an item wins a comparison when its margin is larger, so the strongest quartile
    collects far more copies than the weakest (which can only win against even weaker partners)."""
    gt = np.arange(400, dtype=float)
    out = sim(gt, sampling="random", k=5, seed=1)
    copies = winner_counts(400, out["a"], out["b"], out["a_stronger"])
    assert copies.sum() == 2000
    assert copies[300:].sum() > 4 * copies[:100].sum()


def test_flip_noise_rate_within_binomial_tolerance():
    """20,000 comparisons at p = 0.2: expected 4,000 flips, sd = sqrt(20000 * 0.2 * 0.8) = 56.6; allow 4 sd."""
    out = sim(np.arange(2000, dtype=float), k=10, p=0.2, seed=7)
    assert abs(int(out["flipped"].sum()) - 4000) < 4 * 56.6
    assert np.array_equal(out["a_stronger"] ^ out["flipped"], np.arange(2000)[out["a"]] > np.arange(2000)[out["b"]])


def test_bradley_terry_noise_by_hand():
    """Margin gap 1 at tau 0.5: P(a stronger) = sigmoid(1 / 0.5) = sigmoid(2) = 0.8808."""
    rng = np.random.default_rng(0)
    n = 40_000
    labels, flipped, keep = label(np.ones(n), np.zeros(n), "bradley_terry", 0.0, 0.5, "coin", rng)
    assert abs(labels.mean() - 0.8808) < 0.01 and keep.all()
    assert np.array_equal(flipped, ~labels)


def test_ties_drop_or_coin():
    gt = [1.0, 1.0, 1.0, 1.0, 2.0]
    dropped = sim(gt, k=4, ties="drop")
    assert len(dropped["a"]) == 20 - 12  # 4 tied items x 3 tied partners each are dropped
    coin = sim(gt, k=4, ties="coin")
    assert len(coin["a"]) == 20 and not coin["flipped"].any()


def test_same_seed_same_labels_other_seed_differs():
    gt = np.random.default_rng(3).normal(size=300)
    a, b, c = sim(gt, p=0.1, seed=5), sim(gt, p=0.1, seed=5), sim(gt, p=0.1, seed=6)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["b"], c["b"])


def test_same_prompt_partners_and_k_limits():
    groups = [0, 0, 0, 1, 1, 1, 1]
    out = sim(np.arange(7.0), k=2, groups=groups, partners="same_prompt")
    g = np.asarray(groups)
    assert (g[out["a"]] == g[out["b"]]).all()
    with pytest.raises(PopflowError, match="annotate.k = 3 is larger than the 2 possible partner"):
        sim(np.arange(7.0), k=3, groups=groups, partners="same_prompt")
    with pytest.raises(PopflowError, match="larger than the 4 possible partner"):
        sim(np.arange(5.0), k=5)
    with pytest.raises(PopflowError, match="ground truth is needed"):
        sim([1.0, float("nan"), 2.0], k=1)
