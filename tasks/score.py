"""Stage 2, score: every reward model scores every sample, then the scores are aggregated.

Each model's scores are staged as their own part as soon as they are computed, so a crash while the third
model runs keeps the first two. `rewards` has one row per (sample, reward model); `sample_rewards` has the
aggregate per sample: optionally each model z-normalised over the run, then mean, min or weighted mean.

    .venv/bin/popflow sql "select reward_model, avg(score), stddev_pop(score) from rewards group by all"
"""

from __future__ import annotations

import importlib
import json
import math
import time

import duckdb
import numpy as np
import pyarrow as pa
from prefect import get_run_logger

from popflow import models, precision
from popflow.config import ScoreConfig
from popflow.errors import PopflowError
from popflow.stage import RunContext, StageResult, finish, stage_task, with_run_columns
from tasks.rewards import ScoringBatch

KINDS = {k: f"tasks.rewards.{k}" for k in ("hf", "constraints", "relevance", "python")}


def check_finite(values: np.ndarray, name: str, prompt_ids: list[str], sample_idx: list[int]) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise PopflowError(
            f"reward model {name!r} returned {values[i]} for prompt_id={prompt_ids[i]!r} "
            f"sample_idx={sample_idx[i]} ({bad.size} non-finite score(s) in all); nothing was written")


def rewards_part(name: str, kind: str, prompt_ids: list[str], sample_idx: list[int], values: np.ndarray) -> pa.Table:
    n = len(values)
    return pa.table({
        "prompt_id": pa.array(prompt_ids, pa.string()), "sample_idx": pa.array(sample_idx, pa.int32()),
        "reward_model": pa.array([name] * n, pa.string()), "kind": pa.array([kind] * n, pa.string()),
        "score": pa.array(values, pa.float64()),
    })


def score_with(spec, batch: ScoringBatch, data_dir, prompt_ids: list[str], sample_idx: list[int]) -> pa.Table:
    """One reward model's scores of a batch, checked finite, as rewards rows."""
    values = importlib.import_module(KINDS[spec.kind]).score(spec, batch, data_dir)
    check_finite(values, spec.name, prompt_ids, sample_idx)
    return rewards_part(spec.name, spec.kind, prompt_ids, sample_idx, values)


def normalised_sql(scores: str, stats: str, cfg: ScoreConfig) -> str:
    """CTEs `model_stats` and `normalised` (prompt_id, sample_idx, reward_model, weight, value): each model's
    scores of `scores`, z-normalised with the mean and std of that model over `stats` when asked."""
    weights = ", ".join(f"('{m.name}', {float(m.weight)!r})" for m in cfg.models)
    value = "(s.score - st.mu) / st.sd" if cfg.normalize == "zscore" else "s.score"
    return f"""
    weights (reward_model, weight) as (values {weights}),
    model_stats as (
        select reward_model, avg(score) as mu, stddev_pop(score) as sd from {stats} group by reward_model
    ),
    normalised as (
        select s.* exclude (score), w.weight,
               case when st.sd > 0 or '{cfg.normalize}' = 'none' then {value} else 0.0 end as value
        from {scores} s join model_stats st using (reward_model) join weights w using (reward_model)
    )"""


def aggregate_sql(rewards_glob: str, cfg: ScoreConfig, stats_glob: str | None = None, keys: tuple = ()) -> str:
    """SQL from per-model scores to one reward per sample; normalised with the stats of `stats_glob`
    (default: the same scores; evaluate passes the run's rewards so new samples share the run's scale).
    `keys`: extra columns that identify a sample (evaluate's method, seed)."""
    key = "".join(f"{k}, " for k in keys)
    combine = {
        "mean": "avg(value)",
        "min": "min(value)",
        "weighted": "sum(weight * value) / sum(weight)",
    }[cfg.aggregate]
    return f"""
    with scores as (
        select {key}prompt_id, sample_idx, reward_model, score from read_parquet('{rewards_glob}')
    ),
    stats_source as (
        select reward_model, score from read_parquet('{stats_glob or rewards_glob}')
    ),
    {normalised_sql("scores", "stats_source", cfg)},
    final as (
        select {key}prompt_id, sample_idx, {combine} as reward
        from normalised group by {key}prompt_id, sample_idx
    )
    select * from final order by {key}prompt_id, sample_idx
    """


def samples_to_score(ctx: RunContext) -> pa.Table:
    return duckdb.sql(f"""
        select s.prompt_id, s.sample_idx, p.prompt, s.response, p.constraints
        from read_parquet('{ctx.glob('samples')}') s
        join read_parquet('{ctx.glob('prompts')}') p using (prompt_id)
        order by s.prompt_id, s.sample_idx
    """).to_arrow_table()


@stage_task("score", retries=1, retry_delay_seconds=5)
def score(ctx: RunContext) -> StageResult:
    """Score with each reward model (resuming per model), publish rewards and sample_rewards."""
    logger, cfg, lake, started = get_run_logger(), ctx.config.score, ctx.lake, time.time()
    data = samples_to_score(ctx)
    ids, idx = data.column("prompt_id").to_pylist(), data.column("sample_idx").to_pylist()
    batch = ScoringBatch(
        prompts=data.column("prompt").to_pylist(), responses=data.column("response").to_pylist(),
        constraints=[json.loads(c) if c else None for c in data.column("constraints").to_pylist()])
    staged = {p.stem for p in lake.staged_parts("rewards", ctx.pipeline, ctx.run_id)}
    identities, report = {}, {"samples": len(ids)}
    dtypes = precision.announce(cfg.dtypes())
    for spec in cfg.models:
        if hasattr(spec, "model"):
            identities[spec.name] = models.resolve(spec.model, lake.data_dir, f"score.models[{spec.name}]").identity()
        if f"model-{spec.name}" in staged:
            logger.info("reward model %s: already scored in this run", spec.name)
            continue
        t0 = time.time()
        part = with_run_columns(ctx, score_with(spec, batch, lake.data_dir, ids, idx))
        lake.write_staged_part("rewards", ctx.pipeline, ctx.run_id, f"model-{spec.name}", part)
        logger.info("reward model %s (%s): %d samples in %.1fs, mean %.4f", spec.name, spec.kind, len(ids),
                    time.time() - t0, float(np.mean(part.column("score").to_numpy())))
    rewards_dir = lake.publish("rewards", ctx.pipeline, ctx.run_id)
    agg = duckdb.sql(aggregate_sql(str(rewards_dir / "*.parquet"), cfg)).to_arrow_table()
    lake.write_table("sample_rewards", ctx.pipeline, ctx.run_id, with_run_columns(ctx, agg))
    stats = duckdb.sql(f"""
        select reward_model, avg(score) as mean, stddev_pop(score) as std, min(score) as min, max(score) as max
        from read_parquet('{rewards_dir}/*.parquet') group by reward_model order by reward_model
    """).to_arrow_table().to_pylist()
    report["models"] = {s.pop("reward_model"): {k: round(v, 6) if math.isfinite(v) else v for k, v in s.items()}
                        for s in stats}
    tables = {"rewards": len(ids) * len(cfg.models), "sample_rewards": agg.num_rows}
    return finish(ctx, "score", started, tables, report, identities, dtypes)
