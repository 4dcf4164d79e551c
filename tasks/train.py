"""Stage 6b, train: each configured method x seed on the run's training pairs, with TRL (tasks/trainer.py).

Methods (train.methods; tasks/losses.py has the maths):
    dpo                 -log sigmoid(beta h)                   plain DPO
    dpo_fixed_margin    -log sigmoid(beta h - gamma)
    dpo_gt_margin       -log sigmoid(beta h - clip(alpha * gt_margin, 0, margins.max_margin))
    dpo_pop             -log sigmoid(beta h - m_i)             m_i from the margins stage (DPO-PoP)
    distill             (beta h - (r_w - r_l))^2               aggregate reward gap (Fisch et al.)
    distill_pessimistic min_k (beta h - (r_w^k - r_l^k))^2     per reward model k (normalised like score)
    ipo, robust, hinge, ... TRL's own loss types, by name.

The training pairs are the annotation's `train_pairs` (one sampling strategy, repeated `copies` times), or a
method's `pairs` (another pair strategy's train pairs, each once), joined with the stored reference log-probs.
Each method x seed writes a LoRA adapter (or a full model) under
DATA_DIR/models/runs/<pipeline>/<run_id>/<method>-s<seed>/ and three lake tables:
    train_metrics     the training curve (step, loss, reward accuracy, margins, chosen/rejected rewards)
    heldout_margins   beta * h of the trained policy on every held-out pair, with its gt_margin
    policies          the trained model: path, base, seconds, tokens/s (written last: the method is done)
A rerun of the run id skips the methods already done.

    .venv/bin/popflow run tiny
    .venv/bin/popflow sql "select method, step, loss, reward_accuracy from train_metrics order by all"
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa

from popflow import models, precision, sql
from popflow.config import ScoreConfig
from popflow.config.train import Method
from popflow.errors import PopflowError
from popflow.sql import lit
from popflow.stage import Artifact, Output, Parts, RunContext, run_logger, stage
from tasks.rewards.aggregate import normalised_sql
from tasks.train_launch import runner

log = logging.getLogger(__name__)


def margin_expr(method: Method, max_margin: float) -> str:
    """The per-pair margin a method subtracts, as a select expression over pairs `p` and margins `m`. The
    ground-truth margin is clipped to [0, margins.max_margin] like the margins stage's (PoP's and `gt`'s), so a
    comparison of DPO-PoP with it compares margin information on one scale, not the scale."""
    if method.loss == "dpo_fixed_margin":
        return lit(float(method.gamma))
    if method.loss == "dpo_gt_margin":
        return f"least(greatest({lit(float(method.alpha))} * p.gt_margin, 0.0), {lit(float(max_margin))})"
    return "m.margin" if method.loss == "dpo_pop" else "0.0"


def training_rows_sql(tables: dict[str, str], method: Method, sampling: str, score: ScoreConfig,
                      max_margin: float, other_pairs: str | None = None) -> str:
    """A method's training examples: each train pair of `sampling` `copies` times (or, with `other_pairs`, each
    train pair of that pair strategy once: a method's `pairs`), with TRL's columns, the stored reference
    log-probs, its margin and its target(s). `tables`: relations of train_pairs, pairs, ref_logps, and
    (dpo_pop) margins or (distill_pessimistic) rewards."""
    ctes = [f"train as (select pair_id, copies from {tables['train_pairs']} where sampling = {lit(sampling)})"
            if other_pairs is None else
            f"train as (select pair_id, 1 as copies from {tables['pairs']} where strategy = {lit(other_pairs)} "
            "and split = 'train')"]
    joins, targets = [], ""
    if method.loss == "dpo_pop":
        ctes.append(f"margins as (select pair_id, margin from {tables['margins']} where sampling = {lit(sampling)})")
        joins.append("join margins m on m.pair_id = t.pair_id")
    if method.loss == "distill_pessimistic":  # one target per reward model, normalised as the score stage does
        ctes.append(normalised_sql(tables["rewards"], tables["rewards"], score))
        ctes.append(f"""gaps as (
            select p.pair_id, list(c.value - r.value order by c.reward_model) as targets
            from {tables['pairs']} p
            join normalised c on c.prompt_id = p.prompt_id and c.sample_idx = p.chosen_idx
            join normalised r on r.prompt_id = p.prompt_id and r.sample_idx = p.rejected_idx
                 and r.reward_model = c.reward_model
            group by p.pair_id
        )""")
        joins.append("join gaps g on g.pair_id = t.pair_id")
        targets = ", g.targets"
    ctes.append(f"""final as (
            select t.pair_id, p.prompt, p.chosen, p.rejected, r.ref_chosen_logps, r.ref_rejected_logps,
                   {margin_expr(method, max_margin)} as margin, p.gt_margin as target{targets},
                   unnest(range(t.copies)) as copy
            from train t
            join {tables['pairs']} p on p.pair_id = t.pair_id
            join {tables['ref_logps']} r on r.pair_id = t.pair_id
            {" ".join(joins)}
        )""")
    return "with " + ",\n".join(ctes) + "\nselect * exclude (copy) from final order by pair_id, copy"


def heldout_rows_sql(pairs: str, ref_logps: str, strategy: str) -> str:
    """The annotated strategy's held-out pairs with their reference log-probs (the trained policy's beta * h is
    measured on them: every method on the same pairs, whatever pairs it trained on)."""
    return f"""
        with final as (
            select p.pair_id, p.prompt, p.chosen, p.rejected, r.ref_chosen_logps, r.ref_rejected_logps,
                   p.gt_margin
            from {pairs} p join {ref_logps} r using (pair_id)
            where r.split = 'eval' and p.strategy = {lit(strategy)}
        )
        select * from final order by pair_id
    """


def check_pop_margins(ctx: RunContext, con) -> None:
    """dpo_pop trains on PoP margins: the run must have them (margins.method: pop)."""
    found = con.sql(f"select count(*), min(method) from {ctx.table('margins')}").fetchall()[0] \
        if ctx.has("margins") else (0, None)
    if found[0] == 0 or found[1] != "pop":
        raise PopflowError(f"train: dpo_pop needs PoP margins, and run {ctx.run_id} has "
                           f"{'none' if found[0] == 0 else repr(found[1]) + ' margins'} (set margins.method: pop)")


def training_rows(ctx: RunContext, con, method: Method) -> pa.Table:
    """The method's training examples (training_rows_sql), checked non-empty and with the gaps it needs."""
    sampling = method.sampling or ctx.config.annotate.sampling[0]
    if method.loss == "dpo_pop":
        check_pop_margins(ctx, con)
    names = ["train_pairs", "pairs", "ref_logps"] + {"dpo_pop": ["margins"],
                                                      "distill_pessimistic": ["rewards"]}.get(method.loss, [])
    strategy = ctx.config.trained_strategy(method)
    other = strategy if strategy != ctx.config.annotated_strategy() else None
    rows = con.sql(training_rows_sql({t: ctx.table(t) for t in names}, method, sampling,
                                     ctx.config.score, ctx.config.margins.max_margin, other)).to_arrow_table()
    if rows.num_rows == 0:
        source = f"sampling {sampling!r}: no train_pairs" if other is None else f"no {other!r} train pairs"
        raise PopflowError(f"train: the training set of run {ctx.run_id} is empty ({source} with reference "
                           "log-probs)")
    if method.loss == "distill_pessimistic":
        zero = sum(any(t == 0 for t in targets) for targets in rows.column("targets").to_pylist())
        if zero:
            log.warning("train %s: %d of %d training pairs have a reward model with a zero gap: with a per-pair "
                        "minimum they give no gradient at beta*h = 0 (tasks/losses.py)", method.loss, zero,
                        rows.num_rows)
    needs_gap = method.loss in ("dpo_gt_margin", "distill")
    if needs_gap and rows.column("target").null_count:
        raise PopflowError(f"train: {method.loss} needs gt_margin, and {rows.column('target').null_count} "
                           "training pair(s) have none")
    return rows.set_column(rows.schema.get_field_index("target"), "target",
                           rows.column("target").fill_null(0.0))


def check_reference(ctx: RunContext, con) -> None:
    """The stored reference log-probs must come from the reference this config names, as it is now, and that
    reference must tokenise as the trained policy does."""
    ref = models.resolve(ctx.config.reference_policy(), ctx.lake.data_dir, "train.reference")
    policy = models.resolve(ctx.config.train_policy(), ctx.lake.data_dir, "train.policy")
    if policy.path != ref.path:
        models.check_same_tokenizer(models.load_tokenizer(policy.path, policy.ref, "train.policy"),
                                    models.load_tokenizer(ref.path, ref.ref, "train.reference"),
                                    "train.policy", "train.reference")
    cfg = ctx.config.train
    columns = {c[0] for c in con.sql(f"describe select * from {ctx.table('ref_logps')}").fetchall()}
    # ref_logps written before these were recorded: no train.trl was used, weights as LoRA's
    trl = "trl" if "trl" in columns else "'{}'"
    weights = "weights" if "weights" in columns else lit(precision.training_precision(cfg.dtype).weights)
    stored = con.sql(f"select distinct reference, ref_fingerprint, max_length, {trl}, {weights} "
                     f"from {ctx.table('ref_logps')}").fetchall()
    wanted = json.dumps(cfg.reference_trl(), sort_keys=True)
    weights_now = cfg.precision().weights
    if stored != [(ref.ref, ref.fingerprint, cfg.max_length, wanted, weights_now)]:
        raise PopflowError(
            f"train.reference {ref.ref!r} ({ref.fingerprint[:19]}, max_length {cfg.max_length}, train.trl {wanted}, "
            f"weights {weights_now}) does "
            f"not match run {ctx.run_id}'s stored reference log-probs {stored}; rerun with --from-stage ref_logps")


def policy_dir(ctx: RunContext, name: str, seed: int) -> Path:
    return models.trained_dir(ctx.lake.data_dir, ctx.pipeline, ctx.run_id) / f"{name}-s{seed}"


@stage("train", reads=("annotate", "margins", "ref_logps", "pair", "import_pairs", "score"), sections=("train",),
       writes=("train_metrics", "heldout_margins", "policies"), when=lambda cfg: cfg.train is not None)
def train(ctx: RunContext) -> Output:
    """Train every method x seed not yet done in this run; publish train_metrics, heldout_margins, policies."""
    logger, cfg, lake, con = run_logger(), ctx.config.train, ctx.lake, sql.connect()
    dtypes = precision.announce({"train.dtype": cfg.dtype})
    check_reference(ctx, con)
    heldout = con.sql(heldout_rows_sql(ctx.table("pairs"), ctx.table("ref_logps"),
                                       ctx.config.annotated_strategy())).to_arrow_table()
    names = [(method, ctx.config.method_name(method), seed) for method in cfg.methods for seed in cfg.seeds]
    parts = Parts(ctx, "train", ("train_metrics", "heldout_margins", "policies"),
                  [f"{n}-s{seed}" for _, n, seed in names], done_by="policies")
    for method in cfg.methods:
        name = ctx.config.method_name(method)
        data = training_rows(ctx, con, method)
        for seed in cfg.seeds:
            part = f"{name}-s{seed}"
            if part in parts.done:
                logger.info("train %s: already done in this run", part)
                continue
            out_dir = policy_dir(ctx, name, seed)
            curve, heldout_h, stats = runner(cfg)(ctx, method, seed, data, heldout.drop(["gt_margin"]), out_dir)
            tag = {"method": name, "loss_type": method.loss, "seed": seed}
            curve_t = pa.Table.from_pylist([{**tag, **row} for row in curve])
            margins_t = pa.table({"pair_id": heldout.column("pair_id"), "method": [name] * heldout.num_rows,
                                  "seed": pa.array([seed] * heldout.num_rows, pa.int64()),
                                  "beta_h": pa.array(heldout_h, pa.float64()),  # float64 in every launch mode
                                  "gt_margin": heldout.column("gt_margin")})
            policy_t = pa.Table.from_pylist([{**tag, "path": str(out_dir), **stats}])
            parts.stage(part, train_metrics=curve_t, heldout_margins=margins_t, policies=policy_t)
            logger.info("train %s: %s", part, stats)
    tables = parts.publish(policies=len(names))
    summary = con.sql(f"""
        with final as (
            select method, seed, steps, examples, train_seconds, tokens_per_s, final_loss from {ctx.table('policies')}
        )
        select * from final order by method, seed""").to_arrow_table()
    report = {"methods": [ctx.config.method_name(m) for m in cfg.methods], "seeds": cfg.seeds,
              "processes": cfg.accelerate.processes if cfg.accelerate else 1,
              "heldout_pairs": heldout.num_rows}
    policy = models.resolve(ctx.config.train_policy(), lake.data_dir, "train.policy")
    return Output(tables, report, {"policy": policy.identity()}, dtypes, (
        Artifact("policies", f"{ctx.pipeline} run {ctx.run_id}: trained policies", table=summary.to_pylist()),))
