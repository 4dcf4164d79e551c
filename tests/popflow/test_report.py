"""popflow report: the table with intervals and the verdict line, on hand-made eval_metrics."""

from __future__ import annotations

import pyarrow as pa

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
                      "[0.400, 0.725] over 8 held-out prompts (the interval holds 0.5; README 'Does it work?' "
                      "measures popflow at a size that can tell)")
    assert len(got) == 6
