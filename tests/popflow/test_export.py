"""`popflow export` (popflow/export.py): a run's pairs as a Hugging Face dataset folder with its card, on the small
lake of tests/fixtures/lake.py (values by hand there), loaded by `datasets` and trained one step by stock TRL."""

from __future__ import annotations

import pytest
import yaml

from popflow.errors import PopflowError
from popflow.export import export, push, size_category
from popflow.models import resolve
from tests.conftest import REPO
from tests.fixtures.lake import E1, P1, P2, A, B, C, D, small_lake


def exported_run(tmp_path, status: str = "completed"):
    """The small lake with a run record (round 2 of a loop: it sampled with seed sample.seed + 1 = 1, which its
    sample manifest records and its config does not) and the sample stage's manifest."""
    ctx = small_lake(tmp_path)
    policy = resolve("builtin:tiny-llama", REPO / "data", "sample.policy").identity()
    ctx.lake.write_run("tiny", "r1", {"pipeline": "tiny", "run_id": "r1", "status": status, "config_hash": "abc",
                                      "config": ctx.config.model_dump(mode="json"), "pins": {"loop": {"round": 2}},
                                      "started_at": "2026-11-29T00:00:00+00:00"})
    ctx.lake.write_manifest("tiny", "r1", "sample", {"models": {"policy": policy}, "report": {
        "n": 4, "sampling": {"temperature": 0.8, "top_p": 1.0, "max_tokens": 12, "seed": 1}}})
    return ctx


def test_an_export_loads_with_datasets_and_keeps_every_pair_and_its_provenance(tmp_path):
    """The seven-point pairs (the strategy tiny trains on): A and B are train pairs, C the held-out one; D
    (max_min) is another strategy, left out. score_chosen / score_rejected are the pairs' rewards (A: samples 0
    and 1 of it's 1, 1.0 and 2.0), reward_margin their difference (-1.0), the per-model raw scores come from
    `rewards` (A chosen: a 3.0, b 1.0), pop_margin from the first annotate.sampling's margins (iterative: A 0.25,
    B 0.75; none for the held-out C), and every row and the card say its run, round, policy and sampling (the
    seed its sample stage used). The card's YAML header names the splits' files and the licence; the chat
    template is the policy's."""
    import datasets

    ctx = exported_run(tmp_path)
    out = export(ctx.lake, ctx.config, "tiny", None, None, tmp_path / "ds")
    assert out == {"run_id": "r1", "strategy": "seven_point", "splits": {"train": 2, "test": 1},
                   "folder": str(tmp_path / "ds")}
    ds = datasets.load_dataset(str(tmp_path / "ds"))
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 2, "test": 1}
    rows = {r["pair_id"]: r for split in ds.values() for r in split}
    assert set(rows) == {A, B, C} and D not in rows
    a = rows[A]
    assert a["prompt"] == [{"role": "user", "content": f"question {P1}"}]
    assert a["chosen"] == [{"role": "assistant", "content": f"answer {P1} #0"}]
    assert (a["score_chosen"], a["score_rejected"], a["reward_margin"]) == (1.0, 2.0, -1.0)
    assert a["chosen_scores"] == {"a": 3.0, "b": 1.0} and a["rejected_scores"] == {"a": 1.0, "b": 2.0}
    assert (a["pop_margin"], rows[B]["pop_margin"], rows[C]["pop_margin"]) == (0.25, 0.75, None)
    assert rows[B]["prompt_id"] == P2 and rows[C]["prompt_id"] == E1
    assert (a["chosen_point"], a["rejected_point"], a["strategy"]) == ("max", "mu-2sigma", "seven_point")
    assert (a["pipeline"], a["run_id"], a["round"], a["policy"]) == ("tiny", "r1", 2, "builtin:tiny-llama")
    assert a["policy_fingerprint"].startswith("sha256:")
    assert a["sampling"] == {"temperature": 0.8, "top_p": 1.0, "max_tokens": 12, "n": 4, "seed": 1}
    text = (tmp_path / "ds" / "README.md").read_text()
    assert ctx.config.sample.seed == 0 and ", seed 1" in text  # the seed the round sampled with, not the config's
    header = yaml.safe_load(text.split("---")[1])
    assert header["license"] == "other" and {"dpo", "trl"} <= set(header["tags"])
    fp = next((tmp_path / "ds" / "data").glob("train-*")).name.split("-")[1]
    assert header["configs"] == [{"config_name": "default", "data_files": [
        {"split": "train", "path": f"data/train-{fp}-*"}, {"split": "test", "path": f"data/test-{fp}-*"}]}]
    assert header["size_categories"] == ["n<1K"] and "| train | 2 |" in text
    assert "{%" in (tmp_path / "ds" / "chat_template.jinja").read_text()


def test_a_re_export_to_the_same_folder_loads_the_new_rows(tmp_path):
    """`datasets` caches a folder by its name and its card's `configs:`, not by its files: the data files'
    fingerprint in both is what makes a re-export (here the max_min pair D in place of A, B and C) load as itself
    rather than as the rows cached from the first export (one cache for both loads, as on a user's machine)."""
    import datasets

    ctx = exported_run(tmp_path)
    cache = str(tmp_path / "hf-cache")
    export(ctx.lake, ctx.config, "tiny", "r1", None, tmp_path / "ds")
    first = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=cache)
    assert sorted(r["pair_id"] for split in first.values() for r in split) == sorted([A, B, C])
    export(ctx.lake, ctx.config, "tiny", "r1", "max_min", tmp_path / "ds", force=True)
    again = datasets.load_dataset(str(tmp_path / "ds"), cache_dir=cache)
    assert [r["pair_id"] for split in again.values() for r in split] == [D]
    assert len(list((tmp_path / "ds" / "data").iterdir())) == 1


@pytest.mark.slow  # a TRL training step
def test_the_exported_folder_trains_one_step_of_stock_trl(tmp_path):
    """TRL's own DPOTrainer (no popflow subclass, no column mapping) takes the exported train split as it is and
    takes one optimiser step on the tiny Llama: its loss is finite and the LoRA-free weights moved."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ctx = exported_run(tmp_path)
    export(ctx.lake, ctx.config, "tiny", "r1", None, tmp_path / "ds")
    train = datasets.load_dataset(str(tmp_path / "ds"), split="train")
    path = resolve("builtin:tiny-llama", REPO / "data", "train.policy").path
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    before = [p.detach().clone() for p in model.parameters()]
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     logging_steps=1, save_strategy="no", use_cpu=True, learning_rate=1e-3)
    trainer = DPOTrainer(model, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))


def test_bad_exports_fail_with_one_line(tmp_path, monkeypatch):
    """A failed run, an unknown strategy, a non-empty --to without --force: one line each and nothing written;
    --force replaces the folder. A push without the network names the repo and keeps the folder."""
    ctx = exported_run(tmp_path, status="failed")
    with pytest.raises(PopflowError, match="run r1 of 'tiny' is failed, not completed"):
        export(ctx.lake, ctx.config, "tiny", "r1", None, tmp_path / "ds")
    with pytest.raises(PopflowError, match="no completed run"):
        export(ctx.lake, ctx.config, "tiny", None, None, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
    ctx = exported_run(tmp_path / "ok")
    with pytest.raises(PopflowError, match=r"--strategy 'random': run r1 has pairs of max_min, seven_point"):
        export(ctx.lake, ctx.config, "tiny", "r1", "random", tmp_path / "ds")
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mine.txt").write_text("keep")
    with pytest.raises(PopflowError, match="exists and is not empty"):
        export(ctx.lake, ctx.config, "tiny", "r1", "max_min", tmp_path / "ds")
    assert export(ctx.lake, ctx.config, "tiny", "r1", "max_min", tmp_path / "ds", force=True)["splits"] == {"train": 1}
    assert not (tmp_path / "ds" / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds-")] == []  # no temporary folder left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PopflowError, match=r"--hub you/pairs: could not push .*OfflineModeIsEnabled"):
        push(tmp_path / "ds", "you/pairs")
    assert (tmp_path / "ds" / "README.md").is_file()


def test_size_categories_by_hand():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10_000, 999_999, 10**6)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "n>1M"]


def test_only_the_runs_own_pop_margins_and_pairs_are_exported(tmp_path, monkeypatch):
    """pop_margin is a margin inferred from PoP labels only (margins.method pop): a `gt` baseline's margins leave
    it null. A loop round's earlier rounds' pairs (loop.pairs: all, staged beside its own part-00000 with ids
    r<k>/...) were sampled by other policies: they are not this run's to export. The current folder, or one
    above it, is never an export target."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from popflow.stage import with_run_columns

    ctx = exported_run(tmp_path)
    ctx.lake.drop_table("margins", "tiny", "r1")  # the fixture's PoP margins, replaced by a gt baseline's
    ctx.lake.write_table("margins", "tiny", "r1", with_run_columns(ctx, pa.Table.from_pylist([
        {"pair_id": A, "margin": 0.25, "sampling": "iterative", "method": "gt"}])))
    earlier = pa.Table.from_pylist([{"pair_id": f"r1/{A}", "prompt_id": P1, "split": "train", "strategy": "seven_point",
                                     "prompt": [{"role": "user", "content": "old"}]}])
    partition = ctx.lake.partition("pairs", "tiny", "r1")
    pq.write_table(earlier, partition / "part-r00001.parquet")
    export(ctx.lake, ctx.config, "tiny", "r1", None, tmp_path / "ds")
    train = pq.read_table(next((tmp_path / "ds" / "data").glob("train-*-00000-of-00001.parquet")))
    rows = {r["pair_id"]: r for r in train.to_pylist()}
    assert set(rows) == {A, B} and rows[A]["pop_margin"] is None
    monkeypatch.chdir(tmp_path / "ds")
    for here in (".", ".."):
        with pytest.raises(PopflowError, match="holds the current folder or the data dir"):
            export(ctx.lake, ctx.config, "tiny", "r1", None, tmp_path / "ds" / here, force=True)
    assert (tmp_path / "ds" / "README.md").is_file()
