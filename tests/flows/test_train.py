"""Train, evaluate and the experiment flow on the `tiny` pipeline (transformers engine: no vLLM start-up),
and the training stage's bad inputs on the imported pairs with the tiny model. Real TRL, peft, Prefect."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import REPO
from tests.flows.test_pipeline import check_trained

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

TINY = ("--set", "sample.engine=transformers")
IMPORTED = ("--set", "train.policy=builtin:tiny-llama", "--set", "train.max_length=256")


@pytest.mark.slow
def test_train_reuses_stored_reference_logps_and_checks_them(cli, tmp_path):
    run_id = cli.run_id(cli("run", "tiny", *TINY).stdout)
    check_trained(cli, run_id)
    ref_part = next((cli.data_dir / "lake" / "ref_logps").rglob("*.parquet"))
    before = ref_part.stat().st_mtime_ns

    # other methods on the same run: the stored reference log-probs are reused, not recomputed
    methods = "train.methods=[{loss: dpo}, {loss: distill_pessimistic}, {loss: ipo}]"
    out = cli("run", "tiny", *TINY, "--run-id", run_id, "--from-stage", "train", "--set", methods)
    summary = [line.split() for line in out.stdout.splitlines() if line.startswith("  ")]
    stages = {line[0]: line[1:] for line in summary}
    assert stages["ref_logps"][-2:] == ["(already", "complete)"] and "(already" not in stages["train"]
    assert ref_part.stat().st_mtime_ns == before
    check_trained(cli, run_id, ("distill_pessimistic", "dpo", "ipo"))
    assert cli.query("select loss_type from policies where method = 'ipo'") == [("ipo",)]  # TRL's own loss

    # a reference other than the one the stored log-probs came from is refused, naming the way out
    other = tmp_path / "other-ref"
    shutil.copytree(REPO / "data" / "models" / "tiny-llama", other)
    err = cli("run", "tiny", *TINY, "--run-id", run_id, "--from-stage", "train", "--set", f"train.reference={other}",
              expect=2).stderr
    assert "does not match run" in err and "--from-stage ref_logps" in err
    # (a train.trl the stored log-probs were not computed with: tests/tasks/test_stage_sql.py)


@pytest.mark.slow
def test_experiment_writes_the_comparison_table(cli):
    methods = ("experiment.methods=[{loss: dpo}, {loss: dpo_pop}, {loss: dpo_pop, sampling: random}, "
               "{loss: dpo, pairs: max_min}]")
    out = cli("experiment", "tiny", *TINY, "--set", methods, "--set", "experiment.seeds=[0, 1]")
    run_id = out.stdout.split("experiment run ")[1].split()[0]
    rows = cli.query(f"select method, metric, seeds, low <= mean and mean <= high from comparison "
                     f"where run_id = '{run_id}' order by all")
    assert {r[0] for r in rows} == {"base", "dpo", "dpo_pop", "dpo_pop_random", "dpo_max_min_pairs"}
    assert {(r[1], r[2]) for r in rows if r[0] == "dpo_pop_random"} == {
        (m, 2) for m in ("accuracy", "constraint_rate", "constraint_gain", "mean_reward", "pearson", "spearman",
                         "win_rate", "win_rate_vs_dpo")}
    # seeds pooled prompt by prompt: an interval around the mean for these, none for the others
    assert {r[1] for r in rows if r[0] == "dpo_pop" and r[3]} == {"accuracy", "constraint_gain", "win_rate",
                                                                  "win_rate_vs_dpo"}
    # both PoP samplings were annotated in the one run, and the random one trained on its own composition
    assert cli.query(f"select sampling, min(train_on) from train_pairs where run_id = '{run_id}' group by 1 "
                     "order by 1") == [("iterative", "all_pairs"), ("random", "pop_winners")]
    run_dir = cli.data_dir / "lake" / "_runs" / "pipeline=tiny" / f"run={run_id}"
    assert (run_dir / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| dpo_pop_random |" in (run_dir / "comparison.md").read_text()
    # dpo_max_min_pairs trained on max_min's train pairs, each once, and was measured on the annotated held-out pairs
    assert cli.query(f"select count(*) from train_metrics where run_id = '{run_id}' "
                     "and method = 'dpo_max_min_pairs'")[0][0] > 0
    assert cli.query(f"select count(distinct strategy) from ref_logps r join pairs p using (pair_id, run_id) "
                     f"where run_id = '{run_id}'") == [(2,)]
    assert cli.query(f"select distinct p.strategy from heldout_margins h join pairs p using (pair_id, run_id) "
                     f"where run_id = '{run_id}'") == [("seven_point",)]
    # without training: the PoP sweep (k 1, 2, 4 as the tiny run's pairs allow; 10 draws each)
    sweep = cli.query(f"select sampling, k, count(*) from pop_sweep where run_id = '{run_id}' "
                      "group by all order by all")
    assert sweep and {r[0] for r in sweep} == {"iterative", "random"} and all(r[2] == 10 for r in sweep)
    assert (run_dir / "pop_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_train_bad_input_fails_clearly_and_writes_nothing(cli, tmp_path):
    def fails(*sets: str, message: str) -> None:
        err = cli("run", "imported", *IMPORTED, *[a for s in sets for a in ("--set", s)], expect=2).stderr
        assert message in err, err[-3000:]

    fails("train.methods=[{loss: distill_pessimistic}]", message="needs at least two in score.models")
    fails("train.methods=[{loss: dpo_typo}]", message="unknown loss 'dpo_typo'")
    fails("train.trl={beta: 0.5}", message="beta: set by popflow")
    fails("train.max_length=16", "train.long_prompts=reject", message="its prompt fills train.max_length=16")
    assert not (cli.data_dir / "lake" / "ref_logps").exists()
    fails("margins.method=gt", message="dpo_pop needs PoP margins, and run")
    assert not (cli.data_dir / "lake" / "train_metrics").exists()
    fails("train.max_length=16", message="set is empty: no pair's prompt fits max_length=16")  # all dropped
    assert not (cli.data_dir / "lake" / "train_metrics").exists()

    no_template = tmp_path / "no-template"
    shutil.copytree(REPO / "data" / "models" / "tiny-llama", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    fails(f"train.policy={no_template}", message="the tokenizer has no chat template")
    # four runs started and failed; the three config errors never started one
    assert cli.query("select count(*) filter (status = 'failed'), count(*) from runs") == [(4, 4)]
