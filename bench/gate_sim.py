"""The promotion gate's error rates by simulation (popflow/gate.py): how often it promotes a no-better candidate
(true mean per-prompt win rate 0.5) and how often a better one (0.7), at the sizes people run, for several
ways prompts can differ in difficulty. Statistics, not speed: seconds on any machine, seeded.

    .venv/bin/python bench/gate_sim.py            # the table docs/loop.md quotes

Null designs (per-prompt win probability p, mean 0.5), each sample a win with probability p, 20% ties:
    mixed       a quarter of prompts always won, a quarter always lost, half a coin flip (the test's design)
    extreme     every prompt always won or always lost
    beta        p ~ Beta(0.3, 0.3)
    skewed      90% of prompts p = 5/9 (slightly better), 10% p = 0 (always lost)
The comparison-level column treats every comparison as its own unit (what the earlier Wilson gate did).
"""

from __future__ import annotations

import numpy as np

from popflow.gate import t_bounds

SIZES = [(8, 4), (32, 4), (128, 8), (256, 8)]
DRAWS = 20_000
ALPHA = 0.05


def null_p(rng, design: str, shape: tuple[int, int]) -> np.ndarray:
    if design == "mixed":
        return rng.choice([0.0, 1.0, 0.5, 0.5], size=shape)
    if design == "extreme":
        return rng.integers(0, 2, shape).astype(float)
    if design == "beta":
        return rng.beta(0.3, 0.3, shape)
    return np.where(rng.random(shape) < 0.9, 5 / 9, 0.0)


def outcomes(rng, p: np.ndarray, samples: int, tie: float) -> np.ndarray:
    shape = p.shape + (samples,)
    wins = (rng.random(shape) < p[..., None]).astype(float)
    return np.where(rng.random(shape) < tie, 0.5, wins)


def promoted(o: np.ndarray) -> tuple[float, float]:
    """Share of draws the gate promotes (prompt-level t bound > 0.5), and the comparison-level bound's share."""
    draws = o.shape[0]
    prompt_level, _ = t_bounds(o.mean(axis=2), ALPHA)
    comparison_level, _ = t_bounds(o.reshape(draws, -1), ALPHA)
    return float(np.mean(prompt_level > 0.5)), float(np.mean(comparison_level > 0.5))


def main() -> None:
    rng = np.random.default_rng(2026)
    print(f"alpha {ALPHA}, {DRAWS} draws per cell, Monte-Carlo standard error ~{np.sqrt(ALPHA * 0.95 / DRAWS):.4f}")
    print("| null design | prompts x samples | promoted (gate) | promoted (comparison-level) |")
    print("|---|---|---|---|")
    for design in ("mixed", "extreme", "beta", "skewed"):
        for m, k in SIZES:
            gate, naive = promoted(outcomes(rng, null_p(rng, design, (DRAWS, m)), k, 0.2))
            print(f"| {design} | {m} x {k} | {gate:.4f} | {naive:.4f} |")
    print("\n| power: true win rate 0.7, p ~ Beta(1.4, 0.6) | prompts x samples | promoted |")
    print("|---|---|---|")
    for m, k in [(8, 4), (16, 4), (32, 4), (64, 4), (128, 8)]:
        gate, _ = promoted(outcomes(rng, rng.beta(1.4, 0.6, (DRAWS, m)), k, 0.0))
        print(f"| | {m} x {k} | {gate:.4f} |")


if __name__ == "__main__":
    main()
