"""The preference pipeline flow, one Prefect task per stage:

    ingest -> sample -> score -> pair -> annotate -> margins -> ref_logps -> train -> evaluate [-> promote]
    import_pairs ------------------> annotate -> margins -> ...   (when the pipeline sets import_pairs)
                                                  (train: null stops after margins; promote: loop pipelines)

    .venv/bin/popflow run tiny                                   # what the CLI calls
    .venv/bin/popflow run tiny --run-id ID --from-stage annotate --set annotate.k=4   # redo from a stage

The flow only wires: STAGES lists the stages in order (each declared once, in its module under tasks/, with
the stages it reads from); the plan keeps those the config turns on, and each Prefect task waits for the
stages it reads from (`wait_for`), so the Prefect UI shows the stage graph. The registry (popflow/stage.py)
skips complete stages, times them, writes their manifests and artifacts. Tasks receive a RunContext and
return StageResults (table row counts and a report): no data frames pass through Prefect. Rerunning with
the same --run-id resumes after the last complete stage (and, inside sampling, after the last shard).

A pipeline with `loop:` is one round of an on-policy loop per run: the run pins the policy it samples (the
pipeline's latest promoted one: popflow/lineage.py) when it starts, `promote` closes the round, and a run
started without --run-id first resumes the pipeline's unfinished round, so a nightly schedule walks the
chain one round a night without ever doubling a round. flows/loop.py runs several rounds in one flow.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.preflight import checked
from popflow import logs
from popflow.config.base import check_name
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.lineage import prepare_run
from popflow.runs import end_run, new_run_id, prune_runs, resolve_data_dir, start_run
from popflow.stage import RunContext, Stage, artifact_key, plan, upstream
from tasks.annotate import annotate
from tasks.evaluate import evaluate
from tasks.import_pairs import import_pairs
from tasks.margins import infer_margins
from tasks.pair import pair
from tasks.promote import promote
from tasks.prompts import ingest
from tasks.ref_logps import ref_logps
from tasks.sample import sample
from tasks.score import score
from tasks.train import train

# Every stage, in the order they run; a pipeline's config decides which of them it runs (Stage.when).
STAGES = (ingest, sample, score, pair, import_pairs, annotate, infer_margins, ref_logps, train, evaluate, promote)


def reset_from(ctx: RunContext, stages: list[Stage], from_stage: str) -> None:
    """Forget the manifests of `from_stage` and every later stage, so they run again on this run's data."""
    names = [s.name for s in stages]
    if from_stage not in names:
        raise PopflowError(f"--from-stage {from_stage!r}: not a stage of this pipeline ({', '.join(names)})")
    for name in names[names.index(from_stage):]:
        ctx.lake.manifest_path(ctx.pipeline, ctx.run_id, name).unlink(missing_ok=True)


def as_assignments(overrides: dict[str, Any] | list[str] | None) -> list[str]:
    """`--set`-style assignments from either form a run is given: a list of "key.path=value" strings (CLI) or a
    nested mapping such as {"sample": {"n": 4}} (a deployment's `overrides` parameter). Values become JSON,
    which the YAML parser of `apply_override` reads back unchanged."""
    if not overrides:
        return []
    if isinstance(overrides, list):
        return list(overrides)

    def flatten(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            path = f"{prefix}{key}"
            out += flatten(value, path + ".") if isinstance(value, dict) and value else [f"{path}={json.dumps(value)}"]
        return out

    return flatten(overrides, "")


def report(ctx: RunContext, stages: dict) -> None:
    """The run's own artifacts: one table of every stage, and a Markdown report with the plots' paths and,
    when the run evaluated policies, the evaluation table."""
    create_table_artifact(key=artifact_key(ctx.pipeline, "stages"), description=f"{ctx.pipeline} run {ctx.run_id}",
                          table=[{"stage": s, "rows": ", ".join(f"{t}={n}" for t, n in i["tables"].items()),
                                  "seconds": i["seconds"], "skipped": i["skipped"]} for s, i in stages.items()])
    plots = "".join(f"- `{p}`\n" for p in sorted(ctx.run_dir.glob("*.png")))
    evaluation = ctx.run_dir / "evaluation.md"
    evaluation = f"\n## Evaluation (mean over seeds)\n\n{evaluation.read_text()}" if evaluation.is_file() else ""
    create_markdown_artifact(key=artifact_key(ctx.pipeline, "report"), markdown=(
        f"# {ctx.pipeline} run {ctx.run_id}\n\nLake: `{ctx.lake.root}`\n\nPlots:\n{plots}{evaluation}"))


@flow(name="preference-pipeline")
def preference_pipeline(pipeline: str = "demo", overrides: dict[str, Any] | list[str] | None = None,
                        data_dir: str | None = None, run_id: str | None = None, config_path: str | None = None,
                        from_stage: str | None = None) -> dict:
    """Run (or resume) one pipeline from pipelines.yaml; returns the run id and each stage's row counts.

    overrides: "key.path=value" strings, or a nested mapping of config sections ({"sample": {"n": 4}}).
    run_id: resume that run (a failed or killed one goes on from its last complete stage / shard).
    from_stage (with run_id) reruns that stage and the later ones on the run's existing data; the config may
    differ only in those stages' sections (each kept stage's hash is checked).

    Bad input (a PopflowError, here or in a stage) ends the run Failed with its one-line message, logged once
    and without a traceback; the direct caller (the CLI) gets the PopflowError itself."""
    from prefect.states import Failed

    try:
        return run_pipeline(pipeline, overrides, data_dir, run_id, config_path, from_stage)
    except PopflowError as err:
        get_run_logger().error("popflow: error: %s", err)
        return Failed(message=str(err), data=err)


def execute(ctx: RunContext, cfg, pins: dict, from_stage: str | None) -> dict:
    """Run the planned stages of one run under its run lock, each task after the stages it reads from; the
    run record says how it ended. `cfg` is the config as given (its hash is the run's), `ctx.config` the
    pinned one the stages see. Returns each stage's row counts and seconds."""
    logger, pipeline = get_run_logger(), ctx.pipeline
    stages_run = plan(STAGES, cfg)
    with ctx.lake.run_lock(pipeline, ctx.run_id):
        if from_stage:
            reset_from(ctx, stages_run, from_stage)
        start_run(ctx.lake, pipeline, ctx.run_id, cfg, same_config=not from_stage, pins=pins)
        if pins.get("loop"):
            logger.info("loop round %d: sampling %s, reference %s", pins["loop"]["round"],
                        pins["sample.policy"]["path"], pins["train.reference"]["path"])
        logger.info("run %s of %s (config %s) into %s", ctx.run_id, pipeline, cfg.hash(), ctx.lake.root)
        stages: dict = {}
        states: dict = {}
        try:
            for stage in stages_run:
                states[stage.name] = stage.task(ctx, wait_for=[states[r] for r in upstream(stage, cfg)],
                                                return_state=True)
                result = states[stage.name].result()  # raises the stage's error
                stages[result.stage] = {"tables": result.tables, "seconds": result.seconds,
                                        "skipped": result.skipped}
        except BaseException as exc:
            end_run(ctx.lake, pipeline, ctx.run_id, "failed", stages, error=str(exc)[:2000])
            raise
        end_run(ctx.lake, pipeline, ctx.run_id, "completed", stages)
    return stages


def run_pipeline(pipeline: str, overrides, data_dir: str | None, run_id: str | None, config_path: str | None,
                 from_stage: str | None) -> dict:
    """The flow's body (inside the flow run): check, pin the run's policies, execute it, report, retention."""
    logger = get_run_logger()
    logs.configure()
    if run_id is not None:  # (load_pipeline checks the pipeline's name)
        check_name(run_id, "run_id")
    cfg = checked(pipeline, config_path, as_assignments(overrides))
    if from_stage and not run_id:
        raise PopflowError("--from-stage needs --run-id: the run whose earlier stages are reused")
    lake = Lake(resolve_data_dir(data_dir))
    with lake.loop_lock(pipeline) if cfg.loop is not None else nullcontext():  # a loop: one round at a time
        found, run_cfg, pins = prepare_run(cfg, pipeline, lake, run_id, config_path,  # its unfinished round first
                                           from_stage)
        if found and not run_id:
            logger.info("loop: resuming the unfinished round of run %s", found)
        ctx = RunContext(str(lake.data_dir), pipeline, found or new_run_id(), run_cfg)
        stages = execute(ctx, cfg, pins, from_stage)
    report(ctx, stages)
    pruned = prune_runs(ctx.lake, pipeline, cfg.retention.keep_runs)
    if pruned:
        logger.info("retention (keep_runs=%d): deleted runs %s", cfg.retention.keep_runs, ", ".join(pruned))
    return {"run_id": ctx.run_id, "stages": stages, "pruned": pruned}


if __name__ == "__main__":
    try:
        print(preference_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo"))
    except PopflowError as err:
        sys.exit(f"popflow: error: {err}")
