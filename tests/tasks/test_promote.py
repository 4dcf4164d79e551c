"""promote's stored policy (tasks/promote.py store_promoted): a LoRA candidate merged into a folder that names
the candidate it holds, reused only for that very candidate (real tiny Llama, real PEFT adapters)."""

from __future__ import annotations

from pathlib import Path

import torch

from popflow.config import load_pipeline
from popflow.models import fingerprint
from popflow.stage import RunContext
from tasks.promote import MARKER, drop_promoted, store_promoted
from tests.conftest import REPO


def lora_adapter(out: Path, seed: int) -> Path:
    """A LoRA adapter of the tiny Llama with random (non-zero) weights: merging it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(REPO / "data" / "models" / "tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    return out


def test_a_retrained_round_never_reuses_the_old_merge(tmp_path, monkeypatch):
    """The round's candidate is merged and marked; storing the same candidate again (a resumed stage) reuses
    the folder untouched; a candidate retrained into the same path (--from-stage train) is merged anew, and a
    rerun that does not promote leaves no folder behind."""
    monkeypatch.setenv("POPFLOW_MODELS_DIR", str(REPO / "data" / "models"))
    ctx = RunContext(str(tmp_path / "data"), "tiny_loop", "r1", load_pipeline("tiny_loop"))
    adapter = lora_adapter(tmp_path / "adapter", seed=1)
    candidate = {"path": str(adapter), "adapter": True}

    first = store_promoted(ctx, candidate)
    marker = (first / MARKER).read_text()
    made, merged = (first / "config.json").stat().st_mtime_ns, fingerprint(first)
    assert str(adapter) in marker and fingerprint(adapter) in marker
    assert store_promoted(ctx, candidate) == first and (first / "config.json").stat().st_mtime_ns == made

    lora_adapter(adapter, seed=2)  # retrained: the same path, other weights
    again = store_promoted(ctx, candidate)
    assert again == first and fingerprint(again) != merged and fingerprint(adapter) in (again / MARKER).read_text()
    drop_promoted(ctx)
    assert not first.exists()
