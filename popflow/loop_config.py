"""Typed config of the on-policy loop: the `loop:` section (null: the pipeline trains once per run).

Part of the one config (popflow/config.py imports it into PipelineConfig). With a loop, each run of the
pipeline is one round: it samples the pipeline's latest promoted policy (round 1: `sample.policy`, the
chain's base), trains a candidate on those samples, and the `promote` stage promotes it when it passes the
gate. tasks/promote.py and popflow/lineage.py say how; README "The on-policy loop" shows a run.

    loop_demo:
      sample: {policy: builtin:smollm2-135m-instruct}          # round 1's policy: the chain's base
      loop:
        reference: initial                                     # or previous
        pairs: this_round                                      # or all
        gate: {bound: wilson, confidence: 0.9, min_win_rate: 0.5}

    .venv/bin/popflow loop loop_demo --rounds 3     # bring the chain to 3 rounds (resumes a killed round)
    .venv/bin/popflow policies loop_demo            # the lineage: every candidate, promoted or not
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from popflow.config_base import NAME_PATTERN, Strict


class GateConfig(Strict):
    """When a round's candidate replaces the current policy (tasks/promote.py)."""

    bound: Literal["wilson", "bootstrap"] = Field(
        "wilson", description="The lower confidence bound of the candidate's win rate against the current policy "
        "on held-out prompts: wilson (Wilson score interval over every comparison, a tie counting 1/2) or "
        "bootstrap (percentile bootstrap over prompts, scipy.stats.bootstrap: a prompt's samples are not "
        "independent draws).")
    confidence: float = Field(0.9, gt=0.5, lt=1.0, description="Two-sided confidence level of the interval whose "
                              "lower end the gate reads.")
    min_win_rate: float = Field(0.5, ge=0.0, le=1.0, description="Promote when the lower bound is >= this. 0.5: "
                                "the candidate is not worse than the current policy at that confidence; 0 promotes "
                                "every candidate; 1 none (a Wilson bound never reaches 1).")
    min_heldout_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="Also require this held-out pair accuracy (share of held-out pairs the "
        "candidate prefers the chosen side of); null: not checked.")
    resamples: int = Field(2000, ge=100, description="bootstrap: number of resamples.")
    seed: int = Field(0, description="bootstrap: seed of the resampling.")


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
