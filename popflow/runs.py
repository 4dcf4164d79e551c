"""A run's lifecycle: its id, its record (run.json), retention.

Run ids carry their UTC start time and a random suffix (20261125T020000Z-3fa2c1), so nightly runs sort by
date and two runs started in the same second never share a partition. Passing an existing run id resumes
that run; the config must hash the same, or the run is refused.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from popflow import __version__
from popflow.config import PipelineConfig
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.stage import now


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir or os.environ.get("POPFLOW_DATA_DIR") or "data").expanduser().resolve()


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def code_version() -> str:
    """popflow's version plus the git commit of the checkout, when there is one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def start_run(lake: Lake, pipeline: str, run_id: str, cfg: PipelineConfig, same_config: bool = True,
              pins: dict | None = None) -> dict:
    """Write (or reopen) the run record; a reused run id must come with the same config (unless a rerun from a
    stage, where the stages themselves check that the ones kept were made with the same config). `pins`: what
    the run's promoted references resolved to (popflow/lineage.py), kept from the run's first start."""
    record = lake.read_run(pipeline, run_id)
    if same_config and record and record["config_hash"] != cfg.hash():
        raise PopflowError(
            f"run {run_id!r} of {pipeline!r} was made with config {record['config_hash']}, this one is "
            f"{cfg.hash()}; a resumed run must use the same config (or omit --run-id for a new run)")
    record = (record or {"started_at": now(), "attempts": 0}) | {
        "run_id": run_id, "pipeline": pipeline, "status": "running", "config_hash": cfg.hash(), "seed": cfg.seed,
        "config": cfg.model_dump(mode="json"), "code_version": code_version(), "finished_at": None,
        "pins": (record or {}).get("pins") or pins or {},
    }
    record["attempts"] += 1
    lake.write_run(pipeline, run_id, record)
    return record


def end_run(lake: Lake, pipeline: str, run_id: str, status: str, stages: dict | None = None,
            error: str | None = None) -> None:
    """Close the run record: status, finish time, per-stage row counts and seconds, and the identities of
    every model its stages used and the dtypes they computed in (from their manifests), so `runs` alone says
    what made a run."""
    record = lake.read_run(pipeline, run_id) or {}
    record.update(status=status, finished_at=now(), error=error)
    if stages is not None:
        record["stages"] = stages
    manifests = lake.read_manifests(pipeline, run_id)
    record["models"] = {stage: m["models"] for stage, m in manifests.items() if m.get("models")}
    record["precision"] = {stage: m["precision"] for stage, m in manifests.items() if m.get("precision")}
    lake.write_run(pipeline, run_id, record)
    lake.rebuild_catalog()


def runs_to_prune(records: list[dict], keep: int, protected: set[str] = frozenset()) -> list[str]:
    """Run ids older than the pipeline's `keep` newest completed runs (records oldest first). Runs that
    started after the oldest kept one stay whatever their status: one may still be in progress. `protected`
    runs (the head of the pipeline's promoted chain, promoted policies an unfinished run pinned) stay."""
    completed = [r for r in records if r.get("status") == "completed"]
    if len(completed) < keep:
        return []
    kept = {r["run_id"] for r in completed[-keep:]}
    cutoff = completed[-keep]["started_at"]
    return [r["run_id"] for r in records
            if r["run_id"] not in kept and r["run_id"] not in protected and r["started_at"] < cutoff]


def prune_runs(lake: Lake, pipeline: str, keep: int | None) -> list[str]:
    """Apply `retention.keep_runs`: delete the runs `runs_to_prune` names (never the one holding the head of
    the promoted chain, nor one whose promoted policy an unfinished run of any pipeline pinned), skipping any
    that a live process holds (its run lock), and what interrupted deletions left behind. Returns the run ids
    deleted."""
    lake.sweep_trash()
    if keep is None:
        return []
    deleted = []
    from popflow.lineage import head_run, pinned_runs

    protected = pinned_runs(lake, pipeline) | {head_run(lake, pipeline)} - {None}
    for run_id in runs_to_prune(lake.read_runs(pipeline), keep, protected=protected):
        try:
            with lake.run_lock(pipeline, run_id):
                lake.delete_run(pipeline, run_id)
        except PopflowError:  # being resumed right now: leave it for a later run's retention
            continue
        deleted.append(run_id)
    if deleted:
        lake.rebuild_catalog()
    return deleted
