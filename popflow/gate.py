"""The promotion gate of the on-policy loop: pure statistics over a candidate's held-out comparisons.

A comparison is one held-out prompt and sample index: the candidate's sample against the current policy's
sample of the same prompt and index, scored by the run's reward models; a win counts 1, a tie 1/2, a loss 0
(the same outcome evaluate's win_rate averages). The gate promotes when the lower end of a confidence
interval of the win rate reaches `gate.min_win_rate` (and, if set, the held-out pair accuracy reaches
`gate.min_heldout_accuracy`).

    wilson     Wilson score interval over all comparisons, ties as half a success: it treats comparisons as
               independent, which samples of one prompt are not, so it is the optimistic bound
    bootstrap  percentile bootstrap over prompts (scipy.stats.bootstrap of the mean of per-prompt win rates):
               resamples whole prompts, so a few easy prompts cannot carry the gate

    from popflow.gate import decide
    decide([("p1", 1.0), ("p1", 0.5), ("p2", 0.0)], accuracy=0.7, gate=cfg.loop.gate)
"""

from __future__ import annotations

import math

import numpy as np

from popflow.loop_config import GateConfig


def wilson_interval(successes: float, n: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (successes may be fractional: ties)."""
    from scipy.stats import norm

    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(per_prompt: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-prompt win rates (prompts resampled)."""
    from scipy.stats import bootstrap

    values = np.asarray(per_prompt, dtype=float)
    if values.size == 0:
        return 0.0, 1.0
    if np.all(values == values[0]):  # every resample has the same mean (scipy would warn of a degenerate one)
        return float(values[0]), float(values[0])
    result = bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=resamples,
                       method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def decide(outcomes: list[tuple[str, float]], accuracy: float | None, gate: GateConfig) -> dict:
    """The gate's verdict on (prompt_id, outcome) comparisons: win rate, its bound, and why it (not) promotes."""
    n = len(outcomes)
    wins = sum(o for _, o in outcomes)
    by_prompt: dict[str, list[float]] = {}
    for prompt_id, outcome in outcomes:
        by_prompt.setdefault(prompt_id, []).append(outcome)
    if gate.bound == "wilson":
        low, high = wilson_interval(wins, n, gate.confidence)
    else:
        low, high = bootstrap_interval([sum(v) / len(v) for v in by_prompt.values()], gate.confidence,
                                       gate.resamples, gate.seed)
    checks = [(n > 0, "no held-out comparisons"),
              (low >= gate.min_win_rate, f"win rate lower bound {low:.3f} < {gate.min_win_rate}")]
    if gate.min_heldout_accuracy is not None:
        checks.append((accuracy is not None and accuracy >= gate.min_heldout_accuracy,
                       f"held-out accuracy {accuracy if accuracy is None else round(accuracy, 3)} < "
                       f"{gate.min_heldout_accuracy}"))
    failed = [why for ok, why in checks if not ok]
    passed = (f"win rate lower bound {low:.3f} >= {gate.min_win_rate}"
              + (f", held-out accuracy {accuracy:.3f} >= {gate.min_heldout_accuracy}"
                 if gate.min_heldout_accuracy is not None else ""))
    return {"comparisons": n, "prompts": len(by_prompt), "win_rate": wins / n if n else None,
            "win_lower": low, "win_upper": high, "bound": gate.bound, "confidence": gate.confidence,
            "heldout_accuracy": accuracy, "promoted": not failed,
            "reason": "; ".join(failed) if failed else passed}
