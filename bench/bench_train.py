"""Benchmark: popflow's trainer vs stock TRL DPOTrainer, and stored reference log-probs vs live ones.

    .venv/bin/python bench/bench_train.py [--model data/models/SmolLM2-135M-Instruct] [--pairs 48] [--batch 8]

Same model, data, LoRA, precision (train.dtype auto: bf16 on CUDA, bf16 autocast on bf16-capable CPUs) and
DPOConfig for every arm; training throughput = tokens seen / train_runtime (Trainer's own clock, so dataset
preparation and the reference precompute are not counted):
  A  stock TRL DPOTrainer, loss sigmoid, precompute_ref_log_probs=True   (TRL's fastest stock setting)
  B  stock TRL DPOTrainer, loss sigmoid, reference computed every step  (what most scripts run)
  P  popflow PopDPOTrainer, loss dpo_pop (per-pair margins), reference log-probs stored in the lake
  F  P in plain fp32 (CPU only: what train.dtype auto's mixed precision buys)
Ratios printed: P / A (goal >= 0.95: a margin costs nothing), P / B (goal > 1.3: stored reference), P / F.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import datasets
import numpy as np
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

from tasks.ref_logps import train_device_dtype
from tasks.trainer import PopDPOTrainer, dpo_args


def make_pairs(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    words = "the a model answer colour river quickly because seven green north light paper".split()
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Question {i}: {text(20)}?"}],
         "chosen": [{"role": "assistant", "content": text(60)}],
         "rejected": [{"role": "assistant", "content": text(40)}]} for i in range(n)])


def run(arm: str, model_path: str, data: datasets.Dataset, batch: int, max_length: int) -> float:
    tok = AutoTokenizer.from_pretrained(model_path)
    device, dtype, bf16 = train_device_dtype("float32" if arm == "F" else "auto")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        common = dict(per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-4, disable_tqdm=True,
                      logging_steps=1000)
        if arm in ("P", "F"):
            args = dpo_args(out, "dpo_pop", 0.1, max_length, 0, bf16, False, {}, **common)
            trainer = PopDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=lora, loss="dpo_pop")
        else:
            args = dpo_args(out, "sigmoid", 0.1, max_length, 0, bf16, False, {},
                            precompute_ref_log_probs=arm == "A", **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
        result = trainer.train()
        return trainer._total_train_tokens / result.metrics["train_runtime"]  # TRL's count; ours mirrors it


def stored_pairs(model_path: str, data: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """What the lake's ref_logps table holds: TRL's precompute pass with the reference, done once."""
    tok = AutoTokenizer.from_pretrained(model_path)
    device, dtype, bf16 = train_device_dtype("auto")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
    with tempfile.TemporaryDirectory() as out:
        trainer = PopDPOTrainer(model=model, args=dpo_args(out, "dpo", 0.1, max_length, 0, bf16, False, {}),
                                train_dataset=data, processing_class=tok)
        ds = trainer.train_dataset
    margins = np.random.default_rng(1).uniform(0, 1, len(data)).tolist()
    return (data.add_column("ref_chosen_logps", ds["ref_chosen_logps"])
            .add_column("ref_rejected_logps", ds["ref_rejected_logps"]).add_column("margin", margins))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/models/SmolLM2-135M-Instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    device, _, bf16 = train_device_dtype("auto")
    data = make_pairs(args.pairs)
    stored = stored_pairs(args.model, data, args.max_length)
    speed = {}
    for arm in ("A", "B", "P") + (("F",) if device == "cpu" else ()):
        t0 = time.time()
        speed[arm] = run(arm, args.model, stored if arm in ("P", "F") else data, args.batch, args.max_length)
        print(f"arm {arm}: {speed[arm]:.0f} tokens/s ({time.time() - t0:.0f} s wall)", flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({name}), bf16 {bf16}, model {args.model}, {args.pairs} pairs, batch {args.batch}, "
          f"max_length {args.max_length}, LoRA r16")
    print(f"popflow dpo_pop (stored ref) / stock TRL sigmoid (precomputed ref): {speed['P'] / speed['A']:.2f}x")
    print(f"popflow dpo_pop (stored ref) / stock TRL sigmoid (live reference):  {speed['P'] / speed['B']:.2f}x")
    if "F" in speed:
        print(f"popflow dpo_pop, bf16 autocast / fp32:                            {speed['P'] / speed['F']:.2f}x")


if __name__ == "__main__":
    main()
