"""Train one method x seed through `accelerate launch`: DDP, FSDP or DeepSpeed ZeRO-2/3 over several processes.

The train stage (tasks/train.py) writes the method's training rows and held-out rows to a job folder, then runs

    python -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \\
        --main_process_port <free> -m tasks.train_launch <job folder>

Every process runs the same `train_one` as the in-process path on the same rows (the stored reference log-probs
are columns of those rows, so no mode ever loads the reference model); TRL's trainer shards the batches, the
held-out margins are gathered in order, and the main process writes the model and `result.json` (curve,
held-out beta * h, stats), which the stage reads back. The same DDP file runs gloo processes on a CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from popflow import cluster
from popflow.config.execution import AccelerateLaunch
from popflow.errors import PopflowError
from popflow.lake import write_text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(launch: AccelerateLaunch, job: Path) -> list[str]:
    """The accelerate launch command line of a job folder."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch.config_file()),
            "--num_processes", str(launch.processes), "--main_process_port",
            str(launch.main_process_port or free_port()), "-m", "tasks.train_launch", str(job)]


def check_launch(launch: AccelerateLaunch) -> None:
    """What accelerate would only say after start-up: a missing config file, DeepSpeed not installed."""
    import yaml

    path = launch.config_file()
    if not path.is_file():
        raise PopflowError(f"train.accelerate.config: {path} not found")
    kind = (yaml.safe_load(path.read_text()) or {}).get("distributed_type")
    if kind == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise PopflowError(f"train.accelerate.config {launch.config!r} uses DeepSpeed, which is not installed "
                               "(pip install deepspeed on the training machine)")


def run_logged(cmd: list[str], log_path: Path, env: dict, timeout_s: float | None = None,
               every_s: float = 30.0) -> int:
    """Run the launch with its output in `log_path`, saying where that is when it starts and, every `every_s`
    seconds while it runs, its last line (so a long or stuck launch is visible); its exit status. Past
    `timeout_s` the launch is stopped and a RuntimeError names the log. Every process of the launch carries a
    token in its environment (torchrun's workers run in sessions of their own, so no process group holds them
    all), written beside the log before the launch starts (`marker`): however the launch ends, no process with
    its token outlives it, and a rerun after popflow itself was killed stops the earlier launch first
    (`stop_earlier_launch`)."""
    import logging
    import time
    import uuid

    log, started = logging.getLogger(__name__), time.time()
    stop_earlier_launch(log_path)
    token, proc = uuid.uuid4().hex, None
    write_text(token, marker(log_path))
    try:
        with log_path.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**env, LAUNCH_TOKEN: token},
                                    start_new_session=True)
            log.info("accelerate launch (pid %d), log %s", proc.pid, log_path)
            while True:
                left = None if timeout_s is None else timeout_s - (time.time() - started)
                if left is not None and left <= 0:
                    raise RuntimeError(f"accelerate launch ran past train.accelerate.timeout_s={timeout_s:g}; "
                                       f"stopped (log: {log_path})")
                try:
                    return proc.wait(timeout=every_s if left is None else min(every_s, left))
                except subprocess.TimeoutExpired:
                    lines = log_path.read_text(errors="replace").strip().splitlines()
                    log.info("accelerate launch running; last line: %s", lines[-1][:200] if lines else "(none yet)")
    finally:  # the launch ended, timed out or the stage was interrupted: none of its processes outlives it
        if proc is not None and proc.poll() is None:
            proc.kill()  # our own child, not yet reaped: its pid is still its own
        stopped = stop_launch(token)
        if proc is not None:
            proc.wait()
        if stopped:  # else kept, so that a rerun tries again
            marker(log_path).unlink(missing_ok=True)


LAUNCH_TOKEN = "POPFLOW_LAUNCH"  # the environment variable every process of a launch inherits


def marker(log_path: Path) -> Path:
    """Where a launch's token is kept while it runs: beside its log."""
    return log_path.with_name(log_path.name + ".token")


def launch_processes(token: str) -> dict[int, str]:
    """This user's live processes (but this one) whose environment holds LAUNCH_TOKEN=token, as
    {pid: cluster.process_key} (the key read before the environment, so a pid reused meanwhile does not match)."""
    entry, found = f"{LAUNCH_TOKEN}={token}".encode(), {}
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # no procfs: the launcher's own kill is all there is
        return found
    for proc in proc_dir.iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        key = cluster.process_key(int(proc.name))
        try:
            if entry in (proc / "environ").read_bytes().split(b"\0") and cluster.process_alive(key):
                found[int(proc.name)] = key
        except OSError:  # gone meanwhile, or another user's
            continue
    return found


def stop_launch(token: str, wait_s: float = 30.0) -> bool:
    """SIGKILL every process of the launch with this token and wait until each is gone (a dying process can hold
    its memory and ports a moment longer) and two scans in a row find none (a launcher may start a worker while
    it is being stopped). False, with the pids in a warning, if some still run after `wait_s`."""
    import logging
    import signal
    import time

    deadline, killed, empty = time.time() + wait_s, {}, 0
    while time.time() < deadline:
        found = launch_processes(token)
        for pid, key in found.items():
            if cluster.process_alive(key):  # the same process the scan matched, right before the signal
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        killed.update(found)
        killed = {pid: key for pid, key in killed.items() if cluster.process_alive(key)}
        empty = 0 if found or killed else empty + 1
        if empty >= 2:
            return True
        time.sleep(0.05)
    logging.getLogger(__name__).warning("accelerate launch %s: processes %s still run after %g s", token,
                                        sorted(killed), wait_s)
    return False


def stop_earlier_launch(log_path: Path) -> None:
    """Stop an earlier launch into the same job that still runs: one whose popflow was SIGKILLed (an OOM kill, say)
    never reached run_logged's `finally`, and a rerun would otherwise train the same part into the same folder
    beside it. Only processes that carry the earlier launch's token are touched."""
    import logging
    import re

    path = marker(log_path)
    token = path.read_text().strip() if path.is_file() else ""
    if re.fullmatch(r"[0-9a-f]{32}", token) and launch_processes(token):
        logging.getLogger(__name__).warning("stopping an earlier accelerate launch still running (log %s)", log_path)
        if not stop_launch(token):
            raise PopflowError(f"an earlier accelerate launch into {log_path.parent} still runs after SIGKILL "
                               f"(token {token} in its environment); stop it, then rerun")
    path.unlink(missing_ok=True)


def train_launched(ctx, method, seed: int, data: pa.Table, heldout: pa.Table, out_dir: Path
                   ) -> tuple[list[dict], np.ndarray, dict]:
    """train_one's result, computed by `train.accelerate.processes` processes under accelerate launch."""
    launch = ctx.config.train.accelerate
    check_launch(launch)
    job = out_dir.with_name(out_dir.name + ".job")
    job.mkdir(parents=True, exist_ok=True)
    stop_earlier_launch(job / "launch.log")  # before its input files are rewritten under it
    pq.write_table(data, job / "data.parquet")
    pq.write_table(heldout, job / "heldout.parquet")
    (job / "job.json").write_text(json.dumps({
        "data_dir": str(ctx.data_dir), "pipeline": ctx.pipeline, "run_id": ctx.run_id,
        "config": ctx.config.model_dump(mode="json"), "method": method.model_dump(mode="json"), "seed": seed,
        "out_dir": str(out_dir)}))
    (job / "result.json").unlink(missing_ok=True)
    returncode = run_logged(launch_command(launch, job), job / "launch.log",
                            {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
                            launch.timeout_s)
    if returncode != 0 or not (job / "result.json").is_file():
        tail = (job / "launch.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"accelerate launch of {out_dir.name} exited {returncode} (full log: {job / 'launch.log'}):"
                           f"\n{tail}")
    result = json.loads((job / "result.json").read_text())
    return result["curve"], np.asarray(result["heldout_h"], dtype=np.float64), result["stats"]


def runner(cfg):
    """How one method x seed trains: `train_one` in this process, or under `accelerate launch` when
    `train.accelerate` is set (then this process loads neither torch nor TRL)."""
    if cfg.accelerate:
        return train_launched
    from tasks.trainer import train_one

    return train_one


def main(job: Path) -> None:
    """One process of a launched job: train, and on the main process write result.json."""
    from popflow.config import PipelineConfig
    from popflow.config.train import Method
    from popflow.stage import RunContext
    from tasks.trainer import train_one

    spec = json.loads((job / "job.json").read_text())
    # The stage's config is the run's pinned one (a loop round's policy and reference set to model paths),
    # which the loop validator rightly refuses from a user; training reads no loop key, so it goes.
    ctx = RunContext(spec["data_dir"], spec["pipeline"], spec["run_id"],
                     PipelineConfig.model_validate(spec["config"] | {"loop": None}))
    curve, heldout_h, stats = train_one(ctx, Method.model_validate(spec["method"]), spec["seed"],
                                        pq.read_table(job / "data.parquet"), pq.read_table(job / "heldout.parquet"),
                                        Path(spec["out_dir"]))
    if int(os.environ.get("RANK", "0")) == 0:
        stats["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
        write_text(json.dumps({"curve": curve, "heldout_h": heldout_h.tolist(), "stats": stats}), job / "result.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
