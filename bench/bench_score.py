"""Benchmark: `hf` reward scoring, batched and length-sorted, vs a batch-size-1 loop over the same samples.

    .venv/bin/python bench/bench_score.py [--samples 256] [--batch-size 16]

The reward model is SmolLM2-135M-Instruct with a scalar head (AutoModelForSequenceClassification,
num_labels=1, head seeded): the same architecture and cost as a real SmolLM2 reward model. The samples are
the demo run's responses when data/lake has them (`make demo`), else synthetic responses of demo-like
lengths. The baseline is how common scripts score: format, tokenize and forward one sample at a time.
Both paths use popflow's formatting (the model's chat template); scores must agree. Goal (issue 2): >= 5x.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from popflow import models
from tasks.rewards import hf

REPO = Path(__file__).resolve().parents[1]


def load_samples(n: int) -> tuple[list[str], list[str], str]:
    catalog = REPO / "data" / "lake" / "catalog.duckdb"
    if catalog.is_file():
        import duckdb

        con = duckdb.connect(str(catalog), read_only=True)
        try:
            rows = con.sql(f"select p.prompt, s.response from samples s join prompts p using (run_id, prompt_id) "
                           f"where s.pipeline = 'demo' order by s.prompt_id, s.sample_idx limit {n}").fetchall()
        except duckdb.Error:
            rows = []
        if len(rows) == n:
            return [r[0] for r in rows], [r[1] for r in rows], "demo run responses"
    rng = np.random.default_rng(0)
    words = "the of a to model reward sample answer prompt focus energy light water plant".split()
    responses = [" ".join(rng.choice(words, size=int(rng.integers(20, 160)))) for _ in range(n)]
    return ["Explain something."] * n, responses, "synthetic responses (run make demo for real ones)"


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    path = models.resolve(models.SMOLLM2, REPO / "data").path
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    prompts, responses, source = load_samples(args.samples)

    start = time.perf_counter()
    texts, templated = hf.format_texts(tokenizer, prompts, responses)
    batched = hf.score_texts(tokenizer, model, texts, templated, args.batch_size, 2048, "batched")
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = []
    for p, r in zip(prompts, responses, strict=True):  # the usual script: one sample per forward pass
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            single.append(model(**enc).logits[0, 0].item())
    t_single = time.perf_counter() - start

    max_diff = float(np.max(np.abs(np.array(single) - batched)))
    tokens = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}")
    print(f"samples: {args.samples} {source}, {tokens / args.samples:.0f} tokens each on average")
    print(f"popflow hf reward, batch {args.batch_size} length-sorted: {t_batched:.1f} s "
          f"({args.samples / t_batched:.1f} samples/s)")
    print(f"batch-size-1 loop:                            {t_single:.1f} s ({args.samples / t_single:.1f} samples/s)")
    print(f"ratio (loop / batched): {t_single / t_batched:.2f}x   max |score difference|: {max_diff:.2e}")


if __name__ == "__main__":
    main()
