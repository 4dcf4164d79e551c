"""The promotion gate's statistics (popflow/gate.py) against values derived by hand and scipy's own."""

from __future__ import annotations

import math

import pytest
from scipy.stats import binomtest

from popflow.gate import bootstrap_interval, decide, wilson_interval
from popflow.loop_config import GateConfig


def test_wilson_interval_by_hand():
    """7 wins in 10 at 90%: z = 1.6449; denominator 1 + z^2/10 = 1.27055; centre (0.7 + z^2/20) / 1.27055 =
    0.65742; half-width z * sqrt(0.7 * 0.3 / 10 + z^2 / 400) / 1.27055 = 0.21573 -> (0.44170, 0.87315)."""
    low, high = wilson_interval(7, 10, 0.9)
    assert low == pytest.approx(0.44170, abs=1e-4) and high == pytest.approx(0.87315, abs=1e-4)


@pytest.mark.parametrize("k, n, confidence", [(0, 6, 0.9), (3, 6, 0.9), (6, 6, 0.95), (41, 64, 0.8)])
def test_wilson_interval_matches_scipy_on_whole_counts(k, n, confidence):
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_ties_count_half_and_an_all_win_bound_stays_below_one():
    """Outcomes 1, 1, 0.5, 0 are 2.5 successes of 4 (a tie is half a win); six wins of six still leave the
    Wilson lower bound at 6 / (6 + z^2) < 1 (at 90%: 6 / 8.7055 = 0.68922), so min_win_rate 1 never passes."""
    gate = GateConfig(bound="wilson", confidence=0.9, min_win_rate=0.0)
    verdict = decide([("a", 1.0), ("a", 1.0), ("b", 0.5), ("b", 0.0)], None, gate)
    assert verdict["win_rate"] == 0.625 and verdict["comparisons"] == 4 and verdict["prompts"] == 2
    assert (verdict["win_lower"], verdict["win_upper"]) == pytest.approx(wilson_interval(2.5, 4, 0.9))
    assert verdict["promoted"] and ">= 0.0" in verdict["reason"]
    z2 = 1.6448536269514722 ** 2
    strict = decide([("a", 1.0)] * 6, None, GateConfig(confidence=0.9, min_win_rate=1.0))
    assert strict["win_lower"] == pytest.approx(6 / (6 + z2)) and not strict["promoted"]
    assert "win rate lower bound 0.689 < 1.0" in strict["reason"]


def test_bootstrap_resamples_prompts_not_comparisons():
    """Per-prompt win rates 1, 1, 0, 0 (two comparisons each): the mean is 0.5 and a percentile interval of
    resampled means of 4 prompts lies on the grid {0, 0.25, 0.5, 0.75, 1}; a Wilson interval of 4 wins in 8
    comparisons is narrower than one over 4 prompts, which is why bootstrap is the cautious bound."""
    outcomes = [(p, v) for p, v in (("a", 1.0), ("b", 1.0), ("c", 0.0), ("d", 0.0)) for _ in range(2)]
    verdict = decide(outcomes, None, GateConfig(bound="bootstrap", confidence=0.9, min_win_rate=0.5, seed=3))
    assert verdict["prompts"] == 4 and verdict["win_rate"] == 0.5
    assert verdict["win_lower"] * 4 == pytest.approx(round(verdict["win_lower"] * 4))
    assert verdict["win_lower"] <= 0.25 and verdict["win_upper"] >= 0.75 and not verdict["promoted"]
    wilson = wilson_interval(4, 8, 0.9)
    assert wilson[0] > verdict["win_lower"]
    assert bootstrap_interval([0.5, 0.5, 0.5], 0.9, 100, 0) == (0.5, 0.5)  # no spread: the mean itself


def test_heldout_accuracy_criterion_and_no_comparisons():
    gate = GateConfig(min_win_rate=0.0, min_heldout_accuracy=0.6)
    assert not decide([("a", 1.0)], 0.5, gate)["promoted"]
    assert "held-out accuracy 0.5 < 0.6" in decide([("a", 1.0)], 0.5, gate)["reason"]
    assert decide([("a", 1.0)], 0.75, gate)["promoted"]
    empty = decide([], 0.9, GateConfig(min_win_rate=0.0))
    assert not empty["promoted"] and "no held-out comparisons" in empty["reason"] and empty["win_rate"] is None
    assert math.isclose(wilson_interval(0, 0, 0.9)[1], 1.0)
