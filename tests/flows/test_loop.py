"""The on-policy loop end to end: `popflow loop` on tiny_loop, real engines, Prefect, TRL and the lake.

tiny_loop samples 6 train + 3 eval prompts x n = 4 per round and compares the candidate on the 3 eval prompts
x evaluate.n = 2, so its gate sees 6 comparisons. `loop.gate.min_win_rate` null opens the gate (every candidate
is promoted) and 1 promotes none (a bound is never above 1), which makes both paths deterministic on random tiny
weights.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from popflow.models import fingerprint
from tasks.promote import content_hash

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

PROMPTS, N = 6 + 3, 4
ALWAYS = ("--set", "loop.gate.min_win_rate=null")
NEVER = ("--set", "loop.gate.min_win_rate=1")
TRANSFORMERS = ("--set", "sample.engine=transformers")


def lineage(cli) -> list[dict]:
    cols = ("round", "run_id", "parent_round", "parent_path", "reference_kind", "reference_path", "promoted",
            "promoted_path", "promoted_fingerprint", "content_hash", "comparisons", "method", "seed", "reason")
    rows = cli.query(f"select {', '.join(cols)} from lineage order by round")
    return [dict(zip(cols, r, strict=True)) for r in rows]


def sampled_policy(cli, run_id: str) -> list[str]:
    return [r[0] for r in cli.query(f"select distinct policy from samples where run_id = '{run_id}'")]


@pytest.mark.slow
def test_two_rounds_round_two_samples_round_one_with_vllm(cli):
    """Round 1 promotes (gate always passes) a merged copy of its LoRA candidate; round 2's vLLM samples carry
    that copy's path and fingerprint, and (reference previous) its reference log-probs come from it too.
    Asking for 2 rounds again finds the chain complete and runs nothing."""
    out = cli("loop", "tiny_loop", "--rounds", "2", *ALWAYS, "--set", "loop.reference=previous").stdout
    assert "loop tiny_loop: 2 rounds" in out
    first, second = lineage(cli)
    assert (first["round"], second["round"], first["parent_round"], second["parent_round"]) == (1, 2, 0, 1)
    assert first["promoted"] and second["promoted"] and first["comparisons"] == 3 * 2
    promoted = Path(first["promoted_path"])
    assert (promoted / "config.json").is_file() and not (promoted / "adapter_config.json").exists()  # merged
    assert fingerprint(promoted) == first["promoted_fingerprint"] and content_hash(promoted) == first["content_hash"]
    assert sampled_policy(cli, first["run_id"]) == ["builtin:tiny-llama"]
    assert sampled_policy(cli, second["run_id"]) == [str(promoted)]
    assert second["parent_path"] == str(promoted) == second["reference_path"]
    assert (first["reference_kind"], second["reference_kind"]) == ("previous", "previous")
    manifest = json.loads((cli.data_dir / f"lake/_runs/pipeline=tiny_loop/run={second['run_id']}/stages/"
                           "sample.json").read_text())
    assert manifest["models"]["policy"]["fingerprint"] == first["promoted_fingerprint"]
    assert manifest["report"]["engine"] == "vllm"
    refs = cli.query(f"select distinct reference, ref_fingerprint from ref_logps where run_id = '{second['run_id']}'")
    assert refs == [(str(promoted), first["promoted_fingerprint"])]
    assert cli.query("select round from policy_chain order by round") == [(1,), (2,)]
    record = json.loads((cli.data_dir / f"lake/_runs/pipeline=tiny_loop/run={second['run_id']}/run.json").read_text())
    assert record["pins"]["sample.policy"]["content_hash"] == first["content_hash"]
    assert (cli.data_dir / f"lake/_runs/pipeline=tiny_loop/run={second['run_id']}/loop_rounds.png").stat().st_size
    again = cli("loop", "tiny_loop", "--rounds", "2", *ALWAYS, "--set", "loop.reference=previous").stdout
    assert "loop tiny_loop: 2 rounds" in again
    assert cli.query("select count(*) from runs") == [(2,)]
    policies = cli("policies", "tiny_loop").stdout
    assert "round 1" in policies and "previous" in policies

    # round 2 sampled round 1's promoted policy: regating round 1 is refused before anything runs (a retrained
    # round's promoted folder is rebuilt, never reused: tests/tasks/test_promote.py)
    again = ("run", "tiny_loop", *ALWAYS, "--set", "loop.reference=previous")
    err = cli(*again, "--run-id", first["run_id"], "--from-stage", "train", expect=2).stderr
    assert f"later runs pinned (tiny_loop/{second['run_id']})" in err
    marker = json.loads((promoted / "popflow_candidate.json").read_text())
    assert marker["fingerprint"] == fingerprint(Path(marker["candidate"]))


@pytest.mark.slow
def test_a_failed_gate_keeps_the_base_and_a_killed_round_resumes_once(cli):
    """The gate always fails: nothing is promoted and round 2 samples the base again, against the initial
    reference. Round 2 is SIGKILLed (CLI, Prefect and the sampler together) once a shard is staged; the same
    command resumes that run from its staged shards: one run and one lineage row per round, exact counts.
    Round 2 also trains on round 1's pairs (loop.pairs: all)."""
    # round 1 trains through accelerate launch (two gloo processes) on the round's pinned config
    cli("loop", "tiny_loop", *NEVER, *TRANSFORMERS, "--set", "train.accelerate={processes: 2, config: ddp}",
        "--set", "loop.gate.guard=[constraints, relevance]", "--rounds", "1")
    assert cli.query("select processes from policies") == [(2,)]
    # the guard read each reward model's per-prompt differences on the gate's sample pairs: its verdict in the
    # reason matches the one-sided 95% t upper bound recomputed here from the lake's scores
    from scipy.stats import t

    (one,) = lineage(cli)
    for model in ("constraints", "relevance"):
        value = "case when e.kind = 'constraints' then (e.score >= 1)::double else e.score end"
        cur = value.replace("e.", "r.")
        diffs = [d for (d,) in cli.query(
            f"select avg({value} - {cur}) from eval_rewards e join rewards r using (run_id, prompt_id, sample_idx, "
            f"reward_model) where e.method = '{one['method']}' and e.seed = {one['seed']} and e.reward_model = "
            f"'{model}' group by e.prompt_id")]
        assert len(diffs) == 3  # tiny_loop's held-out prompts
        sd = (sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2) ** 0.5
        upper = sum(diffs) / 3 + t.ppf(0.95, 2) * sd / 3 ** 0.5
        assert (f"{model} worse than the current policy" in one["reason"]) == (upper < 0), (model, upper, one)
    assert one["reason"].startswith("win rate lower bound")
    # round 2 (a round may change the config: the chain only links policies): 19 one-prompt shards, and it
    # trains on round 1's pairs too
    args = ("loop", "tiny_loop", *NEVER, *TRANSFORMERS, "--set", "prompts.limit=16", "--set", "sample.shard_size=1",
            "--set", "sample.max_tokens=48", "--set", "loop.pairs=all")
    staging = cli.data_dir / "lake" / "_staging" / "samples" / "pipeline=tiny_loop"
    proc = cli.popen(*args, "--rounds", "2")
    deadline = time.time() + 600
    while not list(staging.glob("run=*/shard-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = list(staging.glob("run=*/shard-*.parquet"))
    prompts = 16 + 3
    assert 1 <= len(staged) < prompts, "the kill did not land during round 2's sampling"
    killed_run = staged[0].parent.name.removeprefix("run=")

    out = cli(*args, "--rounds", "2").stdout
    assert "loop tiny_loop: 2 rounds" in out
    rows = lineage(cli)
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["run_id"] == killed_run
    assert cli.query("select count(*) from runs") == [(2,)]
    assert not any(r["promoted"] for r in rows) and cli.query("select count(*) from policy_chain") == [(0,)]
    assert sampled_policy(cli, killed_run) == ["builtin:tiny-llama"]
    assert [r["reference_path"] for r in rows] == ["builtin:tiny-llama"] * 2
    assert [r["reference_kind"] for r in rows] == ["initial"] * 2
    assert cli.query(f"select count(*), count(distinct (prompt_id, sample_idx)) from samples "
                     f"where run_id = '{killed_run}'") == [(prompts * N, prompts * N)]
    manifest = json.loads((cli.data_dir / f"lake/_runs/pipeline=tiny_loop/run={killed_run}/stages/sample.json"
                           ).read_text())
    assert manifest["report"]["resumed_shards"] == len(staged)
    assert not (cli.data_dir / "models" / "promoted").exists()
    # loop.pairs: all: round 1's own pairs joined round 2's, ids prefixed r1/, rewards on round 2's scale (those
    # no longer ordered there dropped and counted), and went on to annotation
    first_run = rows[0]["run_id"]
    own = cli.query(f"select count(*) from pairs where run_id = '{first_run}'")[0][0]
    report = json.loads((cli.data_dir / f"lake/_runs/pipeline=tiny_loop/run={killed_run}/stages/pair.json"
                         ).read_text())["report"]["earlier_rounds"]["round 1"]
    joined = cli.query(f"select count(*), bool_and(gt_margin > 0), "
                       f"bool_and(abs(gt_margin - (chosen_reward - rejected_reward)) < 1e-9) from pairs "
                       f"where run_id = '{killed_run}' and pair_id like 'r1/%'")
    assert own > 0 and joined == [(report["kept"], True, True)] and report["kept"] + report["dropped"] == own
    assert cli.query("select pair_runs, pairs from lineage where round = 2") == [([killed_run, first_run], "all")]
    annotated = cli.query(f"select count(*) from pairs where run_id = '{killed_run}' and pair_id like 'r1/%' "
                          "and strategy = 'seven_point'")
    assert cli.query(f"select count(*) from ref_logps where run_id = '{killed_run}' and pair_id like 'r1/%'"
                     ) == annotated
