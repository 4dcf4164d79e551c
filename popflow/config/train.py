"""Typed config of the training end of the pipeline: `train:`, `evaluate:` and `experiment:` sections.

Part of the one config (popflow/config/__init__.py imports these into PipelineConfig); kept in its own module so
each file stays readable. Every field says its allowed values and where it comes from.

    .venv/bin/popflow run tiny --set train.methods='[{loss: dpo_fixed_margin, gamma: 1.0}]'
    .venv/bin/popflow run tiny --set 'train.trl={learning_rate: 1e-4}'
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from popflow.config.base import NAME_PATTERN, Strict
from popflow.config.execution import AccelerateLaunch

# popflow's own losses (tasks/losses.py): DPO with a per-pair margin (DPO-PoP and its baselines) and reward
# model distillation (Fisch et al. 2405.19316).
POP_LOSSES = ("dpo", "dpo_fixed_margin", "dpo_gt_margin", "dpo_pop", "distill", "distill_pessimistic")
# TRL's own DPO loss types, passed through to DPOConfig(loss_type=...); TRL validates and computes them.
TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# DPOConfig fields popflow sets itself: setting them under train.trl would silently fight the pipeline.
OWNED_TRL_KEYS = ("output_dir", "beta", "loss_type", "precompute_ref_log_probs", "max_length", "seed",
                  "truncation_mode", "bf16", "fp16", "gradient_checkpointing", "report_to")



def distinct_seeds(seeds: list[int]) -> list[int]:
    """Each seed names one training (a part and a folder per method x seed): a repeat is a mistake."""
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds must be distinct; repeated: {repeated}")
    return seeds

class LoraOptions(Strict):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout (0: deterministic runs).")
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt (peft's names).")


class Method(Strict):
    loss: str = Field("dpo_pop", description=f"One of popflow's losses {POP_LOSSES} or a TRL loss type "
                      f"{TRL_LOSSES} (passed through to DPOConfig.loss_type).")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="Label in train/eval tables; default: "
                             "the loss, plus _<sampling> for dpo_pop when the run annotates several samplings.")
    sampling: Literal["iterative", "random"] | None = Field(
        None, description="Which PoP annotation trains this method (its train_pairs and margins); default: the "
        "first of annotate.sampling.")
    pairs: Literal["seven_point", "max_min", "random"] | None = Field(
        None, description="Train on another pair strategy's train pairs, each once, instead of the annotated ones "
        "(the pair-strategy comparison; named <loss>_<strategy>_pairs); it must be built (pair.strategy or "
        "pair.extra_strategies). Not with dpo_pop or sampling: PoP annotations exist for the annotated pairs only. "
        "Held-out accuracy is always measured on the annotated pairs.")
    gamma: float = Field(0.5, ge=0.0, description="dpo_fixed_margin: the margin of every pair.")
    alpha: float = Field(1.0, gt=0.0, description="dpo_gt_margin: margin = alpha * gt_margin, clipped to [0, "
                         "margins.max_margin] as the margins stage clips PoP's and its own gt margins.")

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        if value not in POP_LOSSES + TRL_LOSSES:
            raise ValueError(f"unknown loss {value!r}; popflow losses: {', '.join(POP_LOSSES)}; "
                             f"TRL losses: {', '.join(TRL_LOSSES)}")
        return value


# train.trl keys (prefixes) that never change a sequence's log-prob
TRAINING_ONLY_TRL = ("per_device_", "precompute_ref_batch_size", "gradient_accumulation", "learning_rate", "lr_",
                     "warmup", "weight_decay", "adam", "optim", "max_grad_norm", "num_train_epochs", "max_steps",
                     "logging", "save_", "eval_", "report_to", "seed", "data_seed", "dataloader_")


class TrainConfig(Strict):
    methods: list[Method] = Field(default_factory=lambda: [Method()], min_length=1,
                                  description="Methods trained on the same pairs (each x every seed).")
    seeds: list[int] = Field([0], min_length=1, description="Training seeds; the experiment reports the spread.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        return distinct_seeds(seeds)
    policy: str | None = Field(None, description="Model to train; default: sample.policy (on-policy).")
    reference: str | None = Field(None, description="Reference model of the DPO ratio; default: the policy.")
    beta: float = Field(0.1, gt=0.0, description="DPO beta (KL strength); Sweet Spot used 0.01 at 8B scale.")
    lora: LoraOptions | None = Field(default_factory=LoraOptions,
                                     description="LoRA adapter (peft); null = full fine-tuning.")
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate (LoRA wants a higher one than full FT).")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the training pairs.")
    batch_size: int = Field(8, ge=1, description="Pairs per device step.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(512, ge=16, description="Tokens of prompt + response; longer ones are truncated.")
    long_prompts: Literal["truncate", "reject"] = Field(
        "truncate", description="Prompts that fill max_length: truncate (TRL drops them; counted, with a "
        "warning) or reject (the stage fails naming the pair).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for activation memory.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="auto: popflow/precision.py's table: bf16 on CUDA >= 8.0 (fp16 autocast below); on CPU "
        "fp32 weights with bf16 autocast where the CPU computes bf16 natively (AVX512_BF16, AMX), else fp32. "
        "float32 turns mixed precision off; bfloat16 on a CPU without native bf16 runs emulated, with a warning.")
    ref_batch_size: int = Field(16, ge=1, description="Pairs per forward when computing reference log-probs.")
    accelerate: AccelerateLaunch | None = Field(
        None, description="Train through `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO-2/3) in `processes` processes; "
        "null: in the stage's own process. The stored reference log-probs serve every mode.")
    trl: dict[str, Any] = Field(default_factory=dict, description="Any other DPOConfig field, passed through "
                                "(TRL validates it), e.g. {lr_scheduler_type: cosine, warmup_ratio: 0.1}.")

    @field_validator("trl")
    @classmethod
    def _not_owned(cls, value: dict) -> dict:
        owned = sorted(set(value) & set(OWNED_TRL_KEYS))
        if owned:
            raise ValueError(f"{', '.join(owned)}: set by popflow; use train.<field> (beta, max_length, seeds, "
                             "dtype, gradient_checkpointing) instead of train.trl")
        return value

    def reference_trl(self) -> dict:
        """The train.trl options the reference pass computes with and records (ref_logps): those that may change
        a sequence's log-prob, i.e. all but the optimiser's, scheduler's, batching's, logging's and saving's."""
        return {k: v for k, v in self.trl.items() if not k.startswith(TRAINING_ONLY_TRL)}

    def precision(self):
        """`train.dtype` resolved for this machine (popflow/precision.py), one decision for the policy and the
        reference pass: the reference's weights load as the policy's starting weights do (fp32 for full
        fine-tuning on CUDA), so that h = 0 before the first step."""
        from popflow.precision import training_precision

        return training_precision(self.dtype, full=self.lora is None)

    @model_validator(mode="after")
    def _unique_names(self) -> TrainConfig:
        names = [m.name for m in self.methods if m.name]
        if len(names) != len(set(names)):
            raise ValueError(f"train.methods: duplicate names {names}")
        return self


class EvaluateConfig(Strict):
    generate: bool = Field(True, description="Sample each trained policy on held-out prompts and score it.")
    n: int = Field(4, ge=1, description="Samples per held-out prompt (compared with the base policy's first n).")
    max_prompts: int | None = Field(None, ge=1, description="Cap on held-out prompts for generation.")
    adapters: Literal["auto", "lora", "merge"] = Field(
        "auto", description="How the vllm engine samples a LoRA-trained policy: `lora` serves every adapter from "
        "one engine (enable_lora); `merge` merges each adapter into a copy of the base weights and starts an "
        "engine on it; auto = lora with CUDA, and on CPU merge when the generation time saved (vLLM-CPU's LoRA path "
        "is slower per token) exceeds merging's cost (the merge plus an engine start-up per policy that one "
        "LoRA engine would share): bench/bench_eval_lora.py, tasks/evaluate.py:adapter_serving. The transformers "
        "engine always merges, in memory.")


class PopSweep(Strict):
    k: list[Annotated[int, Field(ge=1)]] = Field([1, 2, 4], min_length=1,
                                                 description="PoP labels per pair to compare (annotate.k's).")
    seeds: int = Field(10, ge=2, description="Label draws per sampling x k (the interval is over them).")


class ExperimentConfig(Strict):
    methods: list[Method] = Field(
        default_factory=lambda: [Method(loss="dpo"), Method(loss="dpo_fixed_margin"), Method(loss="dpo_gt_margin"),
                                 Method(loss="dpo_pop", sampling="iterative"),
                                 Method(loss="dpo_pop", sampling="random"), Method(loss="distill")],
        description="The comparison (DPO-PoP Table 1 by default).")
    seeds: list[int] = Field([0, 1], min_length=1, description="Seeds per method: the table shows mean and spread.")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        return distinct_seeds(seeds)
    set: list[str] = Field(default_factory=list, description="Extra key=value overrides for the experiment's run.")
    pop_sweep: PopSweep | None = Field(
        default_factory=PopSweep, description="Without training: PoP labels drawn with each sampling (iterative, "
        "random) x k x seed on the run's annotated train pairs, with annotate's noise and margins' fit; the "
        "Spearman of the margins against the ground truth (lake table pop_sweep). null: skip.")
