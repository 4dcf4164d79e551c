"""Stage 2, score: every reward model scores every sample, then the scores are aggregated.

Each model's scores are staged as their own part as soon as they are computed, so a crash while the third
model runs keeps the first two. `rewards` has one row per (sample, reward model); `sample_rewards` has the
aggregate per sample: optionally each model z-normalised over the run, then mean, min or weighted mean.

Where the models run is `execution.score`'s (popflow.stage.backend): here, one model after another, or with
`backend: ray` each hf model as replicas scoring chunks and the cheap kinds as Ray CPU tasks, all written here
as they finish (popflow/cluster.py); the tables are the same.

    .venv/bin/popflow sql "select reward_model, avg(score), stddev_pop(score) from rewards group by all"
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from popflow import models, precision, sql
from popflow.stage import Output, Parts, RunContext, backend, run_logger, stage, with_run_columns
from tasks.rewards import ScoringBatch, check_finite, hf, labels_sql, require_ifeval_labels, rewards_part, score_with
from tasks.rewards.aggregate import aggregate_sql


def samples_to_score(ctx: RunContext, con) -> pa.Table:
    """Every sample with its prompt's text and labels (a prompts table from before the IFEval labels: none)."""
    return con.sql(f"""
        with final as (
            select s.prompt_id, s.sample_idx, p.prompt, s.response, {labels_sql(con, ctx.table('prompts'), 'p')}
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


def scored(ctx: RunContext, where, specs: list, batch: ScoringBatch, ids: list[str], idx: list[int]
           ) -> Iterator[tuple[object, pa.Table]]:
    """(spec, rewards rows) of every reward model in `specs`, where `execution.score` says (`where`, a
    cluster.Backend): each cheap kind (constraints, ifeval, relevance, python) as a task (on Ray one CPU task each, all
    submitted first, so they run while the hf models score); each hf model as a pool of hf.Replica scoring chunks
    of samples (here one replica, all samples in one chunk; on Ray `replicas` replicas, `chunk_size` per chunk)."""
    data_dir = ctx.lake.data_dir
    cheap = where.tasks(score_with, [(s, (s, batch, data_dir, ids, idx)) for s in specs if s.kind != "hf"])
    exe = ctx.config.execution.score
    size = where.chunk(exe.chunk_size, len(ids))
    for spec in (s for s in specs if s.kind == "hf"):
        path = models.resolve(spec.model, data_dir, f"score.models[{spec.name}].model").path
        values = np.empty(len(ids), dtype=np.float64)
        chunks = [(i, (batch.prompts[i : i + size], batch.responses[i : i + size])) for i in range(0, len(ids), size)]
        with where.pool(hf.Replica, (path, spec), f"score {spec.name}") as pool:
            for i, chunk in pool.map("score", chunks):
                values[i : i + len(chunk)] = chunk
        check_finite(values, spec.name, ids, idx)
        yield spec, rewards_part(spec.name, spec.kind, ids, idx, values)
    yield from cheap


@stage("score", reads=("ingest", "sample"), sections=("score",), writes=("rewards", "sample_rewards"), retries=1,
       when=lambda cfg: not cfg.import_pairs)
def score(ctx: RunContext) -> Output:
    """Score with each reward model (resuming per model), publish rewards and sample_rewards."""
    logger, cfg, lake, con = run_logger(), ctx.config.score, ctx.lake, sql.connect()
    require_ifeval_labels(con, ctx.table("prompts"), cfg.models, ctx.run_id)
    data = samples_to_score(ctx, con)
    ids, idx = data.column("prompt_id").to_pylist(), data.column("sample_idx").to_pylist()
    batch = ScoringBatch.of(data.select(["prompt", "constraints", "instructions"]).to_pylist(),
                            data.column("response").to_pylist())
    parts = Parts(ctx, "score", ("rewards",), [f"model-{spec.name}" for spec in cfg.models])
    identities, report = {}, {"samples": len(ids)}
    dtypes = precision.announce(cfg.dtypes())
    todo = []
    for spec in cfg.models:
        if hasattr(spec, "model"):
            identities[spec.name] = models.resolve(spec.model, lake.data_dir, f"score.models[{spec.name}]").identity()
        if f"model-{spec.name}" in parts.done:
            logger.info("reward model %s: already scored in this run", spec.name)
        else:
            todo.append(spec)
    t0 = time.time()
    with backend(ctx, "score") as where:
        for spec, part in scored(ctx, where, todo, batch, ids, idx):
            parts.stage(f"model-{spec.name}", rewards=part)
            logger.info("reward model %s (%s): %d samples after %.1fs, mean %.4f", spec.name, spec.kind, len(ids),
                        time.time() - t0, float(np.mean(part.column("score").to_numpy())))
    parts.publish(rewards=len(ids) * len(cfg.models))
    agg = con.sql(aggregate_sql(ctx.table("rewards"), cfg)).to_arrow_table()
    lake.write_table("sample_rewards", ctx.pipeline, ctx.run_id, with_run_columns(ctx, agg))
    stats = con.sql(model_stats_sql(ctx.table("rewards"))).to_arrow_table().to_pylist()
    report["models"] = {s.pop("reward_model"): {k: round(v, 6) if math.isfinite(v) else v for k, v in s.items()}
                        for s in stats}
    tables = {"rewards": len(ids) * len(cfg.models), "sample_rewards": agg.num_rows}
    return Output(tables, report, identities, dtypes)
