"""The on-policy loop flow: rounds of a loop pipeline, each round one run of the pipeline flow (a subflow).

    .venv/bin/popflow loop tiny_loop --rounds 3        # bring tiny_loop's chain to 3 complete rounds
    .venv/bin/popflow policies tiny_loop               # what each round trained, and what was promoted

`--rounds N` is the length the chain should reach, not a number of extra rounds: rerunning the command after
a kill resumes the unfinished round (from its last complete stage, or sampling shard) and stops at N, so no
round is ever done twice; `--rounds 5` later goes on to round 5. Each round pins the policy it samples when
it starts (popflow/lineage.py): the latest promoted one, which a failed gate leaves unchanged.

A served pipeline with `loop:` does one round per scheduled run instead (flows/pipeline.py resumes an
unfinished round first), so `popflow serve` walks the chain one round a night.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Failed

from flows.pipeline import preference_pipeline
from flows.preflight import checked, handing_over
from popflow.config import PipelineConfig
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.lineage import complete_rounds
from popflow.runs import resolve_data_dir


def check_loop(cfg: PipelineConfig, pipeline: str, rounds: int) -> None:
    """A loop needs a pipeline with a `loop:` section and at least one round to reach."""
    if cfg.loop is None:
        raise PopflowError(f"pipeline {pipeline!r} has no loop: section (add `loop: {{}}` for the defaults)")
    if rounds < 1:
        raise PopflowError(f"--rounds {rounds}: at least 1")


def chain_length(chain: list[dict]) -> int:
    """How many rounds a chain has: its last round's number, not the rows left (retention.keep_runs deletes the
    runs of old rounds, and with them their lineage rows)."""
    return max((r["round"] for r in chain), default=0)


@flow(name="preference-loop")
def preference_loop(pipeline: str, rounds: int, overrides: dict[str, Any] | list[str] | None = None,
                    data_dir: str | None = None, config_path: str | None = None) -> dict:
    """Run rounds of a loop pipeline until its chain has `rounds` complete rounds; returns each round's run
    id and gate verdict. Bad input ends it Failed with the round's one-line message."""
    from flows.pipeline import as_assignments

    logger = get_run_logger()
    try:
        cfg = checked(pipeline, config_path, as_assignments(overrides))  # as the CLI checked it, if it did
        check_loop(cfg, pipeline, rounds)
    except PopflowError as err:
        logger.error("popflow: error: %s", err)
        return Failed(message=str(err), data=err)
    lake = Lake(resolve_data_dir(data_dir))
    chain = complete_rounds(lake, pipeline)
    while chain_length(chain) < rounds:
        logger.info("loop %s: round %d of %d", pipeline, chain_length(chain) + 1, rounds)
        with handing_over(pipeline, config_path, as_assignments(overrides), cfg) if cfg else nullcontext():
            state = preference_pipeline(pipeline=pipeline, overrides=overrides, data_dir=data_dir,
                                        config_path=config_path, return_state=True)
        cfg = None  # the first round took the checked config; later ones check anew
        if state.is_failed():  # bad input in the round: its one line, already logged by the round
            return Failed(message=state.message, data=state.result(raise_on_failure=False))
        done, chain = chain_length(chain), complete_rounds(lake, pipeline)
        if chain_length(chain) <= done:  # a programming error: the round did not count
            raise RuntimeError(f"loop {pipeline}: run {state.result()['run_id']} completed without a round")
    logger.info("loop %s: %d rounds, %d promoted", pipeline, chain_length(chain),
                sum(r["promoted"] for r in chain))
    keys = ("round", "run_id", "promoted", "win_rate", "win_lower", "reason", "promoted_path")
    return {"pipeline": pipeline, "length": chain_length(chain), "rounds": [{k: r[k] for k in keys} for r in chain]}
