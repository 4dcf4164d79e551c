"""Names that become paths (pipelines, run ids, reward models, methods) match one pattern, checked before
any work: popflow/config/base.py's NAME_PATTERN."""

from __future__ import annotations

import pytest

from popflow.config import load_pipeline, pipeline_names
from popflow.config.base import check_name
from popflow.errors import PopflowError

GOOD = ["tiny", "ultrafeedback-llama3", "20261125T020000Z-3fa2c1", "dpo_pop", "v1.2", "A"]
BAD = ["../../escape", "..", ".hidden", "a/b", "a\\b", "", "-x", "_x", "a b", "it's", "x" * 65, "é", None, 3]


@pytest.mark.parametrize("name", GOOD)
def test_names_accepted(name):
    assert check_name(name, "run id") == name


@pytest.mark.parametrize("name", BAD)
def test_names_refused_with_what_they_name(name):
    with pytest.raises(PopflowError, match=r"^run id .* is not a valid name \(a letter or digit"):
        check_name(name, "run id")


def test_a_pipeline_name_in_a_config_file_is_checked_with_its_line(tmp_path):
    config = tmp_path / "pipelines.yaml"
    config.write_text("ok:\n  seed: 1\n'../x':\n  seed: 2\n")
    with pytest.raises(PopflowError, match=r"pipelines.yaml:3: pipeline '\.\./x' is not a valid name"):
        pipeline_names(config)
    with pytest.raises(PopflowError, match=r"pipelines.yaml:3: pipeline '\.\./x' is not a valid name"):
        load_pipeline("ok", config)
    with pytest.raises(PopflowError, match=r"^pipeline '\.\./tiny' is not a valid name"):
        load_pipeline("../tiny")


def test_reward_and_method_names_are_names():
    with pytest.raises(PopflowError, match=r"score.models.0.name: String should match pattern"):
        load_pipeline("tiny", overrides=["score.models=[{name: ../x, kind: constraints}]"])
    with pytest.raises(PopflowError, match=r"train.methods.0.name: String should match pattern"):
        load_pipeline("tiny", overrides=["train.methods=[{loss: dpo, name: a/b}]"])
    cfg = load_pipeline("tiny", overrides=["score.models=[{name: Mine.v2, kind: constraints}]"])
    assert cfg.score.models[0].name == "Mine.v2"
