"""The Parquet lake and its DuckDB catalog.

Layout under DATA_DIR/lake:

    <table>/pipeline=<name>/run=<run_id>/part-*.parquet   published tables (what the catalog shows)
    _staging/<table>/pipeline=<name>/run=<run_id>/        parts being written (shards of a running stage)
    _runs/pipeline=<name>/run=<run_id>/run.json           the run: config, hashes, status
    _runs/pipeline=<name>/run=<run_id>/stages/<stage>.json  a stage's manifest, written last
    catalog.duckdb                                         one view per table over all runs, and
                                                           latest_<table> views (newest completed run),
                                                           loop_rounds and policy_chain (popflow/lineage.py)

Completeness is decided by manifests: a stage is done when its manifest exists, and a manifest is written
only after the stage's tables were published (a directory rename). Every file is written to a temporary
name and renamed, so a reader never sees a half-written Parquet file. The catalog is rebuilt in a temporary
file and renamed over the old one under a lock: `popflow sql` during a run sees the old or the new catalog.

    .venv/bin/popflow sql "select pipeline, run_id, count(*) from samples group by all"
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from popflow import models
from popflow.errors import PopflowError
from popflow.sql import ident, lit

CATALOG = "catalog.duckdb"


class Lake:
    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "lake"

    # ------------------------------------------------------------------ paths
    def partition(self, table: str, pipeline: str, run_id: str) -> Path:
        return self.root / table / f"pipeline={pipeline}" / f"run={run_id}"

    def staging(self, table: str, pipeline: str, run_id: str) -> Path:
        return self.root / "_staging" / table / f"pipeline={pipeline}" / f"run={run_id}"

    def trash(self) -> Path:
        """A new folder to move published data into before deleting it (same filesystem: a rename). Its mtime
        is now, so `sweep_trash` leaves it alone while its deletion runs."""
        path = self.root / "_trash" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def sweep_trash(self, older_than_s: float = 3600) -> list[Path]:
        """Remove what an interrupted deletion left in _trash (entries untouched for `older_than_s`; a younger
        one may be another process's deletion in progress)."""
        folder, cutoff = self.root / "_trash", time.time() - older_than_s
        stale = [p for p in folder.iterdir() if p.lstat().st_mtime < cutoff] if folder.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def run_dir(self, pipeline: str, run_id: str) -> Path:
        return self.root / "_runs" / f"pipeline={pipeline}" / f"run={run_id}"

    def glob(self, table: str, pipeline: str, run_id: str) -> str:
        """The read_parquet pattern of one table of one run (for stage SQL)."""
        return str(self.partition(table, pipeline, run_id) / "*.parquet")

    # ------------------------------------------------------------------ writing
    def write_staged_part(self, table: str, pipeline: str, run_id: str, name: str, data: pa.Table) -> Path:
        """Write one part (e.g. a sampling shard) into staging, atomically."""
        path = self.staging(table, pipeline, run_id) / f"{name}.parquet"
        write_parquet(data, path)
        return path

    def staged_parts(self, table: str, pipeline: str, run_id: str) -> list[Path]:
        return sorted(self.staging(table, pipeline, run_id).glob("*.parquet"))

    def publish(self, table: str, pipeline: str, run_id: str) -> Path:
        """Move a table's staged parts into its published partition, replacing an older attempt."""
        src = self.staging(table, pipeline, run_id)
        dst = self.partition(table, pipeline, run_id)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():  # a crash after publishing but before the manifest: the new data supersedes it
            trash = self.trash()  # outside the table's folder: views glob hidden folders too
            with self.catalog_lock():  # files vanish: not while a catalog rebuild is reading them
                os.replace(dst, trash / "partition")
                os.replace(src, dst)
            shutil.rmtree(trash)
        else:
            os.replace(src, dst)
        return dst

    def rows(self, table: str, pipeline: str, run_id: str) -> int:
        """A run's rows of `table`: its staged parts when some are waiting to be published, else its published
        partition (Parquet footers only)."""
        staging = self.staging(table, pipeline, run_id)
        folder = staging if staging.is_dir() else self.partition(table, pipeline, run_id)
        return sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("*.parquet"))

    def publish_count(self, table: str, pipeline: str, run_id: str) -> int:
        """Publish a table's staged parts (if any are waiting) and return its published row count."""
        if self.staging(table, pipeline, run_id).is_dir():
            self.publish(table, pipeline, run_id)
        return self.rows(table, pipeline, run_id)

    def write_table(self, table: str, pipeline: str, run_id: str, data: pa.Table) -> Path:
        """Write a whole table for a run (one part) and publish it."""
        shutil.rmtree(self.staging(table, pipeline, run_id), ignore_errors=True)
        self.write_staged_part(table, pipeline, run_id, "part-00000", data)
        return self.publish(table, pipeline, run_id)

    def drop_table(self, table: str, pipeline: str, run_id: str) -> None:
        """Remove one run's published partition of a table (an earlier attempt's, which a rerun that writes none
        must not leave behind), renamed out of the lake first as delete_run does."""
        part = self.partition(table, pipeline, run_id)
        if part.exists():
            trash = self.trash()
            with self.catalog_lock():
                os.replace(part, trash / "partition")
            shutil.rmtree(trash)
            self.rebuild_catalog()  # a view over a table with no file left would fail every query

    def discard_staging(self, table: str, pipeline: str, run_id: str) -> None:
        shutil.rmtree(self.staging(table, pipeline, run_id), ignore_errors=True)

    # ------------------------------------------------------------------ manifests
    def manifest_path(self, pipeline: str, run_id: str, stage: str) -> Path:
        return self.run_dir(pipeline, run_id) / "stages" / f"{stage}.json"

    def read_manifest(self, pipeline: str, run_id: str, stage: str) -> dict | None:
        path = self.manifest_path(pipeline, run_id, stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_manifest(self, pipeline: str, run_id: str, stage: str, manifest: dict) -> Path:
        path = self.manifest_path(pipeline, run_id, stage)
        write_json(manifest, path)
        return path

    def read_manifests(self, pipeline: str, run_id: str) -> dict[str, dict]:
        """Every stage manifest of a run, by stage name."""
        folder = self.run_dir(pipeline, run_id) / "stages"
        return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}

    def pipelines(self) -> list[str]:
        """The pipelines with run records in this lake, by name."""
        return sorted(p.name.removeprefix("pipeline=") for p in (self.root / "_runs").glob("pipeline=*"))

    def read_runs(self, pipeline: str) -> list[dict]:
        """The run records of one pipeline (any status), oldest first."""
        paths = self.root.glob(f"_runs/pipeline={pipeline}/run=*/run.json")
        records = (json.loads(p.read_text()) for p in paths)
        return sorted(records, key=lambda r: (r.get("started_at") or "", r["run_id"]))

    def read_run(self, pipeline: str, run_id: str) -> dict | None:
        path = self.run_dir(pipeline, run_id) / "run.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_run(self, pipeline: str, run_id: str, record: dict) -> None:
        write_json(record, self.run_dir(pipeline, run_id) / "run.json")

    # ------------------------------------------------------------------ run lifecycle
    def run_lock(self, pipeline: str, run_id: str, wait: bool = False):
        """Held by the process executing a run, for all of it: a second process on the same run id is refused
        (two writers would interleave shards). The OS drops the lock when its holder dies, even by SIGKILL,
        so a crashed run can be resumed at once."""
        return self.exclusive(self.run_dir(pipeline, run_id) / ".lock", wait,
                              f"run {run_id!r} of {pipeline!r} is being executed by another process",
                              "wait for it, or omit --run-id to start a new run")

    def loop_lock(self, pipeline: str):
        """Held while a round of a loop pipeline is chosen and run: rounds of one chain run one at a time, so
        two loop processes (or two overlapping scheduled runs) never start the same round twice."""
        return self.exclusive(self.root / "_runs" / f"pipeline={pipeline}" / ".loop.lock", False,
                              f"a round of loop pipeline {pipeline!r} is being executed by another process",
                              "wait for it: the rounds of a chain run one after another")

    @contextmanager
    def exclusive(self, path: Path, wait: bool, busy: str, advice: str):
        """An exclusive file lock at `path` (filelock); refused at once with `busy (holder); advice` unless
        `wait`. The holder's pid and host are written beside the lock, for the refusal's message."""
        path.parent.mkdir(parents=True, exist_ok=True)
        holder = path.with_name(path.name + ".holder")
        lock = FileLock(path, timeout=-1 if wait else 0)
        try:
            lock.acquire()
        except Timeout:
            who = holder.read_text().strip() if holder.is_file() else ""
            raise PopflowError(f"{busy} ({who or 'unknown pid'}); {advice}") from None
        try:
            holder.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
            yield
        finally:
            lock.release()

    def delete_run(self, pipeline: str, run_id: str) -> list[Path]:
        """Remove a run: its partition of every table, staged parts, trained and promoted models, then its record. Each
        folder is first renamed out of the lake (atomic), so a catalog view never reads half a partition."""
        paths = [*self.root.glob(f"[!_]*/pipeline={pipeline}/run={run_id}"),
                 *self.root.glob(f"_staging/*/pipeline={pipeline}/run={run_id}"),
                 models.trained_dir(self.data_dir, pipeline, run_id),
                 models.promoted_dir(self.data_dir, pipeline, run_id),
                 self.run_dir(pipeline, run_id)]  # the record last: while it exists the run is listed
        trash = self.trash()
        moved = []
        with self.catalog_lock():  # files vanish: not while a catalog rebuild is reading them
            for i, path in enumerate(p for p in paths if p.exists()):
                os.replace(path, trash / str(i))
                moved.append(path)
        shutil.rmtree(trash)
        return moved

    # ------------------------------------------------------------------ catalog
    def tables(self) -> list[str]:
        """Tables with at least one published part."""
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir()
            if d.is_dir() and not d.name.startswith(("_", ".")) and any(d.glob("*/*/*.parquet"))
        )

    def catalog_lock(self):
        """Held while the catalog is rebuilt, and while published files are removed (so a rebuild never reads a
        file that vanishes under it). Publishing new partitions needs no lock: it only adds whole folders."""
        return queued_lock(self.root / ".catalog.lock")

    def rebuild_catalog(self) -> Path:
        """Recreate catalog.duckdb with one view per table over all runs, atomically, under a lock."""
        import duckdb

        self.root.mkdir(parents=True, exist_ok=True)
        with self.catalog_lock():
            fd, tmp = tempfile.mkstemp(prefix=".catalog-", suffix=".duckdb", dir=self.root)
            os.close(fd)
            os.unlink(tmp)  # duckdb wants to create the file itself
            try:
                con = duckdb.connect(tmp)
                tables = self.tables()  # once: another run may publish a new table while this one builds
                for stmt in catalog_statements(self, tables):
                    con.execute(stmt)
                run_columns = {r[0] for r in con.execute(
                    "select column_name from information_schema.columns where table_name = 'runs'").fetchall()}
                if {"pipeline", "run_id", "status", "finished_at"} <= run_columns:  # records from older versions
                    for stmt in latest_statements(tables):
                        con.execute(stmt)
                con.close()
                os.replace(tmp, self.root / CATALOG)
            finally:
                for leftover in (tmp, tmp + ".wal"):
                    if os.path.exists(leftover):
                        os.unlink(leftover)
        return self.root / CATALOG

    def connect(self):
        """A read-only connection to the catalog (built first if missing) that can touch no file outside the
        lake: DuckDB's external access is off but for the lake's folder, and the setting is locked (SQL cannot
        turn it back on). Statements other than queries are refused by `sql.check_query`."""
        import duckdb

        if not (self.root / CATALOG).is_file():
            self.rebuild_catalog()
        con = duckdb.connect(str(self.root / CATALOG), read_only=True)
        # one database instance per file and process: a second connection finds the first's settings, locked
        if not con.execute("select current_setting('lock_configuration')").fetchall()[0][0]:
            con.execute(f"set allowed_directories = [{lit(str(self.root) + os.sep)}]")
            con.execute("set enable_external_access = false")
            con.execute("set lock_configuration = true")
        return con


def latest_statements(tables: list[str]) -> list[str]:
    """Per table a `latest_<table>` view: each pipeline's newest completed run only (failed runs never show);
    `loop_rounds`: the lineage rows of complete loop rounds (promote finished); `policy_chain`: the promoted
    ones, each loop pipeline's chain."""
    chain = ["create view loop_rounds as select l.* from lineage l semi join stages s on s.pipeline = l.pipeline "
             "and s.run_id = l.run_id and s.stage = 'promote'",
             "create view policy_chain as select * from loop_rounds where promoted"] if "lineage" in tables else []
    return ["create view latest_runs as select pipeline, arg_max(run_id, finished_at) as run_id "
            "from runs where status = 'completed' group by pipeline"] + [
        f"create view {ident('latest_' + table)} as select t.* from {ident(table)} t "
        "semi join latest_runs l on l.pipeline = t.pipeline and l.run_id = t.run_id" for table in tables] + chain


def catalog_statements(lake: Lake, tables: list[str]) -> list[str]:
    """The DDL of the catalog: a view per table, plus `runs` and `stages` over the JSON records."""
    stmts = [
        f"create view {ident(table)} as select * from read_parquet({lit(lake.root / table / '*/*/*.parquet')}, "
        "union_by_name = true, hive_partitioning = false)"
        for table in tables
    ]
    runs = lake.root / "_runs" / "*" / "*" / "run.json"
    stages = lake.root / "_runs" / "*" / "*" / "stages" / "*.json"
    if any(lake.root.glob("_runs/*/*/run.json")):
        stmts.append(f"create view runs as select * from read_json_auto({lit(runs)}, union_by_name = true)")
    if any(lake.root.glob("_runs/*/*/stages/*.json")):
        stmts.append(
            f"create view stages as select * from read_json_auto({lit(stages)}, union_by_name = true)")
    return stmts


@contextmanager
def atomic(path: Path | str):
    """popflow's one atomic file writer: yields a temporary name in `path`'s folder (hidden, unique, not ending in
    .parquet, so no glob reads it); renamed onto `path` when the block ends, removed when it raises. Readers see
    all of the file or none of it.

        with atomic(run_dir / "comparison.md") as tmp:
            tmp.write_text(markdown)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet(data: pa.Table, path: Path) -> None:
    with atomic(path) as tmp:
        pq.write_table(data, tmp, compression="zstd")


def write_json(record: dict[str, Any], path: Path) -> None:
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))


def write_text(text: str, path: Path) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


@contextmanager
def queued_lock(path: Path):
    """A blocking flock: the kernel wakes a waiter as soon as the holder releases. filelock (used for the
    run lock and the models dir) polls instead, and a process rebuilding the catalog in a loop starved a
    polling waiter (the race test in tests/popflow/test_lake.py ran 12x longer)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
