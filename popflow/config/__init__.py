"""Typed pipeline configuration: `pipelines.yaml` -> pydantic models, the one place defaults live.

`pipelines.yaml` maps a pipeline name to a `PipelineConfig`. Every model forbids unknown keys, so a typo
is an error naming the key and its line in the file. Overrides (`--set sample.n=8`) are applied to the raw
mapping before validation, so they are validated exactly like the file.

    from popflow.config import load_pipeline
    cfg = load_pipeline("tiny", overrides=["sample.n=4"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from popflow.config.base import DTYPE_HELP, NAME_PATTERN, NAME_RULE, Dtype, Strict, check_name
from popflow.config.execution import ExecutionConfig
from popflow.config.loop import LoopConfig
from popflow.config.service import ExportConfig, RetentionConfig, ScheduleConfig
from popflow.config.train import EvaluateConfig, ExperimentConfig, TrainConfig
from popflow.errors import PopflowError
from popflow.models import MINILM, PROMOTED, SMOLLM2

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "pipelines.yaml"

# The seven points of "Finding the Sweet Spot", lowest first: a chosen point must come later than the rejected.
POINTS = ("min", "mu-2sigma", "mu-sigma", "mu", "mu+sigma", "mu+2sigma", "max")
Point = Literal["min", "mu-2sigma", "mu-sigma", "mu", "mu+sigma", "mu+2sigma", "max"]


class ColumnMap(Strict):
    """Which source columns hold each prompts-table column."""

    prompt_id: str | None = Field("prompt_id", description="Column with a unique id; null numbers the rows 0..N-1.")
    prompt: str = Field("prompt", description="Column with the instruction text (a string).")
    split: str | None = Field("split", description="Column with 'train'/'eval'; missing -> eval_fraction.")
    constraints: str | None = Field("constraints", description="Column with verifiable constraints (dict).")
    instruction_ids: str | None = Field(
        "instruction_id_list", description="IFEval's format: column with a prompt's IFEval instruction ids (read "
        "when present; the `ifeval` reward kind scores them).")
    instruction_kwargs: str | None = Field(
        "kwargs", description="IFEval's format: column with one kwargs object per instruction id.")
    ground_truth: str | None = Field(
        None, description="open-instruct's format instead: column with [{'instruction_id': [...], 'kwargs': "
        "[...]}] (a list or JSON text).")


class PromptsConfig(Strict):
    source: str = Field(
        "data/prompts/demo.jsonl",
        description="A .jsonl or .parquet file (relative paths resolve against the config file's folder) "
        "or 'hf:<dataset>' for datasets.load_dataset.",
    )
    hf_config: str | None = Field(None, description="Dataset config name for 'hf:' sources.")
    hf_split: str = Field("train", description="Dataset split to read for 'hf:' sources.")
    hf_data_files: str | list[str] | None = Field(
        None, description="'hf:' sources only: data_files for load_dataset (e.g. hf:json with local files).")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Source column names.")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of prompts held out (by a hash of prompt_id) when the source "
        "has no split column.",
    )
    limit: int | None = Field(None, ge=1, description="Keep at most this many train prompts (first by id).")
    eval_limit: int | None = Field(None, ge=0, description="Keep at most this many eval prompts.")


class VllmOptions(Strict):
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="GPU: share of GPU memory vLLM may use. CPU: the most of the available "
        "RAM the KV cache may take; within it popflow sizes the cache to what the engine needs (a shard's "
        "sequences at the context length: popflow/engines.py cpu_kv_budget).",
    )
    enforce_eager: bool = Field(True, description="Skip graph capture: faster engine start-up on CPU.")
    max_model_len: int | None = Field(2048, ge=16, description="Context length; None = the model's own.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine.")
    cpu_threads_bind: str = Field(
        "all", pattern=r"^(all|auto|nobind|[0-9,|-]+)$", description="vLLM-CPU only: VLLM_CPU_OMP_THREADS_BIND "
        "for the engine. all = every core this process may run on; vLLM's own `auto` leaves a core to its "
        "scheduler, which is much slower on small machines (BENCHMARKS.md section 8). auto, nobind or a core "
        "list (0-3, 0-3|4-7 per tensor-parallel rank) go to vLLM as they are.")


class SampleConfig(Strict):
    policy: str = Field(SMOLLM2, description="Policy model: hub id, local directory or builtin:* (popflow/models.py).")
    engine: Literal["vllm", "transformers"] = Field(
        "vllm", description="vllm (the `vllm` package on CUDA, `vllm-cpu` elsewhere) or transformers generate.")
    n: int = Field(8, ge=2, description="Samples per prompt (>= 2: pairs need two responses).")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature (Sweet Spot: 0.8).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    max_tokens: int = Field(256, ge=1, description="Maximum new tokens per response.")
    seed: int = Field(0, description="Base seed; each prompt's seed is derived from it and the prompt_id.")
    shard_size: int = Field(
        512, ge=1, description="Prompts per shard: each shard goes to the engine in one call and is written "
        "when done, so a crash loses at most one shard.",
    )
    batch_size: int = Field(8, ge=1, description="transformers engine only: prompts per generate() call (n "
                            "sequences each); on a GPU without vLLM raise it (BENCHMARKS.md section 7).")
    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    system_prompt: str | None = Field(None, description="Optional system message before each prompt.")
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")
    long_prompts: Literal["skip", "fail"] = Field(
        "skip", description="A prompt whose rendered length leaves no room for max_tokens in the context "
        "(vllm.max_model_len, else the model's): skip drops it (counted in the stage report, listed in the "
        "skipped_prompts table), fail stops before the engine starts, naming the first such prompt_id. Checked "
        "with the tokenizer before sampling and before evaluate's generation.")
    vllm: VllmOptions = Field(default_factory=VllmOptions, description="vLLM engine options.")

    def engine_gpus(self) -> int:
        """The GPUs one engine of this config uses: tensor_parallel_size for vllm, else one."""
        return self.vllm.tensor_parallel_size if self.engine == "vllm" else 1


class _RewardBase(Strict):
    name: str = Field(..., pattern=NAME_PATTERN, description="Unique name; the reward_model column value (a name: "
                      f"{NAME_RULE}).")
    weight: float = Field(1.0, ge=0.0, description="Weight in aggregate: weighted.")


class HfReward(_RewardBase):
    kind: Literal["hf"]
    model: str = Field(..., description="An AutoModelForSequenceClassification reward model (ref as in sample).")
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass (sorted by length).")
    max_length: int = Field(2048, ge=16, description="Truncate longer (prompt, response) sequences.")
    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code.")


class ConstraintsReward(_RewardBase):
    kind: Literal["constraints"]
    unconstrained_score: float = Field(1.0, description="Score of a prompt that carries no constraints.")


class RelevanceReward(_RewardBase):
    kind: Literal["relevance"]
    model: str = Field(MINILM, description="Sentence embedding model (mean pooling).")
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    dtype: Dtype = Field("auto", description=DTYPE_HELP)


class IfevalReward(_RewardBase):
    kind: Literal["ifeval"]
    mode: Literal["strict", "loose"] = Field(
        "strict", description="IFEval's strict check, or loose (also without the first or last line, or asterisks).")
    unlabelled_score: float = Field(1.0, description="Score of a prompt that carries no IFEval instructions.")


class PythonReward(_RewardBase):
    kind: Literal["python"]
    function: str = Field(
        ..., pattern=r"^[\w.]+:\w+$", description="'module:function' called as f(prompts, responses, "
        "constraints) -> sequence of floats, one per response.",
    )


# The reward kinds, listed once: each kind is the module tasks/rewards/<kind>.py, which scores a batch.
REWARD_SPECS = (HfReward, ConstraintsReward, IfevalReward, RelevanceReward, PythonReward)
REWARD_KINDS = tuple(get_args(spec.model_fields["kind"].annotation)[0] for spec in REWARD_SPECS)
RewardModel = Annotated[Union[REWARD_SPECS], Field(discriminator="kind")]  # noqa: UP007 (a tuple of classes)
# kinds whose reports show a pass rate (the share of samples scoring 1: every check met) rather than a mean
PASS_RATE_KINDS = ("constraints", "ifeval")


class ScoreConfig(Strict):
    models: list[RewardModel] = Field(
        default_factory=lambda: [
            ConstraintsReward(kind="constraints", name="constraints"),
            RelevanceReward(kind="relevance", name="relevance"),
        ],
        description="Reward models; each writes its own score per sample (rewards table).",
    )
    aggregate: Literal["mean", "min", "weighted"] = Field(
        "mean", description="How per-model scores combine into sample_rewards.reward.")
    normalize: Literal["none", "zscore"] = Field(
        "zscore", description="zscore: standardise each model's scores over the run before aggregating, so "
        "models on different scales count equally.",
    )

    def uses(self, kind: str) -> bool:
        """Whether a reward model of this kind scores."""
        return any(m.kind == kind for m in self.models)

    def dtypes(self) -> dict[str, str]:
        """{config key: requested dtype} of the reward models that run a network (popflow.precision resolves)."""
        return {f"score.models[{m.name}].dtype": m.dtype for m in self.models if hasattr(m, "dtype")}

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list) -> list:
        if not models:
            raise ValueError("at least one reward model is needed")
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward model names must be unique; repeated: {dupes}")
        return models


class PairConfig(Strict):
    strategy: Literal["seven_point", "max_min", "random"] = Field(
        "seven_point", description="seven_point (Sweet Spot), max_min (the usual baseline) or random.")
    chosen: Point = Field("max", description=f"seven_point: chosen point, one of {POINTS}.")
    rejected: Point = Field("mu-2sigma", description="seven_point: rejected point; must lie below chosen.")
    extra_strategies: list[Literal["seven_point", "max_min", "random"]] = Field(
        default_factory=list, description="More strategies written beside the main one (their own pair_ids).")
    seed: int = Field(0, description="Seed of the random strategy.")

    @model_validator(mode="after")
    def _chosen_above_rejected(self) -> PairConfig:
        if POINTS.index(self.chosen) <= POINTS.index(self.rejected):
            raise ValueError(
                f"chosen point {self.chosen!r} must lie above rejected point {self.rejected!r} "
                f"(order: {' < '.join(POINTS)})")
        return self


class PairColumns(Strict):
    """Which source columns hold an imported pair (conversational lists or plain text)."""

    prompt_id: str | None = Field(None, description="Column with a prompt id; null hashes the prompt text.")
    prompt: str | None = Field("prompt", description="Prompt column; null when chosen/rejected hold the whole "
                               "conversation (the prompt is then their common prefix, as TRL extracts it).")
    chosen: str = Field("chosen", description="Chosen response column.")
    rejected: str = Field("rejected", description="Rejected response column.")
    chosen_score: str | None = Field(None, description="Chosen score column (gives gt_margin); optional.")
    rejected_score: str | None = Field(None, description="Rejected score column; optional.")


class ImportPairsConfig(Strict):
    source: str = Field(..., description="A .jsonl or .parquet file (relative to the config file) or "
                        "'hf:<dataset>' of scored preference pairs; replaces sample/score/pair.")
    hf_config: str | None = Field(None, description="Dataset config name for 'hf:' sources.")
    hf_split: str = Field("train", description="Dataset split for 'hf:' sources.")
    hf_data_files: str | list[str] | None = Field(None, description="'hf:' sources only: data_files.")
    columns: PairColumns = Field(default_factory=PairColumns, description="Source column names.")
    limit: int | None = Field(None, ge=1, description="Keep at most this many pairs (first in the source).")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of prompts held out for evaluation "
                                 "(by a hash of prompt_id, stable across runs).")
    normalize: Literal["zscore", "none"] = Field(
        "zscore", description="zscore: the scores z-normalised over the import (mean and population std of every "
        "chosen and rejected score), so gt_margin, the ground-truth margins and distillation targets are in the "
        "units score.normalize: zscore gives generated pairs; none: the source's own units (e.g. 1-10).")


class AnnotateConfig(Strict):
    pairs: str | None = Field(None, description="Which pairs.strategy to annotate; default: pair.strategy, or "
                              "'imported' when import_pairs is set.")
    sampling: list[Literal["iterative", "random"]] = Field(
        ["iterative"], min_length=1, description="iterative: every pair anchors k comparisons; random: k x N "
        "uniform comparisons (DPO-PoP, Chittepu et al. 2025). A list annotates each (the experiment's table "
        "compares both); one value or a list.")
    k: int = Field(2, ge=1, description="PoP labels per pair (the paper found 1-2 best).")
    partners: Literal["all", "same_prompt"] = Field("all", description="Draw partners from all pairs or only "
                                                    "from pairs of the same prompt.")
    train_on: Literal["all_pairs", "pop_winners"] | None = Field(
        None, description="Training-set composition; default all_pairs for iterative, pop_winners for random "
        "(our reading of the paper).")
    ground_truth: str = Field("aggregate", description="'aggregate' (pairs.gt_margin) or a reward model name "
                              "(its own chosen - rejected score).")
    noise: Literal["flip", "bradley_terry"] = Field("flip", description="flip: invert with probability p; "
                                                    "bradley_terry: P(a) = sigmoid((m_a - m_b) / tau).")
    p: float = Field(0.0, ge=0.0, lt=0.5, description="flip: label-noise probability, in [0, 0.5).")
    tau: float = Field(1.0, gt=0.0, description="bradley_terry: temperature (> 0).")
    @field_validator("sampling", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    ties: Literal["drop", "coin"] = Field("coin", description="Exactly equal margins: drop, or a fair coin.")
    seed: int = Field(0, description="Seed of partner draws and label noise.")
    labels: str | None = Field(None, description="People's labels instead of simulated ones: a Label Studio JSON "
                               "(or JSON-MIN) export of the tasks `popflow annotate export` wrote for this run "
                               "(relative to the config file; tasks/human_labels.py). null: simulate.")


class MarginsConfig(Strict):
    method: Literal["pop", "gt", "fixed", "none"] = Field(
        "pop", description="pop: Bradley-Terry strengths from PoP labels; gt: alpha * gt_margin; fixed: gamma; "
        "none: 0 (plain DPO).")
    scale: Literal["rank", "affine"] = Field("rank", description="pop: strengths -> margins by quantile rank, "
                                             "or affine with target_mean (both clipped to [0, max_margin]).")
    max_margin: float = Field(1.0, gt=0.0, description="Margins are clipped to [0, max_margin].")
    target_mean: float = Field(0.5, gt=0.0, description="scale affine: the mean margin.")
    alpha: float = Field(1.0, gt=0.0, description="gt: margin = alpha * gt_margin.")
    gamma: float = Field(0.5, ge=0.0, description="fixed: the margin of every pair.")
    prior_sigma: float = Field(1.0, gt=0.0, description="pop: std of the Gaussian prior on strengths.")


# Sections that say how a pipeline is operated, not what it computes: left out of the config hash.
OPERATIONAL = ("description", "schedule", "retention", "execution", "export")


# Keys added to a section (or a block of one: "prompts.columns") after runs were made with it: hashed only when
# they differ from their default, so a run made before they existed resumes with the same stage hashes.
LATER_KEYS = {"annotate": ("labels",),
              "prompts.columns": ("instruction_ids", "instruction_kwargs", "ground_truth")}

# stage hash keys that are values derived from several sections (PipelineConfig methods), not a section
DERIVED = {"trained_strategies": "trained_strategies"}


class PipelineConfig(Strict):
    description: str = Field("", description="What this pipeline is for.")
    seed: int = Field(0, description="Run-level seed recorded with every artifact.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Prompt source.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Stage 1: sampling.")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="Stage 2: reward models.")
    pair: PairConfig = Field(default_factory=PairConfig, description="Stage 3: pair construction.")
    import_pairs: ImportPairsConfig | None = Field(
        None, description="Start from an existing scored pairs dataset instead of sample/score/pair.")
    annotate: AnnotateConfig = Field(default_factory=AnnotateConfig, description="Stage 4: PoP labels.")
    margins: MarginsConfig = Field(default_factory=MarginsConfig, description="Stage 5: per-pair margins.")
    train: TrainConfig | None = Field(default_factory=TrainConfig, description="Stage 6: DPO-PoP and baselines "
                                      "on TRL; null stops the pipeline after margins.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Stage 7: held-out metrics.")
    loop: LoopConfig | None = Field(None, description="The on-policy loop: each run is a round that samples the "
                                    "latest promoted policy and may promote its own (popflow/config/loop.py); null: "
                                    "off.")
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig,
                                         description="`popflow experiment`: methods x seeds on one run's pairs.")
    schedule: ScheduleConfig | None = Field(default_factory=ScheduleConfig, description="When `popflow serve` "
                                            "runs the pipeline (nightly by default); null: on demand only.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig, description="How many runs to keep.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="`popflow export`: the dataset card's "
                                 "licence, tags and name (popflow/export.py); never hashed.")
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig, description="Where sample, score and evaluate "
                                       "run: here or as replicas on Ray (popflow/config/execution.py); never hashed.")

    @model_validator(mode="after")
    def _methods_fit_pipeline(self) -> PipelineConfig:
        for section, methods in (("train", self.train.methods if self.train else []),
                                 ("experiment", self.experiment.methods)):
            for i, m in enumerate(methods):
                if m.loss == "distill_pessimistic" and (self.import_pairs or len(self.score.models) < 2):
                    raise ValueError(f"{section}.methods[{i}]: distill_pessimistic takes the minimum over reward "
                                     "models and needs at least two in score.models")
                built = [self.pair.strategy, *self.pair.extra_strategies]
                if m.pairs and (self.import_pairs or m.pairs not in built):
                    why = "import_pairs brings its own pairs" if self.import_pairs else (
                        f"pair.strategy and pair.extra_strategies are {built}")
                    raise ValueError(f"{section}.methods[{i}].pairs {m.pairs!r}: not built ({why})")
                if m.pairs and m.pairs != self.annotated_strategy() and (m.loss == "dpo_pop" or m.sampling):
                    raise ValueError(f"{section}.methods[{i}]: {'dpo_pop' if m.loss == 'dpo_pop' else 'sampling'} "
                                     f"needs a PoP annotation, which exists for the annotated pairs "
                                     f"({self.annotated_strategy()!r}) only, not {m.pairs!r}")
                if section == "train" and m.sampling and m.sampling not in self.annotate.sampling:
                    raise ValueError(f"train.methods[{i}].sampling {m.sampling!r}: not annotated (annotate.sampling "
                                     f"is {self.annotate.sampling})")
            if section == "train":  # two methods under one name would write one adapter folder and one part
                names = [self.method_name(m) for m in methods]
                twice = sorted({n for n in names if names.count(n) > 1})
                if twice:
                    raise ValueError(f"train.methods: two methods are named {', '.join(twice)} (give one a name:)")
        return self

    @model_validator(mode="after")
    def _generation_has_prompts(self) -> PipelineConfig:
        if self.import_pairs is not None and self.train is not None and self.evaluate.generate:
            raise ValueError("evaluate.generate: an import_pairs pipeline has no prompts to sample the trained "
                             "policies on (set evaluate.generate: false; held-out pair accuracy needs none)")
        return self

    @model_validator(mode="after")
    def _loop_fits_pipeline(self) -> PipelineConfig:
        """A loop samples, trains, evaluates by generation and sets the policy and reference itself."""
        if self.loop is None:
            return self
        problems = [
            (self.import_pairs is not None, "import_pairs: a loop samples its own pairs (remove import_pairs)"),
            (self.train is None, "train: null: a loop trains a candidate every round"),
            (not self.evaluate.generate, "evaluate.generate: false: the gate compares generations"),
            (self.train is not None and self.train.policy is not None,
             "train.policy: a loop trains the policy it samples (remove train.policy)"),
            (self.train is not None and self.train.reference is not None,
             "train.reference: a loop sets it from loop.reference (initial or previous)"),
            (self.sample.policy.startswith(PROMOTED), "sample.policy: a loop's sample.policy is its chain's base; "
             "each round after the first samples the loop's own promoted policy"),
        ]
        if self.loop.pairs == "all":
            problems += [
                (self.annotate.ground_truth != "aggregate", "annotate.ground_truth: with loop.pairs: all, earlier "
                 "rounds' pairs carry only their aggregate gap (use aggregate)"),
                (any(m.loss == "distill_pessimistic" for m in (self.train.methods if self.train else [])),
                 "train.methods: distill_pessimistic needs per-model rewards, which earlier rounds' pairs (loop.pairs: "
                 "all) do not carry here"),
            ]
        names = [self.method_name(m) for m in (self.train.methods if self.train else [])]
        problems.append((self.loop.method is not None and self.loop.method not in names,
                         f"loop.method {self.loop.method!r}: not a train method ({', '.join(names)})"))
        scored = [m.name for m in self.score.models]
        problems += [(name not in scored, f"gate.guard {name!r}: not a reward model of score.models "
                      f"({', '.join(scored)})") for name in self.loop.gate.guard]
        for bad, message in problems:
            if bad:
                raise ValueError(f"loop: {message}")
        return self

    def method_name(self, method) -> str:
        """A train method's label in the train and eval tables: its name, else its loss (plus _<sampling> when
        it trains on another annotation than the first, _<pairs> when on another pair strategy's pairs)."""
        sampling = method.sampling or self.annotate.sampling[0]
        suffix = f"_{sampling}" if len(self.annotate.sampling) > 1 and sampling != self.annotate.sampling[0] else ""
        if self.trained_strategy(method) != self.annotated_strategy():
            suffix += f"_{method.pairs}_pairs"
        return method.name or f"{method.loss}{suffix}"

    def trained_strategy(self, method) -> str:
        """The pair strategy a train method trains on: its `pairs`, else the annotated one."""
        return method.pairs or self.annotated_strategy()

    def trained_strategies(self) -> list[str]:
        """Every pair strategy the train methods train on: the annotated one, then the others sorted (ref_logps
        covers them; the order of train.methods changes nothing)."""
        annotated = self.annotated_strategy()
        methods = self.train.methods if self.train else []
        return [annotated, *sorted({self.trained_strategy(m) for m in methods} - {annotated})]

    def candidate_method(self) -> str:
        """The train method whose first seed is a loop round's candidate."""
        return self.loop.method or self.method_name(self.train.methods[0])

    def dtypes(self) -> dict[str, str]:
        """Every `dtype` key of the pipeline and what it asks for (popflow doctor shows how each resolves)."""
        return {"sample.dtype": self.sample.dtype, **self.score.dtypes(),
                **({"train.dtype": self.train.dtype} if self.train else {})}

    def train_policy(self) -> str:
        """The model trained: train.policy, else the sampled policy."""
        return self.train.policy or self.sample.policy

    def reference_policy(self) -> str:
        """The DPO reference: train.reference, else the trained policy's starting point."""
        return self.train.reference or self.train_policy()

    def annotated_strategy(self) -> str:
        return self.annotate.pairs or ("imported" if self.import_pairs else self.pair.strategy)

    def train_on(self, sampling: str) -> str:
        return self.annotate.train_on or ("all_pairs" if sampling == "iterative" else "pop_winners")

    def hash(self, *sections: str) -> str:
        """Hash of the whole config, or of the named sections (a stage's own inputs): a section, one field of it
        ("train.reference"), or a value derived from several (DERIVED: "trained_strategies")."""
        data = self.model_dump(mode="json", exclude=set(OPERATIONAL))
        for path, keys in LATER_KEYS.items():  # at its default, a key added later leaves earlier hashes as they were
            block, model = data, type(self)
            for name in path.split("."):
                block, model = block.get(name) or {}, model.model_fields[name].annotation
            for key in keys:
                if key in block and block[key] == model.model_fields[key].default:
                    del block[key]
        if sections:
            data = {k: getattr(self, DERIVED[k])() if k in DERIVED else
                    data[k.split(".")[0]][k.split(".")[1]] if "." in k else data[k] for k in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- loading


def read_pipelines(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """The raw mapping of a pipelines file and its YAML node tree (for line numbers in errors)."""
    if not path.is_file():
        raise PopflowError(f"{path}: config file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text) or {}
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise PopflowError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise PopflowError(f"{path}: expected a mapping of pipeline name -> pipeline config")
    for name in raw:
        check_name(name, f"{path}:{_line_of(node, (name,))}: pipeline")
    return raw, node


def _line_of(node: yaml.Node | None, keys: tuple) -> int | None:
    """The 1-based line of the deepest existing node on a key path."""
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(key)]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (8, true, [1, 2], text)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise PopflowError(f"--set {assignment!r}: expected key.path=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PopflowError(f"--set {assignment!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise PopflowError(f"--set {assignment!r}: the value is not valid YAML ({exc.problem}); quote it, "
                           f"e.g. {key}='{value}'") from None


def format_errors(exc: ValidationError, source: str, name: str, node: yaml.Node | None) -> str:
    lines = []
    for err in exc.errors():
        # pydantic puts the union member's tag after a list index (score.models.0.hf.model): not a config key
        raw = err["loc"]
        loc = tuple(p for i, p in enumerate(raw) if not (p in REWARD_KINDS and i and isinstance(raw[i - 1], int)))
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(node, (name, *loc))
        where = f"{source}:{line}" if line else source
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{where}: pipeline {name!r}: {key}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict, own: dict) -> dict:
    """`own` over `base`: mappings merge key by key, any other value (a list included) replaces."""
    out = dict(base)
    for key, value in own.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def extended(raw: dict, name: str, path: Path, node: yaml.Node | None, chain: tuple = ()) -> dict:
    """Pipeline `name`'s mapping with `extends: <pipeline>` resolved: the named pipeline's settings (its own
    `extends` first) deep-merged under this one's, so pipelines share settings instead of copying them."""
    own = raw[name]
    parent = own.get("extends")
    if parent is None:
        return own
    where = f"{path}:{_line_of(node, (name, 'extends'))}: pipeline {name!r}: extends"
    if not isinstance(parent, str) or parent not in raw:
        raise PopflowError(f"{where} {parent!r}: no such pipeline in this file")
    if parent in (*chain, name):
        raise PopflowError(f"{where} {parent!r}: a cycle ({' -> '.join((*chain, name, parent))})")
    return deep_merge(extended(raw, parent, path, node, (*chain, name)),
                      {k: v for k, v in own.items() if k != "extends"})


def load_pipeline(name: str, config_path: Path | None = None, overrides: list[str] | tuple = ()) -> PipelineConfig:
    """Load and validate one named pipeline, with `key.path=value` overrides applied first."""
    path = Path(config_path or DEFAULT_CONFIG).resolve()
    check_name(name, "pipeline")
    raw, node = read_pipelines(path)
    if name not in raw:
        raise PopflowError(f"{path}: no pipeline named {name!r}; available: {', '.join(raw)}")
    data = json.loads(json.dumps(extended(raw, name, path, node)))  # a copy: overrides never touch the file
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise PopflowError(format_errors(exc, str(path), name, node)) from None
    return resolve_paths(cfg, path.parent)


def _absolute(source: str, base: Path) -> str:
    return source if source.startswith("hf:") or Path(source).is_absolute() else str((base / source).resolve())


def resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    """Make relative source files absolute against the config file's folder (not the caller's cwd)."""
    update = {"prompts": cfg.prompts.model_copy(update={"source": _absolute(cfg.prompts.source, base)})}
    if cfg.import_pairs:
        update["import_pairs"] = cfg.import_pairs.model_copy(
            update={"source": _absolute(cfg.import_pairs.source, base)})
    if cfg.annotate.labels:
        update["annotate"] = cfg.annotate.model_copy(update={"labels": _absolute(cfg.annotate.labels, base)})
    return cfg.model_copy(update=update)


def pipeline_names(config_path: Path | None = None) -> list[str]:
    return list(read_pipelines(Path(config_path or DEFAULT_CONFIG))[0])
