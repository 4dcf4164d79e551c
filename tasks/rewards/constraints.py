"""Verifiable constraints: their schema, and scoring a response against them with partial credit.

A prompt's constraints are a JSON object; each key is one check, each check scores in [0, 1], and the
constraint reward is the mean over the prompt's checks:

    max_words: N       1 if words <= N, else N / words
    min_words: N       1 if words >= N, else words / N
    max_sentences: N   1 if sentences <= N, else N / sentences
    bullets: N         exactly N bullet lines ("- ", "* ", "• ", "1. "): max(0, 1 - |b - N| / N)
    paragraphs: N      exactly N blank-line separated paragraphs: max(0, 1 - |p - N| / N)
    include: [w, ...]  share of the words present (case-insensitive, whole words)
    exclude: [w, ...]  share of the words absent
    lowercase: true    share of letters that are lowercase (0 for a response without letters)
    json: true         1 if the response (``` fences allowed) parses as JSON, 0.5 if some {...} inside does
    ends_with: "text"  1 if the response ends with it (case and trailing spaces ignored), 0.5 if it appears
    starts_with: "t"   likewise at the start

    from tasks.rewards.constraints import score_constraints
    score_constraints("hello world", {"max_words": 1})   # 0.5
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    """Sentence ends (., !, ? runs followed by space or end), plus a trailing unterminated sentence."""
    stripped = text.strip()
    if not stripped:
        return 0
    ends = len(_SENTENCE_END.findall(stripped))
    return ends + (0 if re.search(r"[.!?]$", stripped) else 1)


def count_bullets(text: str) -> int:
    return len(_BULLET.findall(text))


def count_paragraphs(text: str) -> int:
    return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()])


def _at_most(value: int, limit: int) -> float:
    return 1.0 if value <= limit else limit / value


def _at_least(value: int, limit: int) -> float:
    return 1.0 if value >= limit else value / limit


def _exactly(value: int, target: int) -> float:
    return max(0.0, 1.0 - abs(value - target) / target)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def _lowercase(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.islower() for c in letters) / len(letters) if letters else 0.0


def _json(text: str) -> float:
    body = text.strip()
    fenced = _FENCE.match(body)
    try:
        json.loads(fenced.group(1) if fenced else body)
        return 1.0
    except ValueError:
        pass
    start, end = body.find("{"), body.rfind("}")
    if 0 <= start < end:
        try:
            json.loads(body[start : end + 1])
            return 0.5
        except ValueError:
            pass
    return 0.0


def _affix(text: str, phrase: str, at_end: bool) -> float:
    body, target = text.strip().lower(), phrase.strip().lower()
    if (body.endswith(target) if at_end else body.startswith(target)):
        return 1.0
    return 0.5 if target in body else 0.0


CHECKS: dict[str, Callable[[str, object], float]] = {
    "max_words": lambda t, n: _at_most(count_words(t), n),
    "min_words": lambda t, n: _at_least(count_words(t), n),
    "max_sentences": lambda t, n: _at_most(count_sentences(t), n),
    "bullets": lambda t, n: _exactly(count_bullets(t), n),
    "paragraphs": lambda t, n: _exactly(count_paragraphs(t), n),
    "include": lambda t, ws: sum(_has_word(t, w) for w in ws) / len(ws),
    "exclude": lambda t, ws: sum(not _has_word(t, w) for w in ws) / len(ws),
    "lowercase": lambda t, _: _lowercase(t),
    "json": lambda t, _: _json(t),
    "ends_with": lambda t, p: _affix(t, p, at_end=True),
    "starts_with": lambda t, p: _affix(t, p, at_end=False),
}
_INT_CHECKS = {"max_words", "min_words", "max_sentences", "bullets", "paragraphs"}
_LIST_CHECKS = {"include", "exclude"}
_TEXT_CHECKS = {"ends_with", "starts_with"}
_FLAG_CHECKS = {"lowercase", "json"}


def validate_constraints(constraints: object) -> str | None:
    """Why a constraints object is invalid, or None when it is fine."""
    if not isinstance(constraints, dict):
        return f"constraints must be an object, got {type(constraints).__name__}"
    for key, value in constraints.items():
        if key not in CHECKS:
            return f"unknown constraint {key!r}; known: {', '.join(CHECKS)}"
        if key in _INT_CHECKS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return f"constraint {key!r} needs a positive integer, got {value!r}"
        if key in _LIST_CHECKS and not (isinstance(value, list) and value and all(isinstance(w, str) and w
                                                                                 for w in value)):
            return f"constraint {key!r} needs a non-empty list of words, got {value!r}"
        if key in _TEXT_CHECKS and not (isinstance(value, str) and value.strip()):
            return f"constraint {key!r} needs a non-empty string, got {value!r}"
        if key in _FLAG_CHECKS and value is not True:
            return f"constraint {key!r} can only be true, got {value!r}"
    return None


def check_constraints(response: str, constraints: dict) -> dict[str, float]:
    """Each check's score in [0, 1]."""
    return {key: float(CHECKS[key](response, value)) for key, value in constraints.items()}


def score_constraints(response: str, constraints: dict | None, unconstrained: float = 1.0) -> float:
    """The mean of the checks' scores; `unconstrained` for a prompt without constraints."""
    if not constraints:
        return unconstrained
    scores = check_constraints(response, constraints)
    return sum(scores.values()) / len(scores)


def score(spec, batch, data_dir=None):
    """The `constraints` reward kind: one partial-credit score per response."""
    import numpy as np

    return np.array([
        score_constraints(r, c, spec.unconstrained_score)
        for r, c in zip(batch.responses, batch.constraints, strict=True)
    ], dtype=np.float64)
