"""The method-comparison experiment: several training methods x seeds on the same pairs, one table.

    .venv/bin/popflow experiment tiny                 # what the tests run
    .venv/bin/popflow experiment demo                 # methods x seeds on SmolLM2 (docs/training.md)

It runs the pipeline flow once (a subflow, one run id) with `train.methods`, `train.seeds` and
`annotate.sampling` taken from the pipeline's `experiment:` section (default: DPO-PoP's Table 1 -- dpo,
fixed margin, ground-truth margin, dpo_pop with iterative and with random PoP sampling, distill; two seeds),
so every method trains on the same sampled pairs against the same stored reference log-probs. Then it
writes the comparison: the lake table `comparison` (method, metric, mean, std, seeds, low, high, units), and
beside the run comparison.md and comparison.png, plus a Prefect markdown artifact. mean and std are over
seeds; low and high are the two-sided 95% Student t interval over held-out prompts (pairs, for accuracy) of
each unit's value averaged over seeds (pooled_sql), for win_rate, constraint_gain, accuracy and
win_rate_vs_dpo (a method's per-prompt win rate minus dpo's, paired by prompt: the claim "beats DPO").
A method with `pairs: max_min` (or random) trains on that pair strategy's pairs: the pair-strategy claim.
Without training, `experiment.pop_sweep` draws PoP labels with each sampling x k x seed on the run's pairs and
writes how well the fitted margins rank the ground truth: lake table pop_sweep, pop_sweep.md, pop_sweep.png.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed

from flows.pipeline import as_assignments, preference_pipeline
from flows.preflight import checked, handing_over, preflight
from popflow import sql
from popflow.config import load_pipeline
from popflow.errors import PopflowError
from popflow.lake import write_text
from popflow.report import markdown_table
from popflow.runs import resolve_data_dir
from popflow.sql import interval_sql, lit
from popflow.stage import RunContext, artifact_key, with_run_columns

METRICS = ("accuracy", "pearson", "spearman", "mean_reward", "win_rate", "constraint_rate", "constraint_gain")


def experiment_overrides(cfg, user: list[str]) -> list[str]:
    """--set assignments that turn a pipeline run into the experiment's run: the experiment's methods, seeds and
    `set:`, then the user's, so what the user sets wins (`--set prompts.limit=64` on `proof`); never a loop round
    (an experiment compares methods on one run's pairs and promotes nothing)."""
    exp = cfg.experiment
    samplings = list(cfg.annotate.sampling)
    for m in exp.methods:
        if m.sampling and m.sampling not in samplings:
            samplings.append(m.sampling)
    methods = [m.model_dump(exclude_none=True) for m in exp.methods]
    return [f"train.methods={json.dumps(methods)}", f"train.seeds={json.dumps(exp.seeds)}",
            f"annotate.sampling={json.dumps(samplings)}", *exp.set, *user, "loop=null"]


NO_OUTCOMES = ("(select null::varchar as method, null::bigint as seed, null::varchar as prompt_id, "
               "null::double as win, null::double as gain where false)")
LEGEND = "mean [95% interval over held-out prompts (pairs for accuracy), seeds pooled], else mean ± std over seeds"
REFERENCE = "dpo"  # the method the others are compared with, prompt by prompt, when the experiment has it


def comparison_sql(metrics: str, pooled: str | None = None) -> str:
    """mean and std over seeds of every (method, metric) of the relation `metrics` (eval_metrics); with `pooled`
    (pooled_sql's rows), the seeds-pooled 95% interval (low, high) over its units where it has one, and the
    metrics only it has (the comparison with the reference method)."""
    if pooled is None:
        pooled = ("(select null::varchar as method, null::varchar as metric, null::double as mean, "
                  "null::double as low, null::double as high, null::bigint as units, null::bigint as seeds "
                  "where false)")
    return f"""
    with metrics as (  -- not the per-seed intervals (their average means nothing) nor the prompt count
        select method, seed, metric, value from {metrics} where value is not null and metric in {sql.values(METRICS)}
    ),
    spread as (
        select method, metric, avg(value) as mean, coalesce(stddev_samp(value), 0.0) as std,
               count(*) as seeds
        from metrics group by method, metric
    ),
    pooled as (
        select method, metric, mean, low, high, units, seeds from {pooled}
    ),
    final as (
        select s.method, s.metric, s.mean, s.std, s.seeds, p.low, p.high, p.units
        from spread s left join pooled p using (method, metric)
        union all by name
        select p.method, p.metric, p.mean, null::double as std, p.seeds, p.low, p.high, p.units
        from pooled p anti join spread s using (method, metric)
    )
    select * from final order by method, metric
    """


def pooled_sql(outcomes: str, heldout: str, pairs: str, reference: str = REFERENCE) -> str:
    """Each trained method with its seeds pooled, the held-out prompt the unit: a prompt's win and constraint
    gain (`outcomes`: eval_outcomes) and the share of its held-out pairs the policy orders right (beta * h > 0;
    `heldout`: heldout_margins, joined to `pairs` for the prompt), each averaged over seeds, then the mean over
    prompts with a two-sided 95% Student t interval: (method, metric, mean, low, high, units, seeds).
    `win_rate_vs_<reference>`: a method's per-prompt win rate minus the reference method's, paired by prompt (how
    much more often it beats the base than the reference does)."""
    return f"""
    with per_prompt as (
        select method, prompt_id, avg(win) as win, avg(gain) as gain, count(distinct seed) as seeds
        from {outcomes} where method <> 'base' group by method, prompt_id
    ),
    per_heldout_prompt as (  -- a prompt's held-out pairs share its samples: the prompt is the unit here too
        select h.method, p.prompt_id, avg((h.beta_h > 0)::double) as correct, count(distinct h.seed) as seeds
        from {heldout} h join {pairs} p using (pair_id) group by h.method, p.prompt_id
    ),
    versus as (
        select p.method, p.prompt_id, p.win - r.win as diff, p.seeds
        from per_prompt p join per_prompt r on r.method = {lit(reference)} and r.prompt_id = p.prompt_id
        where p.method <> {lit(reference)}
    ),
    win as (
        select method, 'win_rate' as metric, {interval_sql("win", "v", 0, 1)}, count(win) as units,
               max(seeds) as seeds
        from per_prompt group by method
    ),
    gain as (
        select method, 'constraint_gain' as metric, {interval_sql("gain", "v", -1, 1)},
               count(gain) as units, max(seeds) as seeds
        from per_prompt group by method
    ),
    accuracy as (
        select method, 'accuracy' as metric, {interval_sql("correct", "v", 0, 1)},
               count(*) as units, max(seeds) as seeds
        from per_heldout_prompt group by method
    ),
    vs_reference as (
        select method, {lit("win_rate_vs_" + reference)} as metric, {interval_sql("diff", "v", -1, 1)},
               count(*) as units, max(seeds) as seeds
        from versus group by method
    ),
    final as (
        select method, metric, v as mean, v_low as low, v_high as high, units, seeds from win
        union all select method, metric, v, v_low, v_high, units, seeds from gain
        union all select method, metric, v, v_low, v_high, units, seeds from accuracy
        union all select method, metric, v, v_low, v_high, units, seeds from vs_reference
    )
    select * from final where mean is not null order by method, metric
    """


def pop_sweep(gt: np.ndarray, groups: np.ndarray, annotate, margins, ks: list[int], seeds: int) -> pa.Table:
    """PoP labels drawn with each sampling (iterative, random) x k x seed over pairs with ground-truth margins
    `gt` (annotate's noise and partners, seeds annotate.seed + 0, 1, ...), Bradley-Terry margins fitted as the
    margins stage fits them, and their agreement with the ground truth: (sampling, k, seed, comparisons,
    uncompared, spearman, pearson). No training: what the choice of sampling and k costs in margin quality."""
    from tasks.annotate import simulate_pop_labels
    from tasks.margins import agreement, fit_strengths, strengths_to_margins

    rows = []
    for sampling in ("iterative", "random"):
        for k in ks:
            for i in range(seeds):
                seed = annotate.seed + i
                lab = simulate_pop_labels(gt, groups, sampling, k, annotate.noise, annotate.p, annotate.tau,
                                          annotate.ties, seed, annotate.partners)
                strength = fit_strengths(len(gt), lab["a"], lab["b"], lab["a_stronger"], margins.prior_sigma)
                m = strengths_to_margins(strength, margins.scale, margins.max_margin, margins.target_mean)
                counts = np.bincount(lab["a"], minlength=len(gt)) + np.bincount(lab["b"], minlength=len(gt))
                agree = agreement(m, gt)
                rows.append({"sampling": sampling, "k": k, "seed": seed, "comparisons": len(lab["a"]),
                             "uncompared": int((counts == 0).sum()), "spearman": agree["spearman"],
                             "pearson": agree["pearson"]})
    return pa.Table.from_pylist(rows)


def pop_sweep_sql(sweep: str) -> str:
    """Per (sampling, k): the mean Spearman and Pearson of the margins against the ground truth over the label
    draws, the Spearman's two-sided 95% t interval over them, and the mean uncompared pairs."""
    return f"""
    with final as (
        select sampling, k, {interval_sql("spearman", "spearman", -1, 1)}, avg(pearson) as pearson,
               avg(comparisons) as comparisons, avg(uncompared) as uncompared, count(*) as draws
        from {sweep} group by sampling, k
    )
    select * from final order by sampling, k"""


def run_pop_sweep(ctx: RunContext, con) -> pa.Table | None:
    """pop_sweep over the run's annotated train pairs, summarised (pop_sweep_sql); written as lake table pop_sweep
    (the draws). None when the experiment skips it or the pairs carry no ground truth (imported, no scores)."""
    from tasks.annotate import annotated_pairs

    cfg = ctx.config
    if cfg.experiment.pop_sweep is None:
        return None
    try:  # the pairs and ground truth the annotate stage labelled (annotate.ground_truth), in its order
        pairs = annotated_pairs(ctx, con)
    except PopflowError:
        return None
    gt = pairs.column("gt").to_numpy(zero_copy_only=False).astype(np.float64)
    if len(gt) < 3 or np.isnan(gt).any() or np.ptp(gt) == 0:  # nothing to rank
        return None
    groups = (np.unique(pairs.column("prompt_id").to_numpy(zero_copy_only=False), return_inverse=True)[1]
              if cfg.annotate.partners == "same_prompt" else np.zeros(len(gt), dtype=np.int64))
    sweep = cfg.experiment.pop_sweep
    partners = int(np.bincount(groups).min()) - 1  # a pair's possible partners (annotate's check_k)
    ks = [k for k in sweep.k if k <= partners]
    if not ks:
        return None
    draws = pop_sweep(gt, groups, cfg.annotate, cfg.margins, ks, sweep.seeds)
    ctx.lake.write_table("pop_sweep", ctx.pipeline, ctx.run_id, with_run_columns(ctx, draws))
    return con.sql(pop_sweep_sql(ctx.table("pop_sweep"))).to_arrow_table()


def sweep_markdown(table: pa.Table) -> str:
    """sampling x k: Spearman [95% interval over label draws], Pearson, comparisons, uncompared pairs."""
    def num(v) -> str:
        return "" if v is None else f"{v:.3f}"

    rows = []
    for r in table.to_pylist():
        interval = f" [{r['spearman_low']:.3f}, {r['spearman_high']:.3f}]" if r["spearman_low"] is not None else ""
        rows.append([r["sampling"], r["k"], num(r["spearman"]) + interval, num(r["pearson"]),
                     f"{r['comparisons']:.0f}", f"{r['uncompared']:.1f}"])
    return markdown_table(["sampling", "k", "Spearman vs ground truth", "Pearson", "comparisons", "uncompared pairs"],
                          rows)


def comparison_markdown(table: pa.Table) -> str:
    """methods x metrics: 'mean [low, high]' where the seeds-pooled 95% interval exists, else 'mean ± std'."""
    cells: dict = {}
    for row in table.to_pylist():
        cell = f"{row['mean']:.3f}"
        if row.get("low") is not None:
            cell += f" [{row['low']:.3f}, {row['high']:.3f}]"
        elif row.get("std") is not None:
            cell += f" ± {row['std']:.3f}"
        cells.setdefault(row["method"], {})[row["metric"]] = cell
    extra = sorted({m for c in cells.values() for m in c} - set(METRICS))
    metrics = [m for m in (*METRICS, *extra) if any(m in c for c in cells.values())]
    return markdown_table(["method", *metrics], [[method, *(cells[method].get(m, "") for m in metrics)]
                                                 for method in sorted(cells, key=lambda m: (m != "base", m))])


@flow(name="preference-experiment")
def preference_experiment(pipeline: str = "demo", overrides: dict | list[str] | None = None,
                          data_dir: str | None = None, run_id: str | None = None,
                          config_path: str | None = None) -> dict:
    """Train the experiment's methods x seeds on one run's pairs; write the comparison table."""
    from popflow.plots import plot_comparison, plot_pop_sweep

    try:
        cfg = checked(pipeline, config_path, as_assignments(overrides))  # as the CLI checked it, if it did
        sets = experiment_overrides(cfg, as_assignments(overrides))
        run_cfg = load_pipeline(pipeline, config_path, sets)  # the experiment's run: its own check, once
        preflight(run_cfg, config_path)
    except PopflowError as err:
        get_run_logger().error("popflow: error: %s", err)
        return Failed(message=str(err), data=err)
    with handing_over(pipeline, config_path, sets, run_cfg):
        state = preference_pipeline(pipeline=pipeline, overrides=sets, data_dir=data_dir, run_id=run_id,
                                    config_path=config_path, return_state=True)
    if state.is_failed():  # bad input: this flow ends with the pipeline's one-line failure
        return state
    result = state.result()
    ctx = RunContext(str(resolve_data_dir(data_dir)), pipeline, result["run_id"], run_cfg)
    con = sql.connect()
    outcomes = ctx.table("eval_outcomes") if ctx.has("eval_outcomes") else NO_OUTCOMES  # evaluate.generate false
    heldout, pairs = ctx.table("heldout_margins"), ctx.table("pairs")
    pooled = f"({pooled_sql(outcomes, heldout, pairs)})"
    table = con.sql(comparison_sql(ctx.table("eval_metrics"), pooled)).to_arrow_table()
    ctx.lake.write_table("comparison", pipeline, ctx.run_id, with_run_columns(ctx, table))
    ctx.lake.rebuild_catalog()
    markdown = comparison_markdown(table)
    write_text(markdown + "\n", ctx.run_dir / "comparison.md")
    plot = plot_comparison(table.to_pylist(), [m for m in METRICS if m in table.column("metric").to_pylist()],
                           ctx.run_dir / "comparison.png", f"{pipeline} {ctx.run_id}")
    sweep = run_pop_sweep(ctx, con)
    sweep_md = ""
    if sweep is not None:
        ctx.lake.rebuild_catalog()
        sweep_md = sweep_markdown(sweep)
        write_text(sweep_md + "\n", ctx.run_dir / "pop_sweep.md")
        plot_pop_sweep(sweep.to_pylist(), ctx.run_dir / "pop_sweep.png", f"{pipeline} {ctx.run_id}")
    create_markdown_artifact(key=artifact_key(pipeline, "comparison"), markdown=(
        f"# {pipeline} experiment, run {ctx.run_id}\n\nseeds {cfg.experiment.seeds}: {LEGEND}\n\n"
        f"{markdown}\n\nPlot: `{plot}`\n" + (f"\n## PoP sampling (no training)\n\n{sweep_md}\n" if sweep_md else "")))
    get_run_logger().info("comparison (%s):\n%s", LEGEND, markdown)
    if sweep_md:
        get_run_logger().info("PoP sampling x k, margins against the ground truth:\n%s", sweep_md)
    return {"run_id": ctx.run_id, "comparison": markdown, "plot": str(plot), "pop_sweep": sweep_md}
