"""Precision: the one decision of which dtype every engine and stage computes in, from what the hardware
computes natively.

`dtype: auto` (sample.dtype, score.models[].dtype, train.dtype) resolves per device to the fastest dtype the
hardware has native arithmetic for:

    device                                              native          auto
    CUDA, compute capability >= 8.0 (Ampere, Hopper)    bf16, fp16      bfloat16
    CUDA, compute capability < 8.0 (Volta, Turing)      fp16            float16
    CPU with AVX512_BF16 or AMX_BF16                    bf16            bfloat16
    any other CPU (AVX2 only, AVX-512 without BF16)     -               float32

A CPU without native bf16 runs bf16 through slow fallbacks (vLLM-CPU's torch linear: orders of magnitude
slower; BENCHMARKS.md has the measured ratios), so an explicit dtype the device cannot compute natively
still runs, with a warning that names the config key. Training on CPU keeps fp32 weights (the optimizer's
master copy) and computes in bf16 through autocast: `training_precision` says which.

    .venv/bin/popflow doctor        prints this decision for the machine it runs on
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_CPU_FLAGS = ("avx512_fp16", "amx_fp16")
# The CPU flags that decide speed, in the order `popflow doctor` prints them.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", *BF16_CPU_FLAGS, *FP16_CPU_FLAGS)


@dataclass(frozen=True)
class Hardware:
    """What the precision decision depends on. Built by `detect()`, or by hand in tests."""

    device: str  # cuda | cpu
    cpu_flags: frozenset[str] = frozenset()
    cuda_capability: tuple[int, int] | None = None
    name: str = ""

    @property
    def cpu_class(self) -> str:
        """A short label for BENCHMARKS.md figures: which CPU class a number belongs to."""
        if any(f in self.cpu_flags for f in BF16_CPU_FLAGS):
            return "avx512_bf16" if "avx512_bf16" in self.cpu_flags else "amx_bf16"
        if "avx512f" in self.cpu_flags:
            return "avx512"
        return "avx2" if "avx2" in self.cpu_flags else "other"


def read_cpu_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty when the file cannot be read."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_name(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """This process's compute device: the first CUDA device when torch sees one, else the CPU."""
    flags, name = read_cpu_flags(), cpu_name()
    try:
        import torch

        if torch.cuda.is_available():
            return Hardware("cuda", flags, tuple(torch.cuda.get_device_capability(0)), torch.cuda.get_device_name(0))
    except ImportError:
        pass
    return Hardware("cpu", flags, None, name)


def native_dtypes(hw: Hardware) -> tuple[str, ...]:
    """The dtypes the device has native arithmetic for, fastest first (float32 always works)."""
    if hw.device == "cuda":
        major = (hw.cuda_capability or (0, 0))[0]
        return ("bfloat16", "float16", "float32") if major >= 8 else ("float16", "float32")
    native = []
    if any(f in hw.cpu_flags for f in BF16_CPU_FLAGS):
        native.append("bfloat16")
    if any(f in hw.cpu_flags for f in FP16_CPU_FLAGS):
        native.append("float16")
    return (*native, "float32")


def auto_dtype(hw: Hardware) -> str:
    """What `dtype: auto` becomes: bf16 where native (its range needs no loss scaling), else fp16 on GPUs
    that have only that, else float32. fp16 is never chosen on a CPU: few kernels use it there."""
    native = native_dtypes(hw)
    if "bfloat16" in native:
        return "bfloat16"
    return "float16" if hw.device == "cuda" and "float16" in native else "float32"


def slow_dtype_warning(requested: str, hw: Hardware, key: str) -> str | None:
    """The warning for an explicit dtype this device cannot compute natively, or None."""
    if requested in ("auto", "float32") or requested in native_dtypes(hw):
        return None
    lacking = BF16_CPU_FLAGS if requested == "bfloat16" else FP16_CPU_FLAGS
    what = (f"CUDA capability {hw.cuda_capability[0]}.{hw.cuda_capability[1]}" if hw.device == "cuda"
            else f"this CPU ({hw.cpu_class}, no {' / '.join(lacking)})")
    cost = ("no tensor cores for it" if hw.device == "cuda"
            else "vLLM-CPU runs it through a fallback; figures in BENCHMARKS.md section 8")
    return (f"{key}: {requested} is not computed natively by {what}; it runs through a fallback path, "
            f"expect it far slower than {auto_dtype(hw)} ({cost}). Use {key}: auto")


def resolve_dtype(requested: str, hw: Hardware | None = None) -> str:
    """The dtype a config's `dtype` computes in on this device: auto -> `auto_dtype`; explicit stays as asked."""
    if requested != "auto" and requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; one of auto, {', '.join(DTYPES)}")
    return auto_dtype(hw or detect()) if requested == "auto" else requested


def announce(requested: dict[str, str], hw: Hardware | None = None) -> dict:
    """Resolve a stage's dtypes ({config key: requested}), log each decision and warn about every explicit
    dtype the device cannot compute natively. Returns what the stage's manifest records."""
    hw = hw or detect()
    record = {"device": hw.device, "hardware": hw.name, "cpu_class": hw.cpu_class}
    for key, value in requested.items():
        warning = slow_dtype_warning(value, hw, key)
        if warning:
            log.warning(warning)
        record[key] = resolve_dtype(value, hw)
        log.info("%s: %s -> %s (%s, %s)", key, value, record[key], hw.device, hw.cpu_class)
    return record


@dataclass(frozen=True)
class TrainingPrecision:
    """How training and the reference pass run: weights' dtype and whether bf16/fp16 autocast is on."""

    device: str
    weights: str  # the dtype the model loads in
    mixed: str  # no | bf16 | fp16: TrainingArguments' mixed precision
    compute: str  # what the matrix products run in

    def torch_dtype(self):
        import torch

        return getattr(torch, self.weights)


def training_precision(requested: str, hw: Hardware | None = None, full: bool = False) -> TrainingPrecision:
    """`train.dtype` resolved. CUDA: frozen weights (LoRA's base, the reference pass) in the compute dtype;
    weights the optimizer updates (`full`: lora null) stay fp32 with bf16 autocast, since AdamW steps of a
    small learning rate round away in bf16 (5e-6 on a weight of 0.02, whose bf16 spacing is 1.2e-4); fp16
    keeps fp32 weights with fp16 autocast, which needs the gradient scaler. CPU: weights stay fp32 and bf16
    runs as autocast where the CPU computes it natively (or when asked)."""
    hw = hw or detect()
    compute = resolve_dtype(requested, hw)
    if hw.device == "cuda":
        if compute == "float16":
            return TrainingPrecision("cuda", "float32", "fp16", "float16")
        if full and compute == "bfloat16":
            return TrainingPrecision("cuda", "float32", "bf16", "bfloat16")
        return TrainingPrecision("cuda", compute, "bf16" if compute == "bfloat16" else "no", compute)
    mixed = {"bfloat16": "bf16", "float16": "fp16"}.get(compute, "no")
    return TrainingPrecision("cpu", "float32", mixed, compute)


def torch_dtype(requested: str, hw: Hardware | None = None):
    """The torch dtype a model loads in for inference (sampling with transformers, hf and relevance rewards)."""
    import torch

    return getattr(torch, resolve_dtype(requested, hw))


def vllm_cpu_bind(setting: str, cores: set[int] | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `sample.vllm.cpu_threads_bind`: `all` becomes the cores this process may
    run on, as vLLM writes them (0-3 for a run, 0,2,5 otherwise); any other setting is vLLM's own. The other
    CPU-class decision besides the dtype: vLLM's own binding leaves one of 2 cores idle (BENCHMARKS.md section 8)."""
    if setting != "all":
        return setting
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if len(cores) > 1 and cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))
