"""PoP comparisons for people: `popflow annotate export` writes a run's comparisons as Label Studio tasks
(tasks/human_labels.py says how to label them and bring the answers back with `popflow annotate import`).

    .venv/bin/popflow annotate export demo --run-id RUN --to labels/
"""

from __future__ import annotations

from pathlib import Path

from popflow import sql
from popflow.config import load_pipeline
from popflow.config.base import check_name
from popflow.errors import PopflowError
from popflow.lake import Lake
from popflow.runs import resolve_data_dir
from popflow.stage import RunContext
from tasks.annotate import annotated_pairs, draw_comparisons, pair_texts, partner_groups
from tasks.human_labels import tasks, write_tasks


def export_tasks(pipeline: str, run_id: str, overrides: list[str], config_path: str | None, data_dir: str | None,
                 to: Path) -> dict:
    """Write the comparisons the annotate stage of run `run_id` draws (the config as the run was given: the same
    --set) as Label Studio tasks under `to`; {sampling: comparisons} and the files."""
    check_name(run_id, "--run-id")
    cfg = load_pipeline(pipeline, config_path, overrides)
    lake = Lake(resolve_data_dir(data_dir))
    ctx = RunContext(str(lake.data_dir), pipeline, run_id, cfg)
    if lake.read_run(pipeline, run_id) is None or not ctx.has("pairs"):
        raise PopflowError(f"run {run_id!r} of {pipeline!r} has no pairs in {lake.root}: run it to the pair stage "
                           "first")
    con = sql.connect()
    pairs = annotated_pairs(ctx, con, need_gt=False)  # people need no ground truth
    ids = pairs.column("pair_id").to_numpy(zero_copy_only=False)
    groups, a_cfg = partner_groups(pairs, cfg.annotate.partners), cfg.annotate
    rows = pair_texts(ctx, con)
    comparisons, counts = [], {}
    for sampling in a_cfg.sampling:
        a, b, _ = draw_comparisons(groups, sampling, a_cfg.k, a_cfg.seed, a_cfg.partners)
        comparisons += [(sampling, i, ids[x], ids[y]) for i, (x, y) in enumerate(zip(a, b, strict=True))]
        counts[sampling] = len(a)
    task_file, config_file = write_tasks(Path(to), tasks(comparisons, rows, run_id))
    return {"comparisons": counts, "tasks": str(task_file), "labeling_config": str(config_file)}
