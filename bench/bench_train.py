"""Benchmark: popflow's trainer vs stock TRL DPOTrainer, and stored reference log-probs vs live ones.

    .venv/bin/python bench/bench_train.py [--model DIR] [--pairs 48] [--batch 8] [--repeats 1]

Same model, data, LoRA, precision (train.dtype auto: bf16 on CUDA, bf16 autocast on bf16-capable CPUs) and
DPOConfig for every arm; training throughput = tokens seen / train_runtime (Trainer's own clock, so dataset
preparation and the reference precompute are not counted):
  A  stock TRL DPOTrainer, loss sigmoid, precompute_ref_log_probs=True   (TRL's fastest stock setting)
  B  stock TRL DPOTrainer, loss sigmoid, reference computed every step  (what most scripts run)
  P  popflow PopDPOTrainer, loss dpo_pop (per-pair margins), reference log-probs stored in the lake
  F  P in plain fp32 (CPU only: what train.dtype auto's mixed precision buys)
  H  P with LoRA's frozen base weights in bf16 under the same bf16 autocast (CPU with native bf16 only: what
     CUDA does), against reference log-probs computed with the same weights
Ratios printed: P / A (goal >= 0.95: a margin costs nothing), P / B (goal > 1.3: stored reference), P / F, H / P;
and each arm's mean training loss, so an arm that changes the numbers shows it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

from popflow import models, precision
from tasks.trainer import PopDPOTrainer, dpo_args

REPO = Path(__file__).resolve().parents[1]


def make_pairs(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    words = "the a model answer colour river quickly because seven green north light paper".split()
    text = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
    return datasets.Dataset.from_list([
        {"prompt": [{"role": "user", "content": f"Question {i}: {text(20)}?"}],
         "chosen": [{"role": "assistant", "content": text(60)}],
         "rejected": [{"role": "assistant", "content": text(40)}]} for i in range(n)])


def arm_precision(arm: str) -> precision.TrainingPrecision:
    prec = precision.training_precision("float32" if arm == "F" else "auto")
    return precision.TrainingPrecision(prec.device, prec.compute, prec.mixed, prec.compute) if arm == "H" else prec


def run(arm: str, model_path: str, data: datasets.Dataset, batch: int, max_length: int) -> tuple[float, float]:
    tok = AutoTokenizer.from_pretrained(model_path)
    prec = arm_precision(arm)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=prec.torch_dtype()).to(prec.device)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        common = dict(per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=1e-4, disable_tqdm=True,
                      logging_steps=1000)
        if arm in ("P", "F", "H"):
            args = dpo_args(out, "dpo_pop", 0.1, max_length, 0, prec.mixed, False, {}, **common)
            trainer = PopDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                                    peft_config=lora, loss="dpo_pop")
        else:
            args = dpo_args(out, "sigmoid", 0.1, max_length, 0, prec.mixed, False, {},
                            precompute_ref_log_probs=arm == "A", **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
        result = trainer.train()
        # TRL's token count (ours mirrors it) over Trainer's clock; the mean training loss
        return trainer._total_train_tokens / result.metrics["train_runtime"], float(result.training_loss)


def stored_pairs(model_path: str, data: datasets.Dataset, max_length: int, arm: str = "P") -> datasets.Dataset:
    """What the lake's ref_logps table holds: TRL's precompute pass with the reference, done once."""
    tok = AutoTokenizer.from_pretrained(model_path)
    prec = arm_precision(arm)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=prec.torch_dtype()).to(prec.device)
    with tempfile.TemporaryDirectory() as out:
        trainer = PopDPOTrainer(model=model, args=dpo_args(out, "dpo", 0.1, max_length, 0, prec.mixed, False, {}),
                                train_dataset=data, processing_class=tok)
        ds = trainer.train_dataset
    margins = np.random.default_rng(1).uniform(0, 1, len(data)).tolist()
    return (data.add_column("ref_chosen_logps", ds["ref_chosen_logps"])
            .add_column("ref_rejected_logps", ds["ref_rejected_logps"]).add_column("margin", margins))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: builtin:smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--arms", nargs="+", choices=("A", "B", "P", "F", "H"), help="default: all that apply")
    ap.add_argument("--repeats", type=int, default=1, help="run the arms this many times, interleaved; best counts "
                    "(on a GPU the first arm otherwise pays CUDA's warm-up)")
    args = ap.parse_args()
    args.model = args.model or models.resolve(models.SMOLLM2, REPO / "data").path
    prec = precision.training_precision("auto")
    data = make_pairs(args.pairs)
    stored = stored_pairs(args.model, data, args.max_length)
    cpu_bf16 = prec.device == "cpu" and prec.mixed == "bf16"
    stored_h = stored_pairs(args.model, data, args.max_length, "H") if cpu_bf16 else None
    arms = args.arms or ("A", "B", "P") + (("F",) if prec.device == "cpu" else ()) + (("H",) if cpu_bf16 else ())
    speed: dict[str, float] = {}
    for _ in range(args.repeats):
        for arm in arms:
            t0 = time.time()
            pairs = {"P": stored, "F": stored, "H": stored_h}.get(arm, data)
            rate, loss = run(arm, args.model, pairs, args.batch, args.max_length)
            speed[arm] = max(rate, speed.get(arm, 0.0))
            print(f"arm {arm}: {rate:.0f} tokens/s ({time.time() - t0:.0f} s wall), mean loss {loss:.6f}", flush=True)
    hw = precision.detect()
    print(f"device {prec.device} ({hw.name}, {hw.cpu_class}), weights {prec.weights}, mixed {prec.mixed}, "
          f"model {args.model}, {args.pairs} pairs, batch {args.batch}, max_length {args.max_length}, LoRA r16")
    for num, den, what in (("P", "A", "popflow dpo_pop (stored ref) / stock TRL sigmoid (precomputed ref)"),
                           ("P", "B", "popflow dpo_pop (stored ref) / stock TRL sigmoid (live reference)"),
                           ("P", "F", f"popflow dpo_pop, train.dtype auto ({prec.mixed} mixed) / fp32"),
                           ("H", "P", "bf16 frozen base weights / fp32 base weights (both bf16 autocast)")):
        if num in speed and den in speed:
            print(f"{what}: {speed[num] / speed[den]:.2f}x")


if __name__ == "__main__":
    main()
