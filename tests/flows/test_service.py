"""popflow as a service: a real local Prefect server on loopback, `popflow serve`, `prefect deployment run`.

The server and the serve process run in their own process groups with a temporary PREFECT_HOME (a fresh
SQLite database) and are killed with their groups at the end. The deployment runs the `tiny` pipeline with
the transformers engine (no vLLM start-up per run).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from tests.conftest import CLI_TIMEOUT, PREFECT, REPO, cli_env, free_port, prefect_server, start, stop, wait_for

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

DEPLOYMENT = "preference-pipeline/tiny"
TRANSFORMERS = 'overrides={"sample": {"engine": "transformers"}}'


@pytest.fixture
def server(tmp_path_factory):
    """A Prefect server on 127.0.0.1 (SQLite in a temporary PREFECT_HOME); yields (api url, env for clients).
    One per test: two tests register the same deployment name and one asserts that no flow run exists yet, which
    a server shared within the module makes depend on the order in which an xdist worker runs them."""
    home = tmp_path_factory.mktemp("prefect-server")
    env = cli_env(home)
    with prefect_server(home, env) as api:
        yield api, {**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}


def prefect(env: dict, *args: str, timeout: int = CLI_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.own_prefect  # popflow without a server
def test_serve_refuses_a_missing_server_and_a_bad_cron(cli, tmp_path):
    err = cli("serve", "tiny", expect=2).stderr
    assert "PREFECT_API_URL is not set" in err
    cli.env["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    err = cli("serve", "tiny", expect=2).stderr
    assert f"PREFECT_API_URL={cli.env['PREFECT_API_URL']} is not reachable" in err
    bad = tmp_path / "pipelines.yaml"
    bad.write_text(textwrap.dedent("""\
        nightly:
          prompts: {source: data/prompts/demo.jsonl}
          schedule:
            cron: "0 25 * * *"
        """))
    err = cli("serve", "nightly", "--config", str(bad), expect=2).stderr
    assert f"{bad}:4: pipeline 'nightly': schedule.cron" in err and "invalid cron '0 25 * * *'" in err
    err = cli("serve", "no-such-pipeline", expect=2).stderr
    assert "no pipeline named 'no-such-pipeline'" in err


@pytest.mark.slow
def test_deployment_runs_concurrently_on_a_local_server(server, tmp_path):
    api, env = server
    data = tmp_path / "data"
    serve = start([sys.executable, "-m", "popflow.cli", "serve", "tiny", "--data-dir", str(data)], env,
                  tmp_path / "serve.log")
    try:
        deployment = wait_for(
            lambda: (r := httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=5)).status_code == 200 and r.json(),
            "deployment registered", serve, tmp_path / "serve.log")
        # the configured schedule (the default: nightly, 02:00 UTC), not paused, and the fixed parameters
        assert [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in deployment["schedules"]] == [
            ("0 2 * * *", "UTC", True)]
        assert deployment["paused"] is False
        assert deployment["parameters"]["pipeline"] == "tiny" and deployment["parameters"]["data_dir"] == str(data)

        # bad parameters are refused when the run is created: nothing is scheduled
        bad = prefect(env, "deployment", "run", DEPLOYMENT, "--param", "pipeline=nope")
        assert bad.returncode != 0 and "Validation failed for field 'pipeline'" in bad.stdout + bad.stderr
        bad = prefect(env, "deployment", "run", DEPLOYMENT, "--param", 'overrides={"sample": {"temprature": 1}}')
        assert bad.returncode != 0 and "'temprature' was unexpected" in bad.stdout + bad.stderr
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert runs == []

        # two overlapping runs of one pipeline, while a reader keeps querying the catalog
        reads, errors, done = [0], [], threading.Event()
        reader = threading.Thread(target=read_catalog, args=(data, reads, errors, done), daemon=True)
        reader.start()
        watched = [subprocess.Popen([PREFECT, "deployment", "run", DEPLOYMENT, "--param", TRANSFORMERS, "--watch"],
                                    env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for _ in range(2)]
        outputs = [p.communicate(timeout=CLI_TIMEOUT)[0] for p in watched]
        done.set()
        reader.join()
        assert [p.returncode for p in watched] == [0, 0], ("\n".join(outputs)[-3000:] + "\nserve.log:\n"
                                                           + (tmp_path / "serve.log").read_text()[-8000:])
        assert errors == [] and reads[0] > 0
    finally:
        stop(serve)
    # serving stopped (SIGTERM): the schedule stays active for the next `popflow serve`
    deployment = httpx.get(f"{api}/deployments/name/{DEPLOYMENT}", timeout=5).json()
    assert deployment["paused"] is False and [s["active"] for s in deployment["schedules"]] == [True]
    check_lake(data)


def read_catalog(data: Path, reads: list, errors: list, done: threading.Event) -> None:
    """What `popflow sql` does during a run: open the catalog read-only and query every view."""
    catalog = data / "lake" / "catalog.duckdb"
    while not done.is_set():
        if catalog.is_file():
            try:
                con = duckdb.connect(str(catalog), read_only=True)
                for (view,) in con.sql("select view_name from duckdb_views() where not internal").fetchall():
                    con.sql(f"select count(*) from {view}").fetchall()
                con.close()
                reads[0] += 1
            except duckdb.Error as exc:
                errors.append(str(exc))
        time.sleep(0.2)


def check_lake(data: Path) -> None:
    """Both runs completed with their own partitions (every row's run_id is its folder's), and the `runs`
    record says what made each run."""
    con = duckdb.connect(str(data / "lake" / "catalog.duckdb"), read_only=True)
    runs = con.sql("select run_id, status, config_hash, code_version, stages, models from runs").fetchall()
    assert [r[1] for r in runs] == ["completed", "completed"] and runs[0][0] != runs[1][0]
    for _, _, config_hash, version, stages, models in runs:
        assert len(config_hash) == 12 and version.startswith("0.1.0")
        assert stages["sample"]["tables"]["samples"] == 9 * 4 and stages["train"]["seconds"] > 0
        assert models["sample"]["policy"]["ref"] == "builtin:tiny-llama"
    tables = [t for (t,) in con.sql("select view_name from duckdb_views() where not internal").fetchall()
              if t not in ("runs", "stages") and not t.startswith("latest_")]
    assert {"samples", "pairs", "policies", "eval_metrics"} <= set(tables)
    for table in tables:
        mixed = duckdb.sql(f"select count(*) from read_parquet('{data}/lake/{table}/*/*/*.parquet', filename = true, "
                           "union_by_name = true) where filename not like '%/run=' || run_id || '/%'").fetchall()
        assert mixed == [(0,)], table
    per_run = con.sql("select run_id, count(*) from samples group by 1").fetchall()
    assert sorted(n for _, n in per_run) == [36, 36]
    assert con.sql("select count(*) from latest_runs").fetchall() == [(1,)]


@pytest.mark.slow
def test_deployment_on_a_process_work_pool_runs_on_a_worker(server, tmp_path):
    """The second way: `popflow deploy` registers the deployment with a process work pool, and a Prefect
    worker (not a serving popflow process) picks the run up."""
    api, env = server
    data = tmp_path / "data"
    assert prefect(env, "work-pool", "create", "popflow-test", "--type", "process").returncode == 0
    deploy = subprocess.run([sys.executable, "-m", "popflow.cli", "deploy", "tiny", "--work-pool", "popflow-test",
                             "--data-dir", str(data)], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT)
    assert f"deployment {DEPLOYMENT} -> work pool popflow-test" in deploy.stdout, deploy.stderr
    worker = start([PREFECT, "worker", "start", "--pool", "popflow-test"], {**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                   tmp_path / "worker.log")
    try:
        run = prefect(env, "deployment", "run", DEPLOYMENT, "--param", TRANSFORMERS, "--watch")
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:] + (tmp_path / "worker.log").read_text()[-4000:]
    finally:
        stop(worker)
    con = duckdb.connect(str(data / "lake" / "catalog.duckdb"), read_only=True)
    assert con.sql("select status, count(*) from runs group by 1").fetchall() == [("completed", 1)]
    assert con.sql("select count(*) from eval_metrics").fetchall()[0][0] > 0


@pytest.mark.slow
def test_a_served_loop_pipeline_does_one_round_per_run(server, tmp_path):
    """tiny_loop served: the first deployment run (as the nightly schedule would start it) is round 1 and
    promotes (gate always passes here); the second is round 2 and samples round 1's promoted policy."""
    api, env = server
    data = tmp_path / "data"
    serve = start([sys.executable, "-m", "popflow.cli", "serve", "tiny_loop", "--data-dir", str(data)], env,
                  tmp_path / "serve.log")
    name = "preference-pipeline/tiny_loop"
    params = 'overrides={"sample": {"engine": "transformers"}, "loop": {"gate": {"min_win_rate": null}}}'
    try:
        wait_for(lambda: httpx.get(f"{api}/deployments/name/{name}", timeout=5).status_code == 200,
                 "deployment registered", serve, tmp_path / "serve.log")
        for _ in range(2):
            run = prefect(env, "deployment", "run", name, "--param", params, "--watch")
            assert run.returncode == 0, (run.stdout + run.stderr)[-3000:] + (tmp_path / "serve.log").read_text()[-6000:]
    finally:
        stop(serve)
    con = duckdb.connect(str(data / "lake" / "catalog.duckdb"), read_only=True)
    rounds = con.sql("select round, run_id, promoted, promoted_path from lineage order by round").fetchall()
    assert [(r[0], r[2]) for r in rounds] == [(1, True), (2, True)]
    sampled = con.sql(f"select distinct policy from samples where run_id = '{rounds[1][1]}'").fetchall()
    assert sampled == [(rounds[0][3],)]
