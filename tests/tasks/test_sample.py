"""The sample stage's progress line, against values worked out by hand."""

from __future__ import annotations

from tasks.sample import progress


def test_progress_line_by_hand():
    """10 of 40 prompts in 20 s with 3,000 output tokens: 3000 / 20 = 150.0 tokens/s; the 30 prompts left at
    2 s a prompt take 60 s = 1.0 min. Finished: nothing left."""
    assert progress(10, 40, 3000, 20.0) == "10/40 prompts, 3000 tokens at 150.0 tokens/s, 1.0 min left"
    assert progress(40, 40, 9000, 90.0) == "40/40 prompts, 9000 tokens at 100.0 tokens/s, 0.0 min left"



def test_long_prompts_leave_no_room_for_max_tokens():
    """The context is vllm.max_model_len for vLLM, the model's max_position_embeddings (tiny Llama: 2048) for
    transformers. A prompt of t rendered tokens fits when t + max_tokens <= context: with the two prompts'
    own token counts t1 < t2, a context of t2 + 12 fits both at max_tokens 12 and only the first at 13."""
    from transformers import AutoTokenizer

    from popflow import models
    from popflow.config import SampleConfig, VllmOptions
    from popflow.engines import Prompt, context_length, long_prompts
    from tests.conftest import REPO

    path = models.resolve("builtin:tiny-llama", REPO / "data").path
    assert context_length(path, SampleConfig(vllm=VllmOptions(max_model_len=512))) == 512
    assert context_length(path, SampleConfig(engine="transformers")) == 2048
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [Prompt("short", "Hello there."), Prompt("it's long", "word " * 40)]
    t1, t2 = (len(tok(p.text)["input_ids"]) for p in prompts)
    assert t1 < t2
    assert long_prompts(tok, prompts, 12, t2 + 12) == []
    assert long_prompts(tok, prompts, 13, t2 + 12) == [("it's long", t2)]
    assert long_prompts(tok, prompts, 13, None) == []  # no known context: nothing to check
