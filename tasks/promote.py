"""Stage 8 (loop pipelines), promote: the round's gate, its lineage row, and the promoted policy.

The round's candidate is the first seed of `loop.method` (default the first train method). It is compared
with the policy the round sampled (the current one): on every held-out prompt and sample index, the
candidate's evaluate sample against stage 1's sample, both scored by the run's reward models (a win 1, a tie
1/2), exactly evaluate's win_rate. popflow/gate.py turns these into a win rate over prompts with a one-sided
lower bound and a verdict. A promoted candidate is stored merged (its LoRA adapter folded into the weights it
was trained from) under DATA_DIR/models/promoted/<pipeline>/<run_id>/, so vLLM samples the next round at full speed,
with a content hash (sha256 of every file). Tables:

    lineage         one row per round: candidate, parent, reference, pairs, gate figures, verdict, promoted copy
    round_rewards   the round's sample rewards per reward model (raw scale: mean, std, quartiles)

and, in the run folder, loop_rounds.png (reward distribution and win rate per round) and loop_rounds.md.

    .venv/bin/popflow loop tiny_loop --rounds 2
    .venv/bin/popflow policies tiny_loop
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from popflow import models, sql
from popflow.engines import merge_adapter
from popflow.gate import decide
from popflow.lake import write_text
from popflow.lineage import LINEAGE_SCHEMA, complete_rounds
from popflow.report import markdown_table, model_value_sql
from popflow.sql import lit
from popflow.stage import Artifact, Output, RunContext, now, run_logger, stage, with_run_columns
from tasks.rewards.aggregate import win_outcome_sql


def outcomes_sql(eval_samples: str, sample_rewards: str, samples: str, method: str, seed: int) -> str:
    """(prompt_id, outcome) of the candidate's held-out samples against the current policy's (stage 1's) sample
    of the same prompt and index: 1 win, 0.5 tie (or the same text), 0 loss."""
    return f"""
    with candidate as (
        select prompt_id, sample_idx, reward, response from {eval_samples}
        where method = {lit(method)} and seed = {lit(seed)}
    ),
    current_policy as (
        select r.prompt_id, r.sample_idx, r.reward, s.response
        from {sample_rewards} r join {samples} s using (prompt_id, sample_idx)
    ),
    final as (
        select c.prompt_id, c.sample_idx,
               {win_outcome_sql("c.reward", "p.reward", "c.response = p.response")} as outcome
        from candidate c join current_policy p using (prompt_id, sample_idx)
    )
    select prompt_id, outcome from final order by prompt_id, sample_idx
    """


def guard_sql(eval_rewards: str, rewards: str, method: str, seed: int, models: list[str]) -> str:
    """(reward_model, prompt_id, diff) for each guarded reward model (gate.guard) and held-out prompt: the mean
    over the gate's sample pairs (the candidate's held-out sample against the current policy's sample of the
    same prompt and index, as outcomes_sql pairs them) of the candidate's value minus the current policy's; a
    sample's value is popflow/report.py:model_value_sql's, as the climb counts it."""
    value = model_value_sql()
    return f"""
    with candidate as (
        select reward_model, prompt_id, sample_idx, {value} as v from {eval_rewards}
        where method = {lit(method)} and seed = {lit(seed)} and reward_model in {sql.values(models)}
    ),
    current_policy as (
        select reward_model, prompt_id, sample_idx, {value} as v from {rewards}
        where reward_model in {sql.values(models)}
    ),
    final as (
        select reward_model, prompt_id, avg(c.v - p.v) as diff
        from candidate c join current_policy p using (reward_model, prompt_id, sample_idx)
        group by reward_model, prompt_id
    )
    select reward_model, prompt_id, diff from final order by reward_model, prompt_id
    """


def round_rewards_sql(rewards: str) -> str:
    """Per reward model, the raw scores of the round's samples (the current policy's): n, mean, std, quartiles."""
    return f"""
    with final as (
        select reward_model, count(*) as n, avg(score) as mean, stddev_pop(score) as std,
               quantile_cont(score, 0.25) as q25, median(score) as median, quantile_cont(score, 0.75) as q75
        from {rewards} group by reward_model
    )
    select * from final order by reward_model
    """


def content_hash(path: Path) -> str:
    """sha256 of every file of a model directory (relative name and bytes), in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def promoted_dir(ctx: RunContext) -> Path:
    return models.promoted_dir(ctx.lake.data_dir, ctx.pipeline, ctx.run_id)


MARKER = "popflow_candidate.json"  # in a promoted folder: which candidate (and base) its weights were made from


def store_promoted(ctx: RunContext, candidate: dict) -> Path:
    """The candidate as a plain model directory under models/promoted/<pipeline>/<run_id>/ (a LoRA adapter
    merged into the weights it was trained from), written to a temporary folder and renamed. The folder holds
    a marker naming the candidate and its fingerprint: a resumed stage reuses a folder made from this very
    candidate, and rebuilds one made from another (a rerun that retrained the round: --from-stage train)."""
    out = promoted_dir(ctx)
    start = (models.resolve(ctx.config.train_policy(), ctx.lake.data_dir, "train.policy").path
             if candidate["adapter"] else None)
    marker = {"candidate": candidate["path"], "fingerprint": models.fingerprint(Path(candidate["path"])),
              "base": start}
    if (out / "config.json").is_file() and (out / MARKER).is_file() and \
            json.loads((out / MARKER).read_text()) == marker:  # a resumed stage: the rename happened
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if start:
        merge_adapter(start, candidate["path"], tmp, ctx.config.sample.trust_remote_code)
    else:
        shutil.copytree(candidate["path"], tmp)
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    if out.exists():  # made from another candidate: never reused
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def drop_promoted(ctx: RunContext) -> None:
    """A rerun of this round's gate that does not promote leaves no promoted folder of an earlier verdict behind
    (lineage.check_rerun refused the rerun if another run had pinned it)."""
    shutil.rmtree(promoted_dir(ctx), ignore_errors=True)


def round_rows(rows: list[dict], rewards: dict[str, list[dict]]) -> list[dict]:
    """One row per round: its policy, the reward spread of its samples, the gate's figures and verdict."""
    out = []
    for r in rows:
        win = "" if r["win_rate"] is None else f"{r['win_rate']:.3f} [{r['win_lower']:.3f}, {r['win_upper']:.3f}]"
        out.append({
            "round": r["round"], "run": r["run_id"],
            "sampled": f"round {r['parent_round']}" if r["parent_round"] else "base",
            "candidate": f"{r['method']}-s{r['seed']}",
            "sample reward (mean ± std)": "; ".join(f"{s['reward_model']} {s['mean']:.3f} ± {s['std']:.3f}"
                                                    for s in rewards.get(r["run_id"], [])),
            "win rate vs sampled [bound]": win,
            "held-out acc.": "" if r["heldout_accuracy"] is None else f"{r['heldout_accuracy']:.3f}",
            "promoted": "yes" if r["promoted"] else "no: " + r["reason"]})
    return out


def chain_view(ctx: RunContext, con, row: dict) -> tuple[list[dict], dict[str, list[dict]], dict[int, dict]]:
    """Every round so far (this one included), their reward stats, and their raw scores per reward model
    (runs that retention removed are left out of the picture)."""
    rows = [r for r in complete_rounds(ctx.lake, ctx.pipeline) if r["run_id"] != ctx.run_id] + [row]
    stats, scores = {}, {}
    for r in rows:
        part = ctx.lake.partition("rewards", ctx.pipeline, r["run_id"])
        if not any(part.glob("*.parquet")):
            continue
        rel = sql.parquet(part / "*.parquet")
        stats[r["run_id"]] = con.sql(round_rewards_sql(rel)).to_arrow_table().to_pylist()
        by_model: dict[str, list[float]] = {}
        for model, score in con.sql(f"select reward_model, score from {rel} order by all").fetchall():
            by_model.setdefault(model, []).append(score)
        scores[r["round"]] = by_model
    return rows, stats, scores


@stage("promote", reads=("evaluate", "train"), sections=("loop",), writes=("lineage", "round_rewards"),
       when=lambda cfg: cfg.loop is not None)
def promote(ctx: RunContext) -> Output:
    """Gate the round's candidate, store it merged when promoted, write its lineage row and the round plot."""
    from popflow.plots import plot_rounds

    logger, loop, con = run_logger(), ctx.config.loop, sql.connect()
    pins = ctx.lake.read_run(ctx.pipeline, ctx.run_id)["pins"]
    method, seed = ctx.config.candidate_method(), ctx.config.train.seeds[0]
    candidate = con.sql(f"select path, adapter from {ctx.table('policies')} where method = {lit(method)} "
                        f"and seed = {lit(seed)}").to_arrow_table().to_pylist()[0]
    outcomes = con.sql(outcomes_sql(ctx.table("eval_samples"), ctx.table("sample_rewards"), ctx.table("samples"),
                                    method, seed)).fetchall() if ctx.has("eval_samples") else []  # none fitted
    accuracy = con.sql(f"select avg(value) from {ctx.table('eval_metrics')} where method = {lit(method)} and "
                       f"seed = {lit(seed)} and metric = 'accuracy'").fetchall()[0][0]
    guarded: dict[str, list[float]] = {}
    if loop.gate.guard and ctx.has("eval_rewards"):
        for model, _, diff in con.sql(guard_sql(ctx.table("eval_rewards"), ctx.table("rewards"), method, seed,
                                                loop.gate.guard)).fetchall():
            guarded.setdefault(model, []).append(diff)
    verdict = decide(outcomes, accuracy, loop.gate, guarded)
    stored = store_promoted(ctx, candidate) if verdict["promoted"] else drop_promoted(ctx)
    train_pairs = con.sql(f"select count(*) from {ctx.table('train_pairs')}").fetchall()[0][0]
    parent, reference, info = pins["sample.policy"], pins["train.reference"], pins["loop"]
    row = {"round": info["round"], "method": method, "seed": seed, "policy_path": candidate["path"],
           "adapter": bool(candidate["adapter"]), "parent_ref": parent["ref"], "parent_path": parent["path"],
           "parent_round": parent["round"], "parent_run_id": parent["run_id"],
           "reference_kind": info["reference_kind"], "reference_path": reference["path"],
           "reference_round": reference["round"], "pairs": loop.pairs,
           "pair_runs": [ctx.run_id] + [run for _, run in info["pair_runs"]], "train_pairs": train_pairs,
           **{k: verdict[k] for k in ("comparisons", "prompts", "win_rate", "win_lower", "win_upper", "bound",
                                      "alpha", "heldout_accuracy", "promoted", "reason")},
           "promoted_path": str(stored) if stored else None,
           "promoted_fingerprint": models.fingerprint(stored) if stored else None,
           "content_hash": content_hash(stored) if stored else None, "created_at": now()}
    lineage = with_run_columns(ctx, pa.Table.from_pylist([row], schema=LINEAGE_SCHEMA))
    ctx.lake.write_table("lineage", ctx.pipeline, ctx.run_id, lineage)
    row |= {"pipeline": ctx.pipeline, "run_id": ctx.run_id}
    rows, stats, scores = chain_view(ctx, con, row)  # this round's reward stats among them
    rewards = pa.Table.from_pylist([{"round": info["round"], **r} for r in stats[ctx.run_id]])
    ctx.lake.write_table("round_rewards", ctx.pipeline, ctx.run_id, with_run_columns(ctx, rewards))
    per_round = round_rows(rows, stats)
    table = markdown_table(list(per_round[0]), [list(r.values()) for r in per_round])
    write_text(table + "\n", ctx.run_dir / "loop_rounds.md")
    plot = plot_rounds(rows, scores, ctx.run_dir / "loop_rounds.png", f"{ctx.pipeline}: on-policy loop")
    artifact = Artifact("loop", f"{ctx.pipeline}: the on-policy loop after round {info['round']}, one row per round "
                        f"(tables lineage, round_rewards); plot {plot}", table=per_round)
    logger.info("loop round %d: %s %s (%s)\n%s", info["round"], f"{method}-s{seed}",
                "promoted" if verdict["promoted"] else "not promoted", verdict["reason"], table)
    report = {k: verdict[k] for k in ("win_rate", "win_lower", "promoted", "reason")} | {
        "round": info["round"], "plot": str(plot), "promoted_path": row["promoted_path"]}
    return Output({"lineage": 1, "round_rewards": rewards.num_rows}, report,
                  {"promoted": {"path": row["promoted_path"], "fingerprint": row["promoted_fingerprint"],
                                "content_hash": row["content_hash"]}} if stored else {}, artifacts=(artifact,))
