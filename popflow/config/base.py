"""What every config module shares: the strict base model (unknown keys are errors, values are frozen), the
dtype choice of every stage that computes, and the one pattern of names that become paths.

Names (pipelines, run ids, reward models, training methods) become folder and file names in the lake and
the models dir, so they match NAME_PATTERN: a letter or digit, then letters, digits, '_', '.', '-', at most
64 characters (no '/', no leading '.', so never '..'). The CLI, the flow, the deployment parameter schema
and the config check it before any work starts.

    from popflow.config.base import Strict
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from popflow.errors import PopflowError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_RULE = "a letter or digit, then letters, digits, '_', '.' or '-'; at most 64 characters"


def check_name(value: object, what: str) -> str:
    """`value` when it is a valid name (NAME_PATTERN), else a PopflowError saying what it names."""
    if not isinstance(value, str) or not re.fullmatch(NAME_PATTERN, value):
        raise PopflowError(f"{what} {value!r} is not a valid name ({NAME_RULE}): names become folder names")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Dtype = Literal["auto", "bfloat16", "float16", "float32"]
DTYPE_HELP = ("Compute dtype. auto: the fastest the device computes natively (bf16 on CUDA >= 8.0 and on CPUs "
              "with AVX512_BF16/AMX, fp16 on older GPUs, else float32; popflow/precision.py). An explicit dtype "
              "the device lacks runs through a slow fallback, with a warning.")
