"""popflow report: the table with intervals and the verdict line, on hand-made eval_metrics."""

from __future__ import annotations

import pyarrow as pa
import pytest

from popflow import sql
from popflow.report import metrics_sql, render, verdict


def policy(win, low, high, prompts=8, **more) -> dict:
    return {"win_rate": win, "win_rate_low": low, "win_rate_high": high, "prompts": prompts, **more}


def test_the_verdict_reads_the_win_rate_interval_against_one_half():
    """Above 0.5 all the way: better; below all the way: worse; holding 0.5 (an edge at exactly 0.5 included):
    no detectable difference. No interval (one prompt) and no generation: no verdict."""
    assert verdict(policy(0.7, 0.55, 0.85)).startswith("better than the base: win rate 0.700 [0.550, 0.850] over 8")
    assert verdict(policy(0.3, 0.1, 0.45)).startswith("worse than the base")
    assert verdict(policy(0.6, 0.5, 0.7)).startswith("no detectable difference from the base at this size")
    assert "holds 0.5" in verdict(policy(0.344, 0.2, 0.52))
    assert verdict(policy(1.0, None, None, prompts=1)) == "no verdict: 1 held-out prompt(s), too few for an interval"
    assert verdict({"accuracy": 0.6}).startswith("no verdict: nothing was generated")
    gain = policy(0.7, 0.55, 0.85, constraint_gain=0.125, constraint_gain_low=-0.05, constraint_gain_high=0.3)
    assert "constraint pass rate +0.125 [-0.050, +0.300] against the base" in verdict(gain)


def test_the_report_table_from_eval_metrics():
    """Run r2 of pipeline p: the base (seed null) first with its constraint rate, then dpo_pop seed 0; run r1's
    rows and another pipeline's are not shown. Figures are printed with 3 decimals and their intervals."""
    rows = [("p", "r2", "base", None, "constraint_rate", 0.25), ("p", "r2", "base", None, "prompts", 8.0),
            ("p", "r2", "base", None, "constraint_rate_low", 0.05), ("p", "r2", "base", None, "constraint_rate_high",
                                                                     0.45),
            ("p", "r2", "dpo_pop", 0, "win_rate", 0.5625), ("p", "r2", "dpo_pop", 0, "win_rate_low", 0.4),
            ("p", "r2", "dpo_pop", 0, "win_rate_high", 0.725), ("p", "r2", "dpo_pop", 0, "prompts", 8.0),
            ("p", "r2", "dpo_pop", 0, "accuracy", 0.75),
            ("p", "r1", "dpo_pop", 0, "win_rate", 0.9), ("q", "r2", "dpo_pop", 0, "win_rate", 0.1)]
    con = sql.connect()
    con.register("eval_metrics", pa.Table.from_pylist([dict(zip(("pipeline", "run_id", "method", "seed", "metric",
                                                                 "value"), r, strict=True)) for r in rows]))
    got = render("p", con.execute(metrics_sql("p", "r2")).fetchall()).splitlines()
    assert got[0] == "p run r2: 8 held-out prompts, 95% intervals over prompts"
    assert got[1] == "| policy | win rate vs base | constraint pass rate | held-out accuracy |"
    assert got[3] == "| base |  | 0.250 [0.050, 0.450] |  |"
    assert got[4] == "| dpo_pop-s0 | 0.562 [0.400, 0.725] |  | 0.750 |"
    assert got[5] == ("dpo_pop-s0: no detectable difference from the base at this size: win rate 0.562 "
                      "[0.400, 0.725] over 8 held-out prompts (the interval holds 0.5; docs/proof.md "
                      "measures popflow at a size that can tell)")
    assert len(got) == 6


def test_a_no_better_policy_is_called_better_at_most_2_5_percent_of_the_time():
    """20,000 seeded draws of a policy no better than the base on 32 and on 8 held-out prompts x 4 samples
    (per prompt a quarter always won, a quarter always lost, half coin flips; 20% ties), through the report's
    own path: evaluate's interval SQL over prompts, then verdict(). At 32 prompts a two-sided 95% interval lies
    above 0.5 in at most 2.5% of draws, plus 3 Monte-Carlo standard errors (0.025 + 3 sqrt(0.025 x 0.975 /
    20000) = 0.0283); likewise below. At 8 prompts this all-or-nothing clustering makes the t interval
    approximate: measured 2.9% per side (docs/proof.md states it); bounded here at 3.5%. Each comparison
    as its own unit would say "better" far more often: the check can fail."""
    import math

    import numpy as np

    from popflow.sql import interval_sql

    draws, con = 20_000, sql.connect()
    for prompts in (32, 8):
        rng = np.random.default_rng(prompts)
        p = rng.choice([0.0, 1.0, 0.5, 0.5], size=(draws, prompts))
        outcomes = np.where(rng.random((draws, prompts, 4)) < 0.2, 0.5,
                            (rng.random((draws, prompts, 4)) < p[..., None]).astype(float))
        rows = pa.table({"draw": np.repeat(np.arange(draws), prompts), "win": outcomes.mean(axis=2).ravel()})
        con.register("per_prompt", rows)
        said = [verdict(policy(w, lo, hi, prompts)) for w, lo, hi in con.execute(
            f"select {interval_sql('win', 'w', 0, 1)} from per_prompt group by draw").fetchall()]
        limit = 0.025 + 3 * math.sqrt(0.025 * 0.975 / draws)
        better = np.mean([s.startswith("better") for s in said])
        worse = np.mean([s.startswith("worse") for s in said])
        assert better <= (limit if prompts == 32 else 0.035) and worse <= (limit if prompts == 32 else 0.035), (
            prompts, better, worse)
        flat = pa.table({"draw": np.repeat(np.arange(draws), prompts * 4), "win": outcomes.ravel()})
        con.register("per_comparison", flat)
        naive = con.execute(f"select avg((w_low > 0.5)::double) from (select "
                            f"{interval_sql('win', 'w', 0, 1)} from per_comparison "
                            "group by draw)").fetchall()[0][0]
        assert naive > 2 * 0.025, naive


def test_the_climb_of_a_loops_policies_by_hand(tmp_path):
    """Loop lp, rounds 1 (run r1) and 2 (r2), both promoted; held-out prompts e1, e2 (t1 trains: left out).
    Constraint model c (pass: score >= 1), relevance model r (mean score):
      round 1 sampled  c e1 1, 0 -> 0.5; e2 1, 1 -> 1: 0.75        r e1 0.3, e2 0.6: 0.45
      round 2 sampled  c 1, 1: 1.0, gain (0.5, 0) 0.25               r e1 0.4, e2 0.7: 0.55, gain (0.1, 0.1)
      round 2 candidate (dpo_pop-s0's evaluate samples; dpo-s0's are not it)
                       c e1 1, e2 0: 0.5, gain (0.5, -1) -0.25       r 0.5, 0.9: 0.7, gain (0.2, 0.3) 0.25
    Intervals over 2 prompts: t(0.975, 1) = 12.706; round 1's c: sd 0.35355 -> half 12.706 * 0.35355 / sqrt(2)
    = 3.1765; round 2's relevance gain has no spread: [0.1, 0.1]."""
    from popflow.lake import Lake
    from popflow.report import climb_sql, render_climb
    from popflow.sql import student_t
    from tests.fixtures.lake import add_round

    lake = Lake(tmp_path)
    for round_no, run in ((1, "r1"), (2, "r2")):
        add_round(lake, "lp", round_no, run, promoted=True)
        lake.write_run("lp", run, {"run_id": run, "pipeline": "lp", "status": "completed",
                                   "finished_at": f"2026-11-29T0{round_no}:00:00+00:00"})
        lake.write_table("prompts", "lp", run, pa.table({"prompt_id": ["e1", "e2", "t1"],
                                                         "split": ["eval", "eval", "train"],
                                                         "pipeline": ["lp"] * 3, "run_id": [run] * 3}))
    scores = {"r1": {"c": {"e1": [1, 0], "e2": [1, 1], "t1": [1, 1]}, "r": {"e1": [0.2, 0.4], "e2": [0.5, 0.7]}},
              "r2": {"c": {"e1": [1, 1], "e2": [1, 1]}, "r": {"e1": [0.4, 0.4], "e2": [0.8, 0.6]}}}
    kinds = {"c": "constraints", "r": "relevance"}
    for run, by_model in scores.items():
        rows = [{"prompt_id": pid, "sample_idx": i, "reward_model": m, "kind": kinds[m], "score": float(v),
                 "pipeline": "lp", "run_id": run}
                for m, per in by_model.items() for pid, vs in per.items() for i, v in enumerate(vs)]
        lake.write_table("rewards", "lp", run, pa.Table.from_pylist(rows))
    evals = [("dpo_pop", "c", "e1", 1.0), ("dpo_pop", "c", "e2", 0.0), ("dpo_pop", "r", "e1", 0.5),
             ("dpo_pop", "r", "e2", 0.9), ("dpo", "c", "e1", 0.0)]
    lake.write_table("eval_rewards", "lp", "r2", pa.Table.from_pylist([
        {"method": m, "seed": 0, "prompt_id": pid, "sample_idx": 0, "reward_model": rm, "kind": kinds[rm],
         "score": v, "pipeline": "lp", "run_id": "r2"} for m, rm, pid, v in evals]))
    lake.rebuild_catalog()
    got = lake.connect().sql(climb_sql("lp")).to_arrow_table().to_pylist()
    by = {(r["policy"], r["reward_model"]): r for r in got}
    assert [r["policy"] for r in got] == ["round 1 sampled"] * 2 + ["round 2 sampled"] * 2 + \
        ["round 2 candidate (promoted)"] * 2
    half = student_t(0.975, 1) * 0.35355339 / 2 ** 0.5
    assert (by[("round 1 sampled", "c")]["value"], by[("round 1 sampled", "c")]["value_low"]) == pytest.approx(
        (0.75, 0.75 - half))
    assert by[("round 1 sampled", "r")]["value"] == pytest.approx(0.45)
    assert (by[("round 2 sampled", "c")]["value"], by[("round 2 sampled", "c")]["gain"]) == pytest.approx((1.0, 0.25))
    r2 = by[("round 2 sampled", "r")]
    assert (r2["value"], r2["gain"], r2["gain_low"], r2["gain_high"]) == pytest.approx((0.55, 0.1, 0.1, 0.1))
    cand = {m: by[("round 2 candidate (promoted)", m)] for m in "cr"}
    assert (cand["c"]["value"], cand["c"]["gain"], cand["r"]["value"], cand["r"]["gain"]) == pytest.approx(
        (0.5, -0.25, 0.7, 0.25))
    table = render_climb(got)
    # the step gain: round 2's candidate against round 2's sampled policy, c (1 -> 1, 1 -> 0) -0.5,
    # r (0.4 -> 0.5, 0.7 -> 0.9) 0.15; round 2 sampled's step is the base, its step gain its gain
    assert (cand["c"]["step_gain"], cand["r"]["step_gain"], r2["step_gain"]) == pytest.approx((-0.5, 0.15, 0.1))
    assert by[("round 1 sampled", "c")]["step_gain"] is None
    table = render_climb(got)
    assert table.splitlines()[0] == ("| policy | prompts | c pass rate | vs base | vs previous | r mean | vs base "
                                     "| vs previous |")
    assert "| round 2 sampled | 2 | 1.000 [1.000, 1.000] | +0.250 [" in table
