"""Source readers: the records of a prompt or pair source (JSONL, Parquet or an HF dataset), each with the
position an error should name, and the stable held-out split of an id.

    from popflow.sources import read_records
    records, unit = read_records(cfg.prompts)     # unit: 'line' (JSONL) or 'row' (Parquet, HF)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from popflow.errors import PopflowError


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
