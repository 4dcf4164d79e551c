"""Stage 0, ingest: read a prompt set (JSONL, Parquet or an HF dataset) into the lake's `prompts` table.

Every row is checked before anything is written; an error names the file and line (JSONL) or row
(Parquet / HF). Output columns: prompt_id, prompt, split ('train' | 'eval'), constraints (JSON text or
null), instructions (IFEval labels as JSON text, tasks/rewards/ifeval.py, or null), source_row.

    .venv/bin/popflow run tiny        # ingest is the first stage of every pipeline
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from popflow.config import PipelineConfig, PromptsConfig
from popflow.errors import PopflowError
from popflow.sources import is_eval, read_records
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns
from tasks.rewards import check_labelled, ifeval
from tasks.rewards.constraints import validate_constraints

SPLITS = ("train", "eval")


def build_prompts(records: list[dict], cfg: PromptsConfig, where: str, unit: str, checkers: bool = False
                  ) -> pa.Table:
    """Validate and normalise raw records into the prompts table (before limits); `checkers`: IFEval labels are
    also checked against lm-eval's checkers (when an `ifeval` reward will score them: the import costs seconds)."""
    if not records:
        raise PopflowError(f"{where}: no prompts (the source is empty)")
    cols = cfg.columns
    rows, seen = [], {}
    for i, rec in enumerate(records):
        pos = f"{where}:{rec.pop('__line__')}" if unit == "line" else f"{where}: row {i}"
        prompt = rec.get(cols.prompt)
        if cols.prompt not in rec:
            raise PopflowError(f"{pos}: missing prompt column {cols.prompt!r} (prompts.columns.prompt)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PopflowError(f"{pos}: {cols.prompt!r} must be a non-empty string")
        if cols.prompt_id:
            if rec.get(cols.prompt_id) is None:
                raise PopflowError(f"{pos}: missing prompt id column {cols.prompt_id!r}")
            pid = str(rec[cols.prompt_id])
        else:
            pid = str(i)
        if pid in seen:
            raise PopflowError(f"{pos}: duplicate prompt_id {pid!r} (first seen at {seen[pid]})")
        seen[pid] = pos
        split = rec.get(cols.split) if cols.split else None
        if split is None:
            split = "eval" if is_eval(pid, cfg.eval_fraction) else "train"
        elif split not in SPLITS:
            raise PopflowError(f"{pos}: split must be one of {SPLITS}, got {split!r}")
        constraints = rec.get(cols.constraints) if cols.constraints else None
        if constraints is not None:
            problem = validate_constraints(constraints)
            if problem:
                raise PopflowError(f"{pos}: {problem}")
        instructions = read_instructions(rec, cols, f"{pos}: prompt_id {pid!r}", checkers)
        rows.append({
            "prompt_id": pid, "prompt": prompt, "split": split,
            "constraints": json.dumps(constraints, sort_keys=True) if constraints else None,
            "instructions": json.dumps(instructions, sort_keys=True) if instructions else None,
            "source_row": i,
        })
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)


def read_instructions(rec: dict, cols, where: str, checkers: bool = True) -> dict | None:
    """A record's IFEval labels (open-instruct's ground truth column, else IFEval's two columns), their shape
    checked and, with `checkers`, their ids and kwargs against lm-eval's checkers; None when it has none."""
    if cols.ground_truth and rec.get(cols.ground_truth) is not None:
        labels = ifeval.parse_ground_truth(rec[cols.ground_truth], where)
    elif cols.instruction_ids and rec.get(cols.instruction_ids) not in (None, []):
        kwargs = rec.get(cols.instruction_kwargs) if cols.instruction_kwargs else None
        labels = ifeval.parse_labels(rec[cols.instruction_ids], kwargs, where)
    else:
        return None
    problem = ifeval.validate_instructions(labels) if checkers else None
    if problem:
        raise PopflowError(f"{where}: {problem}")
    return labels


def labelled(table: pa.Table) -> int:
    """How many prompts of a prompts table carry IFEval labels."""
    return table.num_rows - table.column("instructions").null_count


def check_ifeval_labels(cfg: PipelineConfig, table: pa.Table) -> None:
    """An `ifeval` reward needs some of the pipeline's prompts labelled (the preflight's check for files; ingest's
    for hf: datasets, which load only there)."""
    check_labelled(cfg.score.models, labelled(table), f"the prompts of {cfg.prompts.source}")


def apply_limits(table: pa.Table, limit: int | None, eval_limit: int | None) -> pa.Table:
    """Keep the first `limit` train and `eval_limit` eval prompts, in source order."""
    keep = []
    counts = {"train": 0, "eval": 0}
    caps = {"train": limit, "eval": eval_limit}
    for i, split in enumerate(table.column("split").to_pylist()):
        if caps[split] is None or counts[split] < caps[split]:
            keep.append(i)
            counts[split] += 1
    return table.take(keep)


PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("split", pa.string()),
    ("constraints", pa.string()), ("instructions", pa.string()), ("source_row", pa.int64()),
])


_CHECKED: dict[tuple, pa.Table] = {}  # (prompts config, the file's identity) -> its checked table: the last one


def file_identity(source: str) -> tuple | None:
    """A local file's (device, inode, size, mtime): what changes when it is rewritten; None for hf: sources."""
    path = Path(source)
    if source.startswith("hf:") or not path.is_file():
        return None
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def load_prompts(cfg: PromptsConfig, checkers: bool = False) -> pa.Table:
    """The checked prompts table of a source (`checkers`: see build_prompts). A local file read and checked already
    in this process (the preflight's, before the flow's ingest) is not read again while it is unchanged on disk."""
    key = (cfg.model_dump_json(), checkers, file_identity(cfg.source))
    if key[2] is not None and key in _CHECKED:
        return _CHECKED[key]
    table = _load_prompts(cfg, checkers)
    if key[2] is not None:
        _CHECKED.clear()
        _CHECKED[key] = table
    return table


def _load_prompts(cfg: PromptsConfig, checkers: bool) -> pa.Table:
    records, unit = read_records(cfg)
    table = build_prompts(records, cfg, cfg.source, unit, checkers)
    table = apply_limits(table, cfg.limit, cfg.eval_limit)
    if table.num_rows == 0 or "train" not in table.column("split").to_pylist():
        raise PopflowError(f"{cfg.source}: no train prompts to sample from")
    return table


@stage("ingest", sections=("prompts",), writes=("prompts",), when=lambda cfg: not cfg.import_pairs)
def ingest(ctx: RunContext) -> Output:
    """Validate the whole prompt set, then write the `prompts` table."""
    table = load_prompts(ctx.config.prompts, ctx.config.score.uses("ifeval"))
    check_ifeval_labels(ctx.config, table)
    ctx.lake.write_table("prompts", ctx.pipeline, ctx.run_id, with_run_columns(ctx, table))
    splits = table.column("split").to_pylist()
    report = {"source": ctx.config.prompts.source, "train": splits.count("train"), "eval": splits.count("eval"),
              "with_constraints": table.num_rows - table.column("constraints").null_count,
              "with_instructions": labelled(table)}
    run_logger().info("prompts: %s", report)
    return Output({"prompts": table.num_rows}, report)
