"""The config reference (docs/config.md), written from the pydantic schema so that it cannot go stale.

Every key of a pipeline in pipelines.yaml, section by section: its type, default, bounds and the
description its `Field` carries in popflow/config/. A test (tests/test_docs.py) fails when
docs/config.md differs from what this writes, so a changed key changes the reference.

    .venv/bin/python -m popflow.config.reference > docs/config.md
"""

from __future__ import annotations

import json
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from popflow.config import PipelineConfig
from popflow.report import markdown_table

HEADER = """# Configuration reference

Every key of a pipeline in `pipelines.yaml`, generated from the typed config (`popflow/config/`) by
`python -m popflow.config.reference > docs/config.md`; a test fails when this file is out of date. Unknown keys
and bad values are errors naming the key and its line. `extends: NAME` starts a pipeline from another's keys:
mappings merge key by key, and any other value of its own, a list included, replaces the base's.
`--set key.path=value` overrides one key for a run.
"""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The config models an annotation holds (directly, optionally, in a list or as a union of kinds)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models(arg)]


def type_name(annotation: Any) -> str:
    """A short, YAML-minded spelling of a field's type: `int`, `a | b`, `list of str`, `null`."""
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " \\| ".join(json.dumps(a) if isinstance(a, str) else str(a).lower() for a in get_args(annotation))
    if origin is Annotated:
        return type_name(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " \\| ".join(dict.fromkeys(type_name(a) for a in get_args(annotation)))
    if origin is list:
        return f"list of {type_name(get_args(annotation)[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: Any) -> str:
    """The default as YAML would spell it; `required` when there is none."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return json.dumps([v.model_dump(exclude_defaults=True, mode="json") for v in value])
    return json.dumps(value, default=str)


def bounds_text(field: Any) -> str:
    """The field's numeric bounds and pattern (`>= 1`, `< 0.5`)."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in signs.items() if hasattr(m, key)]
    return ", ".join(parts)


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split()) if text else ""


def section(model: type[BaseModel], path: str, out: list[str]) -> None:
    """The table of one section's keys, then the sections it holds, each under its dotted path."""
    title = path or "top level"
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += ["", f"## `{title}`" if path else f"## {title}", ""]
    if doc:
        out += [doc, ""]
    nested: list[tuple[type[BaseModel], str]] = []
    rows = []
    for name, field in model.model_fields.items():
        rows.append([f"`{name}`", type_name(field.annotation), f"`{_cell(default_text(field))}`", bounds_text(field),
                     _cell(field.description or "")])
        kinds = _models(field.annotation)
        for kind in kinds:
            suffix = ""
            if len(kinds) > 1 and "kind" in kind.model_fields:
                suffix = f" (kind: {get_args(kind.model_fields['kind'].annotation)[0]})"
            key = f"{path}.{name}" if path else name
            nested.append((kind, f"{key}{'[]' if get_origin(field.annotation) is list else ''}{suffix}"))
    out.append(markdown_table(["key", "type", "default", "bounds", "what it does"], rows))
    for kind, sub in nested:
        section(kind, sub, out)


def render() -> str:
    """docs/config.md's whole text."""
    out = [HEADER.rstrip()]
    section(PipelineConfig, "", out)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
