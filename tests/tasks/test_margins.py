"""Margin inference (tasks/margins.py): Bradley-Terry by hand, strength -> margin maps, the baselines."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from tasks.annotate import simulate_pop_labels
from tasks.margins import bt_objective, fit_strengths, fixed_margins, strengths_to_margins


def test_two_pairs_match_the_closed_form():
    """Two items, a beats b 3 times and loses once. Without a prior the MLE solves 3 sigmoid(-d) = sigmoid(d),
    i.e. d = s_a - s_b = log 3 = 1.0986. A vague prior (sigma 1e4) leaves it there; by symmetry s_a = -s_b."""
    a, b = np.array([0, 0, 0, 0]), np.array([1, 1, 1, 1])
    s = fit_strengths(2, a, b, np.array([True, True, True, False]), prior_sigma=1e4)
    assert s[0] - s[1] == pytest.approx(np.log(3), abs=1e-4)
    assert s[0] == pytest.approx(-s[1], abs=1e-4)


def test_prior_shrinks_toward_zero_by_hand():
    """One comparison, a wins, prior sigma 1. With s_a = -s_b = x, the posterior mode solves
    d/dx [log(1 + e^(-2x)) + x^2] = 0  ->  2x = 2 sigmoid(-2x)  ->  x = 1 / (1 + e^(2x)); fixed point
    x = 0.33742 (check: e^0.67484 = 1.96370, 1 / 2.96370 = 0.33742)."""
    s = fit_strengths(2, np.array([0]), np.array([1]), np.array([True]), prior_sigma=1.0)
    assert s[0] == pytest.approx(0.33742, abs=1e-4) and s[1] == pytest.approx(-0.33742, abs=1e-4)


def test_three_pairs_recover_their_ordering():
    """A beats B twice, B beats C twice, A beats C once: strengths A > B > C; A and C are mirror images
    (3 wins vs 3 losses against the same opponents), so s_B = 0 and s_A = -s_C."""
    a = np.array([0, 0, 1, 1, 0])
    b = np.array([1, 1, 2, 2, 2])
    s = fit_strengths(3, a, b, np.ones(5, bool))
    assert s[0] > s[1] > s[2]
    assert s[1] == pytest.approx(0.0, abs=1e-6) and s[0] == pytest.approx(-s[2], abs=1e-6)  # symmetric


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 30), rng.integers(0, 6, 30)
    keep = a != b
    a, b, sign = a[keep], b[keep], rng.choice([-1.0, 1.0], keep.sum())
    s = rng.normal(size=6)
    _, grad = bt_objective(s, a, b, sign, 2.0)
    eps = 1e-6
    numeric = [(bt_objective(s + eps * e, a, b, sign, 2.0)[0] - bt_objective(s - eps * e, a, b, sign, 2.0)[0])
               / (2 * eps) for e in np.eye(6)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_strengths_to_margins_by_hand():
    """s = [0, 1, 2, 5]. rank: ranks 1..4 -> (r - 1) / 3 * max 2 = [0, 2/3, 4/3, 2].
    affine (target mean 0.5, max 1): mean 2, min 0 -> 0.5 * s / 2 = [0, .25, .5, 1.25] -> clipped [0, .25, .5, 1].
    Tied strengths share their average rank: [1, 1, 3] -> ranks 1.5, 1.5, 3 -> [0.25, 0.25, 1] at max 1."""
    s = np.array([0.0, 1.0, 2.0, 5.0])
    np.testing.assert_allclose(strengths_to_margins(s, "rank", 2.0, 0.5), [0, 2 / 3, 4 / 3, 2])
    np.testing.assert_allclose(strengths_to_margins(s, "affine", 1.0, 0.5), [0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(strengths_to_margins(np.array([1.0, 1.0, 3.0]), "rank", 1.0, 0.5), [0.25, 0.25, 1])


def test_baseline_margins():
    gt = np.array([-1.0, 0.5, 3.0])
    np.testing.assert_allclose(fixed_margins("gt", gt, alpha=0.5, gamma=0.0, m_max=1.0), [0, 0.25, 1.0])
    np.testing.assert_allclose(fixed_margins("fixed", gt, alpha=1.0, gamma=0.3, m_max=1.0), [0.3, 0.3, 0.3])
    np.testing.assert_allclose(fixed_margins("none", gt, alpha=1.0, gamma=0.3, m_max=1.0), [0, 0, 0])


def test_recovers_true_margins_from_noisy_labels():
    """5,000 pairs, k = 5, 10% flips: the issue's quality goal is Spearman >= 0.85 (seen: ~0.88)."""
    gt = np.random.default_rng(1).exponential(size=5000)
    lab = simulate_pop_labels(gt, np.zeros(5000, int), "iterative", 5, "flip", 0.1, 1.0, "coin", 0)
    s = fit_strengths(5000, lab["a"], lab["b"], lab["a_stronger"])
    assert spearmanr(s, gt).statistic >= 0.85


def test_pop_method_without_labels_is_refused(tmp_path):
    from popflow.config import load_pipeline
    from popflow.errors import PopflowError
    from popflow.stage import RunContext
    from tasks.margins import pop_labels_of

    ctx = RunContext(str(tmp_path), "tiny", "r1", load_pipeline("tiny"))
    with pytest.raises(PopflowError, match="method: pop needs PoP labels, and run r1 has none"):
        pop_labels_of(ctx, None, "select 'x' as pair_id", "iterative")
