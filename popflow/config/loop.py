"""Typed config of the on-policy loop: the `loop:` section (null: the pipeline trains once per run).

Part of the one config (popflow/config/__init__.py imports it into PipelineConfig). With a loop, each run of the
pipeline is one round: it samples the pipeline's latest promoted policy (round 1: `sample.policy`, the
chain's base), trains a candidate on those samples, and the `promote` stage promotes it when it passes the
gate. tasks/promote.py and popflow/lineage.py say how; docs/loop.md shows a run.

    loop_demo:
      sample: {policy: builtin:smollm2-135m-instruct}          # round 1's policy: the chain's base
      loop:
        reference: initial                                     # or previous
        pairs: this_round                                      # or all
        gate: {alpha: 0.05, min_win_rate: 0.5, min_prompts: 8}

    .venv/bin/popflow loop loop_demo --rounds 3     # bring the chain to 3 rounds (resumes a killed round)
    .venv/bin/popflow policies loop_demo            # the lineage: every candidate, promoted or not
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from popflow.config.base import NAME_PATTERN, Strict


class GateConfig(Strict):
    """When a round's candidate replaces the current policy (tasks/promote.py, popflow/gate.py)."""

    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="The gate's one-sided level: the most often a "
                         "candidate no better than min_win_rate may be promoted. The bound is the one-sided "
                         "(1 - alpha) Student t lower bound of the mean per-prompt win rate over held-out prompts "
                         "(the prompt is the unit: its samples share its difficulty).")
    min_win_rate: float | None = Field(0.5, ge=0.0, le=1.0, description="Promote when the lower bound is strictly "
                                       "above this. 0.5: the candidate is better than the current policy at level "
                                       "alpha; 1 promotes none. null: the gate is open on the win rate (every "
                                       "candidate with comparisons is promoted, as iterative-DPO scripts do; the "
                                       "bound is still recorded).")
    min_prompts: int = Field(8, ge=2, description="Refuse to promote with fewer held-out prompts than this (the "
                             "reason says so): a t bound over fewer prompts is too wide to mean much, and less "
                             "robust to skewed per-prompt win rates. The preflight checks prompts.eval_limit "
                             "against it.")
    guard: list[str] = Field([], description="Reward models (names in score.models) the candidate must not be "
                             "worse on than the current policy, besides the win rate: each held-out prompt's "
                             "difference on the gate's own sample pairs (a constraints model: pass rate, score >= 1; "
                             "another: mean score), and promotion only when the one-sided (1 - alpha) Student t upper "
                             "bound of its mean over prompts is at least 0. The aggregate reward can rise while one "
                             "of its models falls (docs/proof.md); []: none guarded.")
    min_heldout_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="Also require this held-out pair accuracy (share of held-out pairs the "
        "candidate prefers the chosen side of); null: not checked. A round with no held-out pairs is then not "
        "promoted (the reason says so).")


class LoopConfig(Strict):
    reference: Literal["initial", "previous"] = Field(
        "initial", description="The DPO reference of round k: initial = the chain's base (sample.policy), the "
        "usual choice of iterative DPO; previous = the policy round k starts from (the latest promoted one).")
    pairs: Literal["this_round", "all"] = Field(
        "this_round", description="Which pairs train round k: this round's, or every earlier round's too (each "
        "earlier round's own pairs, ids prefixed r<round>/, re-annotated and scored against this round's "
        "reference).")
    method: str | None = Field(None, pattern=NAME_PATTERN, description="The train method whose policy is the "
                               "round's candidate (its first seed); default: the first of train.methods.")
    gate: GateConfig = Field(default_factory=GateConfig, description="The promotion gate.")
