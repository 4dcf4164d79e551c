"""What every stage shares: the run context it receives and the manifest it writes last.

A stage task gets a `RunContext` (a small, picklable reference: data dir, pipeline, run id, config) and
returns a `StageResult` (table row counts, a report): the flow never passes data frames between tasks.

A stage whose manifest exists with the same stage hash is skipped, so rerunning a run id resumes after the
last complete stage; a manifest with another hash means the run id is being reused with a different config,
which is refused rather than mixing two configs in one run.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from popflow import __version__
from popflow.config import PipelineConfig
from popflow.errors import PopflowError
from popflow.lake import Lake

log = logging.getLogger(__name__)

# The config sections each stage depends on (its own and its upstream stages'): the stage hash covers them.
STAGE_SECTIONS = {
    "ingest": ("prompts",),
    "sample": ("prompts", "sample"),
    "score": ("prompts", "sample", "score"),
    "pair": ("prompts", "sample", "score", "pair"),
    "import_pairs": ("import_pairs",),
    "annotate": ("prompts", "sample", "score", "pair", "import_pairs", "annotate"),
    "margins": ("prompts", "sample", "score", "pair", "import_pairs", "annotate", "margins"),
    # not train.reference / max_length: the train stage checks those against the stored log-probs and says
    # which to rerun, rather than a generic "different config"
    "ref_logps": ("prompts", "sample", "score", "pair", "import_pairs", "annotate.pairs", "train.long_prompts",
                  "train.dtype"),
    "train": ("prompts", "sample", "score", "pair", "import_pairs", "annotate", "margins", "train"),
    "evaluate": ("prompts", "sample", "score", "pair", "import_pairs", "annotate", "margins", "train", "evaluate"),
}


@dataclass(frozen=True)
class RunContext:
    data_dir: str
    pipeline: str
    run_id: str
    config: PipelineConfig

    @property
    def lake(self) -> Lake:
        return Lake(self.data_dir)

    @property
    def run_dir(self) -> Path:
        return self.lake.run_dir(self.pipeline, self.run_id)

    def glob(self, table: str) -> str:
        return self.lake.glob(table, self.pipeline, self.run_id)

    def stage_hash(self, stage: str) -> str:
        return self.config.hash(*STAGE_SECTIONS[stage])


@dataclass
class StageResult:
    stage: str
    tables: dict[str, int]
    report: dict = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def completed(ctx: RunContext, stage: str) -> StageResult | None:
    """The stage's earlier result when it already finished in this run with the same config."""
    manifest = ctx.lake.read_manifest(ctx.pipeline, ctx.run_id, stage)
    if manifest is None:
        return None
    if manifest["stage_hash"] != ctx.stage_hash(stage):
        raise PopflowError(
            f"run {ctx.run_id!r} already has a {stage!r} stage made with a different config "
            f"(stage hash {manifest['stage_hash']} != {ctx.stage_hash(stage)}); start a new run id")
    log.info("stage %s already complete in run %s: skipped", stage, ctx.run_id)
    return StageResult(stage, manifest["tables"], manifest.get("report", {}), skipped=True)


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition for stages: retry what may pass (a model or an engine that failed to load,
    a worker that ran out of memory), never bad input, which would only fail again."""
    return not isinstance(state.data, PopflowError)


def stage_task(name: str, **task_options) -> Callable:
    """Make a stage function a Prefect task that is skipped when the run already completed that stage.
    `retries` apply to transient errors only; a retried stage resumes from its staged parts."""
    from prefect import task

    def decorate(fn: Callable[[RunContext], StageResult]):
        @functools.wraps(fn)
        def run(ctx: RunContext) -> StageResult:
            return completed(ctx, name) or fn(ctx)

        return task(name=name, retry_condition_fn=transient, **task_options)(run)

    return decorate


def with_run_columns(ctx: RunContext, table: pa.Table) -> pa.Table:
    """Every lake table carries pipeline and run_id, so views over all runs can be filtered."""
    n = table.num_rows
    table = table.append_column("pipeline", pa.array([ctx.pipeline] * n, pa.string()))
    return table.append_column("run_id", pa.array([ctx.run_id] * n, pa.string()))


def finish(ctx: RunContext, stage: str, started: float, tables: dict[str, int], report: dict,
           models: dict | None = None, precision: dict | None = None) -> StageResult:
    """Write the stage manifest (last: its existence means the stage's tables are whole), refresh the catalog.
    `precision`: the device and resolved dtypes the stage computed in (popflow.precision.announce)."""
    seconds = round(time.time() - started, 3)
    ctx.lake.write_manifest(ctx.pipeline, ctx.run_id, stage, {
        "stage": stage, "pipeline": ctx.pipeline, "run_id": ctx.run_id,
        "stage_hash": ctx.stage_hash(stage), "config_hash": ctx.config.hash(), "seed": ctx.config.seed,
        "models": models or {}, "precision": precision or {}, "tables": tables, "report": report, "seconds": seconds,
        "finished_at": now(), "popflow_version": __version__, "host": platform.node(),
    })
    ctx.lake.rebuild_catalog()
    return StageResult(stage, tables, report, seconds=seconds)
