"""Imported pairs (tasks/import_pairs.py): plain text and conversations into TRL's conversational columns."""

from __future__ import annotations

import pytest

from popflow.config import ImportPairsConfig
from popflow.errors import PopflowError
from tasks.import_pairs import build_imported_pairs


def cfg(**columns):
    return ImportPairsConfig(source="src.jsonl", columns=columns)


def test_plain_text_pairs_become_conversations_with_gt_margin():
    rows = [{"__line__": 1, "q": "Say hi", "good": "Hi!", "bad": "No.", "a": 7, "b": 4.5}]
    table = build_imported_pairs(rows, cfg(prompt="q", chosen="good", rejected="bad", chosen_score="a",
                                           rejected_score="b"), "line").to_pylist()[0]
    assert table["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert table["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert (table["gt_margin"], table["strategy"], table["chosen_point"]) == (2.5, "imported", "imported")
    assert table["pair_id"].endswith("|imported:0") and len(table["prompt_id"]) == 12  # hashed prompt


def test_multi_turn_conversations_keep_the_shared_prefix_as_prompt():
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    rows = [{"__line__": 3, "chosen": convo + [{"role": "assistant", "content": "4"}],
             "rejected": convo + [{"role": "assistant", "content": "5"}]}]
    row = build_imported_pairs(rows, cfg(prompt=None), "line").to_pylist()[0]
    assert row["prompt"] == convo and row["rejected"] == [{"role": "assistant", "content": "5"}]
    assert row["gt_margin"] is None  # no scores mapped: fine until a ground truth is needed


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "src.jsonl:5: 'chosen' must be non-empty text"),
    ({"prompt": "p", "chosen": "c"}, "src.jsonl:5: no column 'rejected' (import_pairs.columns.rejected)"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "s": "high"}, "'s' must be a number"),
])
def test_bad_rows_name_the_line(record, message):
    with pytest.raises(PopflowError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_imported_pairs([{"__line__": 5, **record}], cfg(chosen_score="s") if "s" in record else cfg(),
                             "line")
