"""Benchmark: the sample stage on the Ray backend vs the local backend, same prompts, parameters and cores.

    .venv/bin/python bench/bench_ray.py [--prompts 16] [--n 8] [--max-tokens 96] [--shard-size 4]

Arms, each in a fresh process on its own lake (ingest of the demo prompts, then the real sample stage of the
`demo` pipeline, SmolLM2-135M-Instruct):
    local        one vLLM engine in the stage's process, bound to every core (today's path)
    ray x1       execution.sample: ray, 1 replica with every core (the same resources), a local Ray started by
                 the stage: what the backend costs
    ray x2       2 replicas of half the cores each: data parallelism on the same cores
    ray data x1  the alternative the backend was chosen against: Ray Data `map_batches` over an actor class
                 holding the same engine (one replica, every core), shards streamed back to the driver, which
                 writes them as the stage does; generation timed from the first shard request to the last row
The stage's own report splits its time into engine start-up (Ray's start and the replicas' engines included),
generation and publishing (staged shard writes + the atomic publish). Goal (issue 13): ray x1 >= 0.9x local,
on the stage's wall time and on tokens/s of generation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def arm(name: str, args) -> dict:
    """Run one arm in this process: ingest, then the sample stage; the figures it reports."""
    import tasks.prompts  # noqa: F401  (registers the stages)
    import tasks.sample  # noqa: F401
    from popflow.config import load_pipeline
    from popflow.sql import connect, parquet
    from popflow.stage import REGISTRY, RunContext

    cores = len(os.sched_getaffinity(0))
    backend = {"local": [], "ray x1": ["execution.sample.backend=ray", "execution.sample.replicas=1",
                                       f"execution.sample.cpus={cores}"],
               "ray x2": ["execution.sample.backend=ray", "execution.sample.replicas=2",
                          f"execution.sample.cpus={max(cores // 2, 1)}"]}[name]
    cfg = load_pipeline("demo", overrides=[f"prompts.limit={args.prompts}", "prompts.eval_limit=0",
                                           f"sample.n={args.n}", f"sample.max_tokens={args.max_tokens}",
                                           f"sample.shard_size={args.shard_size}", *backend])
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(tmp, "demo", "bench", cfg)
        REGISTRY["ingest"](ctx)
        t0 = time.perf_counter()
        result = REGISTRY["sample"](ctx)
        wall = time.perf_counter() - t0
        tokens = connect().sql(f"select sum(num_tokens) from {parquet(ctx.glob('samples'))}").fetchall()[0][0]
    timing = result.report["timing"]
    return {"arm": name, "wall_s": round(wall, 1), **timing, "tokens": int(tokens),
            "gen_tokens_per_s": round(tokens / timing["generate_s"], 1), "samples": result.tables["samples"]}


class ShardGenerator:
    """Ray Data's callable class: one engine; a batch of one row = one shard of rendered prompts."""

    def __init__(self, policy: str, cfg, cpus: int):
        from popflow.replicas import GenerateReplica

        self.replica = GenerateReplica(policy, cfg, slot=0, cpus=cpus)

    def __call__(self, batch: dict) -> dict:
        from popflow.engines import Params, Prompt

        out = []
        for ids, texts in zip(batch["ids"], batch["texts"], strict=True):
            comps, _ = self.replica.generate([Prompt(i, t) for i, t in zip(ids, texts, strict=True)],
                                                self.replica.engines.cfg.n, Params.of(self.replica.engines.cfg))
            out.append(json.dumps([[[c.text, c.num_tokens] for c in group] for group in comps]))
        return {"shard": batch["shard"], "texts": out}


def ray_data_arm(args) -> dict:
    """The sample stage's work through Ray Data instead of the backend's actor pool (see the docstring)."""
    import pyarrow as pa
    import ray

    from popflow import models
    from popflow.config import PromptsConfig, load_pipeline
    from popflow.engines import prepare_prompts
    from popflow.lake import write_parquet
    from tasks.prompts import load_prompts

    cores = len(os.sched_getaffinity(0))
    cfg = load_pipeline("demo", overrides=[f"prompts.limit={args.prompts}", "prompts.eval_limit=0",
                                           f"sample.n={args.n}", f"sample.max_tokens={args.max_tokens}"]).sample
    table = load_prompts(PromptsConfig(source=str(REPO / "data/prompts/demo.jsonl"), limit=args.prompts,
                                       eval_limit=0))
    ids, texts = table.column("prompt_id").to_pylist(), table.column("prompt").to_pylist()
    path = models.resolve(cfg.policy, REPO / "data").path
    rendered, _, _ = prepare_prompts(path, ids, texts, cfg, "sample")
    items = [{"shard": k, "ids": [p.id for p in rendered[s : s + args.shard_size]],
              "texts": [p.text for p in rendered[s : s + args.shard_size]]}
             for k, s in enumerate(range(0, len(rendered), args.shard_size))]
    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    data = ray.data.from_items(items).map_batches(ShardGenerator, fn_constructor_args=(path, cfg, cores),
                                                 batch_size=1, concurrency=1, num_cpus=cores)
    tokens, publish, samples = 0, 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for row in data.iter_rows():
            t1 = time.perf_counter()
            done = [c for group in json.loads(row["texts"]) for c in group]
            write_parquet(pa.table({"response": [t for t, _ in done]}), Path(tmp) / f"{row['shard']}.parquet")
            publish += time.perf_counter() - t1
            tokens, samples = tokens + sum(n for _, n in done), samples + len(done)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"arm": "ray data x1", "wall_s": round(wall, 1), "startup_s": "-", "generate_s": "-",
            "publish_s": round(publish, 3), "tokens": tokens, "gen_tokens_per_s": "-", "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--shard-size", type=int, default=4)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        result = ray_data_arm(args) if args.arm == "ray data x1" else arm(args.arm, args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "POPFLOW_MODELS_DIR": str(REPO / "data" / "models")}  # the built-in models, not copied per arm
    env.pop("RAY_ADDRESS", None)
    rows = []
    for name in ("local", "ray x1", "ray x2", "ray data x1"):
        cmd = [sys.executable, __file__, "--arm", name, "--prompts", str(args.prompts), "--n", str(args.n),
               "--max-tokens", str(args.max_tokens), "--shard-size", str(args.shard_size)]
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    print(f"\n{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, flags {flags}; "
          f"{args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, shards of {args.shard_size}\n")
    print("| arm | stage wall s | start-up s | generation s | publish s | tokens | gen tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['wall_s']} | {r['startup_s']} | {r['generate_s']} | {r['publish_s']} | "
              f"{r['tokens']} | {r['gen_tokens_per_s']} |")
    local, pool = rows[0], rows[1]
    for r in rows[1:3]:
        print(f"{r['arm']} / local: stage {local['wall_s'] / r['wall_s']:.2f}x, generation tokens/s "
              f"{r['gen_tokens_per_s'] / local['gen_tokens_per_s']:.2f}x")
    work = pool["startup_s"] + pool["generate_s"] + pool["publish_s"]  # the part Ray Data would replace
    print(f"ray data x1: {rows[3]['wall_s']} s vs the actor pool's start-up + generation + publish {work:.1f} s: "
          f"pool {rows[3]['wall_s'] / work:.2f}x")


if __name__ == "__main__":
    main()
