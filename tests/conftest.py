"""Shared test helpers: run the real `popflow` CLI in a subprocess with an isolated Prefect home and lake.

Every CLI test's data dir holds a quote and a space (tmp/it's data), as a home like /home/o'brien does.
The built-in models are shared through POPFLOW_MODELS_DIR (the repo's data/models, filled by `make models`)
so each test does not rebuild them; everything else (lake, Prefect's database) lives in tmp_path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
# A CLI run's time limit in the tests: generous, since beside another xdist worker on the slower CPU class an
# end-to-end run can take several times its time alone; a hang still fails long before CI's own limit.
CLI_TIMEOUT = 1800


def pytest_report_header(config) -> str:
    """The CPU class on the run's first lines, so a suite's time (a CI log) says which class it belongs to."""
    from popflow import precision

    hw = precision.Hardware("cpu", precision.read_cpu_flags(), None, precision.cpu_name())
    flags = " ".join(f for f in precision.REPORTED_FLAGS if f in hw.cpu_flags)
    return f"popflow: CPU class {hw.cpu_class} ({hw.name}; {flags}), {len(os.sched_getaffinity(0))} cores"


def cli_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        POPFLOW_MODELS_DIR=str(REPO / "data" / "models"),
        PYTHONPATH=str(REPO),  # so `python` reward kinds can name tests.fixtures.rewards:...
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    env.pop("POPFLOW_DATA_DIR", None)
    return env


def run_script(tmp_path: Path, script: str) -> dict:
    """Run `script` (it prints one line `RESULT <json>`) in a fresh interpreter with the CLI's environment, as
    vLLM engines want their own process; its RESULT, or a failure with the end of its stderr."""
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env=cli_env(tmp_path), cwd=REPO, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-4000:]
    return json.loads(line[0][len("RESULT "):])


class Cli:
    def __init__(self, tmp_path: Path):
        self.data_dir = tmp_path / "it's data"  # a quote and a space: every path reaching SQL is quoted
        self.env = cli_env(tmp_path)

    def cmd(self, *args: str) -> list[str]:
        takes_data = {"run", "sql", "runs", "experiment", "loop", "policies", "report", "export", "annotate"}
        data = ["--data-dir", str(self.data_dir)] if args[0] in takes_data else []
        return [sys.executable, "-m", "popflow.cli", *args, *data]

    def __call__(self, *args: str, expect: int = 0, timeout: int = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """Run the CLI in its own process group; past `timeout` (or on Ctrl-C) the group gets SIGINT, as from a
        terminal, then SIGKILL after 20 s (engine processes it started would otherwise keep the other xdist
        worker's cores busy). Prefect's temporary server and an accelerate launch run in sessions of their own:
        the server stops once popflow is gone; popflow stops a launch on SIGINT (tasks/train_launch.py)."""
        with subprocess.Popen(self.cmd(*args), env=self.env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) as run:
            try:
                out, err = run.communicate(timeout=timeout)
            except BaseException as exc:  # past the limit, or pytest interrupted: the run goes with it, first
                with contextlib.suppress(ProcessLookupError):  # as Ctrl-C would (popflow stops its launches)
                    os.killpg(run.pid, signal.SIGINT)
                try:
                    out, err = run.communicate(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(run.pid, signal.SIGKILL)
                    out, err = run.communicate()
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
                pytest.fail(f"{' '.join(args)}: not done in {timeout} s\n{out[-3000:]}\n{err[-6000:]}")
        proc = subprocess.CompletedProcess(run.args, run.returncode, out, err)
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*args), env=self.env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def query(self, sql: str) -> list[tuple]:
        con = duckdb.connect(str(self.data_dir / "lake" / "catalog.duckdb"), read_only=True)
        try:
            return con.sql(sql).fetchall()
        finally:
            con.close()

    def prefect_db(self, sql: str) -> list[tuple]:
        """Rows from the ephemeral Prefect server's own database (what the UI would show)."""
        import sqlite3

        con = sqlite3.connect(Path(self.env["PREFECT_HOME"]) / "prefect.db")
        try:
            return con.execute(sql).fetchall()
        finally:
            con.close()

    def run_id(self, stdout: str) -> str:
        line = next(line for line in stdout.splitlines() if line.startswith("run ") and "completed" in line)
        return line.split()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Stop the process and everything left in its group (children outlive a leader that already exited)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited {proc.returncode}\n{log.read_text()[-4000:]}")
        try:
            got = check()
            if got:
                return got
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not ready in {timeout} s\n{log.read_text()[-4000:]}")


@contextmanager
def prefect_server(home: Path, env: dict):
    """A Prefect server on 127.0.0.1 (SQLite under `home`) in its own process group; yields its API url."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    proc = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off", "--no-ui"],
                 env, home / "server.log")
    try:
        wait_for(lambda: httpx.get(f"{api}/health", timeout=2).status_code == 200, "prefect server", proc,
                 home / "server.log")
        yield api
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect server for the session's CLI runs. Without it every `popflow run` starts Prefect's temporary
    server, which costs seconds of start-up and database migrations per run on 2 cores. A test that reads the
    server's own database, or tests popflow without a server, asks for its own: @pytest.mark.own_prefect."""
    home = tmp_path_factory.mktemp("prefect-shared")
    with prefect_server(home, cli_env(home)) as api:
        yield api


@pytest.fixture
def cli(tmp_path, request) -> Cli:
    made = Cli(tmp_path)
    if not request.node.get_closest_marker("own_prefect"):
        made.env["PREFECT_API_URL"] = request.getfixturevalue("prefect_api")
    return made
