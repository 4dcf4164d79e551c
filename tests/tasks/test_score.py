"""The score stage's parts: SQL aggregation by hand, finite checks, and the real reward models."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from popflow import models
from popflow.config import PythonReward, ScoreConfig
from popflow.errors import PopflowError
from popflow.plugins import load_function
from popflow.sql import parquet
from tasks.rewards import ScoringBatch, check_finite, hf, python, relevance, score_with
from tasks.rewards.aggregate import aggregate_sql

DATA = Path(__file__).resolve().parents[2] / "data"


def aggregate(tmp_path, scores: dict[str, list[float]], **cfg) -> list[float]:
    rows = [("p", i, name, s) for name, values in scores.items() for i, s in enumerate(values)]
    table = pa.Table.from_pylist([dict(zip(("prompt_id", "sample_idx", "reward_model", "score"), r, strict=True))
                                  for r in rows])
    pq.write_table(table, tmp_path / "r.parquet")
    spec = ScoreConfig.model_validate({"models": [{"name": n, "kind": "constraints", "weight": w}
                                                  for n, w in zip(scores, cfg.pop("weights", [1, 1]), strict=True)],
                                       **cfg})
    return [r[2] for r in duckdb.sql(aggregate_sql(parquet(tmp_path / "r.parquet"), spec)).fetchall()]


def test_aggregate_by_hand(tmp_path):
    """Model a scores [1, 3]: mu 2, sd 1 -> z [-1, 1]. Model b scores [10, 10]: sd 0 -> z [0, 0].
    zscore+mean -> [-0.5, 0.5]; zscore+min -> [-1, 0]; weighted 3:1 -> [(-3+0)/4, (3+0)/4] = [-0.75, 0.75];
    no normalisation, mean -> [(1+10)/2, (3+10)/2] = [5.5, 6.5]."""
    scores = {"a": [1.0, 3.0], "b": [10.0, 10.0]}
    assert aggregate(tmp_path, scores, aggregate="mean") == [-0.5, 0.5]
    assert aggregate(tmp_path, scores, aggregate="min") == [-1.0, 0.0]
    assert aggregate(tmp_path, scores, aggregate="weighted", weights=[3, 1]) == [-0.75, 0.75]
    assert aggregate(tmp_path, scores, aggregate="mean", normalize="none") == [5.5, 6.5]


def test_non_finite_scores_are_named():
    with pytest.raises(PopflowError, match=r"'rm' returned inf for prompt_id='q' sample_idx=7 \(2 non-finite"):
        check_finite(np.array([0.0, np.inf, np.nan]), "rm", ["p", "q", "q"], [0, 7, 8])
    check_finite(np.array([0.0, -1e30]), "rm", ["p", "p"], [0, 1])


def test_python_reward_kind():
    batch = ScoringBatch(["p", "p"], ["ab", "abcd"], [None, None])
    spec = type("S", (), {"name": "len", "function": "tests.fixtures.rewards:length_reward"})
    assert python.score(spec, batch).tolist() == [2.0, 4.0]
    spec.function = "tests.fixtures.rewards:wrong_length"
    with pytest.raises(PopflowError, match=r"reward model 'len': tests.fixtures.rewards:wrong_length returned 1 "
                                           r"value\(s\) for 2 responses"):
        python.score(spec, batch)
    with pytest.raises(PopflowError, match="has no function 'nope'"):
        load_function("tests.fixtures.rewards:nope", "k")
    with pytest.raises(PopflowError, match="cannot import module 'no_such_mod'"):
        load_function("no_such_mod:f", "k")


def test_python_reward_errors_name_the_model_and_the_sample():
    """Through score_with, as the score stage calls it: a string among the values names its sample (the
    second: prompt_id 'it''s', sample_idx 3); an exception names the model and the exception; numpy numbers
    and ints are numbers."""
    batch = ScoringBatch(["p", "q"], ["ab", "abcd"], [None, None])

    def spec(function):
        return PythonReward(kind="python", name="mine", function=f"tests.fixtures.rewards:{function}")

    with pytest.raises(PopflowError, match=r"reward model 'mine': tests.fixtures.rewards:string_reward returned "
                                           r"'good' \(str\), not a number for prompt_id=\"it's\" sample_idx=3"):
        score_with(spec("string_reward"), batch, None, ["p", "it's"], [0, 3])
    with pytest.raises(PopflowError, match=r"reward model 'mine': tests.fixtures.rewards:raising_reward raised "
                                           r"KeyError: 'score_me'"):
        score_with(spec("raising_reward"), batch, None, ["p", "q"], [0, 1])
    assert python.check_values([np.float32(0.5), 2], 2, "mine", "f").tolist() == [0.5, 2.0]
    with pytest.raises(PopflowError, match="returned NoneType, not a list of 2 numbers"):
        python.check_values(None, 2, "mine", "f")


def test_hf_reward_batched_equals_one_at_a_time():
    """The tiny reward model (real LlamaForSequenceClassification): padding and length-sorting must not
    change any score, and different texts must get different scores."""
    path = models.resolve(models.TINY_REWARD, DATA).path
    tokenizer, model = hf.load(path, "float32", False)
    prompts = ["Say hi.", "Explain gravity in one long sentence please.", "List three fruits."] * 2
    responses = ["hi", "Gravity pulls masses together, which is why apples fall and planets orbit.", "- apple",
                 "hello there friend", "Mass attracts mass.", "- pear\n- fig\n- kiwi"]
    texts, templated = hf.format_texts(tokenizer, prompts, responses)
    assert templated and "<|im_start|>assistant" in texts[0]  # the model's own chat template is used
    batched = hf.score_texts(tokenizer, model, texts, templated, batch_size=4, max_length=512)
    single = np.array([hf.score_texts(tokenizer, model, [t], templated, 1, 512)[0] for t in texts])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    assert len(set(np.round(batched, 6))) == len(texts)


def test_relevance_reward_prefers_on_topic_answers():
    spec = type("S", (), {"name": "rel", "model": models.MINILM, "batch_size": 2, "dtype": "float32"})
    prompt = "Explain how photosynthesis works in plants."
    batch = ScoringBatch([prompt] * 3, [
        "Plants use sunlight, water and carbon dioxide to make glucose in their chloroplasts.",
        "The stock market closed higher today after strong earnings reports.",
        prompt,
    ], [None] * 3)
    on_topic, off_topic, same = relevance.score(spec, batch, DATA)
    assert on_topic > off_topic + 0.3
    assert same == pytest.approx(1.0, abs=1e-4)
