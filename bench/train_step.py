"""Check: one training step of the tiny pipeline's trainer on this machine's device (CUDA when present).

    .venv/bin/python bench/train_step.py [--model DIR]      (bench/gpu_check.sh runs it)

The tiny pipeline's train settings (pipelines.yaml `tiny`: LoRA r 8 / alpha 16, batch 4, max_length 256,
dpo_pop with per-pair margins over stored reference log-probs), the precision `train.dtype: auto` picks
(popflow.precision), the tiny Llama (builtin:tiny-llama). Fails (exit 1) unless the loss is finite and the
LoRA weights moved; prints the device, precision and the seconds per step after one warm-up step.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
from bench_train import make_pairs, stored_pairs
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from popflow import models, precision
from tasks.trainer import PopDPOTrainer, dpo_args

REPO = Path(__file__).resolve().parents[1]


class StepClock(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: builtin:tiny-llama")
    args = ap.parse_args()
    path = args.model or models.resolve(models.TINY_LLAMA, REPO / "data").path
    prec = precision.training_precision("auto")
    data = stored_pairs(path, make_pairs(12), 256)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=prec.torch_dtype()).to(prec.device)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        trainer = PopDPOTrainer(
            model=model, processing_class=tok, train_dataset=data, peft_config=lora, loss="dpo_pop",
            callbacks=[clock], args=dpo_args(out, "dpo_pop", 0.1, 256, 0, prec.mixed, False, {},
                                             per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                                             logging_steps=1, disable_tqdm=True))
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
        result = trainer.train()
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()
                if n in before)
    loss = result.training_loss
    print(f"device {prec.device} ({precision.detect().name}), weights {prec.weights}, mixed {prec.mixed}; "
          f"model {path}")
    print(f"train step: loss {loss:.4f}, max |delta lora_B| {moved:.2e}, "
          f"{(clock.ends[-1] - clock.ends[0]) / (len(clock.ends) - 1) * 1000:.1f} ms/step after warm-up")
    if not math.isfinite(loss) or moved == 0.0:
        raise SystemExit("train step check FAILED: the loss is not finite or the LoRA weights did not move")
    print("train step check: ok")


if __name__ == "__main__":
    main()
