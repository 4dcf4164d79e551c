"""bench/gpu_check.sh runs its five checks on whatever machine it meets; here, the CPU (small sizes, tiny
model for training), so the script a GPU session carries is known to work before device time is spent."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # runs bench/gpu_check.sh's checks on this CPU


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_cpu(tmp_path):
    tiny = REPO / "data/models/tiny-llama"
    env = {**os.environ, "PYTHONPATH": str(REPO), "POPFLOW_MODELS_DIR": str(REPO / "data" / "models"),
           "GPU_CHECK_SCORE_ARGS": "--samples 8 --batch-size 4",
           "GPU_CHECK_TRAIN_ARGS": f"--pairs 8 --batch 4 --max-length 64 --model {tiny}",
           "GPU_CHECK_SAMPLE_ARGS": f"--hf-prompts 2 --hf-batch 2 --n 2 --max-tokens 8 --model {tiny}"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    for header in ("== 1. popflow doctor", "== 2. hf reward scoring", "== 3. training", "== 4. one training step",
                   "== 5. sampling"):
        assert header in log
    assert "ratio vs same-dtype loop:" in log
    assert "popflow dpo_pop (stored ref) / stock TRL sigmoid (live reference):" in log
    assert "train step check: ok" in log and "gpu_check passed" in log
    assert re.search(r"transformers engine: ([1-9]\d*) tokens in [\d.]+ s: [\d.]+ tok/s", log)
    assert "FAILED" not in log


@pytest.mark.slow
def test_gpu_check_fails_when_a_check_fails(tmp_path):
    """A failing check (here: an argument bench_train refuses) makes the whole script fail, naming the step."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "POPFLOW_MODELS_DIR": str(REPO / "data" / "models"),
           "GPU_CHECK_STEPS": "3", "GPU_CHECK_TRAIN_ARGS": "--no-such-flag"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 1, log[-3000:]
    assert "FAILED (exit 2)" in log and "gpu_check FAILED" in log
    assert "== 1. popflow doctor" not in log  # GPU_CHECK_STEPS chose step 3 only
