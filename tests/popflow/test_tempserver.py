"""Ctrl-C reaches popflow, not Prefect's temporary server, and no way of ending popflow leaves a server behind
(popflow/tempserver.py). A real Prefect flow and temporary server; the flow only waits, so no engine starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.conftest import cli_env

pytestmark = pytest.mark.slow  # Prefect's temporary server and a real run

SCRIPT = """
import sys, time
from popflow import tempserver
tempserver.detach()
from prefect import flow


@flow
def wait():
    print("RUNNING", flush=True)
    time.sleep(300)

try:
    wait()
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(130)
"""


def as_a_terminal_job() -> None:
    """In the child before exec, what a shell does for a job it starts: no signal blocked and SIGINT at its
    default. A child inherits both from the pytest worker, where a library an earlier test ran may have
    changed them. Twice in full-suite runs with two workers (2026-11-30) the child neither printed nor exited
    in 120 s after the group's SIGINT, and never alone or in one process: the cause is not pinned down, so a
    timeout now reports the child's signal state."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def signal_state(pid: int) -> str:
    """The Sig* lines of /proc/PID/status: which signals the process blocks, ignores and catches."""
    try:
        return " ".join(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Sig"))
    except OSError as err:
        return str(err)


def start(tmp_path) -> tuple[subprocess.Popen, psutil.Process]:
    """The script in a process group of its own, as a terminal runs a foreground job; once its flow runs, the
    script and its temporary server (started through popflow.tempserver)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=cli_env(tmp_path), start_new_session=True, preexec_fn=as_a_terminal_job)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("RUNNING"):
            break
    assert lines and lines[-1].startswith("RUNNING"), "".join(lines[-20:])
    servers = [c for c in psutil.Process(proc.pid).children() if "popflow.tempserver" in c.cmdline()]
    assert len(servers) == 1, [c.cmdline() for c in psutil.Process(proc.pid).children()]
    assert os.getpgid(servers[0].pid) != os.getpgid(proc.pid)  # its own session: a group signal misses it
    return proc, servers[0]


def test_ctrl_c_stops_the_run_which_then_stops_its_server(tmp_path):
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends): the flow is interrupted at once
    and the script exits 130; the server, which the signal did not reach, was alive to record the crash and
    is stopped on the way out. Before popflow.tempserver the server died with the signal and the interrupted
    flow retried the dead API for about a minute, then failed with a ConnectError: the assertions on the output
    catch that, so the time limits are loose (beside other tests on 2 cores the way out once took over 30 s,
    and once no exit came in 120 s: see as_a_terminal_job)."""
    proc, server = start(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        rest = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        state = signal_state(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no exit 120 s after SIGINT; the child's {state}") from None
    assert proc.returncode == 130 and "INTERRUPTED" in rest, rest[-2000:]
    assert "ConnectError" not in rest and "Error logging to API" not in rest, rest[-2000:]
    server.wait(timeout=30)


def test_a_killed_run_leaves_no_server(tmp_path):
    """SIGKILL to the group (a crash, the OOM killer): the script dies at once; its server, re-parented, sees
    its parent gone and exits within seconds instead of holding its port forever."""
    proc, server = start(tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    server.wait(timeout=20)
    assert not server.is_running()


def test_a_server_whose_popflow_died_during_its_start_up_exits(tmp_path):
    """The watchdog compares its parent with the pid popflow wrote into POPFLOW_TEMPSERVER_PARENT before the
    server started: a server re-parented before its watchdog began (popflow killed while the server imported
    uvicorn) still sees that its popflow is gone. Here the named pid is not the child's parent at all: the
    watchdog's SIGTERM ends the child at its first look (default SIGTERM action), long before its 60 s sleep."""
    from popflow.tempserver import PARENT

    code = "import time; from popflow.tempserver import watch_parent; watch_parent(0.05); time.sleep(60)"
    env = cli_env(tmp_path) | {PARENT: str(os.getpid() + 1_000_000)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env)
    assert child.wait(timeout=20) == -signal.SIGTERM
