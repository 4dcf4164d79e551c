"""Benchmark: popflow's `constraints` reward vs the `ifeval` reward (lm-eval's IFEval checkers) on real samples:
scoring speed of each, and how often they agree.

    .venv/bin/python bench/bench_ifeval.py [--data-dir data] [--pipeline demo] [--out docs/ifeval_agreement.csv]

The samples are a run's responses in the lake (the latest run of the pipeline: `make demo` makes one); their
prompts' constraints and IFEval labels come from the pipeline's prompt set as it is now
(data/prompts/build_demo.py writes both, the labels from the constraints where IFEval has the same check), so a
run made before the labels existed is measured too. Speed: samples scored per second by each kind over the
same samples, one process, best of 3. Agreement, over the samples of labelled prompts:
- per check: a constraint met in full (its check scores 1) against IFEval's strict verdict on the instruction
  that states it; the share of samples where the two agree, per constraint and over all;
- per sample: every constraint that has an IFEval instruction met in full against every instruction followed
  (ifeval strict = 1): agreement and Cohen's kappa; and the Spearman correlation of the two rewards' scores
  (constraints with all its checks, partial credit included).
Intervals: 95% bootstrap over prompts (samples of one prompt are not independent), 2,000 resamples, seed 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from popflow import sql
from popflow.config import ConstraintsReward, IfevalReward, load_pipeline
from popflow.lake import Lake
from tasks.prompts import load_prompts
from tasks.rewards import ScoringBatch, constraints, ifeval

REPO = Path(__file__).resolve().parents[1]


def build_demo():
    spec = importlib.util.spec_from_file_location("build_demo", REPO / "data" / "prompts" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_samples(data_dir: Path, pipeline: str) -> tuple[str, list[tuple[str, str]]]:
    """(run id, [(prompt_id, response)]) of the pipeline's latest run with published samples."""
    lake = Lake(data_dir)
    runs = [r["run_id"] for r in reversed(lake.read_runs(pipeline))]
    for run in runs:
        glob = lake.glob("samples", pipeline, run)
        if any(Path(glob).parent.glob("*.parquet")):
            rows = sql.connect().sql(f"select prompt_id, response from {sql.parquet(glob)} "
                                     "order by prompt_id, sample_idx").fetchall()
            return run, rows
    raise SystemExit(f"no samples of pipeline {pipeline!r} in {data_dir}/lake: run `popflow run {pipeline}`")


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bootstrap(groups: np.ndarray, stat, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(index array) resampling whole prompts."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in ids}
    values = []
    for _ in range(n):
        pick = rng.choice(ids, size=len(ids), replace=True)
        values.append(stat(np.concatenate([members[g] for g in pick])))
    return float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))


def kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two binary verdicts: (p_o - p_e) / (1 - p_e)."""
    po = float(np.mean(a == b))
    pe = float(np.mean(a) * np.mean(b) + (1 - np.mean(a)) * (1 - np.mean(b)))
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(REPO / "data"))
    ap.add_argument("--pipeline", default="demo")
    ap.add_argument("--out", default=None, help="CSV of the per-check agreement")
    args = ap.parse_args()
    cfg = load_pipeline(args.pipeline)
    prompts = {r["prompt_id"]: r for r in load_prompts(cfg.prompts.model_copy(update={"limit": None,
                                                                                      "eval_limit": None})).to_pylist()}
    run, rows = run_samples(Path(args.data_dir), args.pipeline)
    rows = [(p, r) for p, r in rows if p in prompts and prompts[p]["instructions"]]
    if not rows:
        raise SystemExit("no samples of prompts with IFEval labels")
    batch = ScoringBatch.of([prompts[p] for p, _ in rows], [r for _, r in rows])
    groups = np.array([p for p, _ in rows])
    n = len(rows)
    t_con, s_con = timed(lambda: constraints.score(ConstraintsReward(kind="constraints", name="c"), batch))
    ifeval.registry()  # the library's import (about 2 s, once per process) is not scoring
    t_strict, s_strict = timed(lambda: ifeval.score(IfevalReward(kind="ifeval", name="i"), batch))
    t_loose, _ = timed(lambda: ifeval.score(IfevalReward(kind="ifeval", name="i", mode="loose"), batch))

    demo = build_demo()
    per_key: dict[str, list[tuple[int, bool, bool]]] = {}
    for i, (pid, response) in enumerate(rows):
        for key, value in (batch.constraints[i] or {}).items():
            labels = demo.ifeval_labels({key: value})
            if labels:
                met = constraints.check_constraints(response, {key: value})[key] >= 1.0
                followed = ifeval.follows(labels, prompts[pid]["prompt"], response)[0]
                per_key.setdefault(key, []).append((i, met, followed))
    table = []
    every = [(i, m, f) for v in per_key.values() for i, m, f in v]
    for key, items in [*sorted(per_key.items()), ("all checks", every)]:
        met = np.array([m for _, m, _ in items])
        fol = np.array([f for _, _, f in items])
        g = groups[[i for i, _, _ in items]]
        low, high = bootstrap(g, lambda ix, met=met, fol=fol: float(np.mean(met[ix] == fol[ix])))
        table.append({"check": key, "ifeval_id": demo.ifeval_labels({key: batch.constraints[items[0][0]][key]}
                                                                   )["instruction_id_list"][0]
                      if key != "all checks" else "", "samples": len(items),
                      "constraint_met": round(float(met.mean()), 3), "ifeval_followed": round(float(fol.mean()), 3),
                      "agreement": round(float(np.mean(met == fol)), 3), "low": round(low, 3), "high": round(high, 3)})
    mapped_met = np.ones(n, dtype=bool)  # every constraint that has an IFEval instruction met in full
    for i, met, _ in every:
        mapped_met[i] &= met
    a, b = mapped_met, s_strict >= 1.0
    sample_agree = bootstrap(groups, lambda ix: float(np.mean(a[ix] == b[ix])))
    sample_kappa = bootstrap(groups, lambda ix: kappa(a[ix], b[ix]))
    rho = float(spearmanr(s_con, s_strict).statistic)

    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")})
    print(f"# {time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()} cores={os.cpu_count()} "
          f"flags={' '.join(flags)}")
    print(f"pipeline {args.pipeline}, run {run}: {n} samples of {len(set(groups))} labelled prompts")
    print("| reward | samples/s |\n|---|---:|")
    print(f"| constraints | {n / t_con:,.0f} |\n| ifeval strict | {n / t_strict:,.0f} |\n"
          f"| ifeval loose | {n / t_loose:,.0f} |")
    print(f"| ratio constraints / ifeval strict | {t_strict / t_con:.1f}x |")
    print("\n| check | IFEval id | samples | constraint met | IFEval followed | agreement [95%] |")
    print("|---|---|---:|---:|---:|---|")
    for r in table:
        print(f"| {r['check']} | {r['ifeval_id']} | {r['samples']} | {r['constraint_met']} | "
              f"{r['ifeval_followed']} | {r['agreement']} [{r['low']}, {r['high']}] |")
    print(f"\nper sample (every mapped check met vs every instruction followed): agreement {np.mean(a == b):.3f} "
          f"[{sample_agree[0]:.3f}, {sample_agree[1]:.3f}], Cohen's kappa {kappa(a, b):.3f} "
          f"[{sample_kappa[0]:.3f}, {sample_kappa[1]:.3f}], Spearman of the scores {rho:.3f}; "
          f"all met: mapped constraints {a.mean():.3f}, ifeval {b.mean():.3f}")
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)


if __name__ == "__main__":
    main()
