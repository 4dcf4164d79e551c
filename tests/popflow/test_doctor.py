"""`popflow doctor` on machines it must describe without crashing: no CUDA, no /proc/cpuinfo, vLLM missing,
vLLM installed but broken (a real package that fails to import, as a CUDA torchvision makes vllm fail)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from popflow.doctor import check_package, diagnose, expected_rate, render
from popflow.precision import Hardware

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
AVX2 = Hardware("cpu", frozenset({"avx2", "fma"}), name="AMD EPYC (Zen 3)")


def test_avx2_machine_gets_float32_everywhere():
    text = render(diagnose("demo", sample=False, hw=AVX2))
    assert "class avx2, no native bf16" in text
    assert "no CUDA device" in text
    for key in ("sample.dtype: auto", "score.models[relevance].dtype: auto", "train.dtype: auto"):
        line = next(line for line in text.splitlines() if key in line)
        assert "-> float32" in line, line


def test_explicit_bf16_on_avx2_is_flagged():
    found = diagnose("tiny", sample=False, hw=AVX2)
    assert not any("WARNING" in line for line in found.lines)  # tiny asks for auto everywhere
    text = render(found)
    assert "verdict" in text
    from popflow import doctor

    rows = doctor.stage_precision("ultrafeedback-llama3", AVX2)  # asks for bfloat16 explicitly
    warnings = [value for key, value in rows if key == "WARNING"]
    assert any(w.startswith("sample.dtype: bfloat16 is not computed natively") for w in warnings)


def test_no_cpuinfo_and_no_cuda_is_described_not_fatal():
    found = diagnose("demo", sample=False, hw=Hardware("cpu", frozenset(), None, ""))
    text = render(found)
    assert "unknown (/proc/cpuinfo unreadable)" in text
    assert "-> float32" in text


def test_missing_package_is_reported_as_missing():
    pkg = check_package(("popflow-no-such-dist",), "popflow_no_such_module")
    assert pkg.version is None and pkg.error is None


def test_expected_rate_reads_the_benchmarks_table(tmp_path):
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# B\n\n## 0. Sampling by machine class (`popflow doctor`'s reference)\n\n"
                     "| class | dtype | output tokens/s | date |\n|---|---|---|---|\n"
                     "| avx2 | float32 | 97.5 | 2026-11-26 |\n| avx512_bf16 | bfloat16 | 250 | 2026-11-26 |\n\n"
                     "## 1. Other\n| avx2 | float32 | 1 |\n")
    assert expected_rate(AVX2, bench) == (97.5, "float32")
    assert expected_rate(Hardware("cpu", frozenset({"avx512_bf16"})), bench) == (250.0, "bfloat16")
    assert expected_rate(Hardware("cpu", frozenset({"avx512f"})), bench) is None  # no row for this class
    assert expected_rate(AVX2, tmp_path / "missing.md") is None


@pytest.mark.slow
def test_cli_exit_status_ok_then_broken_vllm(tmp_path):
    """The real CLI: exit 0 on this machine; exit 1 naming vllm when `import vllm` fails although the
    distribution is installed (a package earlier on the path that raises, as a broken install does)."""
    cmd = [sys.executable, "-m", "popflow.cli", "doctor", "--no-sample"]
    ok = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verdict    ok" in ok.stdout and "precision" in ok.stdout
    fake = tmp_path / "vllm"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    broken = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{REPO_ROOT}"})
    assert broken.returncode == 1, broken.stdout + broken.stderr
    line = next(line for line in broken.stdout.splitlines() if line.startswith("BROKEN"))
    assert "vllm" in line and "torchvision::nms" in line
