"""TRL's DPOTrainer with popflow's losses (one subclass, no training loop of its own), and one training.

`PopDPOTrainer` keeps everything TRL does (tokenisation, chat templates, truncation, batching, LoRA via
peft, mixed precision, logging, checkpoints) and changes three things:
- `_compute_loss`: popflow's losses (tasks/losses.py) get per-pair inputs the collator adds (`margin`,
  `target`, `targets`); TRL's own loss types (ipo, robust, hinge, ...) go to TRL's code unchanged.
- `_precompute_ref_logps`: a dataset that already carries reference log-probs (from the lake's `ref_logps`
  table) is used as is, so the reference model is never loaded for training.
- the signature columns keep the per-pair inputs through `remove_unused_columns`.

    trainer = PopDPOTrainer(model, args=dpo_args(...), train_dataset=ds, processing_class=tok, loss="dpo_pop")

`train_one` trains one method x seed on a run's rows and saves the policy: the train stage calls it in its
own process (tasks/train.py), each process of an `accelerate launch` calls it too (tasks/train_launch.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from trl import DPOConfig, DPOTrainer

from popflow import models
from popflow.config.train import POP_LOSSES, Method
from popflow.errors import PopflowError
from popflow.stage import RunContext
from tasks.losses import pair_loss

POP_COLUMNS = ("margin", "target", "targets")
NEEDS = {"dpo_pop": "margin", "dpo_fixed_margin": "margin", "dpo_gt_margin": "margin", "distill": "target",
         "distill_pessimistic": "targets"}  # the per-pair input each loss cannot do without


class PairInputsCollator:
    """TRL's preference collator plus the per-pair loss inputs as float tensors."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.inner(examples)
        for key in POP_COLUMNS:
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return batch


def sequence_logps(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of the chosen and rejected halves of a collated batch (as TRL does it:
    its fused LM head returns per-token log-probs without materialising the logits)."""
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                use_cache=False, fused_lm_head=True)
    seq_len = completion_mask.size(1) - 1
    logps = out.log_probs[:, -seq_len:].sum(dim=1)
    return logps.chunk(2, dim=0)


class PopDPOTrainer(DPOTrainer):
    def __init__(self, *args, loss: str = "dpo", **kwargs):
        self.pop_loss = loss
        super().__init__(*args, **kwargs)
        self.data_collator = PairInputsCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, *POP_COLUMNS]

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        if len(dataset) == 0:  # TRL dropped every pair (prompts filling max_length); its pass would crash
            raise PopflowError(f"the {name} set is empty: no pair's prompt fits max_length={self.args.max_length} "
                               "tokens, so nothing is left to train on")
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        if self.pop_loss not in POP_LOSSES:
            return super()._compute_loss(model, inputs, return_outputs)
        chosen, rejected = sequence_logps(model, inputs)
        chosen_ratio = chosen - inputs["ref_chosen_logps"]
        rejected_ratio = rejected - inputs["ref_rejected_logps"]
        h = chosen_ratio - rejected_ratio
        needed = NEEDS.get(self.pop_loss)
        if needed and needed not in inputs:  # never train a margin method as plain DPO without a word
            raise PopflowError(f"train: loss {self.pop_loss} needs the per-pair column {needed!r}, and the training "
                               "batch has none")
        zeros = torch.zeros_like(h)
        per_pair = pair_loss(self.pop_loss, h, self.beta, inputs.get("margin", zeros), inputs.get("target", zeros),
                             inputs.get("targets", zeros[:, None]))
        self._log_pairs(chosen, rejected, chosen_ratio.detach(), rejected_ratio.detach(), inputs)
        return per_pair.mean()

    def _log_pairs(self, chosen, rejected, chosen_ratio, rejected_ratio, inputs) -> None:
        """The metrics TRL logs for its own losses (so curves compare across methods), plus the mean margin."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        chosen_rewards, rejected_rewards = self.beta * chosen_ratio, self.beta * rejected_ratio
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        if "margin" in inputs:
            metrics["pop/margin"].append(gather(inputs["margin"]).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item()
        metrics["num_tokens"] = [self._total_train_tokens]


def dpo_args(output_dir: str, loss: str, beta: float, max_length: int, seed: int, mixed: str,
             gradient_checkpointing: bool, extra: dict, **kwargs) -> DPOConfig:
    """DPOConfig for one method: popflow's own losses run through `_compute_loss` above (TRL's loss_type
    is then irrelevant and left at sigmoid); TRL's loss types pass through by name. mixed: no | bf16 | fp16
    (popflow.precision.training_precision)."""
    options = dict(
        output_dir=output_dir, loss_type=[loss if loss not in POP_LOSSES else "sigmoid"], beta=beta,
        max_length=max_length, seed=seed, data_seed=seed, bf16=mixed == "bf16", fp16=mixed == "fp16",
        gradient_checkpointing=gradient_checkpointing,
        precompute_ref_log_probs=True, report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=not torch.cuda.is_available())  # bf16 without CUDA is CPU autocast: transformers wants it said
    return DPOConfig(**{**options, **kwargs, **extra})


CURVE = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
         "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward", "pop/margin": "mean_margin",
         "learning_rate": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}


def implicit_margins(trainer) -> np.ndarray:
    """beta * h of the trained policy on the trainer's eval dataset, in its order (under accelerate launch each
    process scores its share of the batches and gather_for_metrics puts them back in order)."""
    import torch

    out, model = [], trainer.model_wrapped.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            chosen, rejected = sequence_logps(model, batch)
            h = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
            out.append(trainer.accelerator.gather_for_metrics(trainer.beta * h).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_one(ctx: RunContext, method: Method, seed: int, data: pa.Table, heldout: pa.Table,
              out_dir: Path) -> tuple[list[dict], np.ndarray, dict]:
    """Train one method with one seed; save the adapter/model to out_dir. Returns curve, held-out beta*h, stats."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback

    cfg = ctx.config.train
    policy = models.resolve(ctx.config.train_policy(), ctx.lake.data_dir, "train.policy")
    prec = cfg.precision()
    tok = models.load_tokenizer(policy.path, policy.ref, "train.policy")
    curve: list[dict] = []

    class Curve(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                curve.append({"step": state.global_step, **{CURVE[k]: float(v) for k, v in logs.items() if k in CURVE}})

    peft_config = None
    if cfg.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    tmp, main = out_dir.with_name(out_dir.name + ".tmp"), int(os.environ.get("RANK", "0")) == 0
    if main:  # under accelerate launch: the main process owns the folders; the others write only in save_model
        shutil.rmtree(tmp, ignore_errors=True)
    args = dpo_args(str(tmp), method.loss, cfg.beta, cfg.max_length, seed, prec.mixed, cfg.gradient_checkpointing,
                    cfg.trl, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
                    per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
                    gradient_accumulation_steps=cfg.grad_accum)
    model = AutoModelForCausalLM.from_pretrained(policy.path, dtype=prec.torch_dtype()).to(prec.device)
    trainer = PopDPOTrainer(
        model=model, args=args, train_dataset=datasets.Dataset(data), processing_class=tok, loss=method.loss,
        eval_dataset=datasets.Dataset(heldout) if heldout.num_rows else None, peft_config=peft_config,
        callbacks=[Curve()])
    result = trainer.train()
    heldout_h = implicit_margins(trainer) if heldout.num_rows else np.zeros(0)
    trainer.save_model(str(tmp))  # every process: FSDP and ZeRO-3 gather the sharded weights here
    if main:
        tok.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    seconds, tokens = float(result.metrics["train_runtime"]), int(trainer._total_train_tokens)
    stats = {"steps": result.global_step, "examples": data.num_rows, "train_seconds": round(seconds, 3),
             "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
             "final_loss": curve[-1]["loss"] if curve else None, "adapter": cfg.lora is not None,
             "base_model": policy.ref, "base_fingerprint": policy.fingerprint, "device": prec.device,
             "dtype": prec.weights, "mixed_precision": prec.mixed}
    return curve, heldout_h, stats
