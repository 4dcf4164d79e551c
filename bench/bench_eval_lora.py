"""Benchmark: generating with a trained LoRA adapter in evaluate, served by vLLM vs merged into the weights.

    .venv/bin/python bench/bench_eval_lora.py [--prompts 16] [--n 4] [--max-tokens 160] [--policies 12]

The demo's evaluate settings by default (its 16 held-out prompts, n = 4, 160 tokens, LoRA r = 16 on every linear
layer of SmolLM2-135M-Instruct; the adapter's weights are random, so its outputs differ from the base's).
Two ways to sample one trained policy, with the same sampling parameters:

    lora    one vLLM engine with enable_lora serves every adapter (start-up paid once per stage)
    merged  peft merges the adapter into a copy of the base weights, saved to a temporary folder, and a new
            vLLM engine serves that copy (merge, save and start-up paid per policy)

Per-policy seconds for a stage that evaluates --policies adapters: lora = start-up / policies + generation;
merged = merge + start-up + generation. Ratio printed: lora seconds / merged seconds (> 1: merging wins).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path


def make_adapter(base: str, out: Path, r: int) -> None:
    """A LoRA adapter like the train stage's (all-linear, r, alpha 2r) with random non-zero B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.002)
    model.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--policies", type=int, default=12)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    from smollm2 import demo_prompts

    from popflow.engines import Engines, Params, VllmEngine, merge_adapter

    base, ids, rendered, cfg = demo_prompts("eval", args.prompts, args.n, args.max_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        make_adapter(base, adapter, args.rank)

        params = Params.of(cfg)
        with Engines(cfg, "lora", args.rank) as engines:  # popflow's LoRA serving: one shared engine
            t0 = time.perf_counter()
            with engines.open(base, str(adapter)) as engine:
                lora_start = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = engine.generate(rendered, cfg.n, params)
                lora_gen = time.perf_counter() - t0
        lora_tokens = sum(c.num_tokens for row in out for c in row)

        t0 = time.perf_counter()
        merged = merge_adapter(base, str(adapter), Path(tmp) / "merged")
        merge_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = VllmEngine(merged, cfg)
        merged_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = engine.generate(rendered, cfg.n, params)
        merged_gen = time.perf_counter() - t0
        merged_tokens = sum(c.num_tokens for row in out for c in row)
        engine.close()

    lora_per = lora_start / args.policies + lora_gen
    merged_per = merge_s + merged_start + merged_gen
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print(f"{args.prompts} prompts x n={args.n}, max_tokens={args.max_tokens}, LoRA r={args.rank}, "
          f"{args.policies} policies per stage")
    print(f"lora    start-up {lora_start:6.1f} s  generate {lora_gen:6.1f} s  {lora_tokens / lora_gen:6.1f} tok/s")
    print(f"merged  merge {merge_s:4.1f} s  start-up {merged_start:6.1f} s  generate {merged_gen:6.1f} s  "
          f"{merged_tokens / merged_gen:6.1f} tok/s")
    print(f"per policy: lora {lora_per:.1f} s, merged {merged_per:.1f} s -> merged is {lora_per / merged_per:.2f}x")


if __name__ == "__main__":
    main()
