"""Imported pairs (tasks/import_pairs.py): plain text and conversations into TRL's conversational columns."""

from __future__ import annotations

import pytest

from popflow.config import ImportPairsConfig
from popflow.errors import PopflowError
from tasks.import_pairs import build_imported_pairs


def cfg(**columns):
    return ImportPairsConfig(source="src.jsonl", columns=columns)


def test_plain_text_pairs_become_conversations_with_gt_margin():
    """Scores 7 / 4.5 and 6 / 2.5: raw gaps 2.5 and 3.5. z-normalised over the four scores (mean 5, population
    std sqrt((4 + 0.25 + 1 + 6.25) / 4) = sqrt(2.875)): gaps 2.5 / sqrt(2.875) and 3.5 / sqrt(2.875)."""
    rows = [{"__line__": 1, "q": "Say hi", "good": "Hi!", "bad": "No.", "a": 7, "b": 4.5},
            {"__line__": 2, "q": "Say bye", "good": "Bye!", "bad": "No.", "a": 6, "b": 2.5}]
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad", "chosen_score": "a", "rejected_score": "b"}
    table = build_imported_pairs([dict(r) for r in rows], cfg(**columns), "line").to_pylist()
    first = table[0]
    assert first["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert first["chosen"] == [{"role": "assistant", "content": "Hi!"}]
    assert (first["strategy"], first["chosen_point"]) == ("imported", "imported")
    assert [r["gt_margin"] for r in table] == pytest.approx([2.5 / 2.875 ** 0.5, 3.5 / 2.875 ** 0.5])
    assert first["chosen_reward"] == pytest.approx(2 / 2.875 ** 0.5)
    assert first["pair_id"].endswith("|imported:0") and len(first["prompt_id"]) == 12  # hashed prompt
    raw = ImportPairsConfig(source="src.jsonl", columns=columns, normalize="none")
    assert [r["gt_margin"] for r in build_imported_pairs([dict(r) for r in rows], raw, "line").to_pylist()] == [
        2.5, 3.5]


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
