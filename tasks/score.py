"""Stage 2, score: every reward model scores every sample, then the scores are aggregated.

Each model's scores are staged as their own part as soon as they are computed, so a crash while the third
model runs keeps the first two. `rewards` has one row per (sample, reward model); `sample_rewards` has the
aggregate per sample: optionally each model z-normalised over the run, then mean, min or weighted mean.

    .venv/bin/popflow sql "select reward_model, avg(score), stddev_pop(score) from rewards group by all"
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa

from popflow import models, precision, sql
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns
from tasks.rewards import ScoringBatch, score_with
from tasks.rewards.aggregate import aggregate_sql


def samples_to_score(ctx: RunContext, con) -> pa.Table:
    return con.sql(f"""
        with final as (
            select s.prompt_id, s.sample_idx, p.prompt, s.response, p.constraints
            from {ctx.table('samples')} s
            join {ctx.table('prompts')} p using (prompt_id)
        )
        select * from final order by prompt_id, sample_idx
    """).to_arrow_table()


def model_stats_sql(rewards: str) -> str:
    """Mean, std, min and max of each reward model's scores (the stage report)."""
    return f"""
    with final as (
        select reward_model, avg(score) as mean, stddev_pop(score) as std, min(score) as min, max(score) as max
        from {rewards} group by reward_model
    )
    select * from final order by reward_model"""


@stage("score", reads=("ingest", "sample"), sections=("score",), writes=("rewards", "sample_rewards"), retries=1,
       when=lambda cfg: not cfg.import_pairs)
def score(ctx: RunContext) -> Output:
    """Score with each reward model (resuming per model), publish rewards and sample_rewards."""
    logger, cfg, lake, con = run_logger(), ctx.config.score, ctx.lake, sql.connect()
    data = samples_to_score(ctx, con)
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
    lake.publish("rewards", ctx.pipeline, ctx.run_id)
    agg = con.sql(aggregate_sql(ctx.table("rewards"), cfg)).to_arrow_table()
    lake.write_table("sample_rewards", ctx.pipeline, ctx.run_id, with_run_columns(ctx, agg))
    stats = con.sql(model_stats_sql(ctx.table("rewards"))).to_arrow_table().to_pylist()
    report["models"] = {s.pop("reward_model"): {k: round(v, 6) if math.isfinite(v) else v for k, v in s.items()}
                        for s in stats}
    tables = {"rewards": len(ids) * len(cfg.models), "sample_rewards": agg.num_rows}
    return Output(tables, report, identities, dtypes)
