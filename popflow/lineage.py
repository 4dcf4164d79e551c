"""Policy lineage of the on-policy loop, and pinning `promoted:` references when a run starts.

Every round of a loop pipeline ends in the `promote` stage (tasks/promote.py), which writes one row to the
`lineage` table: the candidate policy, its parent (the policy the round sampled and started from), its
reference, the runs whose pairs trained it, the gate's figures and verdict. A round counts once its promote
stage is complete (its manifest exists). The head of a pipeline's chain is its latest promoted policy,
stored merged (a plain model directory) under DATA_DIR/models/promoted/<pipeline>/<run_id>/.

A run pins what its policies are when it first starts, in its run record (`pins`), and a resumed run reuses
the pins, so a later promotion never changes a run half-way:
- a loop pipeline samples (and trains from) its own head, or `sample.policy` (the chain's base) before any
  promotion; its reference is the base (`loop.reference: initial`) or that same head (`previous`);
- `promoted:<pipeline>` in sample.policy, train.policy or train.reference resolves to that pipeline's head,
  else to its sample.policy.
Round r samples with seed sample.seed + r - 1 (`seed_offset`), so a round that retries the policy a failed
gate left draws new samples. A head whose files have gone (retention, a moved data dir, a hand-deleted
folder) is an error naming the policy and the run that made it: never a silent fallback to the base.

    .venv/bin/popflow policies tiny_loop          # the lineage table
    .venv/bin/popflow sql "select * from policy_chain"   # the promoted chain of every pipeline
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from popflow.config import PipelineConfig, load_pipeline
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.models import PROMOTED, fingerprint

# The `lineage` table, one row per round: written by the promote stage, read here (the chain, pinning).
LINEAGE_SCHEMA = pa.schema([
    ("round", pa.int64()), ("method", pa.string()), ("seed", pa.int64()), ("policy_path", pa.string()),
    ("adapter", pa.bool_()), ("parent_ref", pa.string()), ("parent_path", pa.string()),
    ("parent_round", pa.int64()), ("parent_run_id", pa.string()), ("reference_kind", pa.string()),
    ("reference_path", pa.string()), ("reference_round", pa.int64()), ("pairs", pa.string()),
    ("pair_runs", pa.list_(pa.string())), ("train_pairs", pa.int64()), ("comparisons", pa.int64()),
    ("prompts", pa.int64()), ("win_rate", pa.float64()), ("win_lower", pa.float64()), ("win_upper", pa.float64()),
    ("bound", pa.string()), ("alpha", pa.float64()), ("heldout_accuracy", pa.float64()),
    ("promoted", pa.bool_()), ("reason", pa.string()), ("promoted_path", pa.string()),
    ("promoted_fingerprint", pa.string()), ("content_hash", pa.string()), ("created_at", pa.string()),
])


def complete_rounds(lake: Lake, pipeline: str) -> list[dict]:
    """The lineage rows of the pipeline's complete rounds (promote manifest written), oldest round first."""
    rows: list[dict] = []
    for run_dir in (lake.root / "_runs" / f"pipeline={pipeline}").glob("run=*"):
        if (run_dir / "stages" / "promote.json").is_file():
            part = lake.partition("lineage", pipeline, run_dir.name.removeprefix("run="))
            for path in sorted(part.glob("*.parquet")):
                rows += pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda r: (r["round"], r["run_id"]))


def head(rows: list[dict]) -> dict | None:
    """The latest promoted row of a chain (complete_rounds), or None before any promotion."""
    promoted = [r for r in rows if r["promoted"]]
    return promoted[-1] if promoted else None


def describe(row: dict) -> str:
    return (f"the promoted policy of {row['pipeline']!r} round {row['round']} ({row['method']}-s{row['seed']}, "
            f"made by run {row['run_id']})")


def check_promoted(policy: dict, path: str, recorded: str) -> None:
    """A promoted policy's files must be where it was recorded, unchanged. `policy`: its lineage row or a pin
    of it (both carry pipeline, round, method, seed and run_id, for the message)."""
    if not (Path(path) / "config.json").is_file():
        raise PopflowError(f"{describe(policy)} is gone: {path} does not hold a model (deleted, or the data dir "
                           "moved); restore it, or start the chain again with a new pipeline name")
    if fingerprint(Path(path)) != recorded:
        raise PopflowError(f"{describe(policy)} has changed on disk: {path} no longer matches its recorded "
                           f"fingerprint {recorded}")


def as_pin(ref: str, row: dict | None) -> dict:
    """What a reference resolved to: the model path a stage loads, and the promoted policy it is, if one."""
    if row is None:
        return {"ref": ref, "path": ref, "round": 0, "run_id": None, "method": None, "seed": None,
                "fingerprint": None, "content_hash": None}
    return {"ref": ref, "path": row["promoted_path"], "round": row["round"], "run_id": row["run_id"],
            "method": row["method"], "seed": row["seed"], "fingerprint": row["promoted_fingerprint"],
            "content_hash": row["content_hash"], "pipeline": row["pipeline"]}


def resolve_promoted(ref: str, lake: Lake, config_path: str | Path | None, key: str) -> dict:
    """Pin one reference: `promoted:<pipeline>` -> that pipeline's head (checked), else its sample.policy."""
    if not ref.startswith(PROMOTED):
        return as_pin(ref, None)
    name = ref.removeprefix(PROMOTED)
    try:
        other = load_pipeline(name, config_path)
    except PopflowError as err:
        raise PopflowError(f"{key} {ref!r}: {err}") from None
    row = head(complete_rounds(lake, name))
    if row is None:
        if other.sample.policy.startswith(PROMOTED):
            raise PopflowError(f"{key} {ref!r}: pipeline {name!r} has promoted nothing yet and its own sample.policy "
                               f"is {other.sample.policy!r}; name a model as its base")
        return {**as_pin(other.sample.policy, None), "ref": ref}
    check_promoted(row, row["promoted_path"], row["promoted_fingerprint"])
    return as_pin(ref, row)


def policy_refs(cfg: PipelineConfig) -> dict[str, str]:
    """The config keys that may name `promoted:<pipeline>`, and what they name (unset keys left out)."""
    refs = {"sample.policy": cfg.sample.policy}
    if cfg.train:
        refs |= {"train.policy": cfg.train.policy, "train.reference": cfg.train.reference}
    return {key: ref for key, ref in refs.items() if ref}


def new_pins(cfg: PipelineConfig, pipeline: str, lake: Lake, config_path: str | Path | None) -> dict:
    """The pins of a run starting now (see the module docstring)."""
    pins: dict = {}
    if cfg.loop is not None:
        rows = complete_rounds(lake, pipeline)
        base = resolve_promoted(cfg.sample.policy, lake, config_path, "sample.policy")
        current = head(rows)
        if current is not None:
            check_promoted(current, current["promoted_path"], current["promoted_fingerprint"])
        current_pin = as_pin(f"{PROMOTED}{pipeline}", current) if current else base
        number = max((r["round"] for r in rows), default=0) + 1
        pins["loop"] = {"round": number, "seed_offset": seed_offset(number),
                        "base": base, "parent": current_pin,
                        "reference_kind": cfg.loop.reference,
                        "pair_runs": [[r["round"], r["run_id"]] for r in rows] if cfg.loop.pairs == "all" else []}
        pins["sample.policy"] = current_pin
        pins["train.reference"] = base if cfg.loop.reference == "initial" else current_pin
        return pins
    for key, ref in policy_refs(cfg).items():  # sample.policy always: its pin is what the run samples
        if key == "sample.policy" or ref.startswith(PROMOTED):
            pins[key] = resolve_promoted(ref, lake, config_path, key)
    return pins


def seed_offset(number: int) -> int:
    """What a loop's round `number` adds to sample.seed: 0 in round 1, one more each round after. A round
    after a failed gate samples the same policy again; with the same seed it would draw the same samples,
    train the same candidate and fail the same way, every round after (and a nightly loop would never move
    again). Pinned with the round (`pins.loop.seed_offset`), so a resumed round keeps its seed; a round
    pinned before the offset existed has none and keeps sample.seed, the seed its stages were hashed with."""
    return number - 1


def pin(cfg: PipelineConfig, pipeline: str, lake: Lake, record: dict | None,
        config_path: str | Path | None) -> tuple[PipelineConfig, dict]:
    """The config a run's stages see (promoted references replaced by model paths) and its pins: the run
    record's own when the run is resumed (their promoted files checked again), else pinned now."""
    pins = (record or {}).get("pins")
    if pins is None:
        pins = new_pins(cfg, pipeline, lake, config_path)
    else:
        for value in (v for k, v in pins.items() if k != "loop"):
            if value.get("fingerprint"):  # a promoted policy, not a model reference
                check_promoted(value, value["path"], value["fingerprint"])
    sample = {"policy": pins["sample.policy"]["path"]}
    if pins.get("loop"):
        sample["seed"] = cfg.sample.seed + pins["loop"].get("seed_offset", 0)
    update: dict = {"sample": cfg.sample.model_copy(update=sample)}
    if cfg.train:
        train = {k.split(".")[1]: v["path"] for k, v in pins.items() if k.startswith("train.")}
        update["train"] = cfg.train.model_copy(update=train)
    return cfg.model_copy(update=update), pins


def unfinished_round(lake: Lake, pipeline: str, cfg: PipelineConfig) -> str | None:
    """The run id of the pipeline's latest loop round when it never finished (killed or failed) and has the
    same config: a new round resumes it instead of starting a second round of the same number."""
    rounds = [r for r in lake.read_runs(pipeline) if (r.get("pins") or {}).get("loop")]
    if not rounds:
        return None
    last = rounds[-1]
    done = lake.manifest_path(pipeline, last["run_id"], "promote").is_file()
    return last["run_id"] if not done and last.get("config_hash") == cfg.hash() else None


def uses_promoted(cfg: PipelineConfig) -> bool:
    """Whether a run of this config pins promoted policies (a loop, or a promoted: reference)."""
    return cfg.loop is not None or any(ref.startswith(PROMOTED) for ref in policy_refs(cfg).values())


def prepare_run(cfg: PipelineConfig, pipeline: str, lake: Lake, run_id: str | None, config_path: str | Path | None,
                from_stage: str | None = None) -> tuple[str | None, PipelineConfig, dict]:
    """What a run about to start will be: its run id (the given one; for a loop, else its unfinished round; None:
    a new run), the config its stages see and its pins. The CLI calls it before Prefect starts, so a gone
    promoted policy or a refused rerun fails in a second; the flow calls it again."""
    if run_id is None and cfg.loop is not None:
        found = unfinished_round(lake, pipeline, cfg)
        if found and not round_taken(lake, pipeline, lake.read_run(pipeline, found)):  # else a new round
            run_id = found
    record = lake.read_run(pipeline, run_id) if run_id else None
    if run_id and cfg.loop is not None:
        check_rerun(lake, pipeline, run_id, record, from_stage)
    if record and cfg.loop is not None:
        check_round_free(lake, pipeline, record)
    run_cfg, pins = pin(cfg, pipeline, lake, record, config_path)
    return run_id, run_cfg, pins


def record_pins(record: dict) -> list[dict]:
    """Every policy a run record pinned: its keys' pins and, for a loop round, its base and parent."""
    pins = record.get("pins") or {}
    loop = pins.get("loop") or {}
    return [v for k, v in pins.items() if k != "loop"] + [loop[k] for k in ("base", "parent") if loop.get(k)]


def all_records(lake: Lake) -> list[dict]:
    """The run records of every pipeline in the lake."""
    return [r for name in lake.pipelines() for r in lake.read_runs(name)]


def pinned_by(lake: Lake, pipeline: str, run_id: str) -> list[str]:
    """'<pipeline>/<run_id>' of every other run (any pipeline, any status) that pinned the promoted policy made
    by this run: it sampled from it, trains from it or uses it as its reference."""
    return [f"{r['pipeline']}/{r['run_id']}" for r in all_records(lake)
            if (r["pipeline"], r["run_id"]) != (pipeline, run_id)
            and any(p.get("pipeline") == pipeline and p.get("run_id") == run_id for p in record_pins(r))]


def pinned_runs(lake: Lake, pipeline: str) -> set[str]:
    """The runs of `pipeline` whose promoted policies a run of any pipeline that has not completed pinned (it
    may be running, or be resumed): retention must keep their folders."""
    return {p["run_id"] for r in all_records(lake) if r.get("status") != "completed"
            for p in record_pins(r) if p.get("pipeline") == pipeline and p.get("run_id")}


def round_of(record: dict | None) -> int | None:
    return (((record or {}).get("pins") or {}).get("loop") or {}).get("round")


def check_rerun(lake: Lake, pipeline: str, run_id: str, record: dict | None, from_stage: str | None) -> None:
    """A loop round's promote may not run again (--from-stage) once other runs pinned what it promoted (their
    samples and lineage would name weights that this rerun's gate never saw), nor once a later round has
    started (it chose its parent by this round's verdict)."""
    if not from_stage:
        return
    users = pinned_by(lake, pipeline, run_id)
    if users:
        raise PopflowError(f"--from-stage {from_stage}: run {run_id!r} of {pipeline!r} promoted a policy that later "
                           f"runs pinned ({', '.join(users[:5])}); rerunning its gate would change what they "
                           "sampled from. Start a new round instead (omit --run-id)")
    number = round_of(record)
    later = [r["run_id"] for r in lake.read_runs(pipeline) if number and (round_of(r) or 0) > number]
    if later:
        raise PopflowError(f"--from-stage {from_stage}: run {run_id!r} of {pipeline!r} was round {number}, and a "
                           f"later round has started since ({', '.join(later[:5])}); it chose its parent by this "
                           "round's verdict. Start a new round instead (omit --run-id)")


def round_taken(lake: Lake, pipeline: str, record: dict) -> dict | None:
    """The lineage row of another run that completed this loop run's round (or a later one), if any."""
    number = round_of(record)
    later = [r for r in complete_rounds(lake, pipeline) if number and r["round"] >= number
             and r["run_id"] != record["run_id"]]
    return later[0] if later else None


def check_round_free(lake: Lake, pipeline: str, record: dict) -> None:
    """A loop run resumed by its id may finish its round only if no other run has completed that round (or a
    later one) meanwhile: a chain has one lineage row per round."""
    later = round_taken(lake, pipeline, record)
    if later:
        number = round_of(record)
        raise PopflowError(f"run {record['run_id']!r} of {pipeline!r} was round {number}, and run "
                           f"{later['run_id']!r} has completed round {later['round']} since; start a new round "
                           "(omit --run-id)")


def head_run(lake: Lake, pipeline: str) -> str | None:
    """The run that made the pipeline's head (retention never deletes it)."""
    row = head(complete_rounds(lake, pipeline))
    return row["run_id"] if row else None
