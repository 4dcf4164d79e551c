"""The PoP stages end to end: imported UltraFeedback-shaped pairs -> annotate -> margins, under Prefect.

No model is loaded on this path, so these runs take seconds (plus Prefect's start-up).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # the real CLI end to end (Prefect, engines, training): make test-fast leaves these out

SOURCE = "data/pairs/ultrafeedback_small.jsonl"  # 12 prompts x 3 pairs, scores on a 1-10 scale
NO_TRAIN = ("--set", "train=null", "--set", "import_pairs.eval_fraction=0")  # every pair annotated, no training


def test_imported_pairs_through_annotate_and_margins(cli):
    run_id = cli.run_id(cli("run", "imported", *NO_TRAIN).stdout)
    q = cli.query
    assert q("select count(*), count(distinct pair_id), bool_and(strategy = 'imported') from pairs") == [
        (36, 36, True)]
    # conversations were split TRL-style: the user turn is the prompt, chosen/rejected keep the answer only
    assert q("select bool_and(len(prompt) = 1 and prompt[1].role = 'user' and len(chosen) = 1 "
             "and chosen[1].role = 'assistant' and rejected[1].role = 'assistant') from pairs") == [(True,)]
    # gt_margin in z-units of every imported score (import_pairs.normalize: zscore)
    records = [json.loads(line) for line in open(f"{cli.env['PYTHONPATH']}/{SOURCE}")]
    scores = [r[k] for r in records for k in ("score_chosen", "score_rejected")]
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    first = records[0]
    got = q(f"select gt_margin from pairs where pair_id = '{first['prompt_id']}|imported:0'")[0][0]
    assert got == pytest.approx((first["score_chosen"] - first["score_rejected"]) / std)
    # iterative, k = 2: every pair anchors exactly two comparisons
    assert q("select min(c), max(c) from (select pair_a, count(*) c from pop_labels group by pair_a)") == [(2, 2)]
    assert q("select count(*), count(distinct pair_id), min(copies) from train_pairs") == [(36, 36, 1)]
    assert q("select count(*), bool_and(margin between 0 and 1), method from margins group by method") == [
        (36, True, "pop")]
    manifest = json.loads((cli.data_dir / f"lake/_runs/pipeline=imported/run={run_id}/stages/margins.json")
                          .read_text())
    report = manifest["report"]["iterative"]
    assert report["spearman"] > 0.5 and report["uncompared_pairs"] == 0
    assert (cli.data_dir / f"lake/_runs/pipeline=imported/run={run_id}/margins_vs_gt.png").is_file()

    # rerun from annotate with random sampling: the import is reused, labels and margins are replaced
    out = cli("run", "imported", "--run-id", run_id, "--from-stage", "annotate", "--set", "annotate.sampling=random",
              "--set", "annotate.k=3", *NO_TRAIN)
    assert "import_pairs pairs=36 (already complete)" in " ".join(out.stdout.split())
    assert q("select count(*), min(sampling), max(sampling) from pop_labels") == [(108, "random", "random")]
    assert q("select min(train_on), sum(copies) from train_pairs") == [("pop_winners", 108)]

    # a kept stage may not silently change: margins alone cannot be rerun with another annotate config
    err = cli("run", "imported", "--run-id", run_id, "--from-stage", "margins", "--set", "annotate.k=4",
              *NO_TRAIN, expect=2).stderr
    assert "already has a 'annotate' stage made with a different config" in err


def test_pop_bad_input(cli, tmp_path):
    def fails(*sets, message):
        args = [a for s in sets for a in ("--set", s)]
        err = cli("run", "imported", *args, expect=2).stderr
        assert message in err, err

    fails("annotate.k=0", message="annotate.k: Input should be greater than or equal to 1")
    fails("annotate.p=0.5", message="annotate.p: Input should be less than 0.5")
    fails("annotate.noise=bradley_terry", "annotate.tau=0", message="annotate.tau: Input should be greater than 0")
    fails("annotate.k=36", "import_pairs.eval_fraction=0",
          message="annotate.k = 36 is larger than the 35 possible partner(s) in the dataset")
    fails(f"import_pairs.source={tmp_path}/missing.jsonl", message="does not exist")
    fails("import_pairs.columns.chosen_score=score_a",
          message="no column 'score_a' (import_pairs.columns.chosen_score)")
    broken = tmp_path / "no_scores.jsonl"
    broken.write_text("".join(
        json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad", "score_chosen": 2.0 if i else None,
                    "score_rejected": 1.0}) + "\n" for i in range(4)))
    fails(f"import_pairs.source={broken}", "import_pairs.columns.prompt_id=null",
          "import_pairs.eval_fraction=0",
          message="has no ground-truth margin (1 such pairs)")
    assert not (cli.data_dir / "lake" / "pop_labels").exists() and not (cli.data_dir / "lake" / "margins").exists()
