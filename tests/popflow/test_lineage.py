"""Policy lineage and pinning (popflow/lineage.py) on a lake built by hand: no model, no Prefect.

A "promoted policy" here is a folder with a config.json and a weights file: what the fingerprint reads.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.lineage import complete_rounds, head, head_run, pin, unfinished_round
from popflow.runs import runs_to_prune, start_run
from tests.fixtures.lake import add_round


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "data")


def loop_cfg(*sets: str):
    return load_pipeline("tiny_loop", overrides=list(sets))


def test_a_new_chain_samples_its_base_and_counts_complete_rounds_only(lake):
    """No round yet: round 1 samples sample.policy; a round whose promote stage never finished does not count."""
    cfg, pins = pin(loop_cfg(), "tiny_loop", lake, None, None)
    assert cfg.sample.policy == "builtin:tiny-llama" == pins["train.reference"]["path"]
    assert pins["loop"]["round"] == 1 and pins["sample.policy"]["round"] == 0
    add_round(lake, "tiny_loop", 1, "r1", promoted=True, complete=False)
    assert complete_rounds(lake, "tiny_loop") == [] and pin(loop_cfg(), "tiny_loop", lake, None, None)[1][
        "loop"]["round"] == 1


def test_round_k_samples_the_head_with_the_chosen_reference(lake):
    """Rounds 1 (promoted), 2 (gate failed): round 3 samples round 1's policy; its reference is the base
    under `initial`, round 1's policy under `previous`; the trained policy follows the sampled one. Round 3
    retries the policy round 2 sampled, so it samples with its own seed (sample.seed 5: 5 + 3 - 1 = 7; round
    1 would have 5): the same seed would repeat round 2's samples, candidate and failed gate bit for bit. A
    round pinned before rounds had their own seeds (no seed_offset in its pins) resumes with sample.seed, the
    seed its stages' hashes were made with."""
    first = add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    add_round(lake, "tiny_loop", 2, "r2", promoted=False)
    assert head(complete_rounds(lake, "tiny_loop"))["run_id"] == "r1" == head_run(lake, "tiny_loop")
    cfg, pins = pin(loop_cfg(), "tiny_loop", lake, None, None)
    assert pins["loop"]["round"] == 3
    seeded, pins = pin(loop_cfg("sample.seed=5"), "tiny_loop", lake, None, None)
    assert seeded.sample.seed == 7 and pins["loop"]["seed_offset"] == 2
    old = {**pins, "loop": {k: v for k, v in pins["loop"].items() if k != "seed_offset"}}
    assert pin(loop_cfg("sample.seed=5"), "tiny_loop", lake, {"pins": old}, None)[0].sample.seed == 5
    assert cfg.sample.policy == first["promoted_path"] and cfg.train_policy() == first["promoted_path"]
    assert pins["sample.policy"]["run_id"] == "r1" and pins["sample.policy"]["round"] == 1
    assert pins["sample.policy"]["content_hash"] == first["content_hash"]
    assert cfg.reference_policy() == "builtin:tiny-llama" and pins["train.reference"]["round"] == 0
    cfg, pins = pin(loop_cfg("loop.reference=previous"), "tiny_loop", lake, None, None)
    assert cfg.reference_policy() == first["promoted_path"] and pins["train.reference"]["round"] == 1
    _, pins = pin(loop_cfg("loop.pairs=all"), "tiny_loop", lake, None, None)
    assert pins["loop"]["pair_runs"] == [[1, "r1"], [2, "r2"]]


def test_a_resumed_run_keeps_its_pins_after_a_later_promotion(lake):
    """A run pinned before round 1 promoted keeps sampling the base when resumed, with round 1's seed
    (sample.seed 0 + 1 - 1 = 0); a new run takes round 1's policy and round 2's seed (1)."""
    cfg = loop_cfg()
    _, pins = pin(cfg, "tiny_loop", lake, None, None)
    record = start_run(lake, "tiny_loop", "r2", cfg, pins=pins)
    add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    resumed, again = pin(cfg, "tiny_loop", lake, record, None)
    assert resumed.sample.policy == "builtin:tiny-llama" and again == pins and resumed.sample.seed == 0
    new = pin(cfg, "tiny_loop", lake, None, None)[0]
    assert new.sample.policy.endswith("promoted/tiny_loop/r1") and new.sample.seed == 1


def test_gone_or_changed_promoted_files_name_the_policy_and_its_run(lake):
    row = add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    (Path(row["promoted_path"]) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(PopflowError, match=r"round 1 \(dpo_pop-s0, made by run r1\) has changed on disk"):
        pin(loop_cfg(), "tiny_loop", lake, None, None)
    for f in Path(row["promoted_path"]).iterdir():
        f.unlink()
    with pytest.raises(PopflowError, match=r"promoted policy of 'tiny_loop' round 1 .*run r1\) is gone: .* does "
                                           "not hold a model"):
        pin(loop_cfg(), "tiny_loop", lake, None, None)
    other = load_pipeline("tiny", overrides=["sample.policy=promoted:tiny_loop"])
    with pytest.raises(PopflowError, match="is gone"):  # never a silent fallback to the base
        pin(other, "tiny", lake, None, None)


def test_promoted_references_of_another_pipeline(lake):
    """promoted:<pipeline> falls back to that pipeline's sample.policy, then follows its head; an unknown
    pipeline is refused naming the key."""
    cfg = load_pipeline("tiny", overrides=["sample.policy=promoted:tiny_loop", "train.reference=promoted:tiny_loop"])
    pinned, pins = pin(cfg, "tiny", lake, None, None)
    assert pinned.sample.policy == "builtin:tiny-llama" and pins["sample.policy"]["ref"] == "promoted:tiny_loop"
    row = add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    pinned, pins = pin(cfg, "tiny", lake, None, None)
    assert pinned.sample.policy == row["promoted_path"] == pinned.reference_policy()
    assert pins["train.reference"]["fingerprint"] == row["promoted_fingerprint"]
    bad = load_pipeline("tiny", overrides=["sample.policy=promoted:nope"])
    with pytest.raises(PopflowError, match="sample.policy 'promoted:nope': .*no pipeline named 'nope'"):
        pin(bad, "tiny", lake, None, None)
    from flows.preflight import preflight

    with pytest.raises(PopflowError, match="sample.policy 'promoted:nope': no pipeline named 'nope'"):
        preflight(bad)


def test_the_loop_config_refuses_what_it_would_override():
    for sets, message in ((["train.policy=builtin:tiny-llama"], "loop: train.policy"),
                          (["train.reference=builtin:tiny-llama"], "loop: train.reference"),
                          (["evaluate.generate=false"], "loop: evaluate.generate"),
                          (["sample.policy=promoted:tiny"], "loop: sample.policy"),
                          (["loop.method=ipo"], "loop.method 'ipo': not a train method"),
                          (["loop.gate.guard=[constraints, nope]"], "gate.guard 'nope': not a reward model"),
                          (["loop.pairs=all", "annotate.ground_truth=relevance"], "annotate.ground_truth")):
        with pytest.raises(PopflowError, match=message):
            loop_cfg(*sets)


def test_an_unfinished_round_is_resumed_and_retention_spares_the_head(lake):
    """A loop run without a promote manifest and with the same config is the round to resume; a changed
    config starts a new round. Retention keeping 1 run would delete r1, except that r1 holds the head."""
    cfg = loop_cfg()
    add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    start_run(lake, "tiny_loop", "r1", cfg, pins={"loop": {"round": 1}})
    _, pins = pin(cfg, "tiny_loop", lake, None, None)
    start_run(lake, "tiny_loop", "r2", cfg, pins=pins)
    assert unfinished_round(lake, "tiny_loop", cfg) == "r2"
    assert unfinished_round(lake, "tiny_loop", loop_cfg("sample.n=3")) is None
    records = [{"run_id": r, "status": "completed", "started_at": t} for r, t in (("r1", "1"), ("r2", "2"))]
    assert runs_to_prune(records, keep=1) == ["r1"]
    assert runs_to_prune(records, keep=1, protected={head_run(lake, "tiny_loop")}) == []


def test_rounds_of_one_chain_run_one_at_a_time(lake):
    """While one process holds the loop lock (choosing and running a round), another is refused naming it;
    another pipeline's loop is not held up."""
    import os

    with lake.loop_lock("tiny_loop"):
        with pytest.raises(PopflowError, match=rf"a round of loop pipeline 'tiny_loop' is being executed by another "
                                               rf"process \(pid {os.getpid()} on .*\); wait for it"):
            with lake.loop_lock("tiny_loop"):
                pass
        with lake.loop_lock("demo_loop"):
            pass
    with lake.loop_lock("tiny_loop"):  # released
        pass


def test_retention_spares_a_policy_an_unfinished_run_of_another_pipeline_pinned(lake):
    """tiny_loop promoted r1 then r2 (the head). A tiny run that pinned r1 through promoted:tiny_loop has not
    completed: tiny_loop's retention (keep 1) deletes neither r2 (head) nor r1 (pinned); once that run has
    completed, r1 goes."""
    from popflow.runs import prune_runs

    cfg = loop_cfg()
    add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    start_run(lake, "tiny_loop", "r1", cfg, pins={"loop": {"round": 1}})
    lake.write_run("tiny_loop", "r1", lake.read_run("tiny_loop", "r1") | {"status": "completed"})
    other = load_pipeline("tiny", overrides=["sample.policy=promoted:tiny_loop"])
    _, pins = pin(other, "tiny", lake, None, None)
    assert pins["sample.policy"]["run_id"] == "r1"
    start_run(lake, "tiny", "b1", other, pins=pins)  # running (or killed): may be resumed
    add_round(lake, "tiny_loop", 2, "r2", promoted=True)
    start_run(lake, "tiny_loop", "r2", cfg, pins={"loop": {"round": 2}})
    lake.write_run("tiny_loop", "r2", lake.read_run("tiny_loop", "r2") | {"status": "completed", "started_at": "~"})
    assert prune_runs(lake, "tiny_loop", keep=1) == []
    lake.write_run("tiny", "b1", lake.read_run("tiny", "b1") | {"status": "completed"})
    assert prune_runs(lake, "tiny_loop", keep=1) == ["r1"]


def test_a_round_that_later_runs_sampled_from_cannot_be_regated(lake):
    """Round 2 pinned round 1's promoted policy: `--from-stage` on round 1 is refused naming round 2's run, before
    anything runs; round 2 itself (pinned by no one) may be rerun from a stage."""
    from popflow.lineage import prepare_run

    cfg = loop_cfg()
    start_run(lake, "tiny_loop", "r1", cfg, pins=pin(cfg, "tiny_loop", lake, None, None)[1])
    add_round(lake, "tiny_loop", 1, "r1", promoted=True)
    _, pins = pin(cfg, "tiny_loop", lake, None, None)
    start_run(lake, "tiny_loop", "r2", cfg, pins=pins)
    with pytest.raises(PopflowError, match=r"--from-stage train: run 'r1' of 'tiny_loop' promoted a policy that "
                                           r"later runs pinned \(tiny_loop/r2\)"):
        prepare_run(cfg, "tiny_loop", lake, "r1", None, "train")
    assert prepare_run(cfg, "tiny_loop", lake, "r1", None, None)[0] == "r1"  # a plain resume is fine
    assert prepare_run(cfg, "tiny_loop", lake, "r2", None, "evaluate")[0] == "r2"


def test_an_abandoned_round_cannot_complete_a_round_another_run_completed(lake):
    """r2 started round 2 and was abandoned; after a config change r3 completed round 2. Resuming r2 by its id
    would write a second round 2: refused, naming r3."""
    from popflow.lineage import prepare_run

    cfg = loop_cfg()
    start_run(lake, "tiny_loop", "r1", cfg, pins=pin(cfg, "tiny_loop", lake, None, None)[1])
    add_round(lake, "tiny_loop", 1, "r1", promoted=False)
    start_run(lake, "tiny_loop", "r2", cfg, pins=pin(cfg, "tiny_loop", lake, None, None)[1])
    add_round(lake, "tiny_loop", 2, "r3", promoted=False)
    with pytest.raises(PopflowError, match="run 'r2' of 'tiny_loop' was round 2, and run 'r3' has completed round 2"):
        prepare_run(cfg, "tiny_loop", lake, "r2", None)
    assert unfinished_round(lake, "tiny_loop", cfg) == "r2"  # the same config, never finished ...
    assert prepare_run(cfg, "tiny_loop", lake, None, None)[0] is None  # ... but its round is taken: a new round


def test_a_round_cannot_be_regated_once_a_later_round_started(lake):
    """Round 1 was not promoted, so round 2 (started, unfinished) pinned the base, not round 1: nothing pinned
    round 1's promoted folder, yet regating round 1 would change the parent round 2 chose: refused."""
    from popflow.lineage import prepare_run

    cfg = loop_cfg()
    start_run(lake, "tiny_loop", "r1", cfg, pins=pin(cfg, "tiny_loop", lake, None, None)[1])
    add_round(lake, "tiny_loop", 1, "r1", promoted=False)
    start_run(lake, "tiny_loop", "r2", cfg, pins=pin(cfg, "tiny_loop", lake, None, None)[1])
    with pytest.raises(PopflowError, match=r"run 'r1' of 'tiny_loop' was round 1, and a later round has started "
                                           r"since \(r2\)"):
        prepare_run(cfg, "tiny_loop", lake, "r1", None, "promote")


def test_a_chain_is_as_long_as_its_last_round(lake):
    """retention.keep_runs 1 deleted rounds 1 and 2 (and their lineage rows) of a 3-round chain: the chain still
    has 3 rounds, so `popflow loop --rounds 3` has nothing left to do and `--rounds 4` runs round 4."""
    from flows.loop import chain_length

    add_round(lake, "tiny_loop", 3, "r3", promoted=True)
    rows = complete_rounds(lake, "tiny_loop")
    assert len(rows) == 1 and chain_length(rows) == 3 and chain_length([]) == 0
    assert pin(loop_cfg(), "tiny_loop", lake, None, None)[1]["loop"]["round"] == 4
