"""Run lifecycle: the run lock, retention (which runs go, and that they go whole), schedule config."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.runs import prune_runs, runs_to_prune


def record(run_id: str, status: str, started: str) -> dict:
    return {"run_id": run_id, "status": status, "started_at": f"2026-11-{started}T02:00:00+00:00"}


def test_runs_to_prune_keeps_the_newest_completed_and_anything_after_them():
    """keep = 2 over (oldest first) a completed, b failed, c completed, d running, e completed, f running:
    the two newest completed are c and e, so the cutoff is c's start (day 03). a and b started before it and
    go; d and f started after it and stay whatever their status (d may still be running)."""
    runs = [record("a", "completed", "01"), record("b", "failed", "02"), record("c", "completed", "03"),
            record("d", "running", "04"), record("e", "completed", "05"), record("f", "running", "06")]
    assert runs_to_prune(runs, 2) == ["a", "b"]
    assert runs_to_prune(runs, 3) == []  # only three completed runs: nothing is beyond the window
    assert runs_to_prune(runs, 1) == ["a", "b", "c", "d"]


def fill(lake: Lake, pipeline: str, run_id: str, status: str, started: str) -> None:
    for table in ("samples", "pairs"):
        lake.write_table(table, pipeline, run_id, pa.table({"x": [1], "run_id": [run_id]}))
    lake.write_staged_part("samples", pipeline, run_id, "shard-00009", pa.table({"x": [2]}))
    (lake.data_dir / "models" / "runs" / pipeline / run_id / "dpo-s0").mkdir(parents=True)
    lake.write_run(pipeline, run_id, record(run_id, status, started))


def test_prune_deletes_whole_runs_and_skips_one_in_progress(tmp_path):
    lake = Lake(tmp_path)
    for run_id, status, day in (("r1", "completed", "01"), ("r2", "running", "02"), ("r3", "completed", "03"),
                                ("r4", "completed", "04")):
        fill(lake, "p", run_id, status, day)
    fill(lake, "other", "o1", "completed", "01")  # another pipeline's runs are not this pipeline's retention
    with lake.run_lock("p", "r2"):  # r2 is being resumed by a live process
        assert prune_runs(lake, "p", keep=2) == ["r1"]
    assert sorted(p.name for p in (tmp_path / "lake" / "samples" / "pipeline=p").iterdir()) == [
        "run=r2", "run=r3", "run=r4"]
    assert not list(tmp_path.rglob("run=r1")) and not (tmp_path / "models/runs/p/r1").exists()
    assert lake.connect().sql("select pipeline, count(*) from runs group by 1 order by 1").fetchall() == [
        ("other", 1), ("p", 3)]
    assert prune_runs(lake, "p", keep=2) == ["r2"]  # no longer held: it goes on the next completed run
    assert prune_runs(lake, "p", keep=None) == []
    assert not list((tmp_path / "lake" / "_trash").iterdir())


def test_prune_sweeps_what_an_interrupted_deletion_left_in_the_trash(tmp_path):
    """A deletion killed between its rename into _trash and its rmtree leaves a folder there. The next prune
    removes it once it is an hour old; a younger one may be another process's deletion still running."""
    lake = Lake(tmp_path)
    old, young = lake.trash(), lake.trash()
    (old / "partition").mkdir()
    (old / "partition" / "part-00000.parquet").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    assert prune_runs(lake, "p", keep=None) == []
    assert list((tmp_path / "lake" / "_trash").iterdir()) == [young]


def test_run_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    lake = Lake(tmp_path)
    with lake.run_lock("p", "r"):
        with pytest.raises(PopflowError, match=r"run 'r' of 'p' is being executed by another process \(pid \d+"):
            with lake.run_lock("p", "r"):
                pass
    with lake.run_lock("p", "r"):  # released: a resume can take it
        pass


def test_schedule_is_validated_and_left_out_of_the_run_hash(tmp_path):
    base = load_pipeline("tiny")
    assert (base.schedule.cron, base.schedule.timezone, base.retention.keep_runs) == ("0 2 * * *", "UTC", None)
    other = load_pipeline("tiny", overrides=["schedule.cron=30 1 * * 1-5", "schedule.timezone=Europe/Paris",
                                             "retention.keep_runs=7"])
    assert other.hash() == base.hash()  # operating a pipeline differently does not orphan its runs
    assert load_pipeline("tiny", overrides=["sample.n=3"]).hash() != base.hash()
    with pytest.raises(PopflowError, match=r"schedule.cron: Value error, invalid cron '\* \* \*'"):
        load_pipeline("tiny", overrides=["schedule.cron='* * *'"])
    with pytest.raises(PopflowError, match=r"schedule.cron=\* \* \*': the value is not valid YAML"):
        load_pipeline("tiny", overrides=["schedule.cron=* * *"])  # unquoted: YAML reads '*' as an alias
    with pytest.raises(PopflowError, match="schedule.timezone: Value error, unknown time zone 'Mars/Olympus'"):
        load_pipeline("tiny", overrides=["schedule.timezone=Mars/Olympus"])
    with pytest.raises(PopflowError, match="retention.keep_runs: Input should be greater than or equal to 1"):
        load_pipeline("tiny", overrides=["retention.keep_runs=0"])
