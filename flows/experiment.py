"""The method-comparison experiment: several training methods x seeds on the same pairs, one table.

    .venv/bin/popflow experiment tiny                 # what the tests run
    .venv/bin/popflow experiment demo                 # the README's table (SmolLM2 on this CPU)

It runs the pipeline flow once (a subflow, one run id) with `train.methods`, `train.seeds` and
`annotate.sampling` taken from the pipeline's `experiment:` section (default: DPO-PoP's Table 1 -- dpo,
fixed margin, ground-truth margin, dpo_pop with iterative and with random PoP sampling, distill; two seeds),
so every method trains on the same sampled pairs against the same stored reference log-probs. Then it
writes the comparison: the lake table `comparison` (method, metric, mean, std, seeds), and beside the run
comparison.md and comparison.png, plus a Prefect markdown artifact.
"""

from __future__ import annotations

import json

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import as_assignments, preference_pipeline
from popflow import sql
from popflow.config import load_pipeline
from popflow.runs import resolve_data_dir
from popflow.stage import RunContext, artifact_key, with_run_columns

METRICS = ("accuracy", "pearson", "spearman", "mean_reward", "win_rate", "constraint_rate")


def experiment_overrides(cfg) -> list[str]:
    """--set assignments that turn a pipeline run into the experiment's run (never a loop round: an experiment
    compares methods on one run's pairs and promotes nothing)."""
    exp = cfg.experiment
    samplings = list(cfg.annotate.sampling)
    for m in exp.methods:
        if m.sampling and m.sampling not in samplings:
            samplings.append(m.sampling)
    methods = [m.model_dump(exclude_none=True) for m in exp.methods]
    return [f"train.methods={json.dumps(methods)}", f"train.seeds={json.dumps(exp.seeds)}",
            f"annotate.sampling={json.dumps(samplings)}", "loop=null", *exp.set]


def comparison_sql(metrics: str) -> str:
    """mean and std over seeds of every (method, metric) of the relation `metrics` (eval_metrics)."""
    return f"""
    with metrics as (
        select method, seed, metric, value from {metrics} where value is not null
    ),
    final as (
        select method, metric, avg(value) as mean, coalesce(stddev_samp(value), 0.0) as std,
               count(*) as seeds
        from metrics group by method, metric
    )
    select * from final order by method, metric
    """


def comparison_markdown(table: pa.Table) -> str:
    """methods x metrics, 'mean ± std' over seeds."""
    cells: dict = {}
    for row in table.to_pylist():
        cells.setdefault(row["method"], {})[row["metric"]] = f"{row['mean']:.3f} ± {row['std']:.3f}"
    metrics = [m for m in METRICS if any(m in c for c in cells.values())]
    lines = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for method in sorted(cells, key=lambda m: (m != "base", m)):
        lines.append(f"| {method} | " + " | ".join(cells[method].get(m, "") for m in metrics) + " |")
    return "\n".join(lines)


@flow(name="preference-experiment")
def preference_experiment(pipeline: str = "demo", overrides: dict | list[str] | None = None,
                          data_dir: str | None = None, run_id: str | None = None,
                          config_path: str | None = None) -> dict:
    """Train the experiment's methods x seeds on one run's pairs; write the comparison table."""
    from popflow.plots import plot_comparison

    cfg = load_pipeline(pipeline, config_path, as_assignments(overrides))
    sets = [*as_assignments(overrides), *experiment_overrides(cfg)]
    state = preference_pipeline(pipeline=pipeline, overrides=sets, data_dir=data_dir, run_id=run_id,
                                config_path=config_path, return_state=True)
    if state.is_failed():  # bad input: this flow ends with the pipeline's one-line failure
        return state
    result = state.result()
    ctx = RunContext(str(resolve_data_dir(data_dir)), pipeline, result["run_id"],
                     load_pipeline(pipeline, config_path, sets))
    table = sql.connect().sql(comparison_sql(ctx.table("eval_metrics"))).to_arrow_table()
    ctx.lake.write_table("comparison", pipeline, ctx.run_id, with_run_columns(ctx, table))
    ctx.lake.rebuild_catalog()
    markdown = comparison_markdown(table)
    (ctx.run_dir / "comparison.md").write_text(markdown + "\n")
    plot = plot_comparison(table.to_pylist(), [m for m in METRICS if m in table.column("metric").to_pylist()],
                           ctx.run_dir / "comparison.png", f"{pipeline} {ctx.run_id}")
    create_markdown_artifact(key=artifact_key(pipeline, "comparison"), markdown=(
        f"# {pipeline} experiment, run {ctx.run_id}\n\nmean ± std over seeds {cfg.experiment.seeds}\n\n"
        f"{markdown}\n\nPlot: `{plot}`\n"))
    get_run_logger().info("comparison (mean ± std over seeds):\n%s", markdown)
    return {"run_id": ctx.run_id, "comparison": markdown, "plot": str(plot)}
