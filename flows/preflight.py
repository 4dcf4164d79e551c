"""What can be checked without a model, before Prefect starts: `popflow run` calls it first, so bad input
fails in about a second with one line (exit 2), and hands the flow the config it checked (`hand_over`), so a
run loads and checks its config once; a run without the CLI before it (a deployment's, a loop's later rounds)
checks once in the flow (`checked`).

    sources          every prompt of prompts.source (ids unique, splits, constraints, IFEval labels) or every
                     pair of import_pairs.source: exists and parses (hf: datasets load at run time: they need the
                     hub); held-out prompts exist when evaluate generates, and are at least loop.gate.min_prompts;
                     an `ifeval` reward has labelled prompts to score
    models           every model reference: built-ins known, local paths exist and hold config.json
                     (hub ids load at run time), `promoted:<pipeline>` names a pipeline of the file (its
                     promoted files are checked when the run pins it: popflow/lineage.py)
    reward functions every `python` reward's module:function imports and is callable
    human labels     annotate.labels: a readable Label Studio export whose answers are A or B
    execution        a Ray backend: ray is installed and RAY_ADDRESS (or execution.ray.address) answers;
                     train.accelerate: its config file exists (and deepspeed is installed when it names DeepSpeed)

    .venv/bin/popflow validate            # preflight of every pipeline in pipelines.yaml

It reuses the stages' own validators (tasks/prompts.py, tasks/import_pairs.py), so a check here and in the
stage never disagree.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from popflow import cluster, models
from popflow.config import PipelineConfig, load_pipeline, pipeline_names
from popflow.errors import PopflowError
from popflow.lineage import policy_refs
from popflow.plugins import load_function
from tasks.human_labels import read_answers
from tasks.import_pairs import load_imported_pairs
from tasks.prompts import check_ifeval_labels, load_prompts
from tasks.train_launch import check_launch


def check_promoted_refs(cfg: PipelineConfig, config_path: str | Path | None) -> None:
    """Every `promoted:<pipeline>` reference names a pipeline of the config file."""
    for key, ref in policy_refs(cfg).items():
        if ref.startswith(models.PROMOTED):
            known = pipeline_names(config_path)
            if ref.removeprefix(models.PROMOTED) not in known:
                raise PopflowError(f"{key} {ref!r}: no pipeline named {ref.removeprefix(models.PROMOTED)!r} in "
                                   f"{config_path or 'pipelines.yaml'}; available: {', '.join(known)}")


def check_gate_size(cfg: PipelineConfig) -> None:
    """A loop whose gate needs more held-out prompts than prompts.eval_limit / evaluate.max_prompts allow could
    never promote: say so before any round runs."""
    gate = cfg.loop.gate if cfg.loop else None
    caps = {k: v for k, v in (("prompts.eval_limit", cfg.prompts.eval_limit),
                              ("evaluate.max_prompts", cfg.evaluate.max_prompts)) if v is not None}
    for key, cap in caps.items():
        if gate and gate.min_win_rate is not None and cap < gate.min_prompts:
            raise PopflowError(f"{key} {cap} < loop.gate.min_prompts {gate.min_prompts}: the gate would never "
                               "promote; give it more held-out prompts or lower loop.gate.min_prompts")


def check_heldout(cfg: PipelineConfig, held_out: int) -> None:
    """Evaluate's generation (and so a loop's gate) needs held-out prompts (split: eval)."""
    usable = min(held_out, cfg.evaluate.max_prompts or held_out)
    if cfg.train and cfg.evaluate.generate and usable == 0:
        raise PopflowError(f"prompts.source {cfg.prompts.source}: no held-out prompt (split: eval) after "
                           "prompts.eval_limit; evaluate generates on held-out prompts: mark some `split: eval`, "
                           "set prompts.eval_fraction, or set evaluate.generate: false")
    gate = cfg.loop.gate if cfg.loop else None
    if gate and gate.min_win_rate is not None and usable < gate.min_prompts:
        raise PopflowError(f"prompts.source {cfg.prompts.source}: {usable} held-out prompts < loop.gate.min_prompts "
                           f"{gate.min_prompts}: the gate would never promote")


def preflight(cfg: PipelineConfig, config_path: str | Path | None = None) -> None:
    """Raise a PopflowError naming the first bad input of this config (see the module docstring); promoted
    references are looked up in `config_path` (default: pipelines.yaml)."""
    check_promoted_refs(cfg, config_path)
    if cfg.import_pairs:
        if not cfg.import_pairs.source.startswith("hf:"):
            load_imported_pairs(cfg.import_pairs)
    else:
        check_gate_size(cfg)
        if not cfg.prompts.source.startswith("hf:"):
            prompts = load_prompts(cfg.prompts, cfg.score.uses("ifeval"))
            check_heldout(cfg, prompts.column("split").to_pylist().count("eval"))
            check_ifeval_labels(cfg, prompts)
        models.check_ref(cfg.sample.policy, "sample.policy")
        for spec in cfg.score.models:
            if hasattr(spec, "model"):
                models.check_ref(spec.model, f"score.models[{spec.name}].model")
            if spec.kind == "python":
                load_function(spec.function, f"score.models[{spec.name}].function")
    if cfg.train:
        models.check_ref(cfg.train_policy(), "train.policy")
        models.check_ref(cfg.reference_policy(), "train.reference")

    if cfg.annotate.labels:  # readable, and every answer A or B; which comparisons they are: the annotate stage
        read_answers(cfg.annotate.labels)
    if cfg.train and cfg.train.accelerate:
        check_launch(cfg.train.accelerate)
    if cfg.execution.uses_ray():
        cluster.check_ray(cfg.execution.ray)


_HANDED: dict[tuple, PipelineConfig] = {}  # (pipeline, config path, overrides) -> the config checked for one run


def _key(pipeline: str, config_path: str | Path | None, overrides: list[str]) -> tuple:
    return pipeline, str(Path(config_path).resolve()) if config_path else None, tuple(overrides)


def hand_over(pipeline: str, config_path: str | Path | None, overrides: list[str], cfg: PipelineConfig) -> None:
    """The config the caller has just loaded and preflighted for the flow it starts next, in this process (the
    caller forgets it when that flow returns: `handing_over`, or the CLI's `forget`)."""
    _HANDED[_key(pipeline, config_path, overrides)] = cfg


@contextmanager
def handing_over(pipeline: str, config_path: str | Path | None, overrides: list[str], cfg: PipelineConfig):
    """hand_over for the flow called inside; forgotten after it, taken or not (it may fail before it checks)."""
    hand_over(pipeline, config_path, overrides, cfg)
    try:
        yield
    finally:
        _HANDED.pop(_key(pipeline, config_path, overrides), None)


def forget() -> None:
    """Drop every config handed over and not taken (the CLI, once its command has run)."""
    _HANDED.clear()


def checked(pipeline: str, config_path: str | Path | None, overrides: list[str]) -> PipelineConfig:
    """The run's config, loaded and preflighted once: the one handed over for these arguments (taken, so a
    later run in the same process, a served pipeline's next night, checks afresh), else loaded and checked now."""
    cfg = _HANDED.pop(_key(pipeline, config_path, overrides), None)
    if cfg is None:
        cfg = load_pipeline(pipeline, config_path, overrides)
        preflight(cfg, config_path)
    return cfg
