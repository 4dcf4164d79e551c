"""Stage 1, sample: n on-policy responses per prompt (train and eval), with vLLM or transformers.

The prompts are cut into shards of `sample.shard_size` prompts. Each shard goes to the engine in one
call (vLLM schedules the whole shard itself: no small batches) and is written to staging when done, so a
crash loses at most the shard in flight and a rerun of the run id generates only the missing shards. When
every shard exists they are published together as the `samples` table.

Seeds: with vLLM on CUDA every prompt gets its own seed derived from `sample.seed` and its prompt_id, so a
resumed shard is identical to the lost one; on CPU (and with transformers) the engine is seeded once, and
the manifest records which (`per_request_seed`; popflow/engines.py says why) and the seed (a loop's round r:
sample.seed + r - 1, popflow/lineage.py). The engines live there too.

Prompts too long for the context (rendered length + max_tokens > vllm.max_model_len or the model's own) are
found with the tokenizer before the engine starts: `sample.long_prompts: skip` drops them (table
`skipped_prompts`, counted in the report), `fail` stops naming the first.

The engines are GenerateReplicas (popflow/replicas.py) where `execution.sample` says (popflow.stage.backend): one
in this process, or with `backend: ray` data-parallel replicas on a Ray cluster fed from one queue
(popflow/cluster.py); this process stays the driver and writes each shard as it comes back, so resume per shard
and the samples table are the same either way.

    .venv/bin/popflow run tiny --set sample.engine=transformers
    .venv/bin/popflow run tiny --set execution.sample.backend=ray --set execution.sample.replicas=2
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack

import pyarrow as pa

from popflow import models, precision, sql
from popflow.engines import Params, Prompt, prepare_prompts, samples_table
from popflow.errors import PopflowError
from popflow.replicas import GenerateReplica
from popflow.stage import Output, Parts, RunContext, backend, run_logger, stage, with_run_columns

log = logging.getLogger(__name__)


def shards(num_prompts: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_prompts)) for s in range(0, num_prompts, shard_size)]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


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


def generated(pool, rendered: list[Prompt], todo: list[tuple[int, int, int]], cfg, run: dict, timing: dict,
              t0: float) -> Iterator[tuple[int, list]]:
    """(shard, completions) of every shard to do from the pool's engines (one here, or Ray replicas: in the
    order they finish, and a replica that dies costs only its shard in flight); `t0`: when the pool was asked
    for, so start-up counts from there."""
    started = pool.ready()
    run.update(per_request_seed=started[0]["per_request_seed"], replicas=len(started))
    timing["startup_s"] += time.time() - t0
    t1 = time.time()
    pids = run.setdefault("replica_pids", {})  # which process made how many shards (a restart shows)
    for k, (completions, pid) in pool.map("generate", [(k, (rendered[s:e], cfg.n, Params.of(cfg)))
                                                          for k, s, e in todo]):
        timing["generate_s"] += time.time() - t1
        pids[str(pid)] = pids.get(str(pid), 0) + 1
        yield k, completions
        t1 = time.time()


@stage("sample", reads=("ingest",), sections=("sample",), writes=("samples", "skipped_prompts"), retries=1,
       when=lambda cfg: not cfg.import_pairs)
def sample(ctx: RunContext) -> Output:
    """Check every prompt fits, generate the missing shards, then publish `samples` (and `skipped_prompts`).
    A fresh stage asks for its engines first: on Ray they start while the prompts are checked."""
    logger, cfg, lake, con = run_logger(), ctx.config.sample, ctx.lake, sql.connect()
    policy = models.resolve(cfg.policy, lake.data_dir, "sample.policy")
    dtypes = precision.announce({"sample.dtype": cfg.dtype})
    gpus = cfg.engine_gpus()
    timing, run = {"startup_s": 0.0, "generate_s": 0.0, "publish_s": 0.0}, {"per_request_seed": None}
    with ExitStack() as stack:
        def engines() -> tuple[object, float]:  # the pool of engines where execution.sample says, and when asked
            t0 = time.time()
            where = stack.enter_context(backend(ctx, "sample"))
            return stack.enter_context(where.pool(GenerateReplica, (policy.path, cfg), "sample", gpus)), t0

        fresh = not Parts.started(ctx, "samples")
        early = engines() if fresh else None  # (on Ray the replicas' engines start while the prompts are checked)
        prompts = prompts_to_sample(ctx, con)
        ids = prompts.column("prompt_id").to_pylist()
        rendered, too_long, context = prepare_prompts(policy.path, ids, prompts.column("prompt").to_pylist(), cfg,
                                                      "sample")
        if not rendered:
            raise PopflowError(f"sample: none of the {len(ids)} prompts fits max_tokens={cfg.max_tokens} in a "
                               f"context of {context}")
        ids = [p.id for p in rendered]
        lake.write_table("skipped_prompts", ctx.pipeline, ctx.run_id,
                         with_run_columns(ctx, skipped_table(too_long, cfg.max_tokens, context)))
        spans = shards(len(ids), cfg.shard_size)
        parts = Parts(ctx, "sample", ("samples",), [shard_name(k) for k in range(len(spans))])
        todo = [(k, s, e) for k, (s, e) in enumerate(spans) if shard_name(k) not in parts.done]
        logger.info("sampling %d prompts x n=%d with %s in %s on %s: %d shard(s) to do, %d already staged",
                    len(ids), cfg.n, cfg.engine, dtypes["sample.dtype"], dtypes["device"], len(todo),
                    len(parts.done))
        if todo:
            total, done, tokens, t0 = sum(e - s for _, s, e in todo), 0, 0, time.time()
            span = {k: (s, e) for k, s, e in todo}
            pool, t_pool = early or engines()
            for i, (k, completions) in enumerate(generated(pool, rendered, todo, cfg, run, timing, t_pool), 1):
                t1 = time.time()
                s, e = span[k]
                parts.stage(shard_name(k), samples=samples_table(ids[s:e], completions, cfg.policy, cfg.engine, k))
                timing["publish_s"] += time.time() - t1
                done, tokens = done + e - s, tokens + sum(c.num_tokens for group in completions for c in group)
                logger.info("sample: shard %d/%d written: %s", i, len(todo), progress(done, total, tokens,
                                                                                    time.time() - t0))
    t1 = time.time()
    rows = parts.publish(samples=len(ids) * cfg.n)["samples"]  # exactly prompts x n, or nothing
    timing = {k: round(v + (time.time() - t1 if k == "publish_s" else 0.0), 3) for k, v in timing.items()}
    report = {"prompts": len(ids), "n": cfg.n, "samples": rows, "engine": cfg.engine,
              "shards": len(spans), "resumed_shards": len(parts.done),
              "per_request_seed": run["per_request_seed"],
              "replicas": run.get("replicas", 0), "timing": timing,
              "replica_pids": run.get("replica_pids", {}),
              "skipped_prompts": len(too_long),
              "skipped_ids": [pid for pid, _ in too_long[:20]], "context": context,
              "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                           "seed": cfg.seed, "system_prompt": cfg.system_prompt}}
    return Output({"samples": rows, "skipped_prompts": len(too_long)}, report, {"policy": policy.identity()}, dtypes)
