"""The Ray backend: connect to (or start) a cluster, run replicas of a class as actors, feed them work items.

A stage that runs on Ray stays the driver: it keeps the lake, sends work items (a shard of prompts, a chunk of
samples) to replica actors and writes each result to staging itself as it comes back, so the lake needs no
shared filesystem and resume per shard works as on one machine.

    from popflow import cluster
    with cluster.session(cfg.execution.ray) as info:                 # RAY_ADDRESS, else a local Ray
        with cluster.Pool(GenerateReplica, (policy, cfg.sample), cfg.execution.sample, gpus) as pool:
            for key, result in pool.map("generate", items):          # items: [(key, args), ...]
                ...                                                  # results in completion order

A stage does not write that branch itself: `cluster.backend(cfg.execution.<stage>, cfg.execution.ray)` (through
popflow.stage.backend) gives a `Backend` whose `pool(...)` is this Pool on Ray, or one `Local` instance of the same
replica class in the stage's process, with the same interface; `tasks(fn, items)` runs plain functions either way.

Faults: an actor whose process dies is restarted by Ray up to `max_restarts` times and its in-flight item
retried (`max_task_retries`); past that its items go to the surviving replicas. Nothing else is redone, and
the driver writes each key once. An address that does not answer within `connect_timeout_s` fails naming it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from popflow.config.execution import RayOptions, Replicas
from popflow.errors import PopflowError
from popflow.lake import write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    address: str  # what the driver connected to; "local" when it started its own Ray
    cpus: float
    gpus: float
    dashboard: str | None


def target(opts: RayOptions) -> str | None:
    """The address to connect to: the config's, else RAY_ADDRESS, else None (start a local Ray)."""
    return opts.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout: float) -> None:
    """Fail fast, naming the address, when nothing listens there (ray.init would retry for minutes)."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise PopflowError(f"RAY_ADDRESS / execution.ray.address {address!r}: expected host:port, ray://host:port "
                           "or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise PopflowError(f"Ray cluster at {address!r} (RAY_ADDRESS / execution.ray.address) is unreachable: {exc}; "
                           "start one with `ray start --head` or unset RAY_ADDRESS to run a local Ray") from None


def check_ray(opts: RayOptions) -> None:
    """Before any work: Ray is installed, and the cluster named (if any) answers."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise PopflowError("execution: a ray backend needs the ray package (pip install 'ray[default]')")
    address = target(opts)
    if address:
        check_reachable(address, opts.connect_timeout_s)


def use_token() -> None:
    """`ray start` (Ray 2.60) turns token authentication on when ~/.ray/auth_token exists (any local ray.init
    writes one), but a driver connecting to an address sends it only with RAY_AUTH_MODE=token, read when ray is
    first imported: set it when a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
    A cluster without authentication accepts such a driver too."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def session(opts: RayOptions) -> Iterator[ClusterInfo]:
    """A driver connection for one stage: to `target(opts)`, else a local Ray started here and stopped after."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home from a pipeline run
    address = target(opts)
    if address:
        check_reachable(address, opts.connect_timeout_s)
        use_token()  # before ray is imported: its core reads the auth mode once
    import ray

    started = time.time()
    try:
        if address:
            context = ray.init(address=address, namespace="popflow", log_to_driver=False,
                               logging_level=logging.WARNING)
        else:
            cpus = opts.num_cpus or len(os.sched_getaffinity(0))
            context = ray.init(num_cpus=cpus, include_dashboard=False, namespace="popflow", log_to_driver=False,
                               logging_level=logging.WARNING)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        raise PopflowError(f"Ray cluster at {address or 'a local Ray'!r}: could not connect: {exc}") from None
    try:
        res = ray.cluster_resources()
        dashboard = getattr(context, "dashboard_url", None) or None
        info = ClusterInfo(address or "local", res.get("CPU", 0.0), res.get("GPU", 0.0), dashboard)
        log.info("ray: connected to %s in %.1fs (%g CPUs, %g GPUs%s)", info.address, time.time() - started,
                 info.cpus, info.gpus, f", dashboard {dashboard}" if dashboard else "")
        yield info
    finally:
        ray.shutdown()  # a local Ray stops; on a cluster this job's actors go and the cluster stays


def get(refs):
    """ray.get, with bad input raised inside a replica or task re-raised as its own one-line PopflowError."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        if isinstance(exc.cause, PopflowError):
            raise PopflowError(str(exc.cause)) from None
        raise


def gpus_per_replica(opts: Replicas, info: ClusterInfo, default: float) -> float:
    """The GPUs each replica asks for: the config's, else `default` when the cluster has GPUs, else none."""
    return opts.gpus if opts.gpus is not None else (default if info.gpus > 0 else 0.0)


class ReplicaFailed(Exception):
    """Every replica of a pool died (restarts used up): the stage fails, the shards written so far stay staged."""


class Pool:
    """`replicas` Ray actors of `cls(*args)`, restarted by Ray on failure, fed work items from one queue."""

    def __init__(self, cls: type, args: tuple, opts: Replicas, gpus: float, name: str):
        import ray

        self.name = name
        remote = ray.remote(cls).options(num_cpus=opts.cpus, num_gpus=gpus, max_restarts=opts.max_restarts,
                                         max_task_retries=opts.max_restarts, max_concurrency=1)
        self.actors = [remote.remote(*args, slot=i, cpus=opts.cpus) for i in range(opts.replicas)]

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def ready(self) -> list[dict]:
        """Wait until every replica has started (its engine or model loaded); what each says about itself."""
        import ray

        return ray.get([a.ready.remote() for a in self.actors])

    def map(self, method: str, items: list[tuple[object, tuple]], poison: int = 2, report_every_s: float = 300.0,
            unavailable_s: float = 300.0) -> Iterator[tuple[object, object]]:
        """(key, result) of `actor.<method>(*args)` for every (key, args), in completion order; each item runs on
        the next free replica. A replica that is gone for good hands its item back to the queue. One only
        unavailable for a while (ActorUnavailableError: restarting, a network blip) hands its item back and
        rests (1, 2, 4 ... 30 s) before it gets another, while the others go on; unavailable for `unavailable_s`
        it counts as gone. An item in flight when `poison` replicas died is the cause, not the victim: the stage
        fails naming it rather than killing every replica in turn. While nothing finishes, a line every
        `report_every_s` says what is in flight (a hung replica shows there)."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        queue, idle, running, deaths = list(reversed(items)), list(self.actors), {}, {}
        resting: dict = {}  # actor -> when it may have an item again
        unavailable: dict = {}  # actor -> (first seen unavailable, times)
        last_report = time.time()
        while queue or running:
            now = time.time()
            for actor in [a for a, until in resting.items() if until <= now]:
                del resting[actor]
                idle.insert(0, actor)
            while queue and idle:
                actor = idle.pop()
                key, args = queue.pop()
                running[getattr(actor, method).remote(*args)] = (key, args, actor)
            if not running:
                if not resting:
                    raise ReplicaFailed(f"{self.name}: every replica died; {len(queue)} item(s) not done")
                time.sleep(max(0.0, min(resting.values()) - time.time()))
                continue
            wait = report_every_s if not resting else max(0.05, min(resting.values()) - now)
            done, _ = ray.wait(list(running), num_returns=1, timeout=min(wait, report_every_s))
            if not done:
                if time.time() - last_report >= report_every_s:
                    last_report = time.time()
                    log.warning("%s: nothing finished in %.0f s; in flight: %s", self.name, report_every_s,
                                ", ".join(repr(k) for k, _, _ in running.values()))
                continue
            last_report = time.time()
            key, args, actor = running.pop(done[0])
            try:
                result = get(done[0])
            except ActorUnavailableError as exc:
                queue.append((key, args))
                first, times = unavailable.get(actor, (time.time(), 0))
                unavailable[actor] = (first, times + 1)
                if time.time() - first > unavailable_s:  # not a while any more: gone (its item went back)
                    log.warning("%s: a replica stayed unavailable for %.0f s (%s); %r goes back to the queue",
                                self.name, time.time() - first, exc, key)
                    continue
                log.warning("%s: a replica is unavailable for now (%s); %r goes back to the queue", self.name, exc, key)
                resting[actor] = time.time() + min(2.0 ** times, 30.0)
                continue
            except RayActorError as exc:
                deaths[key] = deaths.get(key, 0) + 1
                if deaths[key] >= poison:
                    raise ReplicaFailed(f"{self.name}: item {key!r} was in flight when {deaths[key]} replicas died "
                                        f"(last: {type(exc).__name__}); it is the likely cause (memory, a crash in "
                                        "the engine): not retried on the rest") from None
                log.warning("%s: a replica is gone after its restarts (%s); %r goes back to the queue", self.name,
                            type(exc).__name__, key)
                queue.append((key, args))
                continue
            unavailable.pop(actor, None)
            idle.append(actor)
            yield key, result


class Local:
    """The local backend's pool: one `cls(*args)` in this process (not pinned: the stage's process keeps its cores),
    its items in order. It has Pool's interface, so a stage runs the same code on either backend."""

    def __init__(self, cls: type, args: tuple, name: str):
        self.name = name
        self.worker = cls(*args, slot=0, cpus=None)

    def __enter__(self) -> Local:
        return self

    def __exit__(self, *exc) -> None:
        close = getattr(self.worker, "close", None)
        if close:
            close()
        self.worker = None  # the next pool's replica may need the memory this one held

    def ready(self) -> list[dict]:
        return [self.worker.ready()]

    def map(self, method: str, items: list[tuple[object, tuple]]) -> Iterator[tuple[object, object]]:
        for key, args in items:
            yield key, getattr(self.worker, method)(*args)


@dataclass(frozen=True)
class Backend:
    """Where a stage's parts run (its `execution.<stage>` section): in this process (`info` None) or on the Ray
    cluster of a session. A stage asks it for a pool of replicas or for tasks and never branches on which."""

    opts: Replicas
    info: ClusterInfo | None = None

    def pool(self, cls: type, args: tuple, name: str, gpus: float = 1.0) -> Pool | Local:
        """`cls(*args)` replicas: `opts.replicas` Ray actors (`gpus` each by default when the cluster has GPUs),
        or one instance here."""
        if self.info is None:
            return Local(cls, args, name)
        return Pool(cls, args, self.opts, gpus_per_replica(self.opts, self.info, gpus), name)

    @property
    def replicas(self) -> int:
        return self.opts.replicas if self.info is not None else 1

    def chunk(self, size: int, total: int) -> int:
        """Items per call: `size` on Ray (the calls spread over the replicas), all `total` at once here."""
        return size if self.info is not None else max(total, 1)

    def hardware(self, gpus: float = 1.0):
        """What the replicas run on (popflow.precision.Hardware): this machine here; on Ray a GPU when each
        replica gets one (`gpus_per_replica`), else a CPU (of this machine's class, the best guess there is)."""
        from popflow import precision

        hw = precision.detect()
        if self.info is None:
            return hw
        return precision.Hardware("cuda") if gpus_per_replica(self.opts, self.info, gpus) > 0 else \
            precision.Hardware("cpu", hw.cpu_flags)

    def node_local(self, path) -> str | None:
        """A folder of this machine that replicas may write to (scratch): here itself; on Ray None (each
        replica uses its own node's temporary folder)."""
        return str(path) if self.info is None else None

    def ship(self, folder) -> dict | None:
        """A folder the replica must read, as files sent with the call on Ray (a LoRA adapter: a few MB; the
        replica's node need not see this machine's disk); here None: the replica reads the folder itself."""
        return None if self.info is None else pack(Path(folder))

    def tasks(self, fn, items: list[tuple[object, tuple]]) -> Iterator[tuple[object, object]]:
        """(key, fn(*args)) for every (key, args), started now: here run now, in order (so their errors come
        first); on Ray submitted now as one-CPU tasks (they run while the caller does other work) and yielded as
        they finish."""
        if self.info is None:
            return iter([(key, fn(*args)) for key, args in items])
        import ray

        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(*args): key for key, args in items}

        def gather() -> Iterator[tuple[object, object]]:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield refs[done[0]], get(done[0])

        return gather()


@contextmanager
def backend(opts: Replicas, ray_opts: RayOptions) -> Iterator[Backend]:
    """The backend `opts.backend` names; for ray, a driver session (session()) held while this is entered."""
    if opts.backend == "local":
        yield Backend(opts)
        return
    with session(ray_opts) as info:
        yield Backend(opts, info)


CLAIMS_FILE = "popflow-core-claims-{uid}.json"  # in the temp folder; keys "pid@start" (before: popflow-cores-*, pids)


def claim_cores(slot: int, cpus: float, lock_dir: str | None = None, pid: int | None = None,
                wait_s: float = 120.0) -> list[int]:
    """The cores a CPU replica binds to: int(cpus) cores of this node that no live process has claimed, kept as
    {"pid@start": [core ids]} in a small file under a file lock (written whole, then renamed), so replicas of
    several stages, of several widths and restarted replicas never share a core while the owner lives; `start`
    is the owner's start time in clock ticks since boot (/proc/<pid>/stat), which tells a dead owner from a later
    process given its pid and, unlike a wall-clock time, never moves. `slot` picks the preferred block of
    cores when it is free; else the lowest free cores. With too few free cores it waits up to `wait_s` for owners
    to exit, then fails naming them. A fractional replica (cpus < 1: Ray packs several on a core) shares the
    least-claimed core instead, without waiting."""
    from filelock import FileLock

    cores, width, pid = sorted(os.sched_getaffinity(0)), max(int(cpus), 1), pid or os.getpid()
    if width > len(cores):
        raise PopflowError(f"a replica asks for {width} cores; this node lets it use {len(cores)}: {cores}")
    path = Path(lock_dir or tempfile.gettempdir()) / CLAIMS_FILE.format(uid=os.getuid())
    me = process_key(pid)
    deadline = time.time() + wait_s
    while True:
        with FileLock(str(path) + ".lock"):
            claims = {k: c for k, c in _read_claims(path).items() if process_alive(k) and k.split("@")[0] != str(pid)}
            taken = {core for owned in claims.values() for core in owned}
            free = [c for c in cores if c not in taken]
            start = (slot * width) % len(cores)
            block = cores[start:start + width]
            chosen = None
            if cpus < 1:  # shared by design: the core fewest live replicas hold, the slot's own on a tie
                load = {c: sum(c in owned for owned in claims.values()) for c in cores}
                chosen = [min(cores, key=lambda c: (load[c], (cores.index(c) - start) % len(cores)))]
            elif len(free) >= width:
                chosen = block if len(block) == width and not taken & set(block) else free[:width]
            if chosen:
                claims[me] = chosen
                write_text(json.dumps(claims), path)
                return chosen
        owners = {int(k.split("@")[0]): c for k, c in claims.items()}
        if time.time() >= deadline:
            raise PopflowError(f"no {width} free cores for a replica after {wait_s:.0f} s: cores {cores} are claimed "
                               f"by live processes {owners} ({path}); stop them or ask for fewer cores")
        log.warning("replica waits for %d free cores (claimed: %s)", width, owners)
        time.sleep(1.0)


def _read_claims(path: Path) -> dict:
    """The claims file, or none when it is missing or unreadable (a claim is only a hint once its owner died)."""
    try:
        claims = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return claims if isinstance(claims, dict) and all(isinstance(v, list) for v in claims.values()) else {}


def _started(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process from /proc/<pid>/stat; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]  # fields 3 and 22 of proc(5): after the command name in parentheses


def process_key(pid: int) -> str:
    """A process's identity, "pid@start" (its start tick): unlike the pid, no later process shares it; a process
    that cannot be read (already gone) gets a key that is never alive. Core claims and launch markers use it."""
    started = _started(pid)
    return f"{pid}@{started[1] if started else 'gone'}"


def process_alive(key: str) -> bool:
    """The process of a `process_key` still runs: its pid is a process that is not a zombie and started at the
    key's tick."""
    pid, _, start = key.partition("@")
    started = _started(int(pid)) if pid.isdigit() else None
    return started is not None and started[0] not in ("Z", "X") and started[1] == start


def pack(folder: Path) -> dict[str, bytes]:
    """A model folder's files (an adapter: a few MB) as {relative path: bytes}, to send to a replica."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def unpack(files: dict[str, bytes], folder: Path) -> Path:
    """Write pack()'s files under `folder` (replacing an earlier copy); the folder."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    for rel, data in files.items():
        target = (folder / rel).resolve()
        if not target.is_relative_to(folder.resolve()):  # a name is never a path out of the folder
            raise ValueError(f"adapter file {rel!r} escapes its folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder
