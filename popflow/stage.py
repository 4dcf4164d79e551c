"""The stage contract and its registry: a stage declares itself once, the registry does the bookkeeping.

    @stage("pair", reads=("ingest", "sample", "score"), sections=("pair",), writes=("seven_points", "pairs"),
           when=lambda cfg: not cfg.import_pairs)
    def pair(ctx: RunContext) -> Output:
        ...                                   # read the lake, compute, write the tables
        return Output({"pairs": n}, report)

A stage function does its work and nothing else. The registry (as datatrove's executor does: a step never
marks itself complete) derives the rest from the declaration:
- the stage hash: the config `sections` of the stage and of every stage it `reads` from, transitively;
- skip-if-complete: a stage whose manifest exists with the same stage hash is skipped, so rerunning a run id
  resumes after the last complete stage; a manifest with another hash (the run id reused with a different
  config) is refused rather than mixing two configs in one run;
- timing, the manifest (written last: its existence means the stage's tables are whole), the catalog
  rebuild, and a Prefect table artifact per stage;
- the Prefect task (`Stage.task`), retried on transient errors only; flows/pipeline.py passes each task the
  states of the stages it reads from (`wait_for`), so the Prefect UI draws the stage graph.

A heavy stage declares its units of work as `Parts` (below): the registry's side of resuming inside a stage;
`backend(ctx, stage)` says where those parts run (`execution.<stage>`: this process or a Ray pool,
popflow/cluster.py), so a stage's code is the same on both. A stage returns its Prefect artifacts in its `Output`
and the registry publishes them.

A stage receives a `RunContext` (a small, picklable reference: data dir, pipeline, run id, config) and
returns an `Output` (table row counts, a report, model identities, precision): the flow never passes data
frames between tasks.
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

from popflow import __version__, cluster
from popflow.config import PipelineConfig
from popflow.errors import PopflowError
from popflow.lake import Lake, write_text
from popflow.sql import parquet

log = logging.getLogger(__name__)


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

    def table(self, name: str) -> str:
        """One table of this run as a SQL relation: read_parquet('<its files>'), quoted."""
        return parquet(self.glob(name))

    def has(self, table: str) -> bool:
        """Whether this run has published any part of `table`."""
        return any(Path(self.glob(table)).parent.glob("*.parquet"))

    def stage_hash(self, stage: str) -> str:
        return self.config.hash(*hash_sections(REGISTRY[stage], self.config))


@dataclass(frozen=True)
class Artifact:
    """A Prefect artifact a stage asks for beyond its own summary: a table (list of rows) or Markdown, published
    by the registry under the key <pipeline>-<key>."""

    key: str
    description: str
    table: list[dict] | None = None
    markdown: str | None = None


@dataclass(frozen=True)
class Output:
    """What a stage function returns: row counts of the tables it wrote, a report for the manifest and the
    Prefect artifact, the identities of the models it used, the precision it computed in, and any further
    Prefect artifacts."""

    tables: dict[str, int]
    report: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)
    precision: dict = field(default_factory=dict)
    artifacts: tuple[Artifact, ...] = ()


@dataclass
class StageResult:
    stage: str
    tables: dict[str, int]
    report: dict = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0
    artifacts: list[Artifact] = field(default_factory=list)  # a list of its own: see finish()


@dataclass(frozen=True, eq=False)
class Stage:
    """A registered stage: its name, the stages it reads from, its own config sections, the tables it writes,
    whether a pipeline runs it (`when`), and its retries. Calling it runs the work with the bookkeeping."""

    name: str
    work: Callable[[RunContext], Output]
    reads: tuple[str, ...]
    sections: tuple[str, ...]
    writes: tuple[str, ...]
    when: Callable[[PipelineConfig], bool]
    retries: int = 0

    def __call__(self, ctx: RunContext) -> StageResult:
        return run_stage(self, ctx)

    @functools.cached_property
    def task(self):
        """The Prefect task of this stage: runs it, then publishes the stage's table artifact."""
        from prefect import task

        @functools.wraps(self.work)
        def run(ctx: RunContext):
            from prefect.states import Failed

            try:
                result = run_stage(self, ctx)
            except PopflowError as err:  # bad input: a Failed state with its one line, no traceback, no retry
                return Failed(message=str(err), data=err)
            summarise(ctx, result)
            return result

        return task(name=self.name, retries=self.retries, retry_delay_seconds=5, retry_condition_fn=transient)(run)


REGISTRY: dict[str, Stage] = {}


def stage(name: str, *, reads: tuple[str, ...] = (), sections: tuple[str, ...] = (), writes: tuple[str, ...],
          when: Callable[[PipelineConfig], bool] = lambda cfg: True, retries: int = 0) -> Callable:
    """Register a stage function (see the module docstring); returns its `Stage`."""

    def register(work: Callable[[RunContext], Output]) -> Stage:
        if name in REGISTRY and REGISTRY[name].work.__module__ != work.__module__:
            raise ValueError(f"stage {name!r} is registered twice ({REGISTRY[name].work.__module__})")
        REGISTRY[name] = Stage(name, work, tuple(reads), tuple(sections), tuple(writes), when, retries)
        return REGISTRY[name]

    return register


def plan(stages: tuple[Stage, ...], cfg: PipelineConfig) -> list[Stage]:
    """The stages a pipeline runs, in order; every stage read from must be registered and come earlier."""
    chosen = [s for s in stages if s.when(cfg)]
    order = [s.name for s in stages]
    for s in stages:
        for upstream in s.reads:
            if upstream not in REGISTRY:
                raise ValueError(f"stage {s.name!r} reads from {upstream!r}, which is not a registered stage")
            if upstream in order and order.index(upstream) > order.index(s.name):
                raise ValueError(f"stage {s.name!r} reads from {upstream!r}, which runs after it")
    return chosen


def upstream(s: Stage, cfg: PipelineConfig) -> list[str]:
    """The stages `s` reads from that this config runs."""
    return [r for r in s.reads if REGISTRY[r].when(cfg)]


def hash_sections(s: Stage, cfg: PipelineConfig) -> tuple[str, ...]:
    """The config keys a stage's hash covers: its own sections and, transitively, those of the stages it reads
    from (a whole section supersedes its fields: "train" covers "train.dtype")."""
    keys: set[str] = set()
    todo = [s]
    while todo:
        current = todo.pop()
        keys.update(current.sections)
        todo.extend(REGISTRY[r] for r in upstream(current, cfg))
    return tuple(sorted(k for k in keys if k.split(".")[0] == k or k.split(".")[0] not in keys))


def run_logger() -> logging.Logger:
    """Prefect's run logger inside a flow or task run; this module's logger when a stage is called directly
    (a test, a notebook). Stage modules use it, so they import without Prefect."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def completed(ctx: RunContext, name: str) -> StageResult | None:
    """The stage's earlier result when it already finished in this run with the same config."""
    manifest = ctx.lake.read_manifest(ctx.pipeline, ctx.run_id, name)
    if manifest is None:
        return None
    if manifest["stage_hash"] != ctx.stage_hash(name):
        raise PopflowError(
            f"run {ctx.run_id!r} already has a {name!r} stage made with a different config "
            f"(stage hash {manifest['stage_hash']} != {ctx.stage_hash(name)}); start a new run id")
    log.info("stage %s already complete in run %s: skipped", name, ctx.run_id)
    return StageResult(name, manifest["tables"], manifest.get("report", {}), skipped=True)


def run_stage(s: Stage, ctx: RunContext) -> StageResult:
    """Skip a complete stage, else run its work, time it and finish it (manifest, catalog)."""
    done = completed(ctx, s.name)
    if done:
        return done
    started = time.time()
    out = s.work(ctx)
    undeclared = sorted(set(out.tables) - set(s.writes))
    if undeclared:  # a programming error: the declaration is what the graph and the docs show
        raise RuntimeError(f"stage {s.name!r} wrote tables it does not declare: {undeclared}")
    return finish(ctx, s.name, started, out)


def transient(task, task_run, state) -> bool:
    """Prefect's retry condition for stages: retry what may pass (a model or an engine that failed to load,
    a worker that ran out of memory), never bad input, which would only fail again. A stage reports bad
    input by returning a Failed state (Stage.task), which Prefect hands over wrapped in another."""
    from prefect.client.schemas.objects import State

    failure = state.data
    if isinstance(failure, State):
        failure = failure.data
    return not isinstance(failure, PopflowError)


def backend(ctx: RunContext, stage_name: str):
    """Where a stage's parts run, from its `execution.<stage>` section: `with backend(ctx, "sample") as where:`
    gives a cluster.Backend (this process, or a Ray driver session held while entered)."""
    return cluster.backend(getattr(ctx.config.execution, stage_name), ctx.config.execution.ray)


PARTS_STAMP = ".stage-hash"  # beside a table's staged parts: the stage hash of the attempt that staged them


@dataclass
class Parts:
    """A heavy stage's units of work (sampling shards, reward models, method x seed trainings), resumable one
    part at a time, as datatrove's executor resumes its tasks: the stage names its parts and does the work of
    each; this owns which parts are staged already, the rest, staging a finished part (with the run columns,
    atomically) and publishing its tables with a row-count check. A stage never touches the lake's staging.

        parts = Parts(ctx, "sample", ("samples",), [f"shard-{k:05d}" for k in range(shards)])
        for name in parts.todo:
            parts.stage(name, samples=generate(name))
        parts.publish(samples=prompts * n)              # PopflowError if the staged rows are not exactly that

    A part is done when its part of the `done_by` table (default: the first) exists: `stage` writes that one
    last, so a crash in between leaves the part to do again, and its other tables' parts are overwritten then.
    Staged parts carry the stage hash of the attempt that made them (a stamp file beside them): an attempt under
    another config (`--from-stage` with changed sections) or other `inputs` reuses none of them, and parts whose
    names this attempt does not have are dropped, so what is published is exactly this attempt's parts.
    """

    ctx: RunContext
    stage_name: str
    tables: tuple[str, ...]
    names: list[str]
    done_by: str | None = None
    inputs: str = ""  # what the parts depend on besides the config (evaluate: the trained policies), in the stamp

    def __post_init__(self):
        self.done_by = self.done_by or self.tables[0]
        if self.done_by not in self.tables or len(set(self.names)) != len(self.names):  # programming errors
            raise RuntimeError(f"parts of {self.stage_name}: done_by {self.done_by!r} not among {self.tables}, or "
                               f"repeated part names in {self.names}")
        lake, pipeline, run_id, stamp = self.ctx.lake, self.ctx.pipeline, self.ctx.run_id, self.stamp()
        for table in self.tables:
            staging = lake.staging(table, pipeline, run_id)
            made_by = staging / PARTS_STAMP
            if made_by.is_file() and made_by.read_text() != stamp:  # (no stamp: staged before stamps existed)
                lake.discard_staging(table, pipeline, run_id)
                continue
            for part in lake.staged_parts(table, pipeline, run_id):
                if part.stem not in self.names:
                    part.unlink()
        staged = lake.staged_parts(self.done_by, pipeline, run_id)
        self.done = {p.stem for p in staged} & set(self.names)
        self.todo = [n for n in self.names if n not in self.done]

    def stamp(self) -> str:
        return self.ctx.stage_hash(self.stage_name) + (f" {self.inputs}" if self.inputs else "")

    def marker_last(self) -> list[str]:
        """The tables in the order they are staged and published: the done_by table last."""
        return sorted(self.tables, key=lambda t: t == self.done_by)

    @staticmethod
    def started(ctx: RunContext, table: str) -> bool:
        """Whether an earlier attempt of this run staged any part of `table` (before the parts are known)."""
        return bool(ctx.lake.staged_parts(table, ctx.pipeline, ctx.run_id))

    def stage(self, name: str, **tables: pa.Table) -> None:
        """Stage part `name` of each table (every one of `tables`), the `done_by` table last."""
        if set(tables) != set(self.tables):
            raise RuntimeError(f"part {name}: tables {sorted(tables)} != declared {sorted(self.tables)}")
        lake, pipeline, run_id = self.ctx.lake, self.ctx.pipeline, self.ctx.run_id
        for table in self.marker_last():
            made_by = lake.staging(table, pipeline, run_id) / PARTS_STAMP
            if not made_by.is_file():
                write_text(self.stamp(), made_by)
            lake.write_staged_part(table, pipeline, run_id, name, with_run_columns(self.ctx, tables[table]))

    def publish(self, **expected: int | None) -> dict[str, int]:
        """Publish every table's staged parts; {table: rows}. A table given an expected count is refused (nothing
        published) unless its staged rows are exactly that."""
        lake, pipeline, run_id = self.ctx.lake, self.ctx.pipeline, self.ctx.run_id
        if set(expected) - set(self.tables):
            raise RuntimeError(f"parts of {self.stage_name}: expected counts for undeclared tables {sorted(expected)}")
        for table, want in expected.items():
            rows = lake.rows(table, pipeline, run_id)  # staged, or published already by a crashed attempt
            if want is not None and rows != want:  # never publish a table that is not exactly what it should be
                raise PopflowError(f"{table} of run {run_id}: {rows} staged rows, expected {want}")
        published = {table: lake.publish_count(table, pipeline, run_id) for table in self.marker_last()}
        return {table: published[table] for table in self.tables}


def with_run_columns(ctx: RunContext, table: pa.Table) -> pa.Table:
    """Every lake table carries pipeline and run_id, so views over all runs can be filtered."""
    n = table.num_rows
    table = table.append_column("pipeline", pa.array([ctx.pipeline] * n, pa.string()))
    return table.append_column("run_id", pa.array([ctx.run_id] * n, pa.string()))


def finish(ctx: RunContext, name: str, started: float, out: Output) -> StageResult:
    """Write the stage manifest (last: its existence means the stage's tables are whole), refresh the catalog.
    `out.precision`: the device and resolved dtypes the stage computed in (popflow.precision.announce); `execution`:
    where its parts ran (its `execution.<stage>` section, for the stages that have one)."""
    seconds = round(time.time() - started, 3)
    execution = getattr(ctx.config.execution, name, None)
    ctx.lake.write_manifest(ctx.pipeline, ctx.run_id, name, {
        "stage": name, "pipeline": ctx.pipeline, "run_id": ctx.run_id,
        "stage_hash": ctx.stage_hash(name), "config_hash": ctx.config.hash(), "seed": ctx.config.seed,
        "models": out.models, "precision": out.precision, "tables": out.tables, "report": out.report,
        "execution": execution.model_dump(mode="json") if execution else None,
        "seconds": seconds, "finished_at": now(), "popflow_version": __version__, "host": platform.node(),
    })
    ctx.lake.rebuild_catalog()
    # a fresh list: Prefect links a task's result's fields to later tasks' inputs by object identity, and the one
    # empty tuple, found in every later task's ctx, would draw data edges that are not there
    return StageResult(name, out.tables, out.report, seconds=seconds, artifacts=list(out.artifacts))


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes, at most 100 characters)."""
    return "-".join(parts).lower().replace("_", "-")[:100]


def summarise(ctx: RunContext, result: StageResult) -> None:
    """One Prefect table artifact per stage (its tables' row counts and the flattened report), then the ones the
    stage returned."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = [{"item": f"table {t}", "value": str(n)} for t, n in result.tables.items()]
    rows += [{"item": k, "value": str(v)} for k, v in result.report.items()]
    rows += [{"item": "seconds", "value": str(result.seconds)}, {"item": "skipped", "value": str(result.skipped)}]
    create_table_artifact(key=artifact_key(ctx.pipeline, result.stage), table=rows,
                          description=f"{ctx.pipeline} run {ctx.run_id}: stage {result.stage}")
    for extra in result.artifacts:
        key = artifact_key(ctx.pipeline, extra.key)
        if extra.markdown is not None:
            create_markdown_artifact(key=key, markdown=extra.markdown, description=extra.description)
        else:
            create_table_artifact(key=key, table=extra.table, description=extra.description)
