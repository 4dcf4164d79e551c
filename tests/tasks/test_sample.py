"""The sample stage's progress line, against values worked out by hand."""

from __future__ import annotations

from tasks.sample import progress


def test_progress_line_by_hand():
    """10 of 40 prompts in 20 s with 3,000 output tokens: 3000 / 20 = 150.0 tokens/s; the 30 prompts left at
    2 s a prompt take 60 s = 1.0 min. Finished: nothing left."""
    assert progress(10, 40, 3000, 20.0) == "10/40 prompts, 3000 tokens at 150.0 tokens/s, 1.0 min left"
    assert progress(40, 40, 9000, 90.0) == "40/40 prompts, 9000 tokens at 100.0 tokens/s, 0.0 min left"

