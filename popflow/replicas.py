"""The generation replicas a Ray pool runs as actors (popflow/cluster.py), and the local backend as one instance in
the stage's process: sample's GenerateReplica (one engine each), evaluate's EvalReplica (the trained policies, one
after another), and the core pinning every CPU replica does (the reward model replica, tasks/rewards/hf.py:Replica,
uses it too).

A plain class (Ray wraps it), built from the same config the local backend uses, so a replica generates
exactly as the sample stage does in its own process:

    GenerateReplica(policy_dir, sample_cfg, slot=0, cpus=1).generate(prompts, n, params)
        -> ([[Completion]] per prompt, pid)

On a node without GPUs each replica first claims `cpus` cores of its own (cluster.claim_cores) and pins itself
to them: vLLM-CPU binds its OpenMP threads to the cores the process may run on, so two replicas of one node
would otherwise both bind every core. It also takes the same share of vLLM-CPU's KV cache reservation
(`sample.vllm.gpu_memory_utilization` is a share of the node's RAM there): two replicas of half the cores
each reserve half as much each, not twice the setting together.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

from popflow import precision
from popflow.errors import PopflowError

# A Python exception line ("ValueError: ...", "torch.OutOfMemoryError: ...") in a log; vLLM's own summary
# lines point elsewhere ("See root cause above") and are not the cause.
ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception)\b: .+")
NOT_A_CAUSE = ("See root cause above", "Engine core initialization failed")


def last_error(log_text: str) -> str | None:
    """The last exception line of a log that is a cause, not a pointer to one."""
    found = [ln.strip() for ln in log_text.splitlines() if ERROR_LINE.match(ln.strip())]
    causes = [ln for ln in found if not any(p in ln for p in NOT_A_CAUSE)]
    return causes[-1] if causes else None


def with_root_cause(exc: BaseException) -> RuntimeError:
    """An error from inside a replica, with the root cause its child processes (vLLM's engine core) wrote to
    this process's stderr, and where that log is: a Ray driver with log_to_driver off sees no more."""
    try:
        path = os.readlink("/proc/self/fd/2")
        with open(path, errors="replace") as fh:
            fh.seek(max(0, os.path.getsize(path) - (1 << 20)))
            cause = last_error(fh.read())
    except OSError:
        path, cause = None, None
    where = f" (full log: {path} on {socket.gethostname()})" if path else ""
    return RuntimeError(f"{type(exc).__name__}: {exc}" + (f"; root cause: {cause}" if cause else "") + where)


def pin_cores(slot: int, cpus: float | None) -> list[int] | None:
    """On a CPU node: this process (and the engine processes it starts) runs on its own cores only. `cpus` None:
    the local backend's one instance in the stage's own process, which keeps the cores it has."""
    if cpus is None or precision.detect().device != "cpu":
        return None
    from popflow.cluster import claim_cores

    cores = claim_cores(slot, cpus)
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    return cores


def engine_share(cfg, slot: int, cpus: float | None):
    """(sample config for this replica, its cores): pinned on a CPU node, where vLLM-CPU reserves
    gpu_memory_utilization of the node's RAM, so a replica takes its cores' share of that."""
    node_cores = len(os.sched_getaffinity(0)) if cpus is not None else None  # before pinning narrows it
    cores = pin_cores(slot, cpus)
    if cores:
        share = cfg.vllm.gpu_memory_utilization * len(cores) / node_cores
        cfg = cfg.model_copy(update={"vllm": cfg.vllm.model_copy(update={"gpu_memory_utilization": share})})
    return cfg, cores


class GenerateReplica:
    """One vLLM (or transformers) engine on `policy`, generating a shard per call."""

    def __init__(self, policy: str, cfg, slot: int = 0, cpus: float | None = 1.0):
        from popflow.engines import Engines

        t0 = time.time()
        cfg, self.cores = engine_share(cfg, slot, cpus)
        self.engines = Engines(cfg)
        self._open = self.engines.open(policy)
        try:
            self.engine = self._open.__enter__()
        except PopflowError:  # bad input: its own one line, never retried
            raise
        except Exception as exc:
            raise with_root_cause(exc) from None
        self.startup_s = time.time() - t0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "cores": self.cores, "startup_s": self.startup_s,
                "per_request_seed": self.engine.per_request_seed, "dtype": self.engine.dtype}

    def generate(self, prompts, n: int, params):
        return self.engine.generate(prompts, n, params), os.getpid()

    def close(self) -> None:
        self._open.__exit__(None, None, None)
        self.engines.close()


class EvalReplica:
    """Engines for evaluate: every trained policy it is given in turn, each a LoRA adapter on `base` (served by
    one LoRA engine, or merged into a copy: `serving`) or a full model. On Ray an adapter's files come with the
    call (they are small), so the replica needs no filesystem shared with the driver's lake."""

    def __init__(self, base: str, cfg, serving: str, max_lora_rank: int, scratch: str | None, slot: int = 0,
                 cpus: float | None = 1.0):
        from popflow.engines import Engines

        cfg, self.cores = engine_share(cfg, slot, cpus)
        self.base, self.cfg = base, cfg
        self.scratch = Path(scratch) if scratch else None
        self.engines = Engines(cfg, serving, max_lora_rank, self.scratch)
        self._shipped = tempfile.TemporaryDirectory(prefix="popflow-adapters-")  # on this node, removed by close()
        self._received = 0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "cores": self.cores}

    def generate(self, path: str, adapter: bool, prompts, n: int, params, files: dict | None = None):
        """([[Completion]] per prompt, pid) of the policy at `path` (on the driver); `files`: {relative path: bytes}
        of an adapter folder, written here first (the path on the driver may not exist on this node)."""
        if files is not None:
            self._received += 1
            from popflow.cluster import unpack

            path = str(unpack(files, Path(self._shipped.name) / f"policy-{self._received}"))
        try:
            with self.engines.open(self.base, path) if adapter else self.engines.open(path) as engine:
                return engine.generate(prompts, n, params), os.getpid()
        except PopflowError:  # bad input (a request the engine refuses): its own one line, never retried
            raise
        except Exception as exc:
            raise with_root_cause(exc) from None

    def close(self) -> None:
        self.engines.close()
        self._shipped.cleanup()
