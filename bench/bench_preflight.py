"""Benchmark: how fast bad input is refused. Preflight (before Prefect starts) against the same kind of
refusal from inside a stage (after the ephemeral Prefect server and the flow have started).

    .venv/bin/python bench/bench_preflight.py [--repeats 3]

Both arms run the real `popflow run` CLI in a subprocess with a fresh Prefect home, and both end in exit
status 2 with one line:
    preflight  tiny with a prompt file that does not exist (flows/preflight.py refuses it)
    in stage   imported with annotate.k = 500 (more partners than pairs: the annotate stage refuses it,
               after import_pairs ran under Prefect)
Reported: median wall seconds per arm and the ratio in-stage / preflight, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = {
    "preflight": ["tiny", "--set", "prompts.source=/nonexistent/prompts.jsonl"],
    "in stage": ["imported", "--set", "annotate.k=500"],
}


def refuse(args: list[str]) -> float:
    """Seconds until `popflow run ARGS` exits (status 2 required)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(Path(tmp) / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   POPFLOW_MODELS_DIR=str(REPO / "data" / "models"), PYTHONPATH=str(REPO))
        Path(env["PREFECT_HOME"]).mkdir()
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "popflow.cli", "run", *args, "--data-dir", f"{tmp}/data"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - t
    if proc.returncode != 2:
        raise SystemExit(f"{args}: exit {proc.returncode}, expected 2\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    times = {arm: statistics.median(refuse(a) for _ in range(args.repeats)) for arm, a in ARMS.items()}
    for arm, seconds in times.items():
        print(f"{arm:10s} {seconds:6.2f} s (median of {args.repeats})")
    print(f"ratio in stage / preflight: {times['in stage'] / times['preflight']:.1f}x")


if __name__ == "__main__":
    main()
