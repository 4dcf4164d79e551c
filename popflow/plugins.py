"""User code named in a pipeline config as 'module:function' (the `python` reward kind), imported with an
error that names the config key.

    from popflow.plugins import load_function
    fn = load_function("tests.fixtures.rewards:length_reward", "score.models[mine].function")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from popflow.errors import PopflowError


def load_function(ref: str, key: str) -> Callable:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PopflowError(f"{key}: cannot import module {module_name!r}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PopflowError(f"{key}: {module_name!r} has no function {attr!r}")
    return fn
