"""Publish a run's pairs as a Hugging Face dataset: a folder with its card, loadable by `datasets` and TRL as is.

    .venv/bin/popflow export demo --to exports/demo                    # the latest complete run, its trained pairs
    .venv/bin/popflow export demo --run-id R --strategy max_min --to exports/demo-maxmin
    .venv/bin/popflow export demo --to exports/demo --hub you/demo-pairs   # then pushed (a token and the network)
    python -c "import datasets; print(datasets.load_dataset('exports/demo'))"

The folder (written whole under a temporary name, then renamed: never half an export):
    data/train-<fp>-00000-of-00001.parquet  the run's own train-split pairs of the strategy; data/test-...:
                                        held-out (a loop round's own: earlier rounds' pairs export with their
                                        runs). <fp>: a fingerprint of the data, in the card's `configs:` too:
                                        `datasets` caches a folder by its name and its card, not its files, so
                                        a re-export to the same folder would otherwise load the old rows
    README.md                           the dataset card: a YAML header (license from `export.license`, tags,
                                        task_categories, size_categories, `configs:` naming the splits' files)
                                        and what made the pairs, their counts, the reward spread, the figures
    chat_template.jinja                 the chat template the policy was sampled with (when its tokenizer has one)
    reward_distributions.png, ...       the run's seven-point figure (and point growth, when it has one)

Columns: TRL's conversational `prompt` (with the system prompt the policy was sampled with), `chosen`, `rejected`;
`score_chosen` / `score_rejected` (the aggregate reward the pair was chosen by); `chosen_scores` /
`rejected_scores` (every reward model's raw score, a struct by model name); `chosen_point` / `rejected_point` (of
the seven); `reward_margin` (score_chosen - score_rejected); `pop_margin` (the margin inferred from PoP labels, when
the run inferred them for this strategy); `prompt_id`, `pair_id`, `strategy`; and the provenance of every row:
`pipeline`, `run_id`, `round` (loop pipelines), `policy`, `policy_fingerprint` and `sampling` (temperature, top_p,
max_tokens, n, seed).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pyarrow.compute as pc

from popflow import sql
from popflow.config import POINTS, PipelineConfig
from popflow.config.base import check_name
from popflow.errors import PopflowError
from popflow.lake import Lake, write_parquet, write_text
from popflow.report import markdown_table
from popflow.sql import lit
from popflow.stage import RunContext

SPLITS = {"train": "train", "eval": "test"}  # the lake's split -> the dataset's
FIGURES = ("reward_distributions.png", "point_growth.png")
TAGS = ["dpo", "trl", "preference", "popflow", "synthetic"]
ANSWERS = ("pair", "annotate", "import_pairs", "score")  # the recorded sections an export reads


def choose_run(lake: Lake, pipeline: str, run_id: str | None) -> dict:
    """The run record to export: `run_id`, else the pipeline's latest completed run; it must have completed."""
    check_name(pipeline, "pipeline")
    if run_id is not None:
        check_name(run_id, "--run-id")
        record = lake.read_run(pipeline, run_id)
        if record is None:
            raise PopflowError(f"pipeline {pipeline!r} has no run {run_id!r} in {lake.root}")
    else:
        done = [r for r in lake.read_runs(pipeline) if r.get("status") == "completed"]
        if not done:
            raise PopflowError(f"pipeline {pipeline!r} has no completed run in {lake.root}")
        record = done[-1]
    if record.get("status") != "completed":
        raise PopflowError(f"run {record['run_id']} of {pipeline!r} is {record.get('status')}, not completed: "
                           "finish it (rerun with its --run-id) before exporting")
    return record


def as_ran(record: dict) -> PipelineConfig:
    """The sections of the run's own config that say what its pairs are (pair, annotate, import_pairs, score),
    validated on their own: a run recorded by an older popflow may hold keys today's schema refuses elsewhere."""
    config = record.get("config") or {}
    try:
        return PipelineConfig.model_validate({k: config[k] for k in ANSWERS if config.get(k) is not None})
    except ValueError as exc:
        raise PopflowError(f"run {record['run_id']}: its recorded config cannot be read by this popflow ({exc})"
                           ) from None


def export_sql(tables: dict[str, str], strategy: str, models: list[str], provenance: dict, sampling: str) -> str:
    """The exported rows of one strategy. `tables`: relations of pairs, rewards and (optional) margins, whose
    `sampling` rows give pop_margin (the PoP sampling training uses first); `models`: the reward models' names
    (validated config names); `provenance`: constant columns (literals)."""
    def scores(side: str) -> str:
        if not tables.get("rewards"):  # imported pairs: no reward model scored them here
            return f"{side}_scores as (select pair_id, null as {side}_scores from pairs)"
        fields = ", ".join(f"{lit(m)}: max(r.score) filter (where r.reward_model = {lit(m)})" for m in models)
        return f"""{side}_scores as (
            select p.pair_id, {{{fields}}} as {side}_scores
            from pairs p left join {tables['rewards']} r
                 on r.prompt_id = p.prompt_id and r.sample_idx = p.{side}_idx
            group by p.pair_id
        )"""

    margins = (f"left join (select pair_id, margin from {tables['margins']} where sampling = {lit(sampling)} "
               "and method = 'pop') m using (pair_id)" if tables.get("margins") else "")
    constants = ", ".join(f"{struct(v) if isinstance(v, dict) else value(v, k)} as {k}" for k, v in provenance.items())
    return f"""
    with pairs as (
        select * from {tables['pairs']} where strategy = {lit(strategy)}
    ),
    {scores('chosen')},
    {scores('rejected')},
    final as (
        select p.prompt, p.chosen, p.rejected,
               p.chosen_reward as score_chosen, p.rejected_reward as score_rejected,
               c.chosen_scores, r.rejected_scores, p.chosen_point, p.rejected_point,
               p.chosen_reward - p.rejected_reward as reward_margin,
               {'m.margin' if margins else 'null::double'} as pop_margin,
               p.prompt_id, p.pair_id, p.strategy, p.split, {constants}
        from pairs p
        left join chosen_scores c using (pair_id)
        left join rejected_scores r using (pair_id)
        {margins}
    )
    select * from final order by split, pair_id"""


TYPES = {"round": "integer", "n": "integer", "seed": "integer", "max_tokens": "integer", "temperature": "double",
         "top_p": "double"}  # the provenance fields that are not text, for their typed nulls


def value(v, name: str = "") -> str:
    """A SQL literal of a plain value; None as a null of the field's type."""
    return f"null::{TYPES.get(name, 'varchar')}" if v is None else lit(v)


def struct(values: dict) -> str:
    """A DuckDB struct literal of plain values."""
    return "{" + ", ".join(f"{lit(k)}: {value(v, k)}" for k, v in values.items()) + "}"


def provenance(record: dict, sample_report: dict, policy: dict) -> dict:
    """The constant provenance columns of a run's rows: where they came from, and how they were sampled."""
    pins = record.get("pins") or {}
    round_ = (pins.get("loop") or {}).get("round")
    sampling = sample_report.get("sampling", {})
    return {"pipeline": record["pipeline"], "run_id": record["run_id"], "round": round_,
            "policy": policy.get("ref"), "policy_fingerprint": policy.get("fingerprint"),
            "sampling": {"temperature": sampling.get("temperature"), "top_p": sampling.get("top_p"),
                         "max_tokens": sampling.get("max_tokens"), "n": sample_report.get("n"),
                         "seed": sampling.get("seed")}}


def size_category(n: int) -> str:
    """The Hub's size_categories bucket of n rows."""
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def data_fingerprint(folder: Path, splits: list[str]) -> str:
    """The first 12 hex digits of the sha256 of the splits' Parquet bytes; each file is renamed to
    `<split>-<fingerprint>-00000-of-00001.parquet`."""
    digest = hashlib.sha256()
    for split in splits:
        digest.update((folder / f"{split}.parquet").read_bytes())
    fingerprint = digest.hexdigest()[:12]
    for split in splits:
        (folder / f"{split}.parquet").rename(folder / f"{split}-{fingerprint}-00000-of-00001.parquet")
    return fingerprint


def card(cfg: PipelineConfig, record: dict, strategy: str, counts: dict[str, int], spread: list[list],
         policy: dict, reward_models: list[list], figures: list[str], template: bool, imported: bool = False,
         fingerprint: str = "", sampled: dict | None = None) -> str:
    """The dataset card (README.md): the Hub's YAML header, then what made the pairs and how to use them.
    `sampled`: the sample stage's own record of its settings (a loop round's seed is not the config's)."""
    name = cfg.export.pretty_name or record["pipeline"]
    header = {
        "license": cfg.export.license, "pretty_name": name,
        "tags": TAGS + [t for t in cfg.export.tags if t not in TAGS],
        "task_categories": ["text-generation"], "size_categories": [size_category(sum(counts.values()))],
        "configs": [{"config_name": "default", "data_files": [
            {"split": split, "path": f"data/{split}-{fingerprint}-*"} for split in counts]}],
    }
    sampling = {**(record.get("config") or {}).get("sample", {}), **(sampled or {})}
    lines = [
        "---", yaml_header(header), "---", "",
        f"# {name}: preference pairs made by popflow", "",
        (cfg.description.strip() + "\n") if cfg.description.strip() else "",
        f"Pipeline `{record['pipeline']}`, run `{record['run_id']}` (config hash `{record.get('config_hash')}`, "
        f"popflow {record.get('code_version')}), finished {record.get('finished_at')}. Pair strategy `{strategy}`: "
        "for each prompt the policy sampled n responses, the reward models scored them, and the pair holds the "
        f"strategy's chosen and rejected points among the seven of each prompt's rewards ({', '.join(POINTS)}; "
        "\"Finding the Sweet Spot\", arXiv 2502.16825).", "",
        "| split | pairs |", "|---|---|", *[f"| {s} | {n} |" for s, n in counts.items()], "",
        (f"**Pairs** {policy.get('ref')}: no policy sampled them and no reward model scored them here." if imported
         else f"**Policy** `{policy.get('ref')}` (fingerprint `{policy.get('fingerprint')}`), sampled with temperature "
         f"{sampling.get('temperature')}, top_p {sampling.get('top_p')}, at most {sampling.get('max_tokens')} new "
         f"tokens, n = {sampling.get('n')} per prompt, seed {sampling.get('seed')}"
         + (f", system prompt: {sampling.get('system_prompt')!r}" if sampling.get("system_prompt") else "")
         + (" (its chat template: `chat_template.jinja`)." if template else ".")), "",
        *([] if imported else [
            "**Reward models** (their raw scores are the columns `chosen_scores` / `rejected_scores`; `score_chosen` "
            f"/ `score_rejected` are the aggregate, {(record.get('config') or {}).get('score', {}).get('aggregate')}):",
            "", markdown_table(["name", "kind", "model", "fingerprint"], reward_models), ""]),
        "**Reward spread** of the exported pairs:", "",
        markdown_table(["split", "score_chosen mean", "score_rejected mean", "reward_margin mean [min, max]",
                        "pairs with a PoP margin"], spread), "",
        *[f"![{f}]({f})\n" for f in figures],
        "## Use", "",
        "```python", "from datasets import load_dataset", "from trl import DPOConfig, DPOTrainer", "",
        'pairs = load_dataset("path/to/this/folder")        # or the Hub repo id', 
        'trainer = DPOTrainer(model, args=DPOConfig(...), train_dataset=pairs["train"], processing_class=tokenizer)',
        "```", "",
        "Every row keeps its provenance: `pipeline`, `run_id`, `round` (loop pipelines), `policy`, "
        "`policy_fingerprint`, `sampling`. `pop_margin` is the per-pair margin popflow inferred from "
        "preference-over-preference labels (DPO-PoP, arXiv 2509.22851), where the run inferred one.", "",
        f"Licence: `{cfg.export.license}`" + (" (not set: `export.license` in the pipeline's config). The pairs "
                                              "hold the policy's outputs and the prompts' text: check both licences."
                                              if cfg.export.license == "other" else "."), "",
    ]
    return "\n".join(line for line in lines if line is not None)


def yaml_header(header: dict) -> str:
    import yaml

    return yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip("\n")


def chat_template(policy_path: str | None) -> str | None:
    """The chat template of the policy's tokenizer, when the folder is here and it has one."""
    if not policy_path or not Path(policy_path).is_dir():
        return None
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(policy_path).chat_template
    return template if isinstance(template, str) else None


def export(lake: Lake, cfg: PipelineConfig, pipeline: str, run_id: str | None, strategy: str | None, to: Path,
           force: bool = False) -> dict:
    """Write the dataset folder `to` of a run's pairs (see the module docstring); its counts per split."""
    record = choose_run(lake, pipeline, run_id)
    run_id = record["run_id"]
    to = check_target(Path(to), lake, force)
    con = sql.connect()  # the run's own files; the catalog is left to the runs that rebuild it
    # this run's own pairs: a loop round's file part-00000 (with loop.pairs: all, earlier rounds' pairs sit
    # beside it, sampled by other policies: their own runs export them with their own provenance)
    own = lake.partition("pairs", pipeline, run_id) / "part-00000.parquet"
    if not own.is_file():
        raise PopflowError(f"run {run_id} of {pipeline!r} has no pairs to export")
    pairs = sql.parquet(own)
    strategies = [s for (s,) in con.sql(f"select distinct strategy from {pairs} order by 1").fetchall()]
    ran = as_ran(record)
    ctx = RunContext(str(lake.data_dir), pipeline, run_id, ran)

    def table(name: str) -> str | None:  # one of the run's tables as a relation, when it has one
        return ctx.table(name) if ctx.has(name) else None

    strategy = strategy or ran.annotated_strategy()
    if strategy not in strategies:
        raise PopflowError(f"--strategy {strategy!r}: run {run_id} has pairs of {', '.join(strategies)}")
    manifests = lake.read_manifests(pipeline, run_id)
    sample = manifests.get("sample", {})
    imported = (record.get("config") or {}).get("import_pairs")
    policy = (sample.get("models") or {}).get("policy") or (
        {"ref": f"imported from {imported.get('source')}"} if imported else {})
    models = [m for (m,) in con.sql(f"select distinct reward_model from {table('rewards')} order by 1").fetchall()] \
        if table("rewards") else []
    annotated = strategy == ran.annotated_strategy() and table("margins")
    query = export_sql({"pairs": pairs, "rewards": table("rewards"),
                        "margins": table("margins") if annotated else None},
                       strategy, models, provenance(record, sample.get("report", {}), policy), ran.annotate.sampling[0])
    rows = con.sql(query).to_arrow_table()
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}-", dir=to.parent))  # beside it: the renames stay on one disk
    try:
        counts = {}
        for split, name in SPLITS.items():
            part = rows.filter(pc.equal(rows.column("split"), split)).drop(["split"])
            if part.num_rows:
                write_parquet(part, tmp / "data" / f"{name}.parquet")
                counts[name] = part.num_rows
        fingerprint = data_fingerprint(tmp / "data", list(counts))
        con.register("exported", rows)
        spread = [[SPLITS[s], num(a), num(b), f"{num(m)} [{num(lo)}, {num(hi)}]", str(k)] for s, a, b, m, lo, hi, k
                  in con.sql("select split, avg(score_chosen), avg(score_rejected), avg(reward_margin), "
                             "min(reward_margin), max(reward_margin), count(pop_margin) from exported "
                             "group by split order by split desc").fetchall()]
        figures = [f for f in FIGURES if (lake.run_dir(pipeline, run_id) / f).is_file()]
        for f in figures:
            shutil.copy2(lake.run_dir(pipeline, run_id) / f, tmp / f)
        template = chat_template(policy.get("path"))
        if template:
            write_text(template, tmp / "chat_template.jinja")
        identities = manifests.get("score", {}).get("models") or {}
        reward_models = [[m.name, m.kind, identities.get(m.name, {}).get("ref", ""),
                          (identities.get(m.name, {}).get("fingerprint") or "")[:19]] for m in ran.score.models]
        write_text(card(cfg, record, strategy, counts, spread, policy, reward_models, figures, bool(template),
                        bool(imported), fingerprint, sample.get("report", {}).get("sampling")), tmp / "README.md")
        old = to.with_name(f".{to.name}-replaced-{tmp.name}") if to.exists() else None
        if old:
            to.rename(old)  # aside, not deleted, until the new folder is in place
        try:
            tmp.rename(to)
        except OSError:
            if old:
                old.rename(to)
            raise
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"run_id": run_id, "strategy": strategy, "splits": counts, "folder": str(to)}


def num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def check_target(to: Path, lake: Lake, force: bool) -> Path:
    """The folder to write, resolved: not a file, not this folder or one above it, not holding the lake, and empty
    unless `force` (then it is replaced)."""
    to = to.resolve()
    if to.exists() and not to.is_dir():
        raise PopflowError(f"--to {to}: is a file")
    here = Path.cwd().resolve()
    if to == here or to in here.parents or to == lake.data_dir.resolve() or to in lake.data_dir.resolve().parents:
        raise PopflowError(f"--to {to}: holds the current folder or the data dir; name a folder of its own")
    if to.exists() and any(to.iterdir()) and not force:
        raise PopflowError(f"--to {to}: exists and is not empty (pass --force to replace it)")
    return to


def push(folder: Path, repo: str) -> str:
    """Upload the folder as the dataset repo `repo` (created if missing) with huggingface_hub; its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        # the repo becomes this export: the earlier one's data files (their names change with their content),
        # figures and template go in the same commit (files uploaded in it are never deleted)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                                 commit_message="popflow export",
                                 delete_patterns=["data/*", *FIGURES, "chat_template.jinja"])
    except Exception as exc:  # offline, no token, refused, an HTTP error of any client version: one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PopflowError(f"--hub {repo}: could not push {folder} ({type(exc).__name__}: {first}); the folder is "
                           "written: push it later with `huggingface-cli upload --repo-type dataset`") from None
    return str(getattr(info, "commit_url", info))
