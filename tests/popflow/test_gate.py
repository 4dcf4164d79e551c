"""The promotion gate (popflow/gate.py): its bound by hand and against scipy, its verdicts at the edges, and its
false-promotion rate and power by simulation under heterogeneous prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import ttest_1samp

from popflow.config.loop import GateConfig
from popflow.gate import decide, t_bounds


def test_t_bound_by_hand_and_against_scipy():
    """Per-prompt win rates 1, 0.75, 0.5, 0.75 (m = 4): mean 0.75, sample sd sqrt(0.125 / 3) = 0.204124,
    t(0.95, 3) = 2.353363, half-width 2.353363 * 0.204124 / 2 = 0.240189 -> lower 0.509811, upper 0.990189.
    The lower bound is where a one-sided one-sample t test of the mean at alpha 0.05 just rejects."""
    low, high = t_bounds(np.array([1.0, 0.75, 0.5, 0.75]), 0.05)
    assert float(low) == pytest.approx(0.509811, abs=1e-6) and float(high) == pytest.approx(0.990189, abs=1e-6)
    assert ttest_1samp([1.0, 0.75, 0.5, 0.75], float(low), alternative="greater").pvalue == pytest.approx(0.05)


def test_decide_averages_prompts_and_promotes_strictly_above():
    """Prompt a: 1, 1, 0.5, 1 (rate 0.875); b: 0, 1 (0.5); c: 1 (1.0): the win rate is the mean over prompts,
    (0.875 + 0.5 + 1) / 3 = 0.791667, not over the 7 comparisons (5.5 / 7). A min_prompts of 4 refuses it."""
    outcomes = [("a", 1.0), ("a", 1.0), ("a", 0.5), ("a", 1.0), ("b", 0.0), ("b", 1.0), ("c", 1.0)]
    verdict = decide(outcomes, None, GateConfig(min_win_rate=0.0, min_prompts=2))
    assert verdict["win_rate"] == pytest.approx(0.791667, abs=1e-6)
    assert (verdict["comparisons"], verdict["prompts"]) == (7, 3)
    low, _ = t_bounds(np.array([0.875, 0.5, 1.0]), 0.05)
    assert verdict["win_lower"] == pytest.approx(float(low)) and verdict["promoted"]
    few = decide(outcomes, None, GateConfig(min_win_rate=0.0, min_prompts=4))
    assert not few["promoted"] and "3 held-out prompts < gate.min_prompts 4" in few["reason"]


def test_a_candidate_that_changed_nothing_is_not_promoted():
    """Every comparison a tie (the candidate's samples score as the policy's): every prompt's rate is 0.5, sd 0,
    so the bound is exactly 0.5, which is not strictly above min_win_rate 0.5."""
    verdict = decide([(f"p{i}", 0.5) for i in range(16) for _ in range(4)], None, GateConfig())
    assert (verdict["win_lower"], verdict["win_rate"]) == (0.5, 0.5) and not verdict["promoted"]
    assert "win rate lower bound 0.500 <= 0.5" in verdict["reason"]


def test_open_gate_accuracy_criterion_and_no_comparisons():
    """min_win_rate null promotes any candidate with comparisons (bound still recorded); the accuracy criterion
    without any held-out accuracy is a verdict with a reason, not a crash; no comparisons never promote."""
    losing = [(f"p{i}", 0.0) for i in range(3)]
    opened = decide(losing, None, GateConfig(min_win_rate=None))
    assert opened["promoted"] and opened["win_lower"] == 0.0 and "gate open" in opened["reason"]
    gate = GateConfig(min_win_rate=None, min_heldout_accuracy=0.6)
    assert "held-out accuracy 0.500 < 0.6" in decide(losing, 0.5, gate)["reason"]
    assert decide(losing, 0.75, gate)["promoted"]
    none = decide(losing, None, gate)
    assert not none["promoted"] and "held-out accuracy none (no held-out pairs" in none["reason"]
    for gate in (GateConfig(min_win_rate=None), GateConfig(), GateConfig(min_heldout_accuracy=0.5)):
        empty = decide([], 0.9, gate)
        assert not empty["promoted"] and "no held-out comparisons" in empty["reason"] and empty["win_rate"] is None


def simulate(rng, p: np.ndarray, samples: int, tie: float) -> np.ndarray:
    """(draws, prompts, samples) outcomes: each sample a win with its prompt's probability p, a tie with
    probability `tie` instead (1/2)."""
    shape = p.shape + (samples,)
    wins = (rng.random(shape) < p[..., None]).astype(float)
    return np.where(rng.random(shape) < tie, 0.5, wins)


def heterogeneous_null(rng, draws: int, prompts: int) -> np.ndarray:
    """Per-prompt win probabilities with mean 0.5 and strong clustering: a quarter of prompts the candidate
    always wins, a quarter it always loses, half a coin flip."""
    return rng.choice([0.0, 1.0, 0.5, 0.5], size=(draws, prompts))


@pytest.mark.parametrize("prompts, samples", [(8, 4), (32, 4), (128, 8)])
def test_null_false_promotion_rate_holds_alpha(prompts, samples):
    """20,000 seeded draws of a no-better candidate (true mean per-prompt win rate 0.5, prompts of three
    difficulties, 20% ties): the gate's bound exceeds 0.5 in at most alpha + 3 Monte-Carlo standard errors
    (0.05 + 3 * sqrt(0.05 * 0.95 / 20000) = 0.0546) of draws. The same draws bounded with each comparison as
    its own unit (what the old Wilson gate did) promote far more often: the simulation can fail."""
    rng, draws, alpha = np.random.default_rng(prompts * 1000 + samples), 20_000, 0.05
    outcomes = simulate(rng, heterogeneous_null(rng, draws, prompts), samples, tie=0.2)
    low, _ = t_bounds(outcomes.mean(axis=2), alpha)
    rate = float(np.mean(low > 0.5))
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws), rate
    naive, _ = t_bounds(outcomes.reshape(draws, -1), alpha)
    assert float(np.mean(naive > 0.5)) > 2 * alpha


def test_power_at_a_true_win_rate_of_0_7():
    """A candidate with true mean win rate 0.7 at 64 prompts x 4 samples, prompts heterogeneous (per-prompt
    probability Beta(1.4, 0.6), mean 0.7): promoted in most of 5,000 draws (measured: about 0.99)."""
    rng, draws = np.random.default_rng(7), 5000
    outcomes = simulate(rng, rng.beta(1.4, 0.6, size=(draws, 64)), 4, tie=0.0)
    low, _ = t_bounds(outcomes.mean(axis=2), 0.05)
    assert float(np.mean(low > 0.5)) > 0.9
    one = outcomes[0]  # decide() on one draw reads the same bound
    verdict = decide([(f"p{i}", o) for i in range(64) for o in one[i]], None, GateConfig())
    assert verdict["win_lower"] == pytest.approx(float(low[0])) and verdict["promoted"] == bool(low[0] > 0.5)


def test_a_guarded_reward_that_falls_refuses_promotion():
    """gate.guard [c]: per-prompt differences (candidate - current policy) on c. Refused: -1, 0, -0.5, -0.5:
    mean -0.5, sd sqrt(0.5 / 3) = 0.40825, t(0.95, 3) = 2.35336, upper -0.5 + 2.35336 * 0.40825 / 2 = -0.01962
    < 0. Passed: -1, 0, 0, -0.5: mean -0.375, sd 0.47871, upper -0.375 + 2.35336 * 0.47871 / 2 = 0.18829 >= 0.
    The win-rate check passes in both (8 prompts all won; gate.min_prompts 4), so only the guard decides; an
    unguarded gate promotes both; a guarded model with no pairs refuses."""
    from popflow.gate import guard_upper

    assert guard_upper([-1, 0, -0.5, -0.5], 0.05) == pytest.approx(-0.01962, abs=1e-5)
    assert guard_upper([-1, 0, 0, -0.5], 0.05) == pytest.approx(0.18829, abs=1e-5)
    assert guard_upper([-0.2], 0.05) == math.inf and guard_upper([-0.1, -0.1], 0.05) == pytest.approx(-0.1)
    wins = [(f"p{i}", 1.0) for i in range(8)]
    guarded = GateConfig(guard=["c"], min_prompts=4)
    refused = decide(wins, None, guarded, {"c": [-1, 0, -0.5, -0.5], "r": [1.0]})
    assert not refused["promoted"]
    assert refused["reason"] == ("c worse than the current policy: mean per-prompt difference -0.500, upper bound "
                                 "-0.020 < 0")
    passed = decide(wins, None, guarded, {"c": [-1, 0, 0, -0.5]})
    assert passed["promoted"] and passed["reason"].endswith(", no guarded reward worse (c -0.375)")
    assert decide(wins, None, GateConfig(), {"c": [-1, 0, -0.5, -0.5]})["promoted"]
    empty = decide(wins, None, guarded, {})
    assert not empty["promoted"] and empty["reason"].startswith("gate.guard c: 0 held-out prompts")


def test_guard_sql_pairs_the_gates_samples_by_hand():
    """Candidate m seed 0, held-out samples 0 and 1 of prompts e1, e2; the current policy's samples 0-2 (sample 2
    has no candidate pair). Constraints c (pass: score >= 1): e1 candidate 1, 0 vs current 1, 1 -> diffs 0, -1:
    -0.5; e2 1, 1 vs 0, 1 -> 1, 0: 0.5. Relevance r (score): e1 0.5 vs 0.3 -> 0.2 (one pair). Another method's
    rows and an unguarded model are left out."""
    import pyarrow as pa

    from popflow import sql
    from tasks.promote import guard_sql

    cand = [("m", 0, "c", "constraints", "e1", 0, 1.0), ("m", 0, "c", "constraints", "e1", 1, 0.5),
            ("m", 0, "c", "constraints", "e2", 0, 1.0), ("m", 0, "c", "constraints", "e2", 1, 1.0),
            ("m", 0, "r", "relevance", "e1", 0, 0.5), ("dpo", 0, "c", "constraints", "e1", 0, 0.0),
            ("m", 0, "x", "relevance", "e1", 0, 9.0)]
    cur = [("c", "constraints", "e1", 0, 1.0), ("c", "constraints", "e1", 1, 1.0), ("c", "constraints", "e1", 2, 0.0),
           ("c", "constraints", "e2", 0, 0.0), ("c", "constraints", "e2", 1, 1.0), ("r", "relevance", "e1", 0, 0.3),
           ("x", "relevance", "e1", 0, 0.0)]
    con = sql.connect()
    con.register("er", pa.Table.from_pylist([dict(zip(("method", "seed", "reward_model", "kind", "prompt_id",
                                                        "sample_idx", "score"), r, strict=True)) for r in cand]))
    con.register("rw", pa.Table.from_pylist([dict(zip(("reward_model", "kind", "prompt_id", "sample_idx", "score"),
                                                       r, strict=True)) for r in cur]))
    got = con.sql(guard_sql("er", "rw", "m", 0, ["c", "r"])).fetchall()
    assert got == [("c", "e1", -0.5), ("c", "e2", 0.5), ("r", "e1", pytest.approx(0.2))]


def test_the_guard_needs_min_prompts_even_with_the_win_rate_open():
    """gate.min_prompts 8, the win rate open (min_win_rate null): a guard over 3 prompts (diffs all 0.1, an
    upper bound of 0.1 >= 0) still refuses, as too few prompts bound nothing; over 8 it passes."""
    wins = [(f"p{i}", 1.0) for i in range(8)]
    gate = GateConfig(min_win_rate=None, guard=["c"])
    few = decide(wins, None, gate, {"c": [0.1] * 3})
    assert not few["promoted"] and few["reason"].startswith("gate.guard c: 3 held-out prompts")
    assert decide(wins, None, gate, {"c": [0.1] * 8})["promoted"]


@pytest.mark.parametrize("prompts", [8, 96])
def test_guard_false_refusal_rate_under_the_null(prompts):
    """A candidate exactly as good as the current policy on a guarded constraints model: per prompt, 4 sample
    pairs whose pass indicators are independent draws of the same prompt-level pass rate (a quarter of prompts
    always pass, a quarter never, half at 0.5), so each prompt's mean difference lies in {-1, ..., 1} with
    mean 0. Over 20,000 draws the guard (guard_upper < 0) refuses at most about alpha = 5% of them (+3 Monte
    Carlo standard errors), as its one-sided bound promises; a bound without the t quantile (the mean alone)
    would refuse nearly half, so the check can fail."""
    from popflow.gate import guard_upper

    rng, draws, alpha = np.random.default_rng(prompts), 20_000, 0.05
    rate = rng.choice([0.0, 1.0, 0.5, 0.5], size=(draws, prompts))[..., None]
    diffs = ((rng.random((draws, prompts, 4)) < rate).astype(float)
             - (rng.random((draws, prompts, 4)) < rate).astype(float)).mean(axis=2)
    upper = t_bounds(diffs, alpha, -np.inf, np.inf)[1]
    refused = np.mean(upper < 0)
    assert refused <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / draws), refused
    assert np.mean(diffs.mean(axis=1) < 0) > 0.4  # the mean alone
    assert guard_upper(list(diffs[0]), alpha) == pytest.approx(upper[0])
