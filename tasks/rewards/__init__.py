"""Reward scoring, shared by the score and evaluate stages: one module per reward kind, and the aggregation.

Each kind (popflow.config.REWARD_KINDS lists them) is the module tasks/rewards/<kind>.py exposing
`score(spec, batch, data_dir) -> np.ndarray`, one float per response of the `ScoringBatch`. `score_with`
picks the module by the spec's `kind`, checks every value is finite and returns `rewards` rows;
tasks/rewards/aggregate.py turns per-model scores into one reward per sample.

    from tasks.rewards import ScoringBatch, score_with
    rows = score_with(spec, ScoringBatch(prompts, responses, constraints), data_dir, prompt_ids, sample_idx)
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from popflow.errors import PopflowError


@dataclass(frozen=True)
class ScoringBatch:
    """One entry per response: its prompt, the response, the prompt's constraints and IFEval labels (None: none)."""

    prompts: list[str]
    responses: list[str]
    constraints: list[dict | None]
    instructions: list[dict | None] | None = None

    def __post_init__(self):
        if self.instructions is None:
            object.__setattr__(self, "instructions", [None] * len(self.responses))

    @classmethod
    def of(cls, prompts: list[dict], responses: list[str]) -> ScoringBatch:
        """From prompts-table rows (one per response; constraints and instructions as JSON text or null; a
        prompts table written before the instructions column existed has none)."""
        def labels(row: dict, key: str):
            return json.loads(row[key]) if row.get(key) else None

        return cls([r["prompt"] for r in prompts], responses, [labels(r, "constraints") for r in prompts],
                   [labels(r, "instructions") for r in prompts])


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length, longest first: padding is minimal and an OOM shows up at once."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class BadScore(Exception):
    """A reward kind's complaint about one response, by its position in the batch; `score_with` names the
    sample (prompt_id, sample_idx) in the error."""

    def __init__(self, index: int, problem: str):
        super().__init__(problem)
        self.index, self.problem = index, problem


def check_finite(values: np.ndarray, name: str, prompt_ids: list[str], sample_idx: list[int]) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise PopflowError(
            f"reward model {name!r} returned {values[i]} for prompt_id={prompt_ids[i]!r} "
            f"sample_idx={sample_idx[i]} ({bad.size} non-finite score(s) in all); nothing was written")


def rewards_part(name: str, kind: str, prompt_ids: list[str], sample_idx: list[int], values: np.ndarray) -> pa.Table:
    n = len(values)
    return pa.table({
        "prompt_id": pa.array(prompt_ids, pa.string()), "sample_idx": pa.array(sample_idx, pa.int32()),
        "reward_model": pa.array([name] * n, pa.string()), "kind": pa.array([kind] * n, pa.string()),
        "score": pa.array(values, pa.float64()),
    })


def score_with(spec, batch: ScoringBatch, data_dir, prompt_ids: list[str], sample_idx: list[int]) -> pa.Table:
    """One reward model's scores of a batch, checked finite, as rewards rows."""
    try:
        values = importlib.import_module(f"tasks.rewards.{spec.kind}").score(spec, batch, data_dir)
    except BadScore as bad:
        i = bad.index
        raise PopflowError(f"reward model {spec.name!r}: {bad.problem} for prompt_id={prompt_ids[i]!r} "
                           f"sample_idx={sample_idx[i]}; nothing was written") from None
    check_finite(values, spec.name, prompt_ids, sample_idx)
    return rewards_part(spec.name, spec.kind, prompt_ids, sample_idx, values)


def has_instructions(con, prompts: str) -> bool:
    """Whether a prompts relation has the IFEval labels column (a table ingested before popflow read them has not)."""
    return "instructions" in con.sql(f"select * from {prompts} limit 0").columns


def labels_sql(con, prompts: str, alias: str) -> str:
    """The label columns of a prompts relation for a select list: constraints and instructions (null for a table
    ingested before popflow read IFEval labels)."""
    labels = f"{alias}.instructions" if has_instructions(con, prompts) else "null::varchar as instructions"
    return f"{alias}.constraints, {labels}"


def require_ifeval_labels(con, prompts: str, specs: list, run_id: str) -> None:
    """An `ifeval` reward needs the run's prompts table to carry labels: one ingested before popflow read them (a
    resumed older run) would score every sample `unlabelled_score` (the preflight reads the file, not the table)."""
    name = ifeval_reward(specs)
    if name is None:
        return
    if not has_instructions(con, prompts):
        raise PopflowError(
            f"reward model {name!r} (ifeval): the prompts of run {run_id} were ingested before popflow read "
            "IFEval labels; start a new run (a new --run-id) to ingest them")
    check_labelled(specs, con.sql(f"select count(instructions) from {prompts}").fetchall()[0][0],
                   f"the prompts of run {run_id}")
    # labels are checked against lm-eval's checkers at ingest only when an ifeval reward was configured then
    from tasks.rewards.ifeval import validate_instructions

    for pid, text in con.sql(f"select min(prompt_id), instructions from {prompts} where instructions is not null "
                             "group by instructions order by 1").fetchall():
        problem = validate_instructions(json.loads(text))
        if problem:
            raise PopflowError(f"reward model {name!r} (ifeval): prompt_id {pid!r} of run {run_id}: {problem}; "
                               "fix its labels and start a new run")


def ifeval_reward(specs: list) -> str | None:
    """The name of the first `ifeval` reward model among `specs`, if any."""
    return next((s.name for s in specs if s.kind == "ifeval"), None)


def check_labelled(specs: list, labelled: int, where: str) -> None:
    """An `ifeval` reward among `specs` with no labelled prompt would give every sample the same score."""
    name = ifeval_reward(specs)
    if name is not None and not labelled:
        raise PopflowError(
            f"score.models[{name}]: kind ifeval, but {where} carry no IFEval labels (columns "
            "prompts.columns.instruction_ids + instruction_kwargs, or prompts.columns.ground_truth)")
