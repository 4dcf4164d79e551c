"""Seven-point selection and pair construction (tasks/pair.py) on small tables worked out by hand."""

from __future__ import annotations

import duckdb
import pytest

from popflow.config import PairConfig
from tasks.pair import write_pairs

# prompt a: rewards 0, 1, 2, 3, 4 -> mu = 2, sigma = sqrt((4+1+0+1+4)/5) = sqrt(2) = 1.414
#   targets: mu-2s = -0.828 -> idx 0 (reward 0); mu-s = 0.586 -> |1-0.586| = 0.414 < 0.586 -> idx 1;
#   mu = 2 -> idx 2; mu+s = 3.414 -> idx 3 (0.414 < 0.586); mu+2s = 4.828 -> idx 4; min 0, max 4.
# prompt b: rewards 1, 3, 3, 1 -> mu = 2, sigma = 1. Ties go to the lowest sample_idx:
#   min -> idx 0 (not 3); max -> idx 1 (not 2); mu = 2 is 1 away from all four -> idx 0;
#   mu-2s = 0 -> rewards 1 at idx 0 and 3 -> idx 0; mu+s = 3 -> idx 1.
# prompt c: rewards 0.5, 0.5, 0.5 -> sigma = 0 -> no pair (zero_std).
# prompt d: rewards 0, 1 -> mu = 0.5, sigma = 0.5; mu-2s = -0.5 -> idx 0; mu = 0.5 ties -> idx 0.
REWARDS = {
    "a": [0.0, 1.0, 2.0, 3.0, 4.0],
    "b": [1.0, 3.0, 3.0, 1.0],
    "c": [0.5, 0.5, 0.5],
    "d": [0.0, 1.0],
}
EXPECTED_POINTS = {
    "a": {"min": 0, "mu-2sigma": 0, "mu-sigma": 1, "mu": 2, "mu+sigma": 3, "mu+2sigma": 4, "max": 4},
    "b": {"min": 0, "mu-2sigma": 0, "mu-sigma": 0, "mu": 0, "mu+sigma": 1, "mu+2sigma": 1, "max": 1},
}


def run_pairs(tmp_path, cfg: PairConfig, rewards=REWARDS):
    con = duckdb.connect()
    rows = [(p, i, r) for p, rs in rewards.items() for i, r in enumerate(rs)]
    con.execute("create table rw (prompt_id varchar, sample_idx integer, reward double)")
    con.executemany("insert into rw values (?, ?, ?)", rows)
    con.execute("create table sm as select prompt_id, sample_idx, 'resp ' || prompt_id || sample_idx as response "
                "from rw")
    con.execute("create table pr as select distinct prompt_id, 'prompt ' || prompt_id as prompt, 'train' as split "
                "from rw")
    out = {t: str(tmp_path / t) for t in ("seven_points", "pairs")}
    report = write_pairs(con, ", 'p' as pipeline, 'r' as run_id", {"rewards": "rw", "samples": "sm", "prompts": "pr"},
                         cfg, out)
    seven = con.execute(f"select * from read_parquet('{tmp_path}/seven_points/*.parquet')").fetchdf()
    pairs = con.execute(f"select * from read_parquet('{tmp_path}/pairs/*.parquet') order by pair_id").fetchdf()
    return seven, pairs, report


def test_seven_points_match_hand_worked_values(tmp_path):
    seven, _, _ = run_pairs(tmp_path, PairConfig())
    for prompt, expected in EXPECTED_POINTS.items():
        got = dict(seven[seven.prompt_id == prompt][["point", "sample_idx"]].itertuples(index=False))
        assert got == expected, prompt
    a = seven[seven.prompt_id == "a"].set_index("point")
    assert a.loc["mu-2sigma", "target"] == pytest.approx(2 - 2 * 2**0.5)
    assert a.loc["mu", "sigma"] == pytest.approx(2**0.5)
    assert a.loc["max", "target"] != a.loc["max", "target"]  # NaN/None: min and max have no target
    assert len(seven) == 7 * len(REWARDS)


def test_default_pairs_and_dropped_prompts(tmp_path):
    """Default chosen=max, rejected=mu-2sigma: a -> (4, 0) margin 4; b -> (1, 0) margin 2; c zero_std;
    d -> max idx 1 vs mu-2sigma idx 0, margin 1."""
    _, pairs, report = run_pairs(tmp_path, PairConfig())
    got = {r.prompt_id: (r.chosen_idx, r.rejected_idx, r.gt_margin) for r in pairs.itertuples()}
    assert got == {"a": (4, 0, 4.0), "b": (1, 0, 2.0), "d": (1, 0, 1.0)}
    assert report["seven_point"] == {"ok": 3, "zero_std": 1, "same_sample": 0, "not_ordered": 0}
    row = pairs[pairs.prompt_id == "a"].iloc[0]
    assert row.pair_id == "a|seven_point:max>mu-2sigma"
    assert list(row.prompt) == [{"role": "user", "content": "prompt a"}]
    assert list(row.chosen) == [{"role": "assistant", "content": "resp a4"}]
    assert list(row.rejected) == [{"role": "assistant", "content": "resp a0"}]
    assert (row.reward_mean, row.reward_std) == (2.0, pytest.approx(2**0.5))


def test_same_sample_is_dropped_and_counted(tmp_path):
    """chosen=mu, rejected=mu-2sigma: a -> (2, 0) ok; b -> both idx 0; d -> both idx 0 (see table)."""
    _, pairs, report = run_pairs(tmp_path, PairConfig(chosen="mu", rejected="mu-2sigma"))
    assert list(pairs.prompt_id) == ["a"]
    assert report["seven_point"] == {"ok": 1, "zero_std": 1, "same_sample": 2, "not_ordered": 0}


def test_max_min_baseline_beside_main_strategy(tmp_path):
    """max_min on b: max idx 1 (3.0), min idx 0 (1.0); each strategy has its own pair_id."""
    _, pairs, report = run_pairs(tmp_path, PairConfig(chosen="mu+sigma", rejected="mu-sigma",
                                                      extra_strategies=["max_min"]))
    mm = pairs[pairs.strategy == "max_min"].set_index("prompt_id")
    assert (mm.loc["b", "chosen_idx"], mm.loc["b", "rejected_idx"]) == (1, 0)
    assert (mm.loc["a", "chosen_point"], mm.loc["a", "rejected_point"]) == ("max", "min")
    sp = pairs[pairs.strategy == "seven_point"].set_index("prompt_id")
    assert (sp.loc["a", "chosen_idx"], sp.loc["a", "rejected_idx"]) == (3, 1)
    assert pairs.pair_id.is_unique
    assert set(report) == {"seven_point", "max_min"}


def test_random_baseline_is_seeded_and_ordered(tmp_path):
    """Random pairs: two distinct samples of the prompt, higher reward chosen; same seed -> same pairs;
    a tie between the two drawn samples is dropped as not_ordered (prompt t: rewards 1, 1, 1, 2)."""
    rewards = {f"p{i}": [float((i * 7 + j * 3) % 11) for j in range(6)] for i in range(40)}
    rewards["t"] = [1.0, 1.0, 1.0, 2.0]
    cfg = PairConfig(strategy="random", seed=3)
    _, first, report = run_pairs(tmp_path / "1", cfg, rewards)
    _, again, _ = run_pairs(tmp_path / "2", cfg, rewards)
    _, other, _ = run_pairs(tmp_path / "3", PairConfig(strategy="random", seed=4), rewards)
    assert (first.chosen_reward > first.rejected_reward).all()
    assert (first.chosen_idx != first.rejected_idx).all()
    assert first[["chosen_idx", "rejected_idx"]].equals(again[["chosen_idx", "rejected_idx"]])
    assert not first[["chosen_idx", "rejected_idx"]].equals(other[["chosen_idx", "rejected_idx"]])
    counts = report["random"]
    assert counts["ok"] + counts["not_ordered"] + counts["zero_std"] == len(rewards)
    assert counts["same_sample"] == 0


def test_the_seven_points_as_n_grows():
    """growth_sizes: powers of two from 4 below n, then n; none below 8 samples.
    Prompt x, rewards 0, 1, 2, 3, 10, -10, 5, 5. First 4: mu 1.5, sigma sqrt(1.25) = 1.118, mu-2sigma = -0.736
    -> sample 0 (reward 0), max 3, min 0. All 8: mu 16/8 = 2, squared deviations 4, 1, 0, 1, 64, 144, 9, 9 ->
    sigma sqrt(29) = 5.385, mu-2sigma = -8.77 -> sample 5 (-10) = min, max 10. Prompt y = x + 1 everywhere: the
    same picks, rewards one higher. The curve over the two prompts: mean = x's + 0.5, sd 0.7071, t(0.975, 1)
    12.706 -> half width 12.706 * 0.7071 / sqrt(2) = 6.353; gap to max: n 4: 3 - 0 = 3, n 8: 10 + 10 = 20."""
    from popflow.sql import student_t
    from tasks.pair import growth_curve_sql, growth_sizes, point_growth_sql

    assert growth_sizes(4) == [] and growth_sizes(8) == [4, 8] and growth_sizes(12) == [4, 8, 12]
    assert growth_sizes(32) == [4, 8, 16, 32]
    x = [0.0, 1.0, 2.0, 3.0, 10.0, -10.0, 5.0, 5.0]
    rows = [("x", i, r) for i, r in enumerate(x)] + [("y", i, r + 1) for i, r in enumerate(x)]
    con = duckdb.connect()
    con.execute("create table rw (prompt_id varchar, sample_idx integer, reward double)")
    con.executemany("insert into rw values (?, ?, ?)", rows)
    con.execute(f"create table growth as {point_growth_sql('rw', [4, 8])}")
    picks = {(n, p, pt): (i, r) for n, p, pt, i, r in con.execute(
        "select n, prompt_id, point, sample_idx, reward from growth").fetchall()}
    assert picks[(4, "x", "mu-2sigma")] == (0, 0.0) and picks[(4, "x", "max")] == (3, 3.0)
    assert picks[(8, "x", "mu-2sigma")] == (5, -10.0) and picks[(8, "y", "max")] == (4, 11.0)
    assert len(picks) == 2 * 2 * 7
    curve = {(n, pt): (r, lo, hi, gap, k) for n, pt, r, lo, hi, gap, k in con.execute(
        f"select n, point, reward, reward_low, reward_high, gap_to_max, prompts "
        f"from ({growth_curve_sql('growth')})").fetchall()}
    half = student_t(0.975, 1) * 0.5 ** 0.5 / 2 ** 0.5
    assert curve[(4, "mu-2sigma")] == pytest.approx((0.5, 0.5 - half, 0.5 + half, 3.0, 2))
    assert curve[(8, "mu-2sigma")] == pytest.approx((-9.5, -9.5 - half, -9.5 + half, 20.0, 2))
    assert curve[(8, "max")][:1] == pytest.approx((10.5,))


def test_the_pair_stage_writes_point_growth_with_n_8(tmp_path):
    """The stage itself with 8 samples per prompt (6 train, 2 held-out prompts; seeded normal rewards):
    seven_points 8 x 7 = 56 rows, point_growth 56 at n = 4 and 56 at n = 8 (its n = 8 rows are seven_points'),
    and the plot. (n = 4 runs write no point_growth: tests/flows.)"""
    import random

    import pyarrow as pa

    from popflow.config import load_pipeline
    from popflow.stage import RunContext, with_run_columns
    from tasks.pair import pair

    cfg = load_pipeline("tiny", overrides=["sample.n=8"])
    ctx = RunContext(str(tmp_path), "tiny", "r1", cfg)
    rng = random.Random(0)
    prompts = [(f"p{i}", "train" if i < 6 else "eval") for i in range(8)]
    tables = {"prompts": [{"prompt_id": p, "prompt": "q", "split": s} for p, s in prompts],
              "samples": [{"prompt_id": p, "sample_idx": i, "response": f"{p}#{i}"} for p, _ in prompts
                          for i in range(8)],
              "sample_rewards": [{"prompt_id": p, "sample_idx": i, "reward": rng.gauss(0, 1)} for p, _ in prompts
                                 for i in range(8)]}
    for name, rows in tables.items():
        ctx.lake.write_table(name, "tiny", "r1", with_run_columns(ctx, pa.Table.from_pylist(rows)))
    out = pair.work(ctx)
    assert out.tables["seven_points"] == 56 and out.tables["point_growth"] == 112
    con = duckdb.connect()
    assert con.sql(f"select n, count(*) from {ctx.table('point_growth')} group by n order by n").fetchall() == [
        (4, 56), (8, 56)]
    same = con.sql(f"select count(*) from {ctx.table('point_growth')} g join {ctx.table('seven_points')} s "
                   "using (prompt_id, point, sample_idx) where g.n = 8").fetchall()[0][0]
    assert same == 56
    assert open(out.report["point_growth_plot"], "rb").read(4) == b"\x89PNG"
