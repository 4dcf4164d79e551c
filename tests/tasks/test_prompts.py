"""Prompt ingestion: JSONL, Parquet and HF-dataset sources, column mapping, and errors that name the place."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from popflow.config import PromptsConfig
from popflow.errors import PopflowError
from tasks.prompts import is_eval, load_prompts


def jsonl(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_shipped_demo_set():
    """At least 300 prompts, most carrying constraints, with a held-out eval split."""
    table = load_prompts(PromptsConfig(source="data/prompts/demo.jsonl"))
    splits = table.column("split").to_pylist()
    assert table.num_rows >= 300
    assert splits.count("eval") >= 30 and splits.count("train") >= 250
    assert table.num_rows - table.column("constraints").null_count >= 0.7 * table.num_rows


def test_jsonl_with_limits_and_constraints(tmp_path):
    rows = [{"prompt_id": f"x{i}", "prompt": f"q{i}", "split": "eval" if i % 3 == 0 else "train",
             "constraints": {"max_words": 5} if i == 1 else None} for i in range(9)]
    table = load_prompts(PromptsConfig(source=str(jsonl(tmp_path, rows)), limit=2, eval_limit=1))
    assert table.column("prompt_id").to_pylist() == ["x0", "x1", "x2"]
    assert json.loads(table.column("constraints")[1].as_py()) == {"max_words": 5}


def test_parquet_and_hf_sources_with_column_mapping(tmp_path):
    data = {"id": [10, 11, 12], "instruction": ["a", "b", "c"]}
    pq.write_table(pa.table(data), tmp_path / "p.parquet")
    cols = {"prompt_id": "id", "prompt": "instruction", "split": None, "constraints": None}
    from_parquet = load_prompts(PromptsConfig(source=str(tmp_path / "p.parquet"), columns=cols, eval_fraction=0))
    assert from_parquet.column("prompt_id").to_pylist() == ["10", "11", "12"]
    jsonl(tmp_path, [{"id": i, "instruction": t} for i, t in zip(data["id"], data["instruction"], strict=True)],
          "hf.jsonl")
    from_hf = load_prompts(PromptsConfig(source="hf:json", hf_data_files=str(tmp_path / "hf.jsonl"),
                                         columns=cols, eval_fraction=0))
    assert from_hf.select(["prompt_id", "prompt"]).equals(from_parquet.select(["prompt_id", "prompt"]))


def test_eval_split_by_hash_is_stable():
    ids = [f"id{i}" for i in range(2000)]
    chosen = [i for i in ids if is_eval(i, 0.1)]
    assert 140 < len(chosen) < 260  # 10% of 2000 = 200, binomial sd ~ 13
    assert chosen == [i for i in ids if is_eval(i, 0.1)]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt_id": "a", "prompt": "x"}, "{not json"], r"p.jsonl:2: malformed JSON"),
    ([{"prompt_id": "a", "prompt": "x"}, {"prompt_id": "a", "prompt": "y"}],
     r"p.jsonl:2: duplicate prompt_id 'a' \(first seen at .*p.jsonl:1\)"),
    ([{"prompt_id": "a", "text": "x"}], r"p.jsonl:1: missing prompt column 'prompt'"),
    ([{"prompt_id": "a", "prompt": "  "}], r"p.jsonl:1: 'prompt' must be a non-empty string"),
    ([{"prompt_id": "a", "prompt": "x", "split": "test"}], r"p.jsonl:1: split must be one of"),
    ([{"prompt_id": "a", "prompt": "x", "constraints": {"max_wrds": 3}}], r"p.jsonl:1: unknown constraint 'max_wrds'"),
    ([{"prompt_id": "a", "prompt": "x", "split": "eval"}], r"no train prompts"),
    (["[1, 2]"], r"p.jsonl:1: expected a JSON object"),
])
def test_bad_prompt_files_name_file_and_line(tmp_path, rows, message):
    with pytest.raises(PopflowError, match=message):
        load_prompts(PromptsConfig(source=str(jsonl(tmp_path, rows))))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PopflowError, match="does not exist"):
        load_prompts(PromptsConfig(source=str(tmp_path / "nope.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PopflowError, match="empty.jsonl: no prompts"):
        load_prompts(PromptsConfig(source=str(tmp_path / "empty.jsonl")))
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(PopflowError, match="unsupported file type"):
        load_prompts(PromptsConfig(source=str(tmp_path / "p.csv")))


def test_a_checked_file_is_read_once_while_unchanged(tmp_path, monkeypatch):
    """The preflight and the flow's ingest load the same file in one process: the second load is the first's table;
    a rewrite of the file (same size, so only its mtime tells) or another prompts config reads it again."""
    import os

    import tasks.prompts as module

    reads, real = [], module.read_records
    monkeypatch.setattr(module, "read_records", lambda cfg: reads.append(cfg.source) or real(cfg))
    path = jsonl(tmp_path, [{"prompt_id": "a", "prompt": "x"}])
    cfg = PromptsConfig(source=str(path), eval_fraction=0)
    first = load_prompts(cfg)
    assert load_prompts(cfg) is first and len(reads) == 1
    mtime = path.stat().st_mtime_ns
    path.write_text(json.dumps({"prompt_id": "a", "prompt": "y"}) + "\n")
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert load_prompts(cfg).column("prompt").to_pylist() == ["y"] and len(reads) == 2
    load_prompts(cfg.model_copy(update={"limit": 5}))
    assert len(reads) == 3
