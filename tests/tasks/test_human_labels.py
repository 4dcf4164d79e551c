"""People's PoP labels (tasks/human_labels.py, flows/labels.py): the comparisons out as Label Studio tasks, a
hand-written answers file back in as the run's labels, margins inferred from them; and every bad answer refused
with one line. On the small lake of tests/fixtures/lake.py: two train pairs A and B of the annotated strategy."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

import flows.pipeline  # noqa: F401 (registers every stage: a stage's hash reads its upstream stages)
from flows.labels import export_tasks
from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.sql import connect
from popflow.stage import REGISTRY, RunContext
from tasks.annotate import pair_texts
from tasks.human_labels import texts_check
from tests.fixtures.lake import P1, P2, A, B, small_lake

ONE_EACH = ("annotate.k=1", "annotate.sampling=[iterative]")  # two pairs: each anchors one comparison


def check(ctx, a: str, b: str) -> str:
    """The texts check `popflow annotate export` writes for A vs B of the small lake."""
    texts = pair_texts(ctx, connect())
    return texts_check(texts[a], texts[b])


def answered(ctx, comparison: str, a: str, b: str, choice, cancelled: bool = False, run_id: str = "r1",
             task: int = 1) -> dict:
    """One task as Label Studio's JSON export writes it."""
    return {"id": task, "data": {"comparison": comparison, "run_id": run_id, "pair_a": a, "pair_b": b,
                                 "check": check(ctx, a, b), "prompt_a": "..."},
            "annotations": [{"was_cancelled": cancelled, "result": [
                {"from_name": "stronger", "to_name": "prompt_a", "type": "choices", "value": {"choices": [choice]}}]}]}


def with_labels(ctx, answers) -> RunContext:
    return RunContext(ctx.data_dir, "tiny", "r1", ctx.config.model_copy(update={
        "annotate": ctx.config.annotate.model_copy(update={"labels": str(answers)})}))


def test_tasks_out_answers_in_margins_from_them(tmp_path):
    """Iterative with k = 1 over A and B draws A vs B (iterative-0) and B vs A (iterative-1): the tasks hold both
    pairs' texts, the labeling interface names every field the tasks fill. The answers say A's preference is
    the stronger every time (A in task 1; B = the other pair, A, in task 2, from two people in the JSON-MIN form,
    one record each), so the stage writes three human labels, all for A, the training set keeps both pairs once
    (all_pairs), and the inferred PoP margin of A is above B's."""
    ctx = small_lake(tmp_path, ONE_EACH)
    ctx.lake.write_run("tiny", "r1", {"pipeline": "tiny", "run_id": "r1", "status": "completed"})
    out = export_tasks("tiny", "r1", [*json.loads(json.dumps(list(ONE_EACH))),
                                      "score.models=[{name: a, kind: constraints}, {name: b, kind: constraints}]",
                                      "score.normalize=none"], None, ctx.data_dir, tmp_path / "labels")
    assert out["comparisons"] == {"iterative": 2}
    tasks = json.loads((tmp_path / "labels" / "tasks.json").read_text())
    assert [(t["data"]["comparison"], t["data"]["pair_a"], t["data"]["pair_b"]) for t in tasks] == [
        ("iterative-0", A, B), ("iterative-1", B, A)]
    assert tasks[0]["data"]["prompt_a"] == f"question {P1}" and tasks[0]["data"]["chosen_b"] == f"answer {P2} #2"
    view = ET.fromstring((tmp_path / "labels" / "labeling_config.xml").read_text())
    fields = {el.get("value")[1:] for el in view.iter("Text")}
    assert fields == set(tasks[0]["data"]) - {"comparison", "run_id", "sampling", "pair_a", "pair_b", "check"}
    assert [c.get("value") for c in view.iter("Choice")] == ["A", "B"]

    assert {t["data"]["run_id"] for t in tasks} == {"r1"} and tasks[0]["data"]["check"] == check(ctx, A, B)
    answers = tmp_path / "answers.json"  # task 1 as Label Studio's JSON export, task 2 as its JSON-MIN (2 people)
    answers.write_text(json.dumps([{"id": 1, "data": tasks[0]["data"], "annotations": [{"result": [
        {"from_name": "stronger", "to_name": "prompt_a", "type": "choices", "value": {"choices": ["A"]}}]}]},
        {"id": 2, **tasks[1]["data"], "stronger": "B", "annotator": 1},
        {"id": 2, **tasks[1]["data"], "stronger": "B", "annotator": 2}]))
    labelled = with_labels(ctx, answers)
    result = REGISTRY["annotate"](labelled)
    assert result.report["iterative"] | {"labels_sha256": "-"} == {
        "comparisons": 3, "flip_rate": result.report["iterative"]["flip_rate"], "train_on": "all_pairs",
        "train_pairs": 2, "train_examples": 2, "source": "human", "answers": 3, "unanswered": 0, "labels_sha256": "-"}
    con = connect()
    labels = con.sql(f"select pair_a, pair_b, a_stronger, source, noise from {labelled.table('pop_labels')} "
                     "order by pop_id").fetchall()
    assert labels == [(A, B, True, "human", "human"), (B, A, False, "human", "human"), (B, A, False, "human", "human")]
    REGISTRY["margins"](labelled)
    margin = dict(con.sql(f"select pair_id, margin from {labelled.table('margins')}").fetchall())
    assert margin[A] > margin[B]


@pytest.mark.parametrize(("records", "message"), [
    (lambda ctx: [answered(ctx, "iterative-7", A, B, "A")], r"task #1 \(comparison 'iterative-7'\): this run draws"),
    (lambda ctx: [answered(ctx, "iterative-0", A, B, "A"), answered(ctx, "iterative-0", A, B, "B", task=2)],
     r"task #2 \(comparison 'iterative-0'\): the comparison is answered again \(first in task #1\)"),
    (lambda ctx: [answered(ctx, "iterative-0", A, B, "C")], r"task #1 .*: answer 'C' is not one of A, B"),
    (lambda ctx: [answered(ctx, "iterative-0", A, B, {"choices": ["A"]})], r"task #1 .*: answer .* is not one of"),
    (lambda ctx: [answered(ctx, "iterative-0", B, A, "A")], r"task #1 .*pairs .* but this run draws"),
    (lambda ctx: [answered(ctx, "iterative-0", A, B, "A", run_id="r0")], r"task #1 .*a task of run 'r0', not of run"),
    (lambda ctx: [answered(ctx, "iterative-0", A, B, "A") | {"data": answered(ctx, "iterative-0", A, B, "A")["data"]
                                                              | {"check": "0" * 16}}], r"task #1 .*texts are not"),
    (lambda ctx: [{"data": {"text": "not ours"}}], r"task #1 has no `comparison`"),
    (lambda ctx: [{"data": {"comparison": "iterative-0"}, "annotations": None}], r"task #1 .*not a list"),
    (lambda ctx: {"not": "a list"}, r"expected a list of tasks"),
])
def test_every_bad_answer_is_one_line_naming_the_task(tmp_path, records, message):
    """Unknown comparison, the same comparison in two tasks, an answer other than A/B (or not even a string),
    other pairs than drawn, a task of another run (pair ids repeat from night to night; the responses do not),
    texts that are not the exported ones, a task popflow did not write, broken annotations, not an export at
    all: each refused with the file and the task; the lake's labels stay as they were."""
    ctx = small_lake(tmp_path, ONE_EACH)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(records(ctx)))
    labelled = with_labels(ctx, answers)
    with pytest.raises(PopflowError, match=str(answers).replace("'", ".") + ".*" + message):
        REGISTRY["annotate"](labelled)
    assert connect().sql(f"select count(*) from {labelled.table('pop_labels')}").fetchall() == [(3,)]  # the lake's own
    assert labelled.lake.read_manifest("tiny", "r1", "annotate") is None


def test_a_cancelled_annotation_is_no_answer_and_the_config_resolves_the_file(tmp_path):
    """A cancelled annotation gives no label (the comparison counts as unanswered); `annotate.labels` in a config
    resolves against the config file's folder like every source file."""
    ctx = small_lake(tmp_path, ONE_EACH)
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([answered(ctx, "iterative-0", A, B, "A", cancelled=True),
                                   answered(ctx, "iterative-1", B, A, "A", task=2)]))
    labelled = with_labels(ctx, answers)
    report = REGISTRY["annotate"](labelled).report["iterative"]
    assert (report["answers"], report["unanswered"]) == (1, 1)
    config = tmp_path / "conf" / "pipelines.yaml"
    config.parent.mkdir()
    config.write_text("p:\n  annotate: {labels: answers.json}\n")
    assert load_pipeline("p", config).annotate.labels == str(tmp_path / "conf" / "answers.json")
