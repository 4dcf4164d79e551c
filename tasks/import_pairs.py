"""Bring your own pairs: an existing scored preference dataset lands in the `pairs` table (strategy 'imported').

Set `import_pairs:` in a pipeline and it replaces sample/score/pair; annotate, margins and everything after
read the same `pairs` table either way. Sources: .jsonl, .parquet or `hf:<dataset>`, with a column map.
Chosen/rejected may be plain text or conversations (lists of {role, content}); when they hold the whole
conversation the prompt is their common prefix (TRL's `extract_prompt`). Scores are optional; with both,
gt_margin = chosen_score - rejected_score, both z-normalised over the import by default
(`import_pairs.normalize`), the unit of generated pairs.

    .venv/bin/popflow run imported
"""

from __future__ import annotations

import hashlib
import json
import math

import pyarrow as pa

from popflow.config import ImportPairsConfig
from popflow.errors import PopflowError
from popflow.sources import is_eval, read_records
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.string()), ("prompt_id", pa.string()), ("split", pa.string()), ("prompt", MESSAGES),
    ("chosen", MESSAGES),
    ("rejected", MESSAGES), ("chosen_idx", pa.int32()), ("rejected_idx", pa.int32()), ("chosen_point", pa.string()),
    ("rejected_point", pa.string()), ("chosen_reward", pa.float64()), ("rejected_reward", pa.float64()),
    ("reward_mean", pa.float64()), ("reward_std", pa.float64()), ("gt_margin", pa.float64()),
    ("n_samples", pa.int64()), ("strategy", pa.string()),
])


def as_messages(value, role: str, pos: str, column: str) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                 for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise PopflowError(f"{pos}: {column!r} must be non-empty text or a list of {{role, content}} messages")


def split_conversation(prompt, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list, list]:
    """(prompt, chosen, rejected) with the shared conversation moved into the prompt."""
    if len(chosen) > 1 or len(rejected) > 1:
        from trl.data_utils import extract_prompt

        parts = extract_prompt({"chosen": chosen, "rejected": rejected})
        return parts["prompt"], parts["chosen"], parts["rejected"]
    return prompt, chosen, rejected


def score(value, pos: str, column: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PopflowError(f"{pos}: {column!r} must be a number, got {value!r}")
    return None if math.isnan(value) else float(value)


def build_imported_pairs(records: list[dict], cfg: ImportPairsConfig, unit: str) -> pa.Table:
    """Validate and convert source records into the pairs table's rows."""
    if not records:
        raise PopflowError(f"{cfg.source}: no pairs (the source is empty)")
    cols = cfg.columns
    mapped = {f: c for f, c in cols.model_dump().items() if c is not None}
    rows = []
    for i, rec in enumerate(records[: cfg.limit] if cfg.limit else records):
        pos = f"{cfg.source}:{rec.pop('__line__')}" if unit == "line" else f"{cfg.source}: row {i}"
        for field, column in mapped.items():
            if column not in rec:
                raise PopflowError(f"{pos}: no column {column!r} (import_pairs.columns.{field}); "
                                   f"the source has {sorted(rec)}")
        chosen = as_messages(rec[cols.chosen], "assistant", pos, cols.chosen)
        rejected = as_messages(rec[cols.rejected], "assistant", pos, cols.rejected)
        prompt = as_messages(rec[cols.prompt], "user", pos, cols.prompt) if cols.prompt else None
        prompt, chosen, rejected = split_conversation(prompt, chosen, rejected)
        if not prompt:
            raise PopflowError(f"{pos}: no prompt (map import_pairs.columns.prompt, or give conversations)")
        pid = str(rec[cols.prompt_id]) if cols.prompt_id else hashlib.sha1(
            json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:12]
        cs = score(rec.get(cols.chosen_score), pos, cols.chosen_score) if cols.chosen_score else None
        rs = score(rec.get(cols.rejected_score), pos, cols.rejected_score) if cols.rejected_score else None
        rows.append({
            "pair_id": f"{pid}|imported:{i}", "prompt_id": pid,
            "split": "eval" if is_eval(pid, cfg.eval_fraction) else "train",
            "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_point": "imported", "rejected_point": "imported",
            "chosen_reward": cs, "rejected_reward": rs,
            "gt_margin": cs - rs if cs is not None and rs is not None else None, "strategy": "imported",
        })
    if cfg.normalize == "zscore":
        rows = zscored(rows)
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def zscored(rows: list[dict]) -> list[dict]:
    """Chosen and rejected scores z-normalised over every score of the import (population std), gt_margin their
    difference: the unit a generated pair's aggregate reward has under score.normalize: zscore. With fewer than
    two distinct scores there is no spread to divide by: the rows stay as they are."""
    import numpy as np

    values = np.array([r[k] for r in rows for k in ("chosen_reward", "rejected_reward") if r[k] is not None])
    if values.size < 2 or values.std() == 0:
        return rows
    mu, sd = float(values.mean()), float(values.std())
    out = []
    for r in rows:
        c, j = ((r[k] - mu) / sd if r[k] is not None else None for k in ("chosen_reward", "rejected_reward"))
        out.append(r | {"chosen_reward": c, "rejected_reward": j,
                        "gt_margin": c - j if c is not None and j is not None else None})
    return out


def load_imported_pairs(cfg: ImportPairsConfig) -> pa.Table:
    """Read and validate the whole source into the pairs table (the stage and the preflight call this)."""
    records, unit = read_records(cfg, "import_pairs.source")
    return build_imported_pairs(records, cfg, unit)


@stage("import_pairs", sections=("import_pairs",), writes=("pairs",), when=lambda cfg: bool(cfg.import_pairs))
def import_pairs(ctx: RunContext) -> Output:
    """Read, validate and write the imported pairs as this run's `pairs` table."""
    cfg = ctx.config.import_pairs
    table = load_imported_pairs(cfg)
    ctx.lake.write_table("pairs", ctx.pipeline, ctx.run_id, with_run_columns(ctx, table))
    report = {"source": cfg.source, "pairs": table.num_rows,
              "eval_pairs": table.column("split").to_pylist().count("eval"),
              "with_gt_margin": table.num_rows - table.column("gt_margin").null_count}
    run_logger().info("imported pairs: %s", report)
    return Output({"pairs": table.num_rows}, report)
