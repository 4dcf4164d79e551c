"""Each stage's SQL on the small lake (tests/fixtures/lake.py): a data dir with a quote and a space, prompt
ids with quotes and double quotes, results worked out by hand from the fixture's rows."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from flows.experiment import comparison_sql
from popflow import sql
from popflow.config import load_pipeline
from popflow.config.train import Method
from popflow.errors import PopflowError
from tasks.annotate import annotated_pairs
from tasks.evaluate import (
    eval_prompts_sql,
    generation_metrics_sql,
    heldout_metrics_sql,
    prompt_outcomes_sql,
)
from tasks.margins import pop_labels_of, train_pairs_sql
from tasks.pair import write_pairs
from tasks.promote import outcomes_sql, round_rewards_sql
from tasks.ref_logps import pair_rows_sql
from tasks.rewards import labels_sql
from tasks.sample import prompts_to_sample
from tasks.score import samples_to_score
from tasks.train import heldout_rows_sql, training_rows
from tests.fixtures.lake import E1, E2, P1, P2, A, B, C, D, small_lake


@pytest.fixture
def ctx(tmp_path):
    return small_lake(tmp_path)


def test_sample_and_score_read_the_quoted_lake(ctx):
    """sample: train prompts first, then eval, each in source order; score: every sample with its prompt."""
    con = sql.connect()
    assert "'" in ctx.data_dir and " " in ctx.data_dir
    assert prompts_to_sample(ctx, con).column("prompt_id").to_pylist() == [P1, P2, E1, E2]
    rows = samples_to_score(ctx, con).to_pylist()
    assert len(rows) == 11 and rows[0]["prompt"] == f"question {rows[0]['prompt_id']}"
    assert {(r["prompt_id"], r["sample_idx"]) for r in rows if r["prompt_id"] == P2} == {(P2, 0), (P2, 1), (P2, 2)}


def test_pair_builds_pairs_for_quoted_ids(ctx, tmp_path):
    """it's 1: rewards 1, 2, 3 -> mu 2, sigma sqrt(2/3), mu - 2 sigma = 0.37 -> sample 0; max -> sample 2.
    say "hi" 2: rewards 5, 1, 3 -> mu 3, sigma 1.63, mu - 2 sigma = -0.27 -> sample 1; max -> sample 0."""
    con = sql.connect()
    sources = {"samples": ctx.table("samples"), "prompts": ctx.table("prompts"),
               "rewards": ctx.table("sample_rewards")}
    out = {t: str(tmp_path / "it's out" / t) for t in ("seven_points", "pairs")}
    report = write_pairs(con, ", 'tiny' as pipeline", sources, ctx.config.pair, out)
    got = con.sql(f"select prompt_id, chosen_idx, rejected_idx, chosen[1].content from "
                  f"{sql.parquet(out['pairs'] + '/*.parquet')} where prompt_id in {sql.values([P1, P2])} "
                  "and strategy = 'seven_point' order by prompt_id").fetchall()
    assert got == [(P1, 2, 0, f"answer {P1} #2"), (P2, 0, 1, f"answer {P2} #0")]
    assert report["seven_point"]["ok"] == 4  # the two eval prompts pair too


def test_annotate_takes_the_gap_of_a_named_reward_model(tmp_path):
    """ground_truth b: pair A = b(it's 1, 0) - b(it's 1, 1) = 1 - 2 = -1; pair B = b(say "hi" 2, 2) - b(.., 0)
    = 5 - 0 = 5; the eval pair C and the max_min pair D are not annotated."""
    ctx = small_lake(tmp_path, ("annotate.ground_truth=b",))
    got = annotated_pairs(ctx, sql.connect()).to_pylist()
    assert got == [{"pair_id": A, "prompt_id": P1, "gt": -1.0}, {"pair_id": B, "prompt_id": P2, "gt": 5.0}]


def test_margins_number_pairs_and_labels_alike(ctx):
    """Train pairs of the annotated strategy, ordered by pair_id: A = 0, B = 1; the iterative labels
    (A vs B, A stronger) and (B vs A, A stronger) become (0, 1, true) and (1, 0, false)."""
    con = sql.connect()
    pairs = train_pairs_sql(ctx.table("pairs"), "seven_point")
    assert con.sql(pairs).fetchall() == [(A, 1.0), (B, 0.5)]
    labels = pop_labels_of(ctx, con, pairs, "iterative").to_pylist()
    assert sorted((r["a"], r["b"], r["a_stronger"]) for r in labels) == [(0, 1, True), (1, 0, False)]


def test_ref_logps_reads_the_strategies_trained_on(ctx):
    """The annotated seven_point pairs (by pair_id: i < o < s), and max_min's D once a method trains on it."""
    rows = sql.connect().sql(pair_rows_sql(ctx.table("pairs"), ["seven_point"])).fetchall()
    assert [(r[0], r[1]) for r in rows] == [(A, "train"), (C, "eval"), (B, "train")]
    assert rows[0][2] == [{"role": "user", "content": f"question {P1}"}]
    assert ctx.config.trained_strategies() == ["seven_point"]
    cfg = load_pipeline("tiny", overrides=["pair.extra_strategies=[max_min]",
                                           "train.methods=[{loss: dpo}, {loss: dpo, pairs: max_min}]"])
    assert cfg.trained_strategies() == ["seven_point", "max_min"]
    assert [cfg.method_name(m) for m in cfg.train.methods] == ["dpo", "dpo_max_min_pairs"]
    rows = sql.connect().sql(pair_rows_sql(ctx.table("pairs"), cfg.trained_strategies())).fetchall()
    assert [r[0] for r in rows] == [D, A, C, B]  # "it's 1|m" < "it's 1|s"
    # another strategy's held-out pairs are never measured: not computed; the methods' order changes nothing
    rows = sql.connect().sql(pair_rows_sql(ctx.table("pairs"), ["max_min", "seven_point"])).fetchall()
    assert [r[0] for r in rows] == [D, A, B]  # C is seven_point's held-out pair
    other = load_pipeline("tiny", overrides=["pair.extra_strategies=[max_min, random]",
                                             "train.methods=[{loss: dpo, pairs: random}, {loss: dpo, pairs: max_min}]"])
    again = load_pipeline("tiny", overrides=["pair.extra_strategies=[max_min, random]",
                                             "train.methods=[{loss: dpo, pairs: max_min}, {loss: dpo, pairs: random}]"])
    assert other.trained_strategies() == ["seven_point", "max_min", "random"]
    assert other.hash("trained_strategies") == again.hash("trained_strategies")


def test_training_rows_per_method(ctx):
    """iterative train_pairs: A twice, B once. dpo_pop: margins 0.25 (A), 0.75 (B); dpo_fixed_margin:
    gamma everywhere; dpo_gt_margin clip(alpha * gt, 0, max_margin 1): gt A 1.0, B 0.5 -> alpha 0.8: 0.8, 0.4;
    alpha 2: 1.0 (clipped), 1.0; distill_pessimistic (normalize none): per model chosen - rejected, models a then b:
    A = (3 - 1, 1 - 2) = (2, -1), B = (2 - 0, 5 - 0) = (2, 5). The random sampling has A once, margin 0.5."""
    con = sql.connect()

    def rows(method, *cols):
        return [tuple(r[c] for c in cols) for r in training_rows(ctx, con, method).to_pylist()]

    assert rows(Method(loss="dpo_pop"), "pair_id", "margin", "target", "ref_chosen_logps") == [
        (A, 0.25, 1.0, -10.0), (A, 0.25, 1.0, -10.0), (B, 0.75, 0.5, -5.0)]
    assert rows(Method(loss="dpo_pop", sampling="random"), "pair_id", "margin") == [(A, 0.5)]
    assert rows(Method(loss="dpo_fixed_margin", gamma=0.3), "margin") == [(0.3,)] * 3
    assert [m for m, in rows(Method(loss="dpo_gt_margin", alpha=0.8), "margin")] == pytest.approx([0.8, 0.8, 0.4])
    assert rows(Method(loss="dpo_gt_margin", alpha=2.0), "margin") == [(1.0,), (1.0,), (1.0,)]
    assert rows(Method(loss="distill_pessimistic"), "pair_id", "targets") == [
        (A, [2.0, -1.0]), (A, [2.0, -1.0]), (B, [2.0, 5.0])]
    held = con.sql(heldout_rows_sql(ctx.table("pairs"), ctx.table("ref_logps"), "seven_point")).fetchall()
    assert [(r[0], r[-1]) for r in held] == [(C, 2.0)]
    assert con.sql(heldout_rows_sql(ctx.table("pairs"), ctx.table("ref_logps"), "max_min")).fetchall() == []


def test_a_method_trains_on_another_strategys_pairs_once(tmp_path):
    """pairs: max_min trains on max_min's train pair D once (ref -4, -8; gt 3.0) whatever the annotation's
    copies; plain dpo keeps the annotated iterative composition (A twice, B once). A method whose pairs have no
    reference log-probs (random: none stored) stops with the reason."""
    ctx = small_lake(tmp_path, ("pair.extra_strategies=[max_min, random]",))
    con = sql.connect()
    got = training_rows(ctx, con, Method(loss="dpo", pairs="max_min")).to_pylist()
    assert [(r["pair_id"], r["margin"], r["target"], r["ref_chosen_logps"]) for r in got] == [(D, 0.0, 3.0, -4.0)]
    assert [r["pair_id"] for r in training_rows(ctx, con, Method(loss="dpo")).to_pylist()] == [A, A, B]
    with pytest.raises(PopflowError, match="no 'random' train pairs"):
        training_rows(ctx, con, Method(loss="distill", pairs="random"))


@pytest.mark.parametrize("method, message", [
    ("{loss: dpo, pairs: random}", "not built"),
    ("{loss: dpo_pop, pairs: max_min}", "dpo_pop needs a PoP annotation"),
    ("{loss: dpo, pairs: max_min, sampling: random}", "sampling needs a PoP annotation"),
    ("{loss: dpo}, {loss: dpo, pairs: seven_point}", "two methods are named dpo"),
])
def test_a_method_pairs_must_be_built_and_carry_no_pop_annotation(method, message):
    with pytest.raises(PopflowError, match=message):
        load_pipeline("tiny", overrides=["pair.extra_strategies=[max_min]", f"train.methods=[{method}]"])


def test_evaluate_metrics_by_hand(ctx):
    """held-out (beta_h, gt): (1, 2), (-0.5, 1), (2, 3): accuracy 2/3; Pearson = cov / (sd sd) with
    deviations (1/6, -4/3, 7/6) and (0, -1, 1): 2.5 / sqrt(19/6 * 2); Spearman 1 (same ranks).
    generation vs the base (its first n = 2 samples of each eval prompt, 0.5, 0.2 | 0, 1): policy rewards
    1, 0.2 | -1, 3 -> win, tie, loss, and a tie for plain eval #1, whose text is the base's own (scored 3 vs 1
    in two batches) -> win rate 2 / 4; mean reward 3.2 / 4 (base 1.7 / 4, win 0.5);
    constraint rate (score >= 1 of model a): policy 1, 0.5, 1, 1 -> 3/4; base 1, 1, 0, 0.2 -> 2/4."""
    con = sql.connect()
    held = {(m, k): v for m, _, k, v in con.sql(heldout_metrics_sql(ctx.table("heldout_margins"))).fetchall()}
    assert held[("m", "accuracy")] == pytest.approx(2 / 3)
    assert held[("m", "pearson")] == pytest.approx(2.5 / math.sqrt(19 / 6 * 2))
    assert held[("m", "spearman")] == pytest.approx(1.0)
    no_gt = ("(select * from (values ('m', 0, 1.0, null::double), ('m', 0, -2.0, null), ('m', 0, 3.0, null)) "
             "t(method, seed, beta_h, gt_margin))")  # imported pairs without scores: accuracy 2/3, no correlation
    assert con.sql(heldout_metrics_sql(no_gt)).fetchall() == [("m", 0, "accuracy", pytest.approx(2 / 3))]
    labels = labels_sql(con, ctx.table("prompts"), "p")  # the fixture's prompts table predates IFEval labels
    held_out = con.sql(eval_prompts_sql(ctx.table("prompts"), None, labels)).fetchall()
    ids = [r[0] for r in held_out]
    assert ids == [E1, E2] and [r[3] for r in held_out] == [None, None]
    assert con.sql(eval_prompts_sql(ctx.table("prompts"), 1, labels)).fetchall()[0][0] == E1
    constraints = (ctx.table("eval_rewards"), ctx.table("rewards"), "a")

    def outcomes(ids, constraints=None) -> str:
        return "(" + prompt_outcomes_sql(ctx.table("eval_samples"), ctx.table("sample_rewards"), ctx.table("samples"),
                                         ids, 2, constraints) + ")"

    per_prompt = con.sql(f"select method, prompt_id, win, passed, gain from {outcomes(ids, constraints)}").fetchall()
    assert per_prompt == [("base", E1, 0.5, 1.0, None), ("base", E2, 0.5, 0.0, None),
                          ("m", E1, 0.75, 0.5, -0.5), ("m", E2, 0.25, 1.0, 1.0)]
    metrics = generation_metrics_sql(outcomes(ids, constraints))
    got = {(m, k): v for m, _, k, v in con.sql(metrics).fetchall()}
    point = {k: v for k, v in got.items() if not k[1].endswith(("_low", "_high"))}
    assert point == pytest.approx({("m", "win_rate"): 2 / 4, ("m", "mean_reward"): 3.2 / 4,
                                   ("m", "constraint_rate"): 0.75, ("base", "win_rate"): 0.5,
                                   ("base", "mean_reward"): 1.7 / 4, ("base", "constraint_rate"): 0.5,
                                   ("m", "prompts"): 2, ("base", "prompts"): 2, ("m", "constraint_gain"): 0.25})
    # per prompt: wins 0.75 and 0.25 (sd 0.354, t(0.975, 1) = 12.7: the interval is clipped to [0, 1]);
    # pass rates 0.5 and 1 against the base's 1 and 0: gains -0.5 and 1, clipped to [-1, 1]
    assert (got[("m", "win_rate_low")], got[("m", "win_rate_high")]) == (0.0, 1.0)
    assert (got[("m", "constraint_gain_low")], got[("m", "constraint_gain_high")]) == (-1.0, 1.0)
    plain = generation_metrics_sql(outcomes(ids))
    assert {k for _, _, k, _ in con.sql(plain).fetchall()} == {  # no constraints model
        "prompts", "mean_reward", "win_rate", "win_rate_low", "win_rate_high"}
    one = generation_metrics_sql(outcomes(ids[:1]))
    assert {k for _, _, k, _ in con.sql(one).fetchall()} == {"prompts", "mean_reward", "win_rate"}  # no interval


def test_an_interval_over_prompts_by_hand():
    """Per-prompt rates 0.5, 0.6, 0.7, 0.8: mean 0.65, sd sqrt(0.05 / 3) = 0.129099, t(0.975, 3) = 3.182446,
    half width 3.182446 * 0.129099 / 2 = 0.205426: [0.444574, 0.855426], scipy's t.interval too. Rates 0, 1:
    mean 0.5 and a half width of 12.7 * 0.707 / 1.414, clipped to [0, 1]."""
    from scipy import stats

    from popflow.sql import interval_sql, student_t

    con, rates = sql.connect(), [0.5, 0.6, 0.7, 0.8]
    query = (f"select {interval_sql('x', 'r', 0, 1)} "
             f"from (select unnest({rates}::double[]) as x)")
    mean, low, high = con.execute(query).fetchall()[0]
    assert (mean, low, high) == pytest.approx((0.65, 0.444574, 0.855426), abs=1e-6)
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 3, loc=0.65, scale=stats.sem(rates)))
    query = f"select {interval_sql('x', 'r', 0, 1)} from (select unnest([0.0, 1.0]) as x)"
    assert con.execute(query).fetchall()[0] == (0.5, 0.0, 1.0)
    query = f"select {interval_sql('x', 'r')} from (select unnest([0.0, 1.0]) as x)"
    half = student_t(0.975, 1) * math.sqrt(0.5) / math.sqrt(2)  # 12.706 * 0.7071 / 1.4142 = 6.353: unclipped
    assert con.execute(query).fetchall()[0] == pytest.approx((0.5, 0.5 - half, 0.5 + half))


def test_experiment_comparison(ctx):
    """Two seeds of one metric, 0.5 and 0.7: mean 0.6, sample std sqrt(0.02)."""
    ctx.lake.write_table("eval_metrics", "tiny", "r1", __import__("pyarrow").table(
        {"method": ["m", "m"], "seed": [0, 1], "metric": ["accuracy"] * 2, "value": [0.5, 0.7]}))
    got = sql.connect().sql(comparison_sql(ctx.table("eval_metrics"))).fetchall()
    assert got == [("m", "accuracy", pytest.approx(0.6), pytest.approx(math.sqrt(0.02)), 2, None, None, None)]


def test_experiment_intervals_pool_seeds_prompt_by_prompt():
    """Two seeds of dpo and dpo_pop on 3 held-out prompts (q1 and q4 on prompt p1: the prompt is the unit, its
    pairs averaged; q2 on p2, q3 on p3); t(0.975, 2) = 4.302653.
    dpo_pop wins (seed 0 | seed 1): p1 1 | 1, p2 0.5 | 1, p3 0.75 | 0.25 -> per prompt 1, 0.75, 0.5: mean 0.75,
    sd 0.25, half width 4.302653 * 0.25 / sqrt(3) = 0.621035 -> [0.128965, 1 (clipped)]. dpo wins 0.5 everywhere
    (per prompt 0.5): against dpo, dpo_pop's differences 0.5, 0.25, 0: [0.25 - 0.621035, 0.25 + 0.621035].
    Gains 0.5 | 0.5, 0 | 0.5, 0.5 | 0 -> 0.5, 0.25, 0.25: mean 1/3, sd 0.144338, half 0.358555. dpo's
    held-out beta * h: q1 1 | 1 and q4 1 | 1 (p1), q2 1 | 1, q3 -1 | 1 -> correct 1, 1, 0.5: mean 5/6, sd
    0.288675, half 0.717109 -> [0.116224, 1 (clipped)]. The base's rows are left out; scipy's t interval agrees.
    A metric only the pooled rows have and no interval (one prompt) prints as its mean, not a crash."""
    from scipy import stats

    from flows.experiment import comparison_markdown, comparison_sql, pooled_sql

    wins = {("dpo_pop", 0): (1.0, 0.5, 0.75), ("dpo_pop", 1): (1.0, 1.0, 0.25),
            ("dpo", 0): (0.5, 0.5, 0.5), ("dpo", 1): (0.5, 0.5, 0.5), ("base", None): (0.5, 0.5, 0.5)}
    gains = {("dpo_pop", 0): (0.5, 0.0, 0.5), ("dpo_pop", 1): (0.5, 0.5, 0.0)}
    outcomes = pa.Table.from_pylist([
        {"method": m, "seed": s, "prompt_id": f"p{i + 1}", "win": w, "gain": gains.get((m, s), (0.0,) * 3)[i]
         if m != "base" else None} for (m, s), ws in wins.items() for i, w in enumerate(ws)])
    signs = {("dpo", 0): (1, 1, -1, 1), ("dpo", 1): (1, 1, 1, 1), ("dpo_pop", 0): (1, 1, 1, 1),
             ("dpo_pop", 1): (1, 1, 1, 1)}
    heldout = pa.Table.from_pylist([{"method": m, "seed": s, "pair_id": f"q{i + 1}", "beta_h": float(b)}
                                    for (m, s), bs in signs.items() for i, b in enumerate(bs)])
    pairs = pa.table({"pair_id": ["q1", "q2", "q3", "q4"], "prompt_id": ["p1", "p2", "p3", "p1"]})
    con = sql.connect()
    for name, table in (("outcomes", outcomes), ("heldout", heldout), ("pairs", pairs)):
        con.register(name, table)
    pooled = pooled_sql("outcomes", "heldout", "pairs")
    got = {(r[0], r[1]): r[2:] for r in con.execute(pooled).fetchall()}
    assert got[("dpo_pop", "win_rate")] == pytest.approx((0.75, 0.128965, 1.0, 3, 2), abs=1e-6)
    assert got[("dpo_pop", "win_rate_vs_dpo")] == pytest.approx((0.25, 0.25 - 0.621035, 0.25 + 0.621035, 3, 2),
                                                                abs=1e-6)
    assert got[("dpo_pop", "constraint_gain")] == pytest.approx((1 / 3, 1 / 3 - 0.358555, 1 / 3 + 0.358555, 3, 2),
                                                                abs=1e-6)
    assert got[("dpo", "accuracy")] == pytest.approx((5 / 6, 0.116224, 1.0, 3, 2), abs=1e-6)
    assert got[("dpo", "win_rate")] == pytest.approx((0.5, 0.5, 0.5, 3, 2))  # no spread: a zero-width interval
    assert ("dpo", "win_rate_vs_dpo") not in got and not any(m == "base" for m, _ in got)
    low, _ = stats.t.interval(0.95, 2, loc=5 / 6, scale=stats.sem([1, 1, 0.5]))
    assert got[("dpo", "accuracy")][1] == pytest.approx(low)
    # the comparison: seeds' mean and std from eval_metrics, the pooled interval beside them
    metrics = pa.table({"method": ["dpo", "dpo"], "seed": [0, 1], "metric": ["accuracy"] * 2,
                        "value": [2 / 3, 1.0]})
    con.register("metrics", metrics)
    rows = con.execute(comparison_sql("metrics", f"({pooled})")).fetchall()
    assert rows[0] == ("dpo", "accuracy", pytest.approx(5 / 6), pytest.approx(math.sqrt(1 / 18)), 2,
                       pytest.approx(0.116224, abs=1e-6), 1.0, 3)
    assert ("dpo_pop", "win_rate_vs_dpo") in {(r[0], r[1]) for r in rows}  # only the pooled rows have it
    one = pooled_sql("(select * from outcomes where prompt_id = 'p1')", "heldout", "pairs")
    table = con.sql(comparison_sql('metrics', f'({one})')).to_arrow_table()
    assert "| dpo_pop | " in comparison_markdown(table) and "0.000" in comparison_markdown(table)


def test_promote_compares_the_candidate_with_the_sampled_policy_and_sums_round_rewards(ctx):
    """promote's outcomes: the candidate's eval samples (method m, seed 0) against stage 1's sample of the same
    prompt and index. o'brien eval: 1.0 > 0.5 win, 0.2 = 0.2 tie; plain eval: -1.0 < 0.0 loss, and #1 the same
    text as stage 1's (3.0 vs 1.0, scored in two batches) a tie -> 1, 0.5, 0, 0.5 (as evaluate's win_rate).
    round_rewards: model a's raw scores 3, 1, 0, 2, 1, 1, 0, 0.2 -> n 8, mean 8.2 / 8 = 1.025, median
    (1 + 1) / 2 = 1."""
    con = sql.connect()
    args = (ctx.table("eval_samples"), ctx.table("sample_rewards"), ctx.table("samples"))
    got = con.sql(outcomes_sql(*args, "m", 0)).fetchall()
    assert got == [(E1, 1.0), (E1, 0.5), (E2, 0.0), (E2, 0.5)]
    assert all(isinstance(o, float) for _, o in got)  # not DECIMAL: the gate does float arithmetic
    assert con.sql(outcomes_sql(*args, "m", 1)).fetchall() == []
    rows = con.sql(round_rewards_sql(ctx.table("rewards"))).to_arrow_table().to_pylist()
    stats = {r["reward_model"]: r for r in rows}
    assert stats["a"]["n"] == 8 and stats["a"]["mean"] == pytest.approx(1.025) and stats["a"]["median"] == 1.0



def test_earlier_rounds_pairs_are_rescaled_to_this_rounds_reward_scale():
    """loop.pairs: all. An earlier round's prompt p1 had samples scored 3, 1, 2 by model a; its pair (chosen 0,
    rejected 1, rewards and gap 99 on its own round's scale) joins a round whose scores of model a are 0, 2, 4
    (mean 2, population std sqrt(8/3)). On this scale the samples are (3 - 2) / sqrt(8/3), -1 / sqrt(8/3) and 0:
    chosen sqrt(3/8), rejected -sqrt(3/8), gap sqrt(3/2); the prompt's mean 0, std sqrt(2/3) / sqrt(8/3) = 1/2.
    A second pair (chosen 1, rejected 2: -sqrt(3/8) < 0) is no longer ordered: flagged to be dropped."""
    from popflow.config import ScoreConfig
    from tasks.pair import rescaled_pairs_sql

    score = ScoreConfig(models=[{"name": "a", "kind": "constraints"}], normalize="zscore", aggregate="mean")
    pairs = ("(select * from (values ('p1|x', 'p1', 0, 1, 99.0, 99.0, 99.0, 99.0, 99.0, 'loop', 'run1'), "
             "('p1|y', 'p1', 1, 2, 99.0, 99.0, 99.0, 99.0, 99.0, 'loop', 'run1')) t(pair_id, prompt_id, chosen_idx, "
             "rejected_idx, chosen_reward, rejected_reward, reward_mean, reward_std, gt_margin, pipeline, run_id))")
    cols = "t(prompt_id, sample_idx, reward_model, score)"
    then = f"(select * from (values ('p1', 0, 'a', 3.0), ('p1', 1, 'a', 1.0), ('p1', 2, 'a', 2.0)) {cols})"
    now = f"(select * from (values ('q', 0, 'a', 0.0), ('q', 1, 'a', 2.0), ('q', 2, 'a', 4.0)) {cols})"
    got = sql.connect().sql(rescaled_pairs_sql(pairs, then, now, score, "r1/", "loop", "run2")).fetchall()
    r = math.sqrt(3 / 8)
    assert got == [("r1/p1|x", "p1", 0, 1, pytest.approx(r), pytest.approx(-r), pytest.approx(0.0, abs=1e-12),
                    pytest.approx(0.5), pytest.approx(math.sqrt(1.5)), "loop", "run2", True),
                   ("r1/p1|y", "p1", 1, 2, pytest.approx(-r), pytest.approx(0.0, abs=1e-12),
                    pytest.approx(0.0, abs=1e-12), pytest.approx(0.5), pytest.approx(-r), "loop", "run2", False)]


def test_train_checks_the_stored_reference_log_probs(tmp_path, monkeypatch):
    """check_reference: stored log-probs of the configured reference, max_length, train.trl and weights pass;
    another train.trl (ld_alpha changes a sequence's log-prob) is refused naming the way out; a table written
    before trl and weights were recorded counts as no trl and LoRA's weights, so old runs resume."""
    import pyarrow as pa

    from popflow import models
    from popflow.config import load_pipeline
    from popflow.errors import PopflowError
    from popflow.stage import RunContext
    from tasks.train import check_reference

    monkeypatch.setenv("POPFLOW_MODELS_DIR", str(models.Path(__file__).resolve().parents[2] / "data" / "models"))
    ctx = RunContext(str(tmp_path / "data"), "tiny", "r1", load_pipeline("tiny"))
    ref = models.resolve("builtin:tiny-llama", ctx.lake.data_dir)
    row = {"pair_id": "p", "reference": ref.ref, "ref_fingerprint": ref.fingerprint, "max_length": 256}
    ctx.lake.write_table("ref_logps", "tiny", "r1", pa.Table.from_pylist([row]))  # an older table: no trl, weights
    check_reference(ctx, sql.connect())
    ctx.lake.write_table("ref_logps", "tiny", "r1", pa.Table.from_pylist([row | {"trl": "{}", "weights": "float32"}]))
    check_reference(ctx, sql.connect())
    ld = load_pipeline("tiny", overrides=["train.trl={ld_alpha: 0.5}"])
    other = RunContext(str(tmp_path / "data"), "tiny", "r1", ld)
    with pytest.raises(PopflowError, match=r'train.trl \{"ld_alpha": 0.5\}.* does not match run r1.*ref_logps'):
        check_reference(other, sql.connect())


def test_pop_sweep_draws_and_summary():
    """50 pairs with distinct ground truths 0, 1/49, ..., 1 and no label noise. iterative: every pair anchors k
    comparisons (k x 50 of them, none uncompared). random, k = 1: 50 comparisons, each missing a given pair with
    probability 1 - 2/50, so 50 x 0.96^50 = 6.5 pairs stay uncompared on average. More labels per pair rank the
    margins better (k = 4 above k = 1). The summary of Spearmans 0.5 and 0.7: mean 0.6, half width
    12.706 x 0.1414 / sqrt(2) = 1.2706 -> [-0.6706, 1 (clipped)]."""
    import numpy as np

    from flows.experiment import pop_sweep, pop_sweep_sql, sweep_markdown

    cfg = load_pipeline("tiny", overrides=["annotate.p=0.0"])
    draws = pop_sweep(np.linspace(0, 1, 50), np.zeros(50, dtype=np.int64), cfg.annotate, cfg.margins, [1, 4], 10)
    rows = draws.to_pylist()
    assert len(rows) == 2 * 2 * 10 and {r["seed"] for r in rows} == set(range(10))
    it = [r for r in rows if r["sampling"] == "iterative"]
    assert {(r["k"], r["comparisons"], r["uncompared"]) for r in it} == {(1, 50, 0), (4, 200, 0)}
    uncompared = [r["uncompared"] for r in rows if r["sampling"] == "random" and r["k"] == 1]
    assert 4.5 < np.mean(uncompared) < 8.5
    for sampling in ("iterative", "random"):
        mean = {k: np.mean([r["spearman"] for r in rows if r["sampling"] == sampling and r["k"] == k]) for k in (1, 4)}
        assert mean[4] > mean[1] > 0
    con = sql.connect()
    con.register("draws", pa.table({"sampling": ["iterative"] * 2, "k": [1, 1], "spearman": [0.5, 0.7],
                                    "pearson": [0.4, 0.6], "comparisons": [50, 50], "uncompared": [0, 0]}))
    got = con.sql(pop_sweep_sql("draws")).to_arrow_table()
    assert got.to_pylist()[0] == {
        "sampling": "iterative", "k": 1, "spearman": pytest.approx(0.6),
        "spearman_low": pytest.approx(-0.6706, abs=1e-4),
        "spearman_high": 1.0, "pearson": pytest.approx(0.5), "comparisons": 50.0, "uncompared": 0.0, "draws": 2}
    assert "| iterative | 1 | 0.600 [-0.671, 1.000] | 0.500 | 50 | 0.0 |" in sweep_markdown(got)
    # ground truths that never differ rank nothing: no agreement figure, and the table still prints
    flat = pop_sweep(np.ones(20), np.zeros(20, dtype=np.int64), cfg.annotate, cfg.margins, [1], 2)
    assert {r["spearman"] for r in flat.to_pylist()} == {None}
    con.register("flat", flat)
    assert "| iterative | 1 |  |  | 20 | 0.0 |" in sweep_markdown(con.sql(pop_sweep_sql("flat")).to_arrow_table())
