"""The preference pipeline flow: ingest -> sample -> score -> pair, one Prefect task per stage.

    .venv/bin/popflow run tiny                      # what the CLI calls
    .venv/bin/python -m flows.pipeline tiny         # the same, without the CLI

Tasks receive a RunContext and return StageResults (table row counts and a report): no data frames pass
through Prefect. Each stage writes its manifest last, so rerunning with the same --run-id resumes after the
last complete stage (and, inside sampling, after the last complete shard).
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.runs import end_run, new_run_id, preflight, resolve_data_dir, start_run
from popflow.stage import RunContext, StageResult
from tasks.pair import pair
from tasks.prompts import ingest
from tasks.sample import sample
from tasks.score import score


def _artifact_key(*parts: str) -> str:
    return "-".join(parts).lower().replace("_", "-")[:100]


def summarise(ctx: RunContext, result: StageResult) -> None:
    """One Prefect table artifact per stage: its tables' row counts and the flattened report."""
    rows = [{"item": f"table {t}", "value": str(n)} for t, n in result.tables.items()]
    rows += [{"item": k, "value": str(v)} for k, v in result.report.items()]
    rows += [{"item": "seconds", "value": str(result.seconds)}, {"item": "skipped", "value": str(result.skipped)}]
    create_table_artifact(key=_artifact_key(ctx.pipeline, result.stage), table=rows,
                          description=f"{ctx.pipeline} run {ctx.run_id}: stage {result.stage}")


@flow(name="preference-pipeline")
def preference_pipeline(pipeline: str = "demo", overrides: list[str] | None = None, data_dir: str | None = None,
                        run_id: str | None = None, config_path: str | None = None) -> dict:
    """Run (or resume) one pipeline from pipelines.yaml; returns the run id and each stage's row counts."""
    logger = get_run_logger()
    cfg = load_pipeline(pipeline, config_path, overrides or [])
    preflight(cfg)
    ctx = RunContext(str(resolve_data_dir(data_dir)), pipeline, run_id or new_run_id(), cfg)
    start_run(ctx.lake, pipeline, ctx.run_id, cfg)
    logger.info("run %s of %s (config %s) into %s", ctx.run_id, pipeline, cfg.hash(), ctx.lake.root)
    stages: dict = {}
    try:
        for run_stage in (ingest, sample, score, pair):
            result = run_stage(ctx)
            stages[result.stage] = {"tables": result.tables, "seconds": result.seconds, "skipped": result.skipped}
            summarise(ctx, result)
    except BaseException as exc:
        end_run(ctx.lake, pipeline, ctx.run_id, "failed", stages, error=str(exc)[:2000])
        raise
    end_run(ctx.lake, pipeline, ctx.run_id, "completed", stages)
    plot = ctx.run_dir / "reward_distributions.png"
    create_markdown_artifact(key=_artifact_key(pipeline, "report"), markdown=(
        f"# {pipeline} run {ctx.run_id}\n\nLake: `{ctx.lake.root}`\n\nReward distributions: `{plot}`\n"))
    return {"run_id": ctx.run_id, "stages": stages}


if __name__ == "__main__":
    try:
        print(preference_pipeline(sys.argv[1] if len(sys.argv) > 1 else "demo"))
    except PopflowError as err:
        sys.exit(f"popflow: error: {err}")
