"""The `relevance` reward kind: cosine similarity of prompt and response sentence embeddings.

all-MiniLM-L6-v2 (builtin:minilm) with mean pooling over the attention mask and L2 normalisation, as
sentence-transformers does; each distinct prompt is embedded once. A response that ignores the prompt
scores near 0, an on-topic one near 0.5-0.8.
"""

from __future__ import annotations

import numpy as np

from popflow import models, precision
from tasks.rewards import ScoringBatch, length_sorted_batches


def embed(tokenizer, model, texts: list[str], batch_size: int, desc: str) -> np.ndarray:
    import torch
    from tqdm.auto import tqdm

    ids = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    for idx in tqdm(length_sorted_batches([len(x) for x in ids], batch_size), desc=desc):
        enc = tokenizer.pad({"input_ids": [ids[i] for i in idx]}, return_tensors="pt").to(model.device)
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out[idx] = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()
    return out


def score(spec, batch: ScoringBatch, data_dir) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    resolved = models.resolve(spec.model, data_dir, f"score.models[{spec.name}].model")
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    hw = precision.detect()
    model = AutoModel.from_pretrained(resolved.path, dtype=precision.torch_dtype(spec.dtype, hw)).to(hw.device).eval()
    unique, inverse = np.unique(np.asarray(batch.prompts, dtype=object), return_inverse=True)
    prompt_vecs = embed(tokenizer, model, list(unique), spec.batch_size, f"embed prompts ({spec.name})")
    response_vecs = embed(tokenizer, model, batch.responses, spec.batch_size, f"embed responses ({spec.name})")
    return np.einsum("ij,ij->i", prompt_vecs[inverse], response_vecs).astype(np.float64)
