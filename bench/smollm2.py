"""What the SmolLM2 benchmarks share: the demo prompts of one split, rendered with SmolLM2's chat template.

Imported by the bench scripts as `from smollm2 import demo_prompts` (a script's own folder is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_prompts(split: str, count: int, n: int, max_tokens: int):
    """(SmolLM2's local path, prompt ids, rendered prompts, SampleConfig) for `count` demo prompts of `split`."""
    from transformers import AutoTokenizer

    from popflow import models
    from popflow.config import PromptsConfig, SampleConfig
    from tasks.prompts import load_prompts
    from tasks.sample import render_prompts

    path = models.resolve(models.SMOLLM2, REPO / "data").path
    limits = {"limit": count} if split == "train" else {"eval_limit": count}
    prompts = load_prompts(PromptsConfig(source=str(REPO / "data/prompts/demo.jsonl"), **limits))
    prompts = prompts.filter(prompts.column("split").to_numpy(zero_copy_only=False) == split)
    ids, texts = prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()
    cfg = SampleConfig(policy=models.SMOLLM2, n=n, max_tokens=max_tokens, seed=0)
    return path, ids, render_prompts(AutoTokenizer.from_pretrained(path), texts, None, cfg.policy), cfg
