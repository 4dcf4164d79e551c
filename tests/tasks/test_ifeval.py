"""The `ifeval` reward kind: lm-eval's IFEval checkers offline, both label formats, bad labels refused at ingest.

Every expected value is worked out by hand from IFEval's rules (in each docstring)."""

from __future__ import annotations

import json

import nltk
import pytest

from popflow.config import IfevalReward, PromptsConfig, ScoreConfig
from popflow.errors import PopflowError
from tasks.prompts import load_prompts
from tasks.rewards import ScoringBatch, ifeval, score_with


def labels(*pairs):
    return {"instruction_id_list": [p[0] for p in pairs], "kwargs": [p[1] for p in pairs]}


WORDS_LT_4 = ("length_constraints:number_words", {"num_words": 4, "relation": "less than"})
SENTENCES_LT_3 = ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"})
NOT_VERY = ("keywords:forbidden_words", {"forbidden_words": ["very"]})
JSON = ("detectable_format:json_format", {})


def test_checkers_run_offline_on_packaged_punkt_data():
    """The sentence check needs punkt's trained English data, found in an installed package (no download):
    'Dr. Smith arrived. He sat down.' is 2 sentences for the trained model (it knows the abbreviation 'dr'),
    3 for an untrained one; 2 < 3 follows, and one more sentence (3 < 3) does not."""
    assert ifeval.follows(labels(SENTENCES_LT_3), "p", "Dr. Smith arrived. He sat down.") == [True]
    assert ifeval.follows(labels(SENTENCES_LT_3), "p", "Dr. Smith arrived. He sat down. Then he left.") == [False]
    assert nltk.data.find(ifeval.PUNKT)
    assert ifeval.packaged_nltk_data() is not None


def test_strict_and_loose_by_hand():
    """number_words 'less than 4': 3 words follow, 4 do not. forbidden 'very' is a whole word: 'verygood' is
    allowed. A JSON body after a chatty first line fails strict and passes loose (loose also tries the response
    without its first line)."""
    assert ifeval.follows(labels(WORDS_LT_4), "p", "one two three") == [True]
    assert ifeval.follows(labels(WORDS_LT_4), "p", "one two three four") == [False]
    assert ifeval.follows(labels(NOT_VERY, WORDS_LT_4), "p", "It is very good") == [False, False]
    assert ifeval.follows(labels(NOT_VERY, WORDS_LT_4), "p", "It is verygood") == [True, True]
    chatty = 'Sure! Here it is:\n{"a": 1}'
    assert ifeval.follows(labels(JSON), "p", chatty) == [False]
    assert ifeval.follows(labels(JSON), "p", chatty, loose=True) == [True]


def test_reward_is_the_fraction_followed():
    """Two instructions, one followed -> 0.5; both -> 1; an unlabelled prompt -> unlabelled_score (0.25 here).
    The batch comes from prompts-table rows (labels as JSON text), as the score and evaluate stages build it."""
    rows = [{"prompt": "p", "constraints": None, "instructions": json.dumps(labels(NOT_VERY, WORDS_LT_4))}] * 2
    rows.append({"prompt": "q", "constraints": None, "instructions": None})
    batch = ScoringBatch.of(rows, ["very good", "good", "anything at all here"])
    spec = IfevalReward(kind="ifeval", name="ifeval", unlabelled_score=0.25)
    out = score_with(spec, batch, None, ["a", "a", "b"], [0, 1, 0])
    assert out.column("score").to_pylist() == [0.5, 1.0, 0.25]
    assert out.column("kind").to_pylist() == ["ifeval"] * 3
    assert ScoreConfig(models=[{"kind": "ifeval", "name": "if", "mode": "loose"}]).models[0].mode == "loose"


@pytest.mark.parametrize("label, message", [
    (("nope:x", {}), "unknown IFEval instruction id 'nope:x'"),
    (("punctuation:no_comma", {"x": 1}), "instruction 'punctuation:no_comma' takes no kwarg x"),
    ((WORDS_LT_4[0], {"num_words": 3}), "instruction '.*' needs kwarg relation .*random"),
    ((WORDS_LT_4[0], {"num_words": 3, "relation": "about"}), "instruction '.*' refused kwargs .*ValueError"),
    ((WORDS_LT_4[0], {"num_words": "3", "relation": "at least"}), "instruction '.*' refused kwargs .*TypeError"),
])
def test_bad_labels_refused_at_ingest_naming_line_prompt_and_id(tmp_path, label, message):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt_id": "ok", "prompt": "x", "instruction_id_list": [JSON[0]], "kwargs": [{}]},
            {"prompt_id": "bad-7", "prompt": "y", "instruction_id_list": [label[0]], "kwargs": [label[1]]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PopflowError, match=rf"p.jsonl:2: prompt_id 'bad-7': {message}"):
        load_prompts(PromptsConfig(source=str(path), eval_fraction=0), checkers=True)
    # with no ifeval reward to score them, labels are carried with their shape checked only (no lm-eval import)
    assert load_prompts(PromptsConfig(source=str(path), eval_fraction=0)).num_rows == 2


def test_both_label_formats_give_the_same_prompts_table(tmp_path):
    """IFEval's own columns (kwargs with the null fields a Parquet struct gives) and open-instruct's ground truth
    (JSON text) of the same instructions read to the same labels; a row without labels has none; a mismatched
    kwargs list is refused."""
    ifeval_rows = [{"prompt_id": "a", "prompt": "x", "instruction_id_list": [WORDS_LT_4[0], JSON[0]],
                    "kwargs": [{**WORDS_LT_4[1], "keywords": None}, {"num_words": None, "relation": None}]},
                   {"prompt_id": "b", "prompt": "y"}]
    gt_rows = [{"prompt_id": "a", "prompt": "x", "ground_truth": json.dumps(
        [{"instruction_id": [WORDS_LT_4[0], JSON[0]], "kwargs": [WORDS_LT_4[1], None]}])},
               {"prompt_id": "b", "prompt": "y"}]
    tables = []
    for name, rows, cols in [("i.jsonl", ifeval_rows, {}), ("g.jsonl", gt_rows, {"ground_truth": "ground_truth"})]:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        tables.append(load_prompts(PromptsConfig(source=str(tmp_path / name), columns=cols, eval_fraction=0)))
    got = [[json.loads(v) if v else None for v in t.column("instructions").to_pylist()] for t in tables]
    assert ifeval.validate_instructions(got[0][0]) is None
    assert [ifeval.given(k) for k in got[0][0]["kwargs"]] == [WORDS_LT_4[1], {}]
    assert [ifeval.given(k) for k in got[1][0]["kwargs"]] == [WORDS_LT_4[1], {}]
    assert got[0][1] is None and got[1][1] is None
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt_id": "c", "prompt": "z",
                                                  "instruction_id_list": [JSON[0]], "kwargs": [{}, {}]}) + "\n")
    with pytest.raises(PopflowError, match=r"m.jsonl:1: prompt_id 'c': kwargs must be a list with one object"):
        load_prompts(PromptsConfig(source=str(tmp_path / "m.jsonl"), eval_fraction=0))


def test_shipped_demo_prompts_carry_ifeval_labels():
    """Every constrained demo prompt whose constraints include one IFEval states carries it: 288 of 336 (the 48
    unconstrained prompts carry none; every recipe has at least one mapped constraint)."""
    table = load_prompts(PromptsConfig(source="data/prompts/demo.jsonl"))
    rows = table.to_pylist()
    assert sum(r["instructions"] is not None for r in rows) == sum(r["constraints"] is not None for r in rows) == 288
    ids = {i for r in rows if r["instructions"] for i in json.loads(r["instructions"])["instruction_id_list"]}
    assert "length_constraints:number_words" in ids and "startend:end_checker" in ids


def test_an_ifeval_reward_without_labelled_prompts_fails_preflight(tmp_path):
    """The tiny pipeline's prompts (demo.jsonl) carry labels: an ifeval reward passes; on a prompt file with none it
    would score every sample the same, so the preflight refuses it, naming the reward model."""
    from flows.preflight import preflight
    from popflow.config import load_pipeline

    extra = ["score.models=[{kind: constraints, name: constraints}, {kind: ifeval, name: instr}]"]
    preflight(load_pipeline("tiny", overrides=extra))
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"x{i}", "prompt": "q", "split": ["train", "eval"][i % 2]})
                            + "\n" for i in range(8)))
    cfg = load_pipeline("tiny", overrides=[*extra, f"prompts.source={path}"])
    with pytest.raises(PopflowError, match=r"score.models\[instr\]: kind ifeval, but the prompts of .*p.jsonl"):
        preflight(cfg)


def test_a_prompts_table_without_labels_is_refused_for_an_ifeval_reward(tmp_path):
    """A run ingested before popflow read IFEval labels (the small lake's prompts table has no instructions column)
    would score every sample unlabelled_score: score and evaluate refuse it, naming the model and the run; its
    labels read as null for the other kinds; a table with labels passes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from popflow import sql
    from tasks.rewards import labels_sql, require_ifeval_labels
    from tests.fixtures.lake import small_lake

    ctx, con = small_lake(tmp_path), sql.connect()
    specs = [IfevalReward(kind="ifeval", name="instr")]
    with pytest.raises(PopflowError, match=r"reward model 'instr' \(ifeval\): the prompts of run r1 were ingested "
                                            "before popflow read IFEval labels; start a new run"):
        require_ifeval_labels(con, ctx.table("prompts"), specs, "r1")
    require_ifeval_labels(con, ctx.table("prompts"), [], "r1")  # no ifeval reward: nothing to check
    assert con.sql(f"select {labels_sql(con, ctx.table('prompts'), 'p')} from {ctx.table('prompts')} p "
                   "limit 1").fetchall() == [(None, None)]
    pq.write_table(pa.table({"prompt_id": ["a"], "constraints": [None],
                             "instructions": [json.dumps(labels(JSON))]}), tmp_path / "new.parquet")
    require_ifeval_labels(con, sql.parquet(str(tmp_path / "new.parquet")), specs, "r2")
    bad = {"instruction_id_list": ["nope:x"], "kwargs": [{}]}  # carried unchecked by a run without an ifeval reward
    pq.write_table(pa.table({"prompt_id": ["b", "a"], "constraints": [None, None],
                             "instructions": [json.dumps(bad), json.dumps(labels(JSON))]}), tmp_path / "bad.parquet")
    with pytest.raises(PopflowError, match=r"reward model 'instr' \(ifeval\): prompt_id 'b' of run r4: unknown IFEval"):
        require_ifeval_labels(con, sql.parquet(str(tmp_path / "bad.parquet")), specs, "r4")
    pq.write_table(pa.table({"prompt_id": ["a"], "constraints": [None], "instructions": pa.array([None], pa.string())}),
                   tmp_path / "none.parquet")  # the column, no labels (an hf: source without them): no new run helps
    with pytest.raises(PopflowError, match=r"score.models\[instr\]: kind ifeval, but the prompts of run r3 carry no"):
        require_ifeval_labels(con, sql.parquet(str(tmp_path / "none.parquet")), specs, "r3")


def test_prompts_without_an_ifeval_reward_never_import_lm_eval():
    """lm-eval and nltk cost about two seconds to import: a run that scores no ifeval reward reads the labelled
    demo prompts without them (a fresh interpreter, since this one has imported them)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; from popflow.config import PromptsConfig; from tasks.prompts import load_prompts; "
            "t = load_prompts(PromptsConfig(source='data/prompts/demo.jsonl')); "
            "print(t.column('instructions').null_count < t.num_rows, 'lm_eval' in sys.modules, 'nltk' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "False", "False"], out.stderr[-2000:]
