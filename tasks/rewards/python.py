"""The `python` reward kind: a user function `module:function`.

It is called once with every response of the run:

    def my_reward(prompts: list[str], responses: list[str], constraints: list[dict | None]) -> list[float]

and must return one number per response (NaN and inf are rejected by the score stage).
"""

from __future__ import annotations

import numpy as np

from popflow.errors import PopflowError
from popflow.plugins import load_function


def score(spec, batch, data_dir=None) -> np.ndarray:
    key = f"score.models[{spec.name}].function"
    fn = load_function(spec.function, key)
    values = np.asarray(fn(batch.prompts, batch.responses, batch.constraints), dtype=np.float64)
    if values.shape != (len(batch.responses),):
        raise PopflowError(f"{key}: returned shape {values.shape}, expected ({len(batch.responses)},)")
    return values
