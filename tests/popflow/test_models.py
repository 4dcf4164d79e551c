"""Model references and the built-in models' materialisation (popflow/models.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from popflow import models
from popflow.errors import PopflowError

REPO = models.Path(__file__).resolve().parents[2]


def test_references_are_classified_and_checked(tmp_path):
    assert models.is_local_ref("./x") and models.is_local_ref("/abs") and not models.is_local_ref("org/name")
    models.check_ref("HuggingFaceTB/SmolLM2-135M-Instruct", "k")  # hub ids load at run time
    with pytest.raises(PopflowError, match="k: model path .* does not exist"):
        models.check_ref(str(tmp_path / "nope"), "k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PopflowError, match="not a Hugging Face model directory"):
        models.check_ref(str(tmp_path / "empty"), "k")
    with pytest.raises(PopflowError, match="unknown built-in model 'builtin:gpt5'"):
        models.check_ref("builtin:gpt5", "k")


@pytest.mark.slow
def test_tiny_model_materialises_into_an_empty_models_dir(tmp_path):
    """From nothing: the tiny reward model needs SmolLM2's tokenizer, built first (this once deadlocked on the
    models-dir lock). The result is a normal HF directory, and the second call reuses it."""
    code = ("from pathlib import Path; from popflow import models; "
            "print(models.resolve(models.TINY_REWARD, Path('unused')).path)")
    env = {"POPFLOW_MODELS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = models.Path(proc.stdout.strip().splitlines()[-1])
    assert path == tmp_path / "tiny-reward"
    assert json.loads((path / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    assert (tmp_path / "SmolLM2-135M-Instruct" / "tokenizer_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no temp dirs left
    before = (path / "config.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert again.stdout.strip().splitlines()[-1] == str(path) and (path / "config.json").stat().st_mtime_ns == before


def test_a_reference_must_tokenise_as_the_policy():
    """The same tokenizer passes; another chat template, or another vocabulary, is refused naming both keys."""
    from transformers import AutoTokenizer

    from popflow.models import check_same_tokenizer

    tiny = REPO / "data" / "models" / "tiny-llama"
    policy, reference = AutoTokenizer.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    check_same_tokenizer(policy, reference, "train.policy", "train.reference")
    reference.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(PopflowError, match="train.reference and train.policy render conversations differently"):
        check_same_tokenizer(policy, reference, "train.policy", "train.reference")
    other = AutoTokenizer.from_pretrained(tiny)
    other.add_tokens(["<popflow-new-token>"])
    with pytest.raises(PopflowError, match=r"different vocabularies \(49153 vs 49152 tokens\)"):
        check_same_tokenizer(policy, other, "train.policy", "train.reference")
