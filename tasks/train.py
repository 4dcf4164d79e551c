"""Stage 6b, train: each configured method x seed on the run's training pairs, with TRL (tasks/trainer.py).

Methods (train.methods; tasks/losses.py has the maths):
    dpo                 -log sigmoid(beta h)                   plain DPO
    dpo_fixed_margin    -log sigmoid(beta h - gamma)
    dpo_gt_margin       -log sigmoid(beta h - max(alpha * gt_margin, 0))
    dpo_pop             -log sigmoid(beta h - m_i)             m_i from the margins stage (DPO-PoP)
    distill             (beta h - (r_w - r_l))^2               aggregate reward gap (Fisch et al.)
    distill_pessimistic min_k (beta h - (r_w^k - r_l^k))^2     per reward model k (normalised like score)
    ipo, robust, hinge, ... TRL's own loss types, by name.

The training pairs are the annotation's `train_pairs` (one sampling strategy, repeated `copies` times),
joined with the stored reference log-probs. Each method x seed writes a LoRA adapter (or a full model)
under DATA_DIR/models/runs/<pipeline>/<run_id>/<method>-s<seed>/ and three lake tables:
    train_metrics     the training curve (step, loss, reward accuracy, margins, chosen/rejected rewards)
    heldout_margins   beta * h of the trained policy on every held-out pair, with its gt_margin
    policies          the trained model: path, base, seconds, tokens/s (written last: the method is done)
A rerun of the run id skips the methods already done.

    .venv/bin/popflow run tiny
    .venv/bin/popflow sql "select method, step, loss, reward_accuracy from train_metrics order by all"
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from popflow import models, precision
from popflow.errors import PopflowError
from popflow.stage import RunContext, StageResult, finish, stage_task, with_run_columns
from popflow.train_config import Method
from tasks.ref_logps import load_tokenizer, policy_ref, reference_ref
from tasks.score import normalised_sql

log = logging.getLogger(__name__)

CURVE = {"loss": "loss", "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
         "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward", "pop/margin": "mean_margin",
         "learning_rate": "learning_rate", "grad_norm": "grad_norm", "epoch": "epoch"}


def method_name(ctx: RunContext, method: Method) -> str:
    samplings = ctx.config.annotate.sampling
    sampling = method.sampling or samplings[0]
    suffix = f"_{sampling}" if len(samplings) > 1 and sampling != samplings[0] else ""
    return method.name or f"{method.loss}{suffix}"


def margin_sql(ctx: RunContext, method: Method) -> tuple[str, str]:
    """(select expression of the margin, extra joins) for a method."""
    if method.loss == "dpo_fixed_margin":
        return f"{float(method.gamma)!r}", ""
    if method.loss == "dpo_gt_margin":
        return f"greatest({float(method.alpha)!r} * p.gt_margin, 0.0)", ""
    if method.loss != "dpo_pop":
        return "0.0", ""
    found = duckdb.sql(f"select count(*), min(method) from read_parquet('{ctx.glob('margins')}')").fetchall()[0] \
        if list(Path(ctx.glob("margins")).parent.glob("*.parquet")) else (0, None)
    if found[0] == 0 or found[1] != "pop":
        raise PopflowError(f"train: dpo_pop needs PoP margins, and run {ctx.run_id} has "
                           f"{'none' if found[0] == 0 else repr(found[1]) + ' margins'} (set margins.method: pop)")
    sampling = method.sampling or ctx.config.annotate.sampling[0]
    return "m.margin", (f"join read_parquet('{ctx.glob('margins')}') m "
                        f"on m.pair_id = t.pair_id and m.sampling = '{sampling}'")


def targets_sql(ctx: RunContext) -> tuple[str, str]:
    """Per-reward-model gaps (distill_pessimistic): a CTE and its join."""
    cfg = ctx.config.score
    if ctx.config.import_pairs or len(cfg.models) < 2:
        raise PopflowError("train: distill_pessimistic needs at least two reward models (score.models); "
                           "this pipeline has " + ("imported pairs" if ctx.config.import_pairs else
                                                   f"{len(cfg.models)}"))
    rewards = f"read_parquet('{ctx.glob('rewards')}')"
    cte = f"""{normalised_sql(rewards, rewards, cfg)},
    gaps as (
        select p.pair_id, list(c.value - r.value order by c.reward_model) as targets
        from read_parquet('{ctx.glob('pairs')}') p
        join normalised c on c.prompt_id = p.prompt_id and c.sample_idx = p.chosen_idx
        join normalised r on r.prompt_id = p.prompt_id and r.sample_idx = p.rejected_idx
             and r.reward_model = c.reward_model
        group by p.pair_id
    ),"""
    return cte, "join gaps g on g.pair_id = t.pair_id"


def training_rows(ctx: RunContext, method: Method) -> pa.Table:
    """The method's training examples: pairs x copies, TRL columns, stored ref log-probs, loss inputs."""
    sampling = method.sampling or ctx.config.annotate.sampling[0]
    margin, margin_join = margin_sql(ctx, method)
    ctes, targets_join, targets = "", "", ""
    if method.loss == "distill_pessimistic":
        ctes, targets_join = targets_sql(ctx)
        targets = ", g.targets"
    rows = duckdb.sql(f"""
        with {ctes}
        train as (
            select pair_id, copies from read_parquet('{ctx.glob('train_pairs')}') where sampling = '{sampling}'
        ),
        final as (
            select t.pair_id, p.prompt, p.chosen, p.rejected, r.ref_chosen_logps, r.ref_rejected_logps,
                   {margin} as margin, p.gt_margin as target{targets}, unnest(range(t.copies)) as copy
            from train t
            join read_parquet('{ctx.glob('pairs')}') p on p.pair_id = t.pair_id
            join read_parquet('{ctx.glob('ref_logps')}') r on r.pair_id = t.pair_id
            {margin_join} {targets_join}
        )
        select * exclude (copy) from final order by pair_id, copy
    """).to_arrow_table()
    if rows.num_rows == 0:
        raise PopflowError(f"train: the training set of run {ctx.run_id} is empty (sampling {sampling!r}: no "
                           "train_pairs with reference log-probs)")
    needs_gap = method.loss in ("dpo_gt_margin", "distill")
    if needs_gap and rows.column("target").null_count:
        raise PopflowError(f"train: {method.loss} needs gt_margin, and {rows.column('target').null_count} "
                           "training pair(s) have none")
    return rows.set_column(rows.schema.get_field_index("target"), "target",
                           rows.column("target").fill_null(0.0))


def heldout_rows(ctx: RunContext) -> pa.Table:
    return duckdb.sql(f"""
        select p.pair_id, p.prompt, p.chosen, p.rejected, r.ref_chosen_logps, r.ref_rejected_logps, p.gt_margin
        from read_parquet('{ctx.glob('pairs')}') p
        join read_parquet('{ctx.glob('ref_logps')}') r using (pair_id)
        where r.split = 'eval' order by p.pair_id
    """).to_arrow_table()


def check_reference(ctx: RunContext) -> None:
    """The stored reference log-probs must come from the reference this config names, as it is now."""
    ref = models.resolve(reference_ref(ctx.config), ctx.lake.data_dir, "train.reference")
    stored = duckdb.sql(f"select distinct reference, ref_fingerprint, max_length "
                        f"from read_parquet('{ctx.glob('ref_logps')}')").fetchall()
    if stored != [(ref.ref, ref.fingerprint, ctx.config.train.max_length)]:
        raise PopflowError(
            f"train.reference {ref.ref!r} ({ref.fingerprint[:19]}, max_length {ctx.config.train.max_length}) does "
            f"not match run {ctx.run_id}'s stored reference log-probs {stored}; rerun with --from-stage ref_logps")


def implicit_margins(trainer) -> np.ndarray:
    """beta * h of the trained policy on the trainer's eval dataset, in its order."""
    import torch

    from tasks.trainer import sequence_logps

    out, model = [], trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            chosen, rejected = sequence_logps(model, batch)
            h = (chosen - batch["ref_chosen_logps"]) - (rejected - batch["ref_rejected_logps"])
            out.append((trainer.beta * h).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_one(ctx: RunContext, method: Method, seed: int, data: pa.Table, heldout: pa.Table,
              out_dir: Path) -> tuple[list[dict], np.ndarray, dict]:
    """Train one method with one seed; save the adapter/model to out_dir. Returns curve, held-out beta*h, stats."""
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback

    from tasks.trainer import PopDPOTrainer, dpo_args

    cfg = ctx.config.train
    policy = models.resolve(policy_ref(ctx.config), ctx.lake.data_dir, "train.policy")
    prec = precision.training_precision(cfg.dtype)
    tok = load_tokenizer(policy.path, policy.ref, "train.policy")
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
    tmp = out_dir.with_name(out_dir.name + ".tmp")
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
    trainer.save_model(str(tmp))
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


def policy_dir(ctx: RunContext, name: str, seed: int) -> Path:
    return ctx.lake.data_dir / "models" / "runs" / ctx.pipeline / ctx.run_id / f"{name}-s{seed}"


@stage_task("train")
def train(ctx: RunContext) -> StageResult:
    """Train every method x seed not yet done in this run; publish train_metrics, heldout_margins, policies."""
    logger, cfg, lake, started = get_run_logger(), ctx.config.train, ctx.lake, time.time()
    dtypes = precision.announce({"train.dtype": cfg.dtype})
    check_reference(ctx)
    heldout = heldout_rows(ctx)
    done = {p.stem for p in lake.staged_parts("policies", ctx.pipeline, ctx.run_id)}
    for method in cfg.methods:
        name = method_name(ctx, method)
        data = training_rows(ctx, method)
        for seed in cfg.seeds:
            part = f"{name}-s{seed}"
            if part in done:
                logger.info("train %s: already done in this run", part)
                continue
            out_dir = policy_dir(ctx, name, seed)
            curve, heldout_h, stats = train_one(ctx, method, seed, data, heldout.drop(["gt_margin"]), out_dir)
            tag = {"method": name, "loss_type": method.loss, "seed": seed}
            curve_t = pa.Table.from_pylist([{**tag, **row} for row in curve])
            margins_t = pa.table({"pair_id": heldout.column("pair_id"), "method": [name] * heldout.num_rows,
                                  "seed": pa.array([seed] * heldout.num_rows, pa.int64()),
                                  "beta_h": heldout_h, "gt_margin": heldout.column("gt_margin")})
            policy_t = pa.Table.from_pylist([{**tag, "path": str(out_dir), **stats}])
            for table, t in (("train_metrics", curve_t), ("heldout_margins", margins_t), ("policies", policy_t)):
                lake.write_staged_part(table, ctx.pipeline, ctx.run_id, part, with_run_columns(ctx, t))
            logger.info("train %s: %s", part, stats)
    tables = {t: 0 for t in ("train_metrics", "heldout_margins", "policies")}
    for t in tables:
        tables[t] = lake.publish_count(t, ctx.pipeline, ctx.run_id)
    summary = duckdb.sql(f"select method, seed, steps, examples, train_seconds, tokens_per_s, final_loss "
                         f"from read_parquet('{ctx.glob('policies')}') order by method, seed").to_arrow_table()
    create_table_artifact(key=f"{ctx.pipeline}-policies".replace("_", "-")[:100], table=summary.to_pylist(),
                          description=f"{ctx.pipeline} run {ctx.run_id}: trained policies")
    report = {"methods": [method_name(ctx, m) for m in cfg.methods], "seeds": cfg.seeds,
              "heldout_pairs": heldout.num_rows}
    return finish(ctx, "train", started, tables, report, {"policy": models.resolve(
        policy_ref(ctx.config), lake.data_dir, "train.policy").identity()}, dtypes)
