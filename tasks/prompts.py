"""Stage 0, ingest: read a prompt set (JSONL, Parquet or an HF dataset) into the lake's `prompts` table.

Every row is checked before anything is written; an error names the file and line (JSONL) or row
(Parquet / HF). Output columns: prompt_id, prompt, split ('train' | 'eval'), constraints (JSON text or
null), source_row.

    .venv/bin/popflow run tiny        # ingest is the first stage of every pipeline
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger

from popflow.config import PromptsConfig
from popflow.errors import PopflowError
from popflow.stage import RunContext, StageResult, finish, stage_task, with_run_columns
from tasks.rewards.constraints import validate_constraints

SPLITS = ("train", "eval")


def read_records(cfg, key: str = "prompts.source") -> tuple[list[dict], str]:
    """Raw records of a file or HF dataset source and the word for a position in it ('line' or 'row').

    `cfg` has source, hf_config, hf_split and hf_data_files (PromptsConfig, ImportPairsConfig)."""
    source = cfg.source
    if source.startswith("hf:"):
        import datasets

        try:
            ds = datasets.load_dataset(source[3:], cfg.hf_config, split=cfg.hf_split, data_files=cfg.hf_data_files)
        except Exception as exc:  # datasets raises many types; the message is what matters
            raise PopflowError(f"{key} {source!r}: cannot load dataset: {exc}") from exc
        return ds.to_list(), "row"
    path = Path(source)
    if not path.is_file():
        raise PopflowError(f"{key}: file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), "row"
        except Exception as exc:
            raise PopflowError(f"{path}: cannot read Parquet: {exc}") from exc
    if path.suffix != ".jsonl":
        raise PopflowError(f"{path}: unsupported file type (use .jsonl, .parquet or hf:<dataset>)")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PopflowError(f"{path}:{lineno}: malformed JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise PopflowError(f"{path}:{lineno}: expected a JSON object")
        record["__line__"] = lineno
        records.append(record)
    return records, "line"


def is_eval(prompt_id: str, fraction: float) -> bool:
    """A stable held-out choice: the prompt_id's hash, mapped to [0, 1), falls below the fraction."""
    h = int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def build_prompts(records: list[dict], cfg: PromptsConfig, where: str, unit: str) -> pa.Table:
    """Validate and normalise raw records into the prompts table (before limits)."""
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
        rows.append({
            "prompt_id": pid, "prompt": prompt, "split": split,
            "constraints": json.dumps(constraints, sort_keys=True) if constraints else None,
            "source_row": i,
        })
    return pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA)


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
    ("constraints", pa.string()), ("source_row", pa.int64()),
])


def load_prompts(cfg: PromptsConfig) -> pa.Table:
    records, unit = read_records(cfg)
    table = build_prompts(records, cfg, cfg.source, unit)
    table = apply_limits(table, cfg.limit, cfg.eval_limit)
    if table.num_rows == 0 or "train" not in table.column("split").to_pylist():
        raise PopflowError(f"{cfg.source}: no train prompts to sample from")
    return table


@stage_task("ingest")
def ingest(ctx: RunContext) -> StageResult:
    """Validate the whole prompt set, then write the `prompts` table."""
    started = time.time()
    table = load_prompts(ctx.config.prompts)
    ctx.lake.write_table("prompts", ctx.pipeline, ctx.run_id, with_run_columns(ctx, table))
    splits = table.column("split").to_pylist()
    report = {"source": ctx.config.prompts.source, "train": splits.count("train"), "eval": splits.count("eval"),
              "with_constraints": table.num_rows - table.column("constraints").null_count}
    get_run_logger().info("prompts: %s", report)
    return finish(ctx, "ingest", started, {"prompts": table.num_rows}, report)
