"""The precision table (popflow/precision.py) on hand-written machines: every CPU class and CUDA capability
the issue names, explicit dtypes and their warnings, training's weights/autocast split, flag parsing."""

from __future__ import annotations

import logging

import pytest

from popflow.precision import (
    Hardware,
    announce,
    auto_dtype,
    native_dtypes,
    read_cpu_flags,
    resolve_dtype,
    slow_dtype_warning,
    training_precision,
    vllm_cpu_bind,
)

AVX2 = Hardware("cpu", frozenset({"sse4_2", "avx", "avx2", "fma"}), name="AMD EPYC (Zen 3)")
AVX512 = Hardware("cpu", AVX2.cpu_flags | {"avx512f", "avx512bw", "avx512_vnni"}, name="Intel Xeon (Cascade Lake)")
AVX512_BF16 = Hardware("cpu", AVX512.cpu_flags | {"avx512_bf16"}, name="AMD EPYC (Zen 4)")
AMX = Hardware("cpu", AVX512.cpu_flags | {"amx_tile", "amx_bf16", "amx_int8"}, name="Intel Xeon (Sapphire Rapids)")
V100 = Hardware("cuda", AVX2.cpu_flags, (7, 0), "Tesla V100")
A100 = Hardware("cuda", AVX2.cpu_flags, (8, 0), "A100")
H200 = Hardware("cuda", AMX.cpu_flags, (9, 0), "H200")


@pytest.mark.parametrize(("hw", "native", "auto", "cpu_class"), [
    (AVX2, ("float32",), "float32", "avx2"),                    # no native bf16: bf16 would be emulated
    (AVX512, ("float32",), "float32", "avx512"),                # AVX-512 alone has no bf16 dot products
    (AVX512_BF16, ("bfloat16", "float32"), "bfloat16", "avx512_bf16"),
    (AMX, ("bfloat16", "float32"), "bfloat16", "amx_bf16"),
    (V100, ("float16", "float32"), "float16", "avx2"),          # capability 7.0: tensor cores in fp16 only
    (A100, ("bfloat16", "float16", "float32"), "bfloat16", "avx2"),
    (H200, ("bfloat16", "float16", "float32"), "bfloat16", "amx_bf16"),
])
def test_auto_is_the_fastest_native_dtype(hw, native, auto, cpu_class):
    assert native_dtypes(hw) == native
    assert auto_dtype(hw) == auto
    assert resolve_dtype("auto", hw) == auto
    assert hw.cpu_class == cpu_class


def test_fp16_on_a_cpu_is_native_only_with_fp16_flags_and_never_auto():
    sapphire = Hardware("cpu", AMX.cpu_flags | {"avx512_fp16", "amx_fp16"})
    assert native_dtypes(sapphire) == ("bfloat16", "float16", "float32")
    assert auto_dtype(Hardware("cpu", AVX2.cpu_flags | {"avx512_fp16"})) == "float32"


@pytest.mark.parametrize(("requested", "hw", "warns"), [
    ("bfloat16", AVX2, True), ("bfloat16", AVX512, True), ("float16", AVX2, True), ("bfloat16", V100, True),
    ("bfloat16", AVX512_BF16, False), ("bfloat16", AMX, False), ("float16", V100, False), ("float16", A100, False),
    ("float32", AVX2, False), ("float32", H200, False), ("auto", AVX2, False),
])
def test_explicit_dtypes_stay_and_warn_where_not_native(requested, hw, warns):
    assert resolve_dtype(requested, hw) == (auto_dtype(hw) if requested == "auto" else requested)
    warning = slow_dtype_warning(requested, hw, "sample.dtype")
    assert (warning is not None) == warns
    if warns:
        assert warning.startswith(f"sample.dtype: {requested} is not computed natively")
        assert "slower" in warning and "sample.dtype: auto" in warning


def test_announce_records_and_warns_naming_the_key(caplog):
    with caplog.at_level(logging.INFO, logger="popflow.precision"):
        record = announce({"sample.dtype": "bfloat16", "score.models[rm].dtype": "auto"}, AVX2)
    assert record == {"device": "cpu", "hardware": AVX2.name, "cpu_class": "avx2", "sample.dtype": "bfloat16",
                      "score.models[rm].dtype": "float32"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("sample.dtype: bfloat16 is not computed natively")


@pytest.mark.parametrize(("requested", "hw", "expected"), [
    ("auto", AVX2, ("cpu", "float32", "no", "float32")),             # plain fp32
    ("auto", AVX512_BF16, ("cpu", "float32", "bf16", "bfloat16")),   # fp32 master weights, bf16 autocast
    ("bfloat16", AVX2, ("cpu", "float32", "bf16", "bfloat16")),      # asked for: emulated, with a warning
    ("float32", AMX, ("cpu", "float32", "no", "float32")),
    ("auto", H200, ("cuda", "bfloat16", "bf16", "bfloat16")),         # bf16 weights and compute
    ("float32", H200, ("cuda", "float32", "no", "float32")),
    ("auto", V100, ("cuda", "float32", "fp16", "float16")),           # fp16 autocast over fp32 weights (scaler)
])
def test_training_precision(requested, hw, expected):
    p = training_precision(requested, hw)
    assert (p.device, p.weights, p.mixed, p.compute) == expected


def test_full_fine_tuning_keeps_fp32_master_weights_on_cuda():
    """A weight of 0.02 in bf16 lies between 2^-6 and 2^-5, where bf16's spacing is 2^-6 * 2^-7 = 1.22e-4: an
    AdamW step of lr 5e-6 (about lr for Adam's normalised update) rounds back to the same weight, so bf16
    weights would not train. Full fine-tuning (lora null) on CUDA therefore keeps fp32 weights under bf16
    autocast; LoRA's frozen base stays in bf16 (PEFT keeps the adapters themselves in fp32)."""
    import torch

    w = torch.tensor(0.02, dtype=torch.bfloat16)
    assert torch.equal(w - 5e-6, w) and not torch.equal(w.float() - 5e-6, w.float())
    p = training_precision("auto", H200, full=True)
    assert (p.device, p.weights, p.mixed, p.compute) == ("cuda", "float32", "bf16", "bfloat16")
    assert training_precision("auto", H200, full=False).weights == "bfloat16"
    assert training_precision("auto", AVX512_BF16, full=True).weights == "float32"


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8", AVX2)


def test_cpu_flags_from_cpuinfo_files(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse avx2 fma avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu sse avx2 fma avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 sve\n")
    assert read_cpu_flags(x86) == {"fpu", "sse", "avx2", "fma", "avx512_bf16"}
    assert read_cpu_flags(arm) == {"fp", "asimd", "bf16", "sve"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()  # no /proc/cpuinfo: no flags, float32
    assert auto_dtype(Hardware("cpu", read_cpu_flags(tmp_path / "missing"))) == "float32"


def test_vllm_cpu_bind_names_every_allowed_core():
    """`all` -> the process's cores in vLLM's syntax: a contiguous set as a range, anything else as a list."""
    assert vllm_cpu_bind("all", {0, 1}) == "0-1"
    assert vllm_cpu_bind("all", {4, 5, 6, 7}) == "4-7"
    assert vllm_cpu_bind("all", {0, 2, 5}) == "0,2,5"
    assert vllm_cpu_bind("all", {3}) == "3"
    assert vllm_cpu_bind("auto") == "auto" and vllm_cpu_bind("0-3|4-7") == "0-3|4-7"
