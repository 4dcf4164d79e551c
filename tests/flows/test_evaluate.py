"""Evaluate's generation as parts (tasks/evaluate.py): the tiny pipeline's stages called in this process (no
Prefect, no CLI), the transformers engine, two cheap reward models, two trained policies."""

from __future__ import annotations

import pytest

from flows.pipeline import STAGES
from popflow.config import load_pipeline
from popflow.replicas import EvalReplica
from popflow.sql import connect
from popflow.stage import RunContext, plan
from tasks import evaluate

pytestmark = pytest.mark.slow  # trains two tiny adapters


def test_evaluate_resumes_per_policy_after_a_crash(tmp_path, monkeypatch):
    """Two trained policies (seeds 0 and 1). Evaluate fails while the second one generates, after the first was
    staged: nothing is published. The rerun generates only the second policy (one call to the replica's
    generate), scores both after the engine closed, and publishes both: 2 policies x 3 held-out prompts x
    evaluate.n = 2 samples, no key twice; its report says one policy was resumed and which process generated.
    The raw samples stay staged (a failure after them, or --from-stage evaluate with the same policies, samples
    nothing again)."""
    cfg = load_pipeline("tiny", overrides=["sample.engine=transformers", "train.seeds=[0, 1]",
                                           "score.models=[{name: constraints, kind: constraints}, {name: tiny_rm, "
                                           "kind: hf, model: 'builtin:tiny-reward', batch_size: 8, max_length: 512}]"])
    ctx = RunContext(str(tmp_path), "tiny", "r1", cfg)
    stages = plan(STAGES, cfg)
    for s in stages[: [s.name for s in stages].index("evaluate")]:
        s(ctx)
    run_evaluate = next(s for s in stages if s.name == "evaluate")
    real_generate, calls = EvalReplica.generate, []

    def killed_on_the_second(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("killed while the second policy generates")
        return real_generate(self, path, *args, **kwargs)

    monkeypatch.setattr(EvalReplica, "generate", killed_on_the_second)
    with pytest.raises(RuntimeError, match="killed while the second"):
        run_evaluate(ctx)
    assert not ctx.has("eval_samples") and not ctx.has("eval_rewards")
    assert len(ctx.lake.staged_parts(evaluate.GENERATED, "tiny", "r1")) == 1

    generated = []
    monkeypatch.setattr(EvalReplica, "generate", lambda self, path, *a, **k: generated.append(path)
                        or real_generate(self, path, *a, **k))
    result = run_evaluate(ctx)
    assert len(generated) == 1 and generated[0] == calls[1] and generated[0].endswith("-s1")
    assert result.report["resumed_policies"] == 1 and sum(result.report["replica_pids"].values()) == 1
    keys = connect().sql(f"select method, seed, prompt_id, sample_idx from {ctx.table('eval_samples')}").fetchall()
    assert len(keys) == len(set(keys)) == 2 * 3 * 2 == result.tables["eval_samples"]
    assert {(m, s) for m, s, _, _ in keys} == {("dpo_pop", 0), ("dpo_pop", 1)}
    assert result.tables["eval_rewards"] == 2 * 12  # two reward models
    assert len(ctx.lake.staged_parts(evaluate.GENERATED, "tiny", "r1")) == 2  # kept: --from-stage reuses them
