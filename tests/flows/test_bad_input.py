"""Bad input through the real CLI: refused before Prefect starts when it can be (names, config, sources,
model paths, reward functions: one line, exit 2, nothing written), and otherwise ended by the stage with
the same one line, without a traceback and without a retry."""

from __future__ import annotations

import json
import shutil

import pytest

from popflow.lake import Lake
from popflow.sql import lit
from tests.conftest import REPO
from tests.fixtures.lake import add_round

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out


def error_line(err: str) -> str:
    """The CLI's own line (Prefect's server logs may follow it); there is exactly one."""
    lines = [line for line in err.splitlines() if line.startswith("popflow: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def refused_before_prefect(cli, *args: str, message: str) -> None:
    """Exit 2 with exactly one line on stderr, no lake and no Prefect database (the server never started)."""
    err = cli("run", "tiny", *args, expect=2).stderr
    assert err.strip().splitlines() == [err.strip()], err
    assert err.startswith("popflow: error: ") and message in err, err
    assert not cli.data_dir.exists()
    assert not (cli.data_dir.parent / "prefect-home" / "prefect.db").exists()


@pytest.mark.own_prefect  # "before Prefect starts" is checked by the temporary server's database never appearing
def test_preflight_refuses_bad_input_before_prefect_starts(cli, tmp_path):
    refused_before_prefect(cli, "--set", "sample.temprature=1.0", message="sample.temprature: unknown key")
    refused_before_prefect(cli, "--set", "sample.n=1", message="sample.n: Input should be greater than or equal")
    refused_before_prefect(cli, "--run-id", "../../escape", message="--run-id '../../escape' is not a valid name")
    config = tmp_path / "mine.yaml"
    config.write_text("'../x':\n  seed: 1\n")
    refused_before_prefect(cli, "--config", str(config),
                           message=f"{config}:1: pipeline '../x' is not a valid name")
    missing = tmp_path / "missing.jsonl"
    refused_before_prefect(cli, "--set", f"prompts.source={missing}",
                           message=f"prompts.source: file {str(missing)!r} does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": "hi"}\n{"prompt_id": "b", "prompt": \n')
    refused_before_prefect(cli, "--set", f"prompts.source={bad}", message=f"{bad}:2: malformed JSON")
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"prompt_id": "a", "prompt": "hi"}\n{"prompt_id": "a", "prompt": "again"}\n')
    refused_before_prefect(cli, "--set", f"prompts.source={dup}",
                           message=f"{dup}:2: duplicate prompt_id 'a' (first seen at {dup}:1)")
    refused_before_prefect(cli, "--set", f"sample.policy={tmp_path}/nowhere",
                           message="sample.policy: model path")
    refused_before_prefect(cli, "--set", "score.models=[{name: mine, kind: python, function: 'no_such:f'}]",
                           message="score.models[mine].function: cannot import module 'no_such'")
    train_only = tmp_path / "train_only.jsonl"
    train_only.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": "hi", "split": "train"}) + "\n"
                                  for i in range(3)))
    refused_before_prefect(cli, "--set", f"prompts.source={train_only}",
                           message="no held-out prompt (split: eval) after prompts.eval_limit")
    err = cli("run", "tiny_loop", "--set", "loop.gate.min_prompts=5", expect=2).stderr  # tiny_loop: 3 held out
    assert err.strip() == ("popflow: error: prompts.eval_limit 3 < loop.gate.min_prompts 5: the gate would never "
                           "promote; give it more held-out prompts or lower loop.gate.min_prompts"), err
    assert not cli.data_dir.exists()


def test_sql_reads_the_lake_and_writes_nothing(cli, tmp_path):
    """`popflow sql` runs queries only (COPY, ATTACH, SET refused by statement type, exit 2) and its connection
    reads no file outside the lake; `policies` of a pipeline without runs names it."""
    add_round(Lake(cli.data_dir), "tiny_loop", 1, "r1", promoted=False)
    assert "tiny_loop" in cli("sql", "select pipeline from lineage").stdout
    assert "1" in cli("sql", "pivot (select round, pipeline from lineage) on pipeline using count(*)").stdout
    out = tmp_path / "out.csv"
    lake_file = cli.data_dir / "lake" / "evil.csv"
    for query, message in ((f"copy (select 1) to '{out}'", "got a COPY statement"),
                           (f"explain analyze copy (select 1) to {lit(str(lake_file))}", "EXPLAIN ANALYZE runs"),
                           (f"attach '{tmp_path}/x.db'", "got a ATTACH statement"),
                           ("set enable_external_access = true", "got a SET statement"),
                           ("select * from read_csv('/etc/passwd')", "file system operations are disabled")):
        assert message in error_line(cli("sql", query, expect=2).stderr)
    assert not out.exists() and not (tmp_path / "x.db").exists() and not lake_file.exists()
    cli("sql", "explain select count(*) from lineage")  # a query's plan: allowed
    assert error_line(cli("policies", "nope", expect=2).stderr) == (
        f"popflow: error: pipeline 'nope' has no runs in {cli.data_dir / 'lake'}; pipelines with runs: tiny_loop")


@pytest.mark.own_prefect  # reads the task runs from the server's database
def test_a_bad_reward_function_fails_once_in_one_line(cli):
    """A user function returning strings: exit 2, the reward model and the first bad sample named, no
    traceback, the score task not retried (it retries transient errors only), sampling kept for a resume."""
    models = "score.models=[{name: mine, kind: python, function: 'tests.fixtures.rewards:string_reward'}]"
    err = cli("run", "tiny", "--set", "sample.engine=transformers", "--set", models, expect=2).stderr
    assert error_line(err).startswith(
        "popflow: error: reward model 'mine': tests.fixtures.rewards:string_reward returned 'good' (str), "
        "not a number for prompt_id=")
    assert "Traceback" not in err and "NoneType: None" not in err
    assert cli.prefect_db("select run_count from task_run where name like 'score-%'") == [(1,)]
    assert (cli.data_dir / "lake" / "samples").is_dir() and not (cli.data_dir / "lake" / "rewards").exists()
    assert cli.query("select status from runs") == [("failed",)]


def long_prompt_file(tmp_path, words: int) -> str:
    """The demo prompts behind two that no context of the tiny model holds: one train, one eval."""
    records = [json.loads(line) for line in (REPO / "data/prompts/demo.jsonl").read_text().splitlines()]
    long = [{"prompt_id": f"long {split}", "prompt": "word " * words, "split": split} for split in ("train", "eval")]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in long + records))
    return str(path)


@pytest.mark.slow
def test_long_prompts_are_skipped_and_counted_or_fail_by_name(cli, tmp_path):
    """tiny takes the first 6 train and 3 eval prompts: the long ones and 5 + 2 demo prompts. skip (the
    default): the run completes on the others, skipped_prompts lists both, evaluate drops the eval one.
    fail: the sample stage stops before the engine starts, naming the first (train prompts come first)."""
    source = ("--set", f"prompts.source={long_prompt_file(tmp_path, 2100)}")  # > 2048 tokens: transformers' context
    out = cli("run", "tiny", "--set", "sample.engine=transformers", *source)
    run_id = cli.run_id(out.stdout)
    assert cli.query("select prompt_id, tokens > 2048 - 12, context from skipped_prompts order by 1") == [
        ("long eval", True, 2048), ("long train", True, 2048)]
    assert cli.query("select count(distinct prompt_id), count(*) filter (prompt_id like 'long%') from samples") == [
        (7, 0)]
    stages = {s: json.loads(r) for s, r in cli.query("select stage, to_json(report) from stages")}
    assert stages["sample"]["skipped_prompts"] == 2 and stages["sample"]["skipped_ids"] == ["long train", "long eval"]
    assert stages["evaluate"]["skipped_prompts"] == 1 and stages["evaluate"]["eval_prompts"] == 2
    assert cli.query(f"select status from runs where run_id = '{run_id}'") == [("completed",)]

    err = cli("run", "tiny", "--set", "sample.long_prompts=fail", "--set", "train=null", *source, expect=2).stderr
    assert error_line(err).startswith("popflow: error: sample: prompt_id 'long train' is ")
    assert "which leaves no room for sample.max_tokens=12 in the context of 512" in err


@pytest.mark.own_prefect  # as above
def test_promoted_references_that_cannot_resolve_stop_before_prefect(cli):
    """An unknown pipeline behind promoted:, and a loop whose promoted head has gone: one line naming the
    policy and the run that made it, exit 2, no Prefect database, no new run."""
    refused_before_prefect(cli, "--set", "sample.policy=promoted:nope",
                           message="sample.policy 'promoted:nope': no pipeline named 'nope'")
    lake = Lake(cli.data_dir)
    row = add_round(lake, "tiny_loop", 1, "20261125T020000Z-abc123", promoted=True)
    shutil.rmtree(row["promoted_path"])
    err = cli("run", "tiny_loop", expect=2).stderr
    assert err.strip() == (f"popflow: error: the promoted policy of 'tiny_loop' round 1 (dpo_pop-s0, made by run "
                           f"20261125T020000Z-abc123) is gone: {row['promoted_path']} does not hold a model "
                           "(deleted, or the data dir moved); restore it, or start the chain again with a new "
                           "pipeline name"), err
    assert not (cli.data_dir.parent / "prefect-home" / "prefect.db").exists()
    assert [p.name for p in (lake.root / "_runs" / "pipeline=tiny_loop").iterdir()] == ["run=" + row["run_id"]]
