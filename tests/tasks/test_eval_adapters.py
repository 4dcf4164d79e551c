"""Evaluate's two ways to sample a LoRA-trained policy with vLLM (`evaluate.adapters`): served as an adapter by
one engine, or merged into a copy of the base weights. Both must be the same policy."""

from __future__ import annotations

import textwrap

import pytest

from popflow.precision import Hardware
from tasks.evaluate import adapter_serving
from tests.conftest import REPO, run_script

pytestmark = pytest.mark.slow  # vLLM-CPU engines

AVX2 = Hardware("cpu", frozenset({"avx2", "fma"}))
AVX512_BF16 = Hardware("cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}))
H200 = Hardware("cuda", frozenset({"avx2"}), (9, 0), "H200")


def test_auto_serves_adapters_on_gpus_and_merges_them_on_cpus_when_it_pays():
    """Merging pays when tokens x (extra LoRA seconds a token) > merge + start-up x (1 - 1/P), P the stage's
    policies (one LoRA engine's start-up is shared by all P).
    avx512_bf16 (bf16): extra 1/61 - 1/253 = 0.0124409 s; merge 1.4 s, start-up 45 s.
      P = 1: 1.4 / 0.0124409 = 112.5 tokens -> 113 merges, 112 does not.
      P = 12: (1.4 + 45 * 11/12) / 0.0124409 = 42.65 / 0.0124409 = 3428.2 -> 3429 merges, 3428 does not.
    avx2 (float32): extra 1/29.1 - 1/119.4 = 0.0259890 s; merge 2.2 s, start-up 40 s.
      P = 1: 2.2 / 0.025989 = 84.7 -> 85 merges, 84 does not.
      P = 12: (2.2 + 40 * 11/12) / 0.025989 = 38.867 / 0.025989 = 1495.5 -> 1496 merges, 1495 does not.
    The tiny pipeline (3 held-out prompts x n 2 x 12 tokens = 72, P = 1) merges on neither. Explicit settings
    win; CUDA serves adapters."""
    assert adapter_serving("auto", AVX512_BF16, 113, policies=1) == "merge"
    assert adapter_serving("auto", AVX512_BF16, 112, policies=1) == "lora"
    assert adapter_serving("auto", AVX512_BF16, 3429, policies=12) == "merge"
    assert adapter_serving("auto", AVX512_BF16, 3428, policies=12) == "lora"
    assert adapter_serving("auto", AVX2, 85, policies=1) == "merge"
    assert adapter_serving("auto", AVX2, 84, policies=1) == "lora"
    assert adapter_serving("auto", AVX2, 1496, policies=12) == "merge"
    assert adapter_serving("auto", AVX2, 1495, policies=12) == "lora"
    assert adapter_serving("auto", AVX2, 3 * 2 * 12, policies=1) == "lora"
    assert adapter_serving("auto", H200, 16 * 4 * 160, policies=1) == "lora"
    assert adapter_serving("lora", AVX2, 10**6) == "lora"
    assert adapter_serving("merge", H200, 1) == "merge"


def test_a_merged_adapter_scores_text_as_the_served_adapter_does(tmp_path):
    """The same adapter on the tiny Llama (bf16), served by vLLM-CPU with enable_lora and merged by
    `merge_adapter`: per-token log-probs of 4 prompts (vLLM's prompt_logprobs). The adapter's B matrices
    are random (N(0, 0.05)), so it moves the log-probs away from the base model's; the merged model must land
    on the served adapter's log-probs, within a tenth of that move (the two differ only by bf16 rounding:
    served LoRA adds B A x beside the bf16 base, merged rounds W + B A to bf16 once)."""
    script = textwrap.dedent(f"""
        import json, torch
        from pathlib import Path
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoConfig
        from vllm import SamplingParams
        from vllm.lora.request import LoRARequest
        from popflow import models
        from popflow.config import SampleConfig, VllmOptions
        from popflow.engines import VllmEngine, merge_adapter

        def logprobs(engine, texts, lora=None):  # one text per call: vLLM-CPU 0.32 with enable_lora fails
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)  # on batched prompt_logprobs
            outs = [engine.llm.generate([t], params, lora_request=lora, use_tqdm=False)[0] for t in texts]
            return [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]

        if __name__ == "__main__":
            tmp = Path({str(tmp_path)!r})
            base = models.resolve("builtin:tiny-llama", Path({str(REPO / "data")!r})).path
            torch.manual_seed(0)
            model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                   LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.05)
            model.save_pretrained(tmp / "adapter")
            merged = merge_adapter(base, str(tmp / "adapter"), tmp / "merged")
            cfg = SampleConfig(policy="builtin:tiny-llama", vllm=VllmOptions(max_model_len=256,
                                                                              gpu_memory_utilization=0.1))
            texts = ["The capital of France is Paris.", "Write a haiku about the sea, please.",
                     "List three prime numbers: 2, 3, 5.", "def add(a, b): return a + b"]
            engine = VllmEngine(base, cfg, max_lora_rank=8)
            out = {{"base": logprobs(engine, texts),
                    "served": logprobs(engine, texts, LoRARequest("a", 1, str(tmp / "adapter")))}}
            engine.close()
            engine = VllmEngine(merged, cfg)
            out["merged"] = logprobs(engine, texts)
            engine.close()
            out["merged_dtype"] = str(AutoConfig.from_pretrained(merged).dtype)
            out["merged_files"] = sorted(p.name for p in Path(merged).iterdir())
            print("RESULT " + json.dumps(out))
    """)
    out = run_script(tmp_path, script)

    def mean_gap(x, y):
        pairs = [(a, b) for xs, ys in zip(x, y, strict=True) for a, b in zip(xs, ys, strict=True)]
        return sum(abs(a - b) for a, b in pairs) / len(pairs)

    moved = mean_gap(out["served"], out["base"])
    assert moved > 0.05, "the random adapter did not change the model: the comparison below would be empty"
    assert mean_gap(out["merged"], out["served"]) < moved / 10
    assert out["merged_dtype"] == "torch.bfloat16"
    assert "model.safetensors" in out["merged_files"] and "adapter_config.json" not in out["merged_files"]
