"""The `hf` reward kind: any AutoModelForSequenceClassification reward model.

Each (prompt, response) is formatted with the reward model's own chat template (plain "prompt\\n\\nresponse"
when it has none), tokenised once, sorted by length and scored in padded batches. Padding never changes a
score: the model pools the last non-pad token, and the tests check batched scores equal one-at-a-time ones.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from popflow import models, precision
from tasks.rewards import ScoringBatch, length_sorted_batches

log = logging.getLogger(__name__)


def format_texts(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[str], bool]:
    """The texts to score and whether the template already holds the special tokens."""
    if getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
            for p, r in zip(prompts, responses, strict=True)
        ]
        return texts, True
    return [f"{p}\n\n{r}" for p, r in zip(prompts, responses, strict=True)], False


def load(path: str, dtype: str, trust_remote_code: bool):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hw = precision.detect()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=precision.torch_dtype(dtype, hw), trust_remote_code=trust_remote_code).to(hw.device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def score_texts(tokenizer, model, texts: list[str], templated: bool, batch_size: int, max_length: int,
                desc: str = "score") -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=not templated)["input_ids"]
    out = np.empty(len(texts), dtype=np.float64)
    tokenizer.padding_side = "right"
    for idx in tqdm(length_sorted_batches([len(x) for x in ids], batch_size), desc=desc):
        batch = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            logits = model(**batch).logits
        out[idx] = logits[:, 0].float().cpu().numpy()
    return out


def score(spec, batch: ScoringBatch, data_dir) -> np.ndarray:
    resolved = models.resolve(spec.model, data_dir, f"score.models[{spec.name}].model")
    tokenizer, model = load(resolved.path, spec.dtype, spec.trust_remote_code)
    texts, templated = format_texts(tokenizer, batch.prompts, batch.responses)
    return score_texts(tokenizer, model, texts, templated, spec.batch_size, spec.max_length, f"score {spec.name}")


class Replica:
    """One hf reward model (tokenizer and network) scoring chunks of (prompt, response)."""

    def __init__(self, path: str, spec, slot: int = 0, cpus: float = 1.0):
        from popflow.replicas import pin_cores

        t0 = time.time()
        self.cores = pin_cores(slot, cpus)
        if self.cores:
            import torch

            torch.set_num_threads(len(self.cores))
        self.spec = spec
        self.tokenizer, self.model = load(path, spec.dtype, spec.trust_remote_code)
        self.startup_s = time.time() - t0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "cores": self.cores, "startup_s": self.startup_s}

    def score(self, prompts: list[str], responses: list[str]):
        texts, templated = format_texts(self.tokenizer, prompts, responses)
        return score_texts(self.tokenizer, self.model, texts, templated, self.spec.batch_size,
                           self.spec.max_length, f"score {self.spec.name}")

    def close(self) -> None:
        """Free the model before the next one loads (the local backend runs one reward model after another)."""
        import gc

        import torch

        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
