"""Reward model kinds used by the score stage: hf, constraints, relevance, python.

Each kind module exposes `score(spec, batch, data_dir) -> np.ndarray`, one float per response of the
`ScoringBatch`; tasks/score.py picks the module by the config's `kind` and checks every value is finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ScoringBatch:
    prompts: list[str]
    responses: list[str]
    constraints: list[dict | None]


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Index batches of similar length, longest first: padding is minimal and an OOM shows up at once."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
