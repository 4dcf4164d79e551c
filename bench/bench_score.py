"""Benchmark: `hf` reward scoring, batched and length-sorted, vs a batch-size-1 loop over the same samples.

    .venv/bin/python bench/bench_score.py [--samples 256] [--batch-size 16]

The reward model is SmolLM2-135M-Instruct with a scalar head (AutoModelForSequenceClassification,
num_labels=1, head seeded), saved as a directory and loaded by popflow's own `hf` loader. The samples are
the demo run's responses when data/lake has them (`make demo`), else synthetic responses of demo-like
lengths. The baseline is how common scripts score: format, tokenize and forward one sample at a time.
Reported against the loop in the same dtype (the gain of batching alone) and against a float32 loop (the
default most CPU scripts get; popflow's `dtype: auto` is bf16 on CPUs with native bf16). Goal (issue 2):
>= 5x.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from popflow import models, precision
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


def build_reward_model(out: Path) -> None:
    """SmolLM2-135M-Instruct with a seeded scalar head, saved as a normal HF reward model directory."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = models.resolve(models.SMOLLM2, REPO / "data").path
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = model.config.eos_token_id
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def loop(tokenizer, model, prompts: list[str], responses: list[str]) -> tuple[np.ndarray, float]:
    """The usual script: format, tokenize and forward one sample at a time."""
    import torch

    start, scores = time.perf_counter(), []
    for p, r in zip(prompts, responses, strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                             tokenize=False)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            scores.append(model(**enc).logits[0, 0].float().item())
    return np.array(scores), time.perf_counter() - start


def main() -> None:
    import tempfile

    import torch
    from scipy.stats import spearmanr

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    prompts, responses, source = load_samples(args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        build_reward_model(Path(tmp))
        tokenizer, model = hf.load(tmp, "auto", False)  # what the score stage does
        warm, _ = hf.format_texts(tokenizer, prompts[:2], responses[:2])
        hf.score_texts(tokenizer, model, warm, True, 2, 2048, "warm-up")  # CUDA context and kernels, untimed
        start = time.perf_counter()
        texts, templated = hf.format_texts(tokenizer, prompts, responses)
        batched = hf.score_texts(tokenizer, model, texts, templated, args.batch_size, 2048, "batched")
        t_batched = time.perf_counter() - start
        same, t_same = loop(tokenizer, model, prompts, responses)
        fp32_tok, fp32_model = hf.load(tmp, "float32", False)
        fp32, t_fp32 = loop(fp32_tok, fp32_model, prompts, responses)

    tokens = sum(len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    hw = precision.detect()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, device {hw.device} ({hw.name}, "
          f"CPU class {hw.cpu_class}), torch threads {torch.get_num_threads()}")
    print(f"samples: {args.samples} {source}, {tokens / args.samples:.0f} tokens each on average")
    print(f"popflow hf reward (dtype auto = {model.dtype}, batch {args.batch_size}, length-sorted): "
          f"{t_batched:.1f} s ({args.samples / t_batched:.1f} samples/s)")
    print(f"batch-size-1 loop, same dtype:    {t_same:.1f} s ({args.samples / t_same:.1f} samples/s)")
    print(f"batch-size-1 loop, float32:       {t_fp32:.1f} s ({args.samples / t_fp32:.1f} samples/s)")
    print(f"ratio vs same-dtype loop: {t_same / t_batched:.2f}x   vs float32 loop: {t_fp32 / t_batched:.2f}x")
    print(f"max |batched - same-dtype loop|: {np.max(np.abs(same - batched)):.2e}; Spearman(batched, float32 "
          f"loop): {spearmanr(batched, fp32).statistic:.4f}")


if __name__ == "__main__":
    main()
