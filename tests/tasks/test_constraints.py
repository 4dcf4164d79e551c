"""Each constraint checker against values worked out by hand (the docstrings show the arithmetic)."""

import pytest

from tasks.rewards.constraints import (
    check_constraints,
    count_bullets,
    count_paragraphs,
    count_sentences,
    count_words,
    score_constraints,
    validate_constraints,
)


def test_counters():
    """'It's a test, really.' has 4 words (It's | a | test | really) and 1 sentence; a trailing
    unterminated clause counts as a sentence: 'One. Two! Three' -> 3."""
    assert count_words("It's a test, really.") == 4
    assert count_sentences("It's a test, really.") == 1
    assert count_sentences("One. Two! Three") == 3
    assert count_sentences("   ") == 0
    assert count_bullets("- a\n* b\n• c\n1. d\n2) e\nnot - a bullet\n-nospace") == 5
    assert count_paragraphs("a\n\nb\n  \nc") == 3


def test_word_limits_partial_credit():
    """max_words 4 on 8 words -> 4/8 = 0.5; min_words 10 on 8 words -> 8/10 = 0.8; within limits -> 1."""
    eight = "one two three four five six seven eight"
    assert check_constraints(eight, {"max_words": 4}) == {"max_words": 0.5}
    assert check_constraints(eight, {"min_words": 10}) == {"min_words": 0.8}
    assert check_constraints(eight, {"max_words": 8, "min_words": 8}) == {"max_words": 1.0, "min_words": 1.0}


def test_sentences_bullets_paragraphs():
    """3 sentences with max 2 -> 2/3. Bullets: 2 found, 4 wanted -> 1 - |2-4|/4 = 0.5; 9 found, 4 wanted
    -> 1 - 5/4 < 0 -> 0. Paragraphs: 1 found, 2 wanted -> 1 - 1/2 = 0.5."""
    assert check_constraints("A. B. C.", {"max_sentences": 2})["max_sentences"] == pytest.approx(2 / 3)
    assert check_constraints("- a\n- b", {"bullets": 4})["bullets"] == 0.5
    assert check_constraints("\n".join(["- x"] * 9), {"bullets": 4})["bullets"] == 0.0
    assert check_constraints("just one block", {"paragraphs": 2})["paragraphs"] == 0.5


def test_include_exclude_whole_words_case_insensitive():
    """include [cat, dog, emu] in 'A Cat and a dogma' -> only 'cat' is a whole word -> 1/3;
    exclude [cat, dog] -> 'cat' present, 'dog' absent (dogma is another word) -> 1/2."""
    text = "A Cat and a dogma"
    assert check_constraints(text, {"include": ["cat", "dog", "emu"]})["include"] == pytest.approx(1 / 3)
    assert check_constraints(text, {"exclude": ["cat", "dog"]})["exclude"] == 0.5


def test_lowercase_json_affixes():
    """'abC' -> 2 of 3 letters lowercase = 2/3; no letters -> 0. JSON: whole -> 1, fenced -> 1, embedded -> 0.5,
    none -> 0. ends_with: exact end (case/space-insensitive) -> 1, elsewhere -> 0.5, absent -> 0."""
    assert check_constraints("abC", {"lowercase": True})["lowercase"] == pytest.approx(2 / 3)
    assert check_constraints("123", {"lowercase": True})["lowercase"] == 0.0
    assert check_constraints('{"a": 1}', {"json": True})["json"] == 1.0
    assert check_constraints('```json\n{"a": 1}\n```', {"json": True})["json"] == 1.0
    assert check_constraints('Sure: {"a": 1} ok', {"json": True})["json"] == 0.5
    assert check_constraints("no json here", {"json": True})["json"] == 0.0
    assert check_constraints("Fine. hope THIS helps!  ", {"ends_with": "Hope this helps!"})["ends_with"] == 1.0
    assert check_constraints("Hope this helps! More.", {"ends_with": "Hope this helps!"})["ends_with"] == 0.5
    assert check_constraints("Nothing", {"ends_with": "Hope this helps!"})["ends_with"] == 0.0
    assert check_constraints("Sure, here", {"starts_with": "sure,"})["starts_with"] == 1.0


def test_score_is_the_mean_of_checks():
    """'- a\\n- b' against bullets 2 (1.0) and max_words 1 (2 words -> 1/2) -> (1 + 0.5) / 2 = 0.75;
    no constraints -> the configured unconstrained score."""
    assert score_constraints("- a\n- b", {"bullets": 2, "max_words": 1}) == 0.75
    assert score_constraints("anything", None, unconstrained=0.3) == 0.3


@pytest.mark.parametrize("bad, why", [
    ({"max_word": 3}, "unknown constraint 'max_word'"),
    ({"max_words": 0}, "positive integer"),
    ({"max_words": True}, "positive integer"),
    ({"include": []}, "non-empty list"),
    ({"ends_with": " "}, "non-empty string"),
    ({"json": False}, "can only be true"),
    ([1, 2], "must be an object"),
])
def test_validate_constraints_names_the_problem(bad, why):
    assert why in validate_constraints(bad)
