"""Measurement: how much of a training step's compute is padding, in random batches and in length-grouped ones.

    .venv/bin/python bench/bench_padding.py --data-dir /work/proof --pipeline proof --run-id claims [--batch 8]

Reads a trained run's reference log-probs table (its train pairs' prompt, chosen and rejected token counts, as
TRL tokenised them) and deals the pairs into batches the way the Trainer would: random order (the default
sampler) or transformers' own `get_length_grouped_indices` (what `train_sampling_strategy: group_by_length`
uses: megabatches sorted by length). TRL pads a batch's chosen and rejected sequences (prompt + response) to
its longest, so a step computes 2 x batch x longest tokens; the useful fraction is real tokens over that. Mean
over 20 shuffles each (seeds 0-19). No model is loaded: this costs seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from popflow import sql
from popflow.lake import Lake


def useful_fraction(lengths: np.ndarray, order: list[int], batch: int) -> float:
    """lengths: (pairs, 2) chosen and rejected sequence lengths; real tokens / padded tokens over the epoch."""
    real = padded = 0
    for start in range(0, len(order), batch):
        seqs = lengths[order[start : start + batch]].ravel()
        real += int(seqs.sum())
        padded += len(seqs) * int(seqs.max())
    return real / padded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", type=Path, default=Path("data"))
    ap.add_argument("--pipeline", default="demo")
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (train.batch_size)")
    args = ap.parse_args()

    glob = Lake(args.data_dir).glob("ref_logps", args.pipeline, args.run_id)
    rows = np.array(sql.connect().sql(
        f"select prompt_tokens + chosen_tokens, prompt_tokens + rejected_tokens from {sql.parquet(glob)} "
        "where split = 'train' order by pair_id").fetchall())
    if not len(rows):
        raise SystemExit(f"no train pairs in {glob}")
    longest = rows.max(axis=1).tolist()
    rand, grouped = [], []
    for seed in range(20):
        rand.append(useful_fraction(rows, np.random.default_rng(seed).permutation(len(rows)).tolist(), args.batch))
        order = get_length_grouped_indices(longest, args.batch, generator=torch.Generator().manual_seed(seed))
        grouped.append(useful_fraction(rows, order, args.batch))
    print(f"{args.pipeline} run {args.run_id}: {len(rows)} train pairs, mean chosen {rows[:, 0].mean():.1f} and "
          f"rejected {rows[:, 1].mean():.1f} tokens with the prompt; batches of {args.batch} pairs")
    print(f"useful fraction, random batches:         {np.mean(rand):.3f}")
    print(f"useful fraction, length-grouped batches: {np.mean(grouped):.3f}")
    print(f"ceiling of the saving (padded tokens, random / grouped): {np.mean(grouped) / np.mean(rand):.2f}x")


if __name__ == "__main__":
    main()
