"""The `python` reward kind: a user function `module:function`.

It is called once with every response of the run:

    def my_reward(prompts: list[str], responses: list[str], constraints: list[dict | None]) -> list[float]

and must return one number per response (ints and floats, numpy's included; NaN and inf are rejected by the
score stage). An exception, a result of the wrong length or a value that is not a number stops the stage
with one line naming the reward model (and the first offending sample): bad input, never retried.
"""

from __future__ import annotations

import numbers

import numpy as np

from popflow.errors import PopflowError
from popflow.plugins import load_function
from tasks.rewards import BadScore


def check_values(values, n: int, name: str, ref: str) -> np.ndarray:
    """The function's result as float64, or an error saying what is wrong with it."""
    try:
        values = list(values)
    except TypeError:
        raise PopflowError(f"reward model {name!r}: {ref} returned {type(values).__name__}, not a list of "
                           f"{n} numbers") from None
    if len(values) != n:
        raise PopflowError(f"reward model {name!r}: {ref} returned {len(values)} value(s) for {n} responses "
                           "(one number per response)")
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf":  # strings, None, bools, lists: find the first (only on this error path)
        i = next(i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, numbers.Real))
        raise BadScore(i, f"{ref} returned {values[i]!r} ({type(values[i]).__name__}), not a number")
    return arr.astype(np.float64)


def score(spec, batch, data_dir=None) -> np.ndarray:
    fn = load_function(spec.function, f"score.models[{spec.name}].function")
    try:
        values = fn(batch.prompts, batch.responses, batch.constraints)
    except Exception as exc:  # the user's code: any exception is their bad input, reported in one line
        raise PopflowError(f"reward model {spec.name!r}: {spec.function} raised {type(exc).__name__}: {exc}") from None
    return check_values(values, len(batch.responses), spec.name, spec.function)
