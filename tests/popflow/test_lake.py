"""The Parquet lake and DuckDB catalog: partitions, atomic publish, union_by_name views, safe rebuilds."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pyarrow as pa
import pytest

from popflow.lake import Lake
from tests.conftest import REPO


def test_views_span_runs_and_keep_columns_added_later(tmp_path):
    lake = Lake(tmp_path)
    lake.write_table("t", "p", "r1", pa.table({"a": [1, 2], "run_id": ["r1", "r1"]}))
    lake.write_table("t", "p", "r2", pa.table({"a": [3], "b": ["new"], "run_id": ["r2"]}))
    lake.rebuild_catalog()
    rows = lake.connect().sql("select run_id, a, b from t order by a").fetchall()
    assert rows == [("r1", 1, None), ("r1", 2, None), ("r2", 3, "new")]
    assert (tmp_path / "lake/t/pipeline=p/run=r2/part-00000.parquet").is_file()


def test_staged_parts_are_invisible_until_published(tmp_path):
    lake = Lake(tmp_path)
    lake.write_staged_part("s", "p", "r", "shard-00000", pa.table({"x": [1]}))
    lake.rebuild_catalog()
    assert "s" not in lake.tables()
    lake.write_staged_part("s", "p", "r", "shard-00001", pa.table({"x": [2]}))
    lake.publish("s", "p", "r")
    lake.rebuild_catalog()
    assert lake.connect().sql("select sum(x) from s").fetchall() == [(3,)]
    # republishing (a stage rerun after a crash) replaces the partition instead of adding to it
    lake.write_staged_part("s", "p", "r", "shard-00000", pa.table({"x": [10]}))
    lake.publish("s", "p", "r")
    lake.rebuild_catalog()
    assert lake.connect().sql("select sum(x) from s").fetchall() == [(10,)]
    assert not [p for p in (tmp_path / "lake").rglob("*") if ".tmp" in p.name]
    assert not list((tmp_path / "lake" / "_trash").iterdir())


def test_reader_keeps_a_consistent_catalog_across_rebuilds(tmp_path):
    lake = Lake(tmp_path)
    lake.write_table("t", "p", "r1", pa.table({"a": [1]}))
    lake.rebuild_catalog()
    reader = lake.connect()
    lake.write_table("u", "p", "r1", pa.table({"b": [2]}))
    lake.rebuild_catalog()  # replaced while the reader is open: no lock conflict, no error
    assert reader.sql("select count(*) from t").fetchall() == [(1,)]
    reader.close()  # duckdb shares one instance per path inside a process; `popflow sql` is its own process
    assert "u" in {r[0] for r in lake.connect().sql("show tables").fetchall()}


def test_manifests_and_runs_are_queryable(tmp_path):
    lake = Lake(tmp_path)
    lake.write_run("p", "r1", {"run_id": "r1", "pipeline": "p", "status": "completed"})
    lake.write_manifest("p", "r1", "sample", {"stage": "sample", "run_id": "r1", "tables": {"samples": 8}})
    lake.rebuild_catalog()
    con = lake.connect()
    assert con.sql("select status from runs").fetchall() == [("completed",)]
    assert con.sql("select tables.samples from stages where stage = 'sample'").fetchall() == [(8,)]
    assert lake.read_manifest("p", "r1", "sample")["tables"] == {"samples": 8}
    assert lake.read_manifest("p", "r1", "score") is None


def test_latest_views_show_the_newest_completed_run_only(tmp_path):
    lake = Lake(tmp_path)
    for run_id, status, finished in (("r1", "completed", "2026-11-24T02:00:00+00:00"),
                                     ("r2", "completed", "2026-11-25T02:00:00+00:00"),
                                     ("r3", "failed", "2026-11-26T02:00:00+00:00")):
        lake.write_run("p", run_id, {"run_id": run_id, "pipeline": "p", "status": status, "finished_at": finished})
        lake.write_table("t", "p", run_id, pa.table({"x": [run_id], "pipeline": ["p"], "run_id": [run_id]}))
    lake.write_run("q", "q1", {"run_id": "q1", "pipeline": "q", "status": "completed",
                               "finished_at": "2026-11-20T02:00:00+00:00"})
    lake.write_table("t", "q", "q1", pa.table({"x": ["q1"], "pipeline": ["q"], "run_id": ["q1"]}))
    lake.rebuild_catalog()
    assert lake.connect().sql("select x from latest_t order by x").fetchall() == [("q1",), ("r2",)]


@pytest.mark.slow
def test_catalog_rebuilds_race_with_other_processes_publishing_and_deleting(tmp_path):
    """Two pipeline runs share a lake: while one rebuilds the catalog, the other publishes tables the lake has
    never had (each stage's first output) and retention deletes old runs. Here a second process does that
    (the real situation: two flow runs on one lake) while this one keeps rebuilding the catalog; every
    rebuild succeeds, and the final catalog has a view (and its latest_ view) per table left in the lake."""
    n = 60
    script = textwrap.dedent(f"""
        N = {n}
        import sys, pyarrow as pa
        sys.path.insert(0, {str(REPO)!r})
        from popflow.lake import Lake
        lake = Lake({str(tmp_path)!r})
        lake.write_run("p", "r0", {{"run_id": "r0", "pipeline": "p", "status": "completed",
                                    "finished_at": "2026-11-25T00:00:00"}})
        print("ready", flush=True)
        row = lambda run: pa.table({{"pipeline": ["p"], "run_id": [run]}})
        for i in range(N):
            lake.write_table(f"t{{i}}", "p", "r0", row("r0"))
            lake.write_table("churn", "p", f"old{{i}}", row(f"old{{i}}"))
            if i:
                lake.delete_run("p", f"old{{i - 1}}")
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "ready\n"
    lake, errors, rebuilds = Lake(tmp_path), [], 0
    while writer.poll() is None or rebuilds < 50:
        try:
            lake.rebuild_catalog()
        except duckdb.Error as exc:
            errors.append(str(exc).splitlines()[0])
        rebuilds += 1
    assert writer.wait() == 0
    assert errors == [] and rebuilds >= 50
    lake.rebuild_catalog()
    views = {v for (v,) in lake.connect().sql("select view_name from duckdb_views() where not internal").fetchall()}
    tables = {f"t{i}" for i in range(n)} | {"churn"}
    assert views == tables | {f"latest_{t}" for t in tables} | {"runs", "latest_runs"}


def test_catalog_connections_read_only_the_lake(tmp_path):
    """A catalog connection reads the lake and no file outside it, and cannot turn that off; a second connection
    to the same catalog in the same process (DuckDB shares one instance per file) works the same way."""
    import pytest

    lake = Lake(tmp_path)
    lake.write_table("t", "p", "r1", pa.table({"a": [1]}))
    lake.rebuild_catalog()
    outside = tmp_path / "outside.csv"
    outside.write_text("x\n1\n")
    first = lake.connect()
    second = lake.connect()
    for con in (first, second):
        assert con.sql("select a from t").fetchall() == [(1,)]
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            con.sql(f"select * from read_csv('{outside}')").fetchall()
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("set enable_external_access = true")


def test_the_atomic_writer_publishes_whole_files_or_nothing(tmp_path):
    """A block that ends renames its temporary file onto the path; one that raises leaves the old file as it was
    and no temporary file behind."""
    from popflow.lake import atomic, write_text

    target = tmp_path / "sub" / "table.md"
    write_text("old\n", target)
    with pytest.raises(RuntimeError):
        with atomic(target) as tmp:
            tmp.write_text("half")
            assert tmp.parent == target.parent and not tmp.name.endswith(".md")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["table.md"]
    with atomic(target) as tmp:
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # readers see the old file until the rename
    assert target.read_text() == "new\n" and sorted(p.name for p in target.parent.iterdir()) == ["table.md"]
