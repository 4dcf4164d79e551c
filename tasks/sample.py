"""Stage 1, sample: n on-policy responses per prompt (train and eval), with vLLM or transformers.

The prompts are cut into shards of `sample.shard_size` prompts. Each shard goes to the engine in one
call (vLLM schedules the whole shard itself: no small batches) and is written to staging when done, so a
crash loses at most the shard in flight and a rerun of the run id generates only the missing shards. When
every shard exists they are published together as the `samples` table.

Seeds: with vLLM on CUDA every prompt gets its own seed derived from `sample.seed` and its prompt_id, so a
resumed shard is identical to the lost one; on CPU (and with transformers) the engine is seeded once, and
the manifest records which (`per_request_seed`; popflow/engines.py says why). The engines live there too.

Prompts too long for the context (rendered length + max_tokens > vllm.max_model_len or the model's own) are
found with the tokenizer before the engine starts: `sample.long_prompts: skip` drops them (table
`skipped_prompts`, counted in the report), `fail` stops naming the first.

    .venv/bin/popflow run tiny --set sample.engine=transformers
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from popflow import models, precision, sql
from popflow.engines import Engines, Params, prepare_prompts, samples_table
from popflow.errors import PopflowError
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns

log = logging.getLogger(__name__)


def shards(num_prompts: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_prompts)) for s in range(0, num_prompts, shard_size)]


def prompts_to_sample(ctx: RunContext, con) -> pa.Table:
    """Train and eval prompts alike: eval prompts give held-out pairs and the base policy's samples that
    evaluate compares trained policies with; they never reach annotation or training."""
    return con.sql(f"""
        with final as (
            select prompt_id, prompt, split, source_row from {ctx.table('prompts')}
        )
        select prompt_id, prompt from final order by split desc, source_row""").to_arrow_table()


def progress(done_prompts: int, total_prompts: int, tokens: int, seconds: float) -> str:
    """One progress line after a shard: prompts done, output tokens/s and the time left at that rate."""
    rate = tokens / seconds if seconds > 0 else 0.0
    left = seconds / max(done_prompts, 1) * (total_prompts - done_prompts)
    return f"{done_prompts}/{total_prompts} prompts, {tokens} tokens at {rate:.1f} tokens/s, {left / 60:.1f} min left"


SKIPPED_SCHEMA = pa.schema([("prompt_id", pa.string()), ("tokens", pa.int32()), ("max_tokens", pa.int32()),
                            ("context", pa.int32())])


def skipped_table(too_long: list[tuple[str, int]], max_tokens: int, context: int | None) -> pa.Table:
    return pa.Table.from_pylist([{"prompt_id": pid, "tokens": n, "max_tokens": max_tokens, "context": context}
                                 for pid, n in too_long], schema=SKIPPED_SCHEMA)


@stage("sample", reads=("ingest",), sections=("sample",), writes=("samples", "skipped_prompts"), retries=1,
       when=lambda cfg: not cfg.import_pairs)
def sample(ctx: RunContext) -> Output:
    """Check every prompt fits, generate the missing shards, then publish `samples` (and `skipped_prompts`)."""
    logger, cfg, lake, con = run_logger(), ctx.config.sample, ctx.lake, sql.connect()
    policy = models.resolve(cfg.policy, lake.data_dir, "sample.policy")
    dtypes = precision.announce({"sample.dtype": cfg.dtype})
    prompts = prompts_to_sample(ctx, con)
    ids = prompts.column("prompt_id").to_pylist()
    rendered, too_long, context = prepare_prompts(policy.path, ids, prompts.column("prompt").to_pylist(), cfg,
                                                  "sample")
    if not rendered:
        raise PopflowError(f"sample: none of the {len(ids)} prompts fits max_tokens={cfg.max_tokens} in a context "
                           f"of {context}")
    ids = [p.id for p in rendered]
    lake.write_table("skipped_prompts", ctx.pipeline, ctx.run_id,
                     with_run_columns(ctx, skipped_table(too_long, cfg.max_tokens, context)))
    have = {p.stem for p in lake.staged_parts("samples", ctx.pipeline, ctx.run_id)}
    todo = [(k, s, e) for k, (s, e) in enumerate(shards(len(ids), cfg.shard_size)) if f"shard-{k:05d}" not in have]
    logger.info("sampling %d prompts x n=%d with %s in %s on %s: %d shard(s) to do, %d already staged",
                len(ids), cfg.n, cfg.engine, dtypes["sample.dtype"], dtypes["device"], len(todo), len(have))
    per_request_seed = None
    if todo:
        total, done, tokens, t0 = sum(e - s for _, s, e in todo), 0, 0, time.time()
        with Engines(cfg) as engines, engines.open(policy.path) as engine:
            per_request_seed = engine.per_request_seed
            for i, (k, s, e) in enumerate(todo, 1):
                completions = engine.generate(rendered[s:e], cfg.n, Params.of(cfg))
                part = with_run_columns(ctx, samples_table(ids[s:e], completions, cfg.policy, cfg.engine, k))
                lake.write_staged_part("samples", ctx.pipeline, ctx.run_id, f"shard-{k:05d}", part)
                done, tokens = done + e - s, tokens + sum(c.num_tokens for group in completions for c in group)
                logger.info("sample: shard %d/%d written: %s", i, len(todo), progress(done, total, tokens,
                                                                                    time.time() - t0))
    staged = lake.staging("samples", ctx.pipeline, ctx.run_id)
    rows = con.sql(f"select count(*) from {sql.parquet(staged / '*.parquet')}").fetchall()[0][0]
    if rows != len(ids) * cfg.n:  # never publish a table that is not exactly prompts x n
        raise PopflowError(f"samples of run {ctx.run_id}: {rows} staged rows, expected {len(ids)} x {cfg.n}")
    lake.publish("samples", ctx.pipeline, ctx.run_id)
    report = {"prompts": len(ids), "n": cfg.n, "samples": rows, "engine": cfg.engine,
              "shards": len(shards(len(ids), cfg.shard_size)), "resumed_shards": len(have),
              "per_request_seed": per_request_seed, "skipped_prompts": len(too_long),
              "skipped_ids": [pid for pid, _ in too_long[:20]], "context": context,
              "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                           "seed": cfg.seed, "system_prompt": cfg.system_prompt}}
    return Output({"samples": rows, "skipped_prompts": len(too_long)}, report, {"policy": policy.identity()}, dtypes)
