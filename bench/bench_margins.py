"""Benchmark: PoP margin inference speed at scale, and its quality over k, label noise and sampling.

    .venv/bin/python bench/bench_margins.py [--pairs 200000] [--quality-pairs 20000]

1. Speed: 1M simulated PoP comparisons over 200k pairs (iterative, k = 5, 10% flips), Bradley-Terry MAP fit
   (tasks/margins.fit_strengths, scipy L-BFGS with a bincount gradient). Goal (issue 3): <= 5 s on 2 cores.
   Baseline in the same run: the same objective with scipy's default finite-difference gradient would need
   n + 1 objective calls per step, so the baseline here is one objective+gradient call, and the fit is
   reported as a multiple of it (how many evaluations L-BFGS needed).
2. Quality: Spearman(inferred strength, true margin) over k in {1, 2, 5, 10} and p in {0, 0.1, 0.2, 0.3},
   for iterative and random sampling; true margins ~ Exponential(1). Goal: >= 0.85 at k = 5, p = 0.1.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from scipy.stats import spearmanr

from tasks.annotate import simulate_pop_labels
from tasks.margins import bt_objective, fit_strengths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--quality-pairs", type=int, default=20_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    n = args.pairs
    gt = rng.exponential(size=n)
    t = time.perf_counter()
    lab = simulate_pop_labels(gt, np.zeros(n, np.int64), "iterative", 5, "flip", 0.1, 1.0, "coin", 0)
    t_sim = time.perf_counter() - t
    t = time.perf_counter()
    s = fit_strengths(n, lab["a"], lab["b"], lab["a_stronger"])
    t_fit = time.perf_counter() - t
    sign = np.where(lab["a_stronger"], 1.0, -1.0)
    t = time.perf_counter()
    for _ in range(5):
        bt_objective(s, lab["a"], lab["b"], sign, 1.0)
    t_eval = (time.perf_counter() - t) / 5

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores")
    print(f"speed: {len(lab['a']):,} comparisons over {n:,} pairs (iterative, k=5, p=0.1)")
    print(f"  simulate labels {t_sim:.2f} s; fit strengths {t_fit:.2f} s (goal <= 5 s) = "
          f"{t_fit / t_eval:.0f} objective+gradient evaluations of {t_eval * 1000:.0f} ms; "
          f"Spearman {spearmanr(s, gt).statistic:.3f}")

    m = args.quality_pairs
    gt = rng.exponential(size=m)
    print(f"quality: Spearman(strength, true margin), {m:,} pairs, flip noise")
    print("| sampling | k | p=0 | p=0.1 | p=0.2 | p=0.3 |")
    print("|---|---|---|---|---|---|")
    for sampling in ("iterative", "random"):
        for k in (1, 2, 5, 10):
            cells = []
            for p in (0.0, 0.1, 0.2, 0.3):
                lab = simulate_pop_labels(gt, np.zeros(m, np.int64), sampling, k, "flip", p, 1.0, "coin", 1)
                s = fit_strengths(m, lab["a"], lab["b"], lab["a_stronger"])
                cells.append(f"{spearmanr(s, gt).statistic:.3f}")
            print(f"| {sampling} | {k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
