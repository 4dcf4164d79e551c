"""Stage 3, pair: chosen/rejected pairs from each prompt's reward distribution ("Finding the Sweet Spot").

Per prompt, with mu and sigma (population std) of the aggregate reward, the seven points are
min, mu-2sigma, mu-sigma, mu, mu+sigma, mu+2sigma, max; each picks the sample whose reward is nearest its
target (min and max exactly), ties going to the lowest sample_idx. They land in `seven_points` (7 rows per
prompt). `pairs` then holds, per strategy:

    seven_point   chosen = pair.chosen point, rejected = pair.rejected point (default max / mu-2sigma)
    max_min       chosen = max, rejected = min (the usual recipe, which degrades as n grows)
    random        two distinct samples drawn by a seeded hash; the higher reward is chosen

In an on-policy loop with `loop.pairs: all`, the earlier rounds' own pairs join this round's (ids prefixed
r<round>/), so annotation, margins, reference log-probs and training see every round's pairs.

A prompt yields no pair when sigma = 0, when chosen and rejected are the same sample, or when chosen reward
<= rejected reward; those are counted per reason in the stage report. Everything is DuckDB SQL, one named
CTE per step; `prompt`/`chosen`/`rejected` are TRL's conversational columns. With n >= 8 samples per prompt,
`point_growth` holds the seven points recomputed from each prompt's first 4, 8, 16, ... samples (and
point_growth.png their mean reward against n, with 95% intervals over prompts).

    .venv/bin/popflow sql "select chosen_point, rejected_point, count(*) from pairs group by all"
    .venv/bin/popflow sql "select n, point, avg(reward) from point_growth group by all order by point, n"
"""

from __future__ import annotations

import logging
import os

import pyarrow.parquet as pq

from popflow import sql
from popflow.config import POINTS, PairConfig, ScoreConfig
from popflow.errors import PopflowError
from popflow.lake import atomic
from popflow.sql import interval_sql, lit
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns
from tasks.rewards.aggregate import aggregate_sql

log = logging.getLogger(__name__)

_SIGMA_MULTIPLE = {"mu-2sigma": -2, "mu-sigma": -1, "mu": 0, "mu+sigma": 1, "mu+2sigma": 2}


def seven_points_sql(rewards: str) -> str:
    """SQL over a relation (prompt_id, sample_idx, reward): 7 rows per prompt with the picked samples.

    One pass of per-prompt aggregates: arg_min over the key (distance, sample_idx) gives the nearest
    sample with ties to the lowest index; max uses (reward, -sample_idx) for the same tie rule.
    """
    picks = ",\n".join(
        f"arg_min({{'idx': sample_idx, 'reward': reward}}, (abs(reward - (mu + {k} * sigma)), sample_idx))"
        f" as pt{POINTS.index(p)}" for p, k in _SIGMA_MULTIPLE.items()
    )
    unpivot = ",\n".join(
        f"({lit(p)}, {rank}, {'null' if p in ('min', 'max') else f'mu + {_SIGMA_MULTIPLE[p]} * sigma'}, "
        f"pt{rank}.idx, pt{rank}.reward)" for rank, p in enumerate(POINTS)
    )
    return f"""
    with rewards as (
        select prompt_id, sample_idx, reward from {rewards}
    ),
    stats as (
        select prompt_id, avg(reward) as mu, stddev_pop(reward) as sigma, count(*) as n_samples
        from rewards group by prompt_id
    ),
    picked as (
        select prompt_id, any_value(mu) as mu, any_value(sigma) as sigma, any_value(n_samples) as n_samples,
            arg_min({{'idx': sample_idx, 'reward': reward}}, (reward, sample_idx)) as pt0,
            arg_max({{'idx': sample_idx, 'reward': reward}}, (reward, -sample_idx)) as pt6,
            {picks}
        from rewards join stats using (prompt_id)
        group by prompt_id
    ),
    final as (
        select prompt_id, u.point, u.point_rank, u.target, u.sample_idx, u.reward, mu, sigma, n_samples
        from picked, (values {unpivot}) as u(point, point_rank, target, sample_idx, reward)
    )
    select * from final
    """


def growth_sizes(n: int) -> list[int]:
    """The sample counts the seven points are recomputed at: 4, 8, 16, ... below n, and n (none below 8)."""
    return [] if n < 8 else [m for m in (2 ** i for i in range(2, n.bit_length())) if m < n] + [n]


def point_growth_sql(rewards: str, sizes: list[int]) -> str:
    """The seven points of every prompt recomputed from its first m samples (sample_idx < m), for each m of
    `sizes`: (n, prompt_id, point, point_rank, reward, ...). The samples are independent draws, so the first m
    of n are a sample of size m: how each point's reward moves as n grows, the curve behind "Finding the
    Sweet Spot" (max climbs, min falls, mu-2sigma holds), from one run and no extra sampling."""
    parts = "\n        union all\n".join(
        f"select {m} as n, * from ({seven_points_sql(f'(select * from {rewards} where sample_idx < {m})')})"
        for m in sizes)
    return f"""
    with grown as (
        {parts}
    ),
    final as (
        select n, prompt_id, point, point_rank, reward, sample_idx, mu, sigma from grown
    )
    select * from final order by n, prompt_id, point_rank"""


def growth_curve_sql(growth: str) -> str:
    """Per (n, point): the mean reward over prompts with a two-sided 95% t interval, and the mean gap from each
    point to max (what a pair max / point trains on)."""
    return f"""
    with gaps as (
        select g.*, m.reward - g.reward as gap_to_max
        from {growth} g join {growth} m on m.n = g.n and m.prompt_id = g.prompt_id and m.point = 'max'
    ),
    final as (
        select n, point, any_value(point_rank) as point_rank, {interval_sql("reward", "reward")},
               avg(gap_to_max) as gap_to_max, count(*) as prompts
        from gaps group by n, point
    )
    select * from final order by n, point_rank"""


def candidates_sql(strategy: str, cfg: PairConfig) -> str:
    """One candidate pair per prompt for a strategy, from `seven` (seven_points) and `rewards`."""
    if strategy in ("seven_point", "max_min"):
        chosen, rejected = (cfg.chosen, cfg.rejected) if strategy == "seven_point" else ("max", "min")
        return f"""
        select c.prompt_id, {lit(strategy)} as strategy, c.point as chosen_point, r.point as rejected_point,
               c.sample_idx as chosen_idx, r.sample_idx as rejected_idx,
               c.reward as chosen_reward, r.reward as rejected_reward, c.mu, c.sigma, c.n_samples
        from seven c join seven r on c.prompt_id = r.prompt_id
        where c.point = {lit(chosen)} and r.point = {lit(rejected)}"""
    # random: the two samples with the smallest seeded hashes; the better one is chosen (on a tie the two
    # indices differ, so the pair is dropped as not_ordered)
    return f"""
        select prompt_id, 'random' as strategy, 'random' as chosen_point, 'random' as rejected_point,
               arg_max(sample_idx, (reward, -sample_idx)) as chosen_idx,
               arg_min(sample_idx, (reward, -sample_idx)) as rejected_idx,
               max(reward) as chosen_reward, min(reward) as rejected_reward,
               any_value(mu) as mu, any_value(sigma) as sigma, any_value(n_samples) as n_samples
        from (
            select r.*, s.mu, s.sigma, s.n_samples,
                   row_number() over (partition by prompt_id order by hash({lit(cfg.seed)}, prompt_id, sample_idx),
                                      sample_idx) as draw
            from rewards r join (select distinct prompt_id, mu, sigma, n_samples from seven) s using (prompt_id)
        ) where draw <= 2
        group by prompt_id"""


def build_pairs_sql(seven: str, rewards: str, samples: str, prompts: str, cfg: PairConfig,
                    system_prompt: str | None = None) -> str:
    """All candidate pairs with a `status` ('ok' or why there is no pair), joined with their texts."""
    strategies = list(dict.fromkeys([cfg.strategy, *cfg.extra_strategies]))
    candidates = "\n        union all\n".join(candidates_sql(s, cfg) for s in strategies)
    system = f"{{'role': 'system', 'content': {lit(system_prompt)}}}, " if system_prompt else ""
    return f"""
    with seven as (
        select * from {seven}
    ),
    rewards as (
        select prompt_id, sample_idx, reward from {rewards}
    ),
    candidates as ({candidates}
    ),
    classified as (
        select *,
            case when sigma = 0 then 'zero_std'
                 when chosen_idx = rejected_idx then 'same_sample'
                 when chosen_reward <= rejected_reward then 'not_ordered'
                 else 'ok' end as status
        from candidates
    ),
    final as (
        select
            c.prompt_id || '|' || c.strategy || ':' || c.chosen_point || '>' || c.rejected_point as pair_id,
            c.prompt_id, p.split,
            [{system}{{'role': 'user', 'content': p.prompt}}] as prompt,
            [{{'role': 'assistant', 'content': cs.response}}] as chosen,
            [{{'role': 'assistant', 'content': rs.response}}] as rejected,
            c.chosen_idx, c.rejected_idx, c.chosen_point, c.rejected_point,
            c.chosen_reward, c.rejected_reward, c.mu as reward_mean, c.sigma as reward_std,
            c.chosen_reward - c.rejected_reward as gt_margin, c.n_samples, c.strategy, c.status
        from classified c
        join {prompts} p on p.prompt_id = c.prompt_id
        join {samples} cs on cs.prompt_id = c.prompt_id and cs.sample_idx = c.chosen_idx
        join {samples} rs on rs.prompt_id = c.prompt_id and rs.sample_idx = c.rejected_idx
    )
    select * from final
    """


def _copy(con, query: str, path: str) -> None:
    """COPY a query to Parquet under a temporary name, then rename it into place."""
    with atomic(path) as tmp:
        con.execute(f"copy ({query}) to {lit(str(tmp))} (format parquet, compression zstd)")


def write_pairs(con, ctx_cols: str, sources: dict[str, str], cfg: PairConfig, out_dir: dict[str, str],
                system_prompt: str | None = None) -> dict:
    """Write seven_points and pairs Parquet files; return counts per strategy and status."""
    seven_path = os.path.join(out_dir["seven_points"], "part-00000.parquet")
    os.makedirs(out_dir["seven_points"], exist_ok=True)
    _copy(con, f"select *{ctx_cols} from ({seven_points_sql(sources['rewards'])})", seven_path)
    seven = f"read_parquet({lit(seven_path)})"
    con.execute(f"create or replace temp table all_pairs as {build_pairs_sql(seven, sources['rewards'], sources['samples'], sources['prompts'], cfg, system_prompt)}")  # noqa: E501
    os.makedirs(out_dir["pairs"], exist_ok=True)
    _copy(con, f"select * exclude (status){ctx_cols} from all_pairs where status = 'ok' order by pair_id",
          os.path.join(out_dir["pairs"], "part-00000.parquet"))
    counts = con.execute("select strategy, status, count(*) from all_pairs group by all order by all").fetchall()
    report: dict = {}
    for strategy, status, n in counts:
        report.setdefault(strategy, {"ok": 0, "zero_std": 0, "same_sample": 0, "not_ordered": 0})[status] = n
    return report


def earlier_rounds(ctx: RunContext) -> list[tuple[int, str]]:
    """(round, run_id) of the earlier loop rounds whose pairs this round trains on too (loop.pairs: all)."""
    record = ctx.lake.read_run(ctx.pipeline, ctx.run_id) or {}
    return [tuple(r) for r in ((record.get("pins") or {}).get("loop") or {}).get("pair_runs", [])]


def rescaled_pairs_sql(pairs: str, rewards_then: str, rewards_now: str, score: ScoreConfig, prefix: str,
                       pipeline: str, run_id: str) -> str:
    """An earlier round's pairs as this round's: ids prefixed, and their rewards recomputed from that round's raw
    per-model scores on this round's scale (each model z-normalised with this round's mean and std, then
    aggregated as score.aggregate says): chosen_reward, rejected_reward, gt_margin, and the prompt's reward_mean
    and reward_std over that round's samples. So the gaps PoP labels and margins compare are in one unit
    whatever round a pair came from. A pair whose chosen side no longer scores above its rejected one on this
    scale is dropped, as the pair stage drops it (not_ordered); a sample that no reward model of this round
    scored drops its pairs too (add_earlier_pairs leaves out a round not scored by all of them). Columns: the
    pairs' own, plus `ordered` (false: to drop)."""
    return f"""
    with rescaled as ({aggregate_sql(rewards_then, score, rewards_now)}),
    per_prompt as (
        select prompt_id, avg(reward) as mu, stddev_pop(reward) as sigma from rescaled group by prompt_id
    ),
    final as (
        select p.* replace ({lit(prefix)} || p.pair_id as pair_id, {lit(pipeline)} as pipeline,
                           {lit(run_id)} as run_id, c.reward as chosen_reward, r.reward as rejected_reward,
                           s.mu as reward_mean, s.sigma as reward_std, c.reward - r.reward as gt_margin),
               c.reward > r.reward as ordered
        from {pairs} p
        join rescaled c on c.prompt_id = p.prompt_id and c.sample_idx = p.chosen_idx
        join rescaled r on r.prompt_id = p.prompt_id and r.sample_idx = p.rejected_idx
        join per_prompt s on s.prompt_id = p.prompt_id
    )
    select * from final order by pair_id"""


def add_earlier_pairs(con, ctx: RunContext, earlier: list[tuple[int, str]], out_dir: str) -> dict[str, dict]:
    """Copy each earlier round's own pairs (its part-00000, not what it accumulated itself) into this round's
    staged pairs, ids prefixed r<round>/ so they never collide with this round's, their rewards on this
    round's scale (rescaled_pairs_sql). Returns per round the pairs kept and those dropped (no longer ordered
    on this scale, or scored by no reward model of this round)."""
    added = {}
    for round_no, run_id in earlier:
        own = ctx.lake.partition("pairs", ctx.pipeline, run_id) / "part-00000.parquet"
        scores = ctx.lake.partition("rewards", ctx.pipeline, run_id)
        if not own.is_file() or not any(scores.glob("*.parquet")):
            raise PopflowError(f"pair: loop.pairs is 'all', and round {round_no}'s pairs or rewards (run {run_id}) "
                               f"are gone ({own.parent}); retention removed them? Use loop.pairs: this_round or "
                               "keep more runs")
        then = sql.parquet(scores / "*.parquet")
        missing = {m.name for m in ctx.config.score.models} - {
            r[0] for r in con.execute(f"select distinct reward_model from {then}").fetchall()}
        query = rescaled_pairs_sql(sql.parquet(own), then, ctx.table("rewards"), ctx.config.score,
                                   f"r{round_no}/", ctx.pipeline, ctx.run_id)
        if missing:  # its aggregate would mean another thing than this round's: none of its pairs
            log.warning("pair: round %d's samples were not scored by %s (this round's reward models): its pairs "
                        "are left out", round_no, ", ".join(sorted(missing)))
            query = f"select * from ({query}) where false"
        con.execute(f"create or replace temp table earlier as {query}")
        part = os.path.join(out_dir, f"part-r{round_no:05d}.parquet")
        _copy(con, "select * exclude (ordered) from earlier where ordered order by pair_id", part)
        kept = pq.ParquetFile(part).metadata.num_rows
        total = pq.ParquetFile(own).metadata.num_rows
        added[f"round {round_no}"] = {"kept": kept, "dropped": total - kept}
        if total - kept and not missing:  # (all of them when some were missing: said once above)
            log.warning("pair: %d of round %d's %d pairs dropped: not ordered on this round's reward scale",
                        total - kept, round_no, total)
    return added


@stage("pair", reads=("ingest", "sample", "score"), sections=("pair",),
       writes=("seven_points", "pairs", "point_growth"),
       when=lambda cfg: not cfg.import_pairs)
def pair(ctx: RunContext) -> Output:
    """Build seven_points and pairs for the run, then plot a few prompts' reward distributions."""
    from popflow.plots import plot_point_growth, plot_reward_distributions

    logger, cfg, lake = run_logger(), ctx.config.pair, ctx.lake
    sources = {"samples": ctx.table("samples"), "prompts": ctx.table("prompts"),
               "rewards": ctx.table("sample_rewards")}
    out = {t: str(lake.staging(t, ctx.pipeline, ctx.run_id)) for t in ("seven_points", "pairs")}
    for t in out:
        lake.discard_staging(t, ctx.pipeline, ctx.run_id)
    cols = f", {lit(ctx.pipeline)} as pipeline, {lit(ctx.run_id)} as run_id"
    con = sql.connect()
    report = write_pairs(con, cols, sources, cfg, out, ctx.config.sample.system_prompt)
    earlier = earlier_rounds(ctx)
    if earlier:
        report["earlier_rounds"] = add_earlier_pairs(con, ctx, earlier, out["pairs"])
    for t in out:
        lake.publish(t, ctx.pipeline, ctx.run_id)
    tables = {t: con.execute(f"select count(*) from {ctx.table(t)}").fetchall()[0][0] for t in out}
    sizes = growth_sizes(ctx.config.sample.n)
    if sizes:  # the seven points at 4, 8, ... samples: the pair-strategy claim's curve, from this run's samples
        growth = con.sql(point_growth_sql(ctx.table("sample_rewards"), sizes)).to_arrow_table()
        ctx.lake.write_table("point_growth", ctx.pipeline, ctx.run_id, with_run_columns(ctx, growth))
        tables["point_growth"] = growth.num_rows
        prompts = growth.num_rows // (len(POINTS) * len(sizes))
        curve = con.sql(growth_curve_sql(ctx.table("point_growth"))).to_arrow_table()
        report["point_growth_plot"] = str(plot_point_growth(curve.to_pylist(), ctx.run_dir / "point_growth.png",
                                                            f"{ctx.pipeline} {ctx.run_id}, {prompts} prompts"))
    plot = plot_reward_distributions(con, ctx.table("sample_rewards"), ctx.table("seven_points"),
                                     ctx.run_dir / "reward_distributions.png", ctx.run_id)
    report["plot"] = str(plot)
    for strategy, counts in report.items():
        if strategy not in ("plot", "point_growth_plot"):
            logger.info("pairs %s: %s", strategy, counts)
    return Output(tables, report)
