"""The promotion gate of the on-policy loop: pure statistics over a candidate's held-out comparisons.

A comparison is one held-out prompt and sample index: the candidate's sample against the current policy's
sample of the same prompt and index, scored by the run's reward models; a win counts 1, a tie 1/2, a loss 0
(the same outcome evaluate's win_rate averages). The unit of the gate is the **prompt**, not the comparison:
the samples of one prompt share its difficulty (a candidate may win every sample of an easy prompt and lose
every sample of a hard one), so treating them as independent draws overstates the evidence, more so the
more samples a prompt has.

The gate's statistic is the mean over prompts of the per-prompt win rates, and its bound is the one-sided
Student t lower bound at level `gate.alpha` over those per-prompt rates (prompts - 1 degrees of freedom):

    lower = mean - t(1 - alpha, m - 1) * sd / sqrt(m)        m prompts, sd their sample standard deviation

It promotes when `lower > gate.min_win_rate` (strictly: a candidate that changed nothing ties every sample,
has mean 0.5 and sd 0, and is not promoted at 0.5), and only with at least `gate.min_prompts` prompts. A
no-better candidate (true mean per-prompt win rate <= min_win_rate) is then promoted at most about alpha of
the time; tests/popflow/test_gate.py checks that by simulation, and docs/loop.md gives the
false-promotion and power figures.

    from popflow.gate import decide
    decide([("p1", 1.0), ("p1", 0.5), ("p2", 0.0)], accuracy=0.7, gate=cfg.loop.gate)

`gate.guard` adds a check per named reward model: the candidate must not be worse than the current policy on
it (one-sided t upper bound of the mean per-prompt difference >= 0), so an aggregate that rises while one of
its models falls is not promoted. A guard only refuses: it cannot raise the false-promotion rate.
"""

from __future__ import annotations

import numpy as np

from popflow.config.loop import GateConfig


def t_bounds(per_prompt: np.ndarray, alpha: float, lowest: float = 0.0,
             highest: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One-sided (1 - alpha) Student t lower and upper bounds of the mean of per-prompt values (win rates by
    default, clipped to [lowest, highest]), along the last axis (a (draws, prompts) array gives one pair of
    bounds per draw). With no spread (sd 0) both bounds are the mean itself; with fewer than two prompts they
    are (lowest, highest): nothing is known."""
    from scipy.stats import t

    values = np.asarray(per_prompt, dtype=float)
    m = values.shape[-1]
    mean = values.mean(axis=-1)
    if m < 2:
        return np.full_like(mean, lowest), np.full_like(mean, highest)
    half = float(t.ppf(1 - alpha, m - 1)) * values.std(axis=-1, ddof=1) / np.sqrt(m)
    return np.clip(mean - half, lowest, highest), np.clip(mean + half, lowest, highest)


def per_prompt_rates(outcomes: list[tuple[str, float]]) -> dict[str, float]:
    """Each prompt's win rate: the mean of its comparisons' outcomes (1 win, 1/2 tie, 0 loss)."""
    by_prompt: dict[str, list[float]] = {}
    for prompt_id, outcome in outcomes:
        by_prompt.setdefault(prompt_id, []).append(float(outcome))
    return {p: sum(v) / len(v) for p, v in by_prompt.items()}


def win_checks(rates: list[float], gate: GateConfig) -> tuple[float | None, float | None, list[tuple[bool, str]]]:
    """The win-rate bounds over prompts and the gate's checks on them ((ok, reason if not ok) pairs)."""
    if not rates:
        return None, None, [(False, "no held-out comparisons")]
    low, high = (float(b) for b in t_bounds(np.asarray(rates), gate.alpha))
    if gate.min_win_rate is None:  # the gate is open on the win rate: the bound is reported, not checked
        return low, high, []
    return low, high, [
        (len(rates) >= gate.min_prompts, f"{len(rates)} held-out prompts < gate.min_prompts {gate.min_prompts}: "
                                         "too few to bound the win rate"),
        (low > gate.min_win_rate, f"win rate lower bound {low:.3f} <= {gate.min_win_rate}")]


def guard_upper(diffs: list[float], alpha: float) -> float:
    """The one-sided (1 - alpha) Student t upper bound of the mean of per-prompt differences (candidate minus
    current policy on a guarded reward model), unclipped: mean + t(1 - alpha, m - 1) * sd / sqrt(m). With no
    spread it is the mean; with fewer than two prompts nothing is known (+inf: the guard does not refuse)."""
    return float(t_bounds(np.asarray(diffs, dtype=float), alpha, -np.inf, np.inf)[1])


def guard_checks(guarded: dict[str, list[float]], gate: GateConfig) -> list[tuple[bool, str]]:
    """For each guarded reward model (its per-prompt differences): refuse when the candidate is worse than the
    current policy at level alpha (the upper bound of the mean difference below 0), or when fewer than
    gate.min_prompts prompts bound it (also with the win rate's check open)."""
    checks = []
    for model in gate.guard:
        diffs = guarded.get(model, [])
        if len(diffs) < max(gate.min_prompts, 1):
            checks.append((False, f"gate.guard {model}: {len(diffs)} held-out prompts with sample pairs scored by "
                                  f"it < gate.min_prompts {gate.min_prompts}: too few to bound"))
            continue
        upper = guard_upper(diffs, gate.alpha)
        checks.append((upper >= 0, f"{model} worse than the current policy: mean per-prompt difference "
                                   f"{np.mean(diffs):+.3f}, upper bound {upper:+.3f} < 0"))
    return checks


def decide(outcomes: list[tuple[str, float]], accuracy: float | None, gate: GateConfig,
           guarded: dict[str, list[float]] | None = None) -> dict:
    """The gate's verdict on (prompt_id, outcome) comparisons: win rate (mean over prompts), its bounds, and why
    it (not) promotes; `guarded`: each gate.guard model's per-prompt differences (promote's guard_sql)."""
    rates = per_prompt_rates(outcomes)
    low, high, checks = win_checks(list(rates.values()), gate)
    checks += guard_checks(guarded or {}, gate)
    if gate.min_heldout_accuracy is not None:
        shown = "none (no held-out pairs with a ground truth)" if accuracy is None else f"{accuracy:.3f}"
        checks.append((accuracy is not None and accuracy >= gate.min_heldout_accuracy,
                       f"held-out accuracy {shown} < {gate.min_heldout_accuracy}"))
    failed = [why for ok, why in checks if not ok]
    passed = ""
    if not failed:  # every figure it names exists
        passed = ("gate open (min_win_rate: null)" if gate.min_win_rate is None
                  else f"win rate lower bound {low:.3f} > {gate.min_win_rate}")
        if gate.min_heldout_accuracy is not None:
            passed += f", held-out accuracy {accuracy:.3f} >= {gate.min_heldout_accuracy}"
        if gate.guard:
            passed += ", no guarded reward worse (" + ", ".join(
                f"{m} {np.mean(guarded[m]):+.3f}" for m in gate.guard) + ")"
    return {"comparisons": len(outcomes), "prompts": len(rates),
            "win_rate": float(np.mean(list(rates.values()))) if rates else None,
            "win_lower": low, "win_upper": high, "bound": "t over prompts", "alpha": gate.alpha,
            "heldout_accuracy": accuracy, "promoted": not failed,
            "reason": "; ".join(failed) if failed else passed}
