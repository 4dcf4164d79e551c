"""What a run's evaluation says about its policies, with intervals and a one-line verdict each.

    .venv/bin/popflow report demo                     # the pipeline's latest run (the last table of `make demo`)
    .venv/bin/popflow report demo --run-id RUN        # another run

Every figure comes from the lake's eval_metrics (tasks/evaluate.py): a trained policy's win rate against the base
policy (same held-out prompt and sample index; a tie counts 1/2), its constraint pass rate and the gain in
that rate over the base, paired by prompt, each with its two-sided 95% Student t interval over held-out prompts
(the prompt is the unit: its samples share its difficulty). The verdict reads the win rate's interval:

    better than the base                          the interval lies above 0.5
    worse than the base                           the interval lies below 0.5
    no detectable difference ... at this size     the interval holds 0.5: more held-out prompts (or a
                                                  bigger change) are needed to tell

Several policies in one table each get their own verdict at 95%; none is corrected for the others.
"""

from __future__ import annotations

from popflow.sql import lit

HALF = 0.5  # the win rate of a policy no better than the base


def metrics_sql(pipeline: str, run_id: str | None) -> str:
    """(run_id, method, seed, metric, value) of the pipeline's latest run, or of `run_id`."""
    source = ("latest_eval_metrics" if run_id is None
              else f"(select * from eval_metrics where run_id = {lit(run_id)})")
    return f"""
    with final as (
        select run_id, method, seed, metric, value from {source} where pipeline = {lit(pipeline)}
    )
    select * from final order by method = 'base' desc, method, seed, metric
    """


def by_policy(rows: list[tuple]) -> dict[tuple[str, int | None], dict[str, float]]:
    """(method, seed) -> {metric: value} from metrics_sql's rows, in their order (the base first)."""
    out: dict[tuple[str, int | None], dict[str, float]] = {}
    for _run, method, seed, metric, value in rows:
        out.setdefault((method, seed), {})[metric] = value
    return out


def interval(m: dict, name: str, signed: bool = False) -> str:
    """'0.594 [0.449, 0.739]' (or without the brackets when there is no interval; '' when no value)."""
    if m.get(name) is None:
        return ""
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(m[name])
    if m.get(f"{name}_low") is not None and m.get(f"{name}_high") is not None:
        text += f" [{fmt.format(m[name + '_low'])}, {fmt.format(m[name + '_high'])}]"
    return text


def verdict(m: dict) -> str:
    """One line on a trained policy against the base, from its win rate and the win rate's interval."""
    win, low, high, prompts = (m.get(k) for k in ("win_rate", "win_rate_low", "win_rate_high", "prompts"))
    if win is None:
        return "no verdict: nothing was generated on held-out prompts (evaluate.generate false, or none held out)"
    if low is None or high is None:
        return f"no verdict: {int(prompts or 0)} held-out prompt(s), too few for an interval"
    said = f"win rate {interval(m, 'win_rate')} over {int(prompts)} held-out prompts"
    if m.get("constraint_gain") is not None:
        said += f"; constraint pass rate {interval(m, 'constraint_gain', signed=True)} against the base"
    if low > HALF:
        return f"better than the base: {said}"
    if high < HALF:
        return f"worse than the base: {said}"
    return (f"no detectable difference from the base at this size: {said} (the interval holds 0.5; README "
            "'Does it work?' measures popflow at a size that can tell)")


COLUMNS = (("win rate vs base", "win_rate", False), ("constraint pass rate", "constraint_rate", False),
           ("pass rate gain", "constraint_gain", True), ("mean reward", "mean_reward", False),
           ("held-out accuracy", "accuracy", False))


def render(pipeline: str, rows: list[tuple]) -> str:
    """The table (policies x figures with their intervals) and a verdict line per trained policy."""
    policies = by_policy(rows)
    run_id = rows[0][0]
    base = policies.get(("base", None), {})
    prompts = int(base["prompts"]) if base.get("prompts") is not None else None
    head = f"{pipeline} run {run_id}: " + (f"{prompts} held-out prompts, " if prompts else "") + \
        "95% intervals over prompts"
    columns = [c for c in COLUMNS if any(c[1] in m for m in policies.values())]
    lines = [head, "| policy | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for (method, seed), m in policies.items():
        name = method if seed is None else f"{method}-s{seed}"
        lines.append(f"| {name} | " + " | ".join(interval(m, key, signed) for _, key, signed in columns) + " |")
    for (method, seed), m in policies.items():
        if method != "base":
            lines.append(f"{method}-s{seed}: {verdict(m)}")
    return "\n".join(lines)
