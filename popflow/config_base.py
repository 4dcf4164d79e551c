"""What every config module shares: the strict base model (unknown keys are errors, values are frozen) and
the dtype choice of every stage that computes.

    from popflow.config_base import Strict
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_HELP = ("Compute dtype. auto: the fastest the device computes natively (bf16 on CUDA >= 8.0 and on CPUs "
              "with AVX512_BF16/AMX, fp16 on older GPUs, else float32; popflow/precision.py). An explicit dtype "
              "the device lacks runs through a slow fallback, with a warning.")
