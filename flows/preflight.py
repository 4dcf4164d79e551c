"""What can be checked without a model, before Prefect starts: `popflow run` calls it first, so bad input
fails in about a second with one line (exit 2); the flow calls it again for deployment runs.

    sources          every prompt of prompts.source (ids unique, splits, constraints) or every pair of
                     import_pairs.source: exists and parses (hf: datasets load at run time: they need the hub)
    models           every model reference: built-ins known, local paths exist and hold config.json
                     (hub ids load at run time), `promoted:<pipeline>` names a pipeline of the file (its
                     promoted files are checked when the run pins it: popflow/lineage.py)
    reward functions every `python` reward's module:function imports and is callable
    execution        a Ray backend: ray is installed and RAY_ADDRESS (or execution.ray.address) answers;
                     train.accelerate: its config file exists (and deepspeed is installed when it names DeepSpeed)

    .venv/bin/popflow validate            # preflight of every pipeline in pipelines.yaml

It reuses the stages' own validators (tasks/prompts.py, tasks/import_pairs.py), so a check here and in the
stage never disagree.
"""

from __future__ import annotations

from pathlib import Path

from popflow import cluster, models
from popflow.config import PipelineConfig, pipeline_names
from popflow.errors import PopflowError
from popflow.lineage import policy_refs
from popflow.plugins import load_function
from tasks.import_pairs import load_imported_pairs
from tasks.prompts import load_prompts
from tasks.train_launch import check_launch


def check_promoted_refs(cfg: PipelineConfig, config_path: str | Path | None) -> None:
    """Every `promoted:<pipeline>` reference names a pipeline of the config file."""
    for key, ref in policy_refs(cfg).items():
        if ref.startswith(models.PROMOTED):
            known = pipeline_names(config_path)
            if ref.removeprefix(models.PROMOTED) not in known:
                raise PopflowError(f"{key} {ref!r}: no pipeline named {ref.removeprefix(models.PROMOTED)!r} in "
                                   f"{config_path or 'pipelines.yaml'}; available: {', '.join(known)}")


def preflight(cfg: PipelineConfig, config_path: str | Path | None = None) -> None:
    """Raise a PopflowError naming the first bad input of this config (see the module docstring); promoted
    references are looked up in `config_path` (default: pipelines.yaml)."""
    check_promoted_refs(cfg, config_path)
    if cfg.import_pairs:
        if not cfg.import_pairs.source.startswith("hf:"):
            load_imported_pairs(cfg.import_pairs)
    else:
        if not cfg.prompts.source.startswith("hf:"):
            load_prompts(cfg.prompts)
        models.check_ref(cfg.sample.policy, "sample.policy")
        for spec in cfg.score.models:
            if hasattr(spec, "model"):
                models.check_ref(spec.model, f"score.models[{spec.name}].model")
            if spec.kind == "python":
                load_function(spec.function, f"score.models[{spec.name}].function")
    if cfg.train:
        models.check_ref(cfg.train_policy(), "train.policy")
        models.check_ref(cfg.reference_policy(), "train.reference")

    if cfg.train and cfg.train.accelerate:
        check_launch(cfg.train.accelerate)
    if cfg.execution.uses_ray():
        cluster.check_ray(cfg.execution.ray)
