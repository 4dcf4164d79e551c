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

For a loop pipeline, `popflow policies PIPELINE` adds the climb (climb_sql): each round's sampled policy on the
held-out prompts (the round's own samples), and the last round's candidate (its evaluate samples), per reward
model with a 95% interval over prompts and the gain over round 1's policy (the base), paired by prompt.
"""

from __future__ import annotations

from popflow.config import PASS_RATE_KINDS
from popflow.sql import interval_sql, lit

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
    return (f"no detectable difference from the base at this size: {said} (the interval holds 0.5; docs/proof.md "
            "measures popflow at a size that can tell)")


COLUMNS = (("win rate vs base", "win_rate", False), ("constraint pass rate", "constraint_rate", False),
           ("pass rate gain", "constraint_gain", True), ("mean reward", "mean_reward", False),
           ("held-out accuracy", "accuracy", False))


def markdown_table(header: list[str], rows: list[list]) -> str:
    """The one markdown table renderer: a header row, the separator, a row per list (None is an empty cell)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows])


def render(pipeline: str, rows: list[tuple]) -> str:
    """The table (policies x figures with their intervals) and a verdict line per trained policy."""
    policies = by_policy(rows)
    run_id = rows[0][0]
    base = policies.get(("base", None), {})
    prompts = int(base["prompts"]) if base.get("prompts") is not None else None
    head = f"{pipeline} run {run_id}: " + (f"{prompts} held-out prompts, " if prompts else "") + \
        "95% intervals over prompts"
    columns = [c for c in COLUMNS if any(c[1] in m for m in policies.values())]
    table = [[method if seed is None else f"{method}-s{seed}",
              *(interval(m, key, signed) for _, key, signed in columns)] for (method, seed), m in policies.items()]
    lines = [head, markdown_table(["policy", *(c[0] for c in columns)], table)]
    for (method, seed), m in policies.items():
        if method != "base":
            lines.append(f"{method}-s{seed}: {verdict(m)}")
    return "\n".join(lines)


def model_value_sql(kind: str = "kind", score: str = "score") -> str:
    """One sample's value on one reward model: a pass-rate kind's pass indicator (constraints, ifeval: score >= 1,
    every check met), another model's score. The climb and the loop's gate.guard (tasks/promote.py) read it."""
    kinds = ", ".join(lit(k) for k in PASS_RATE_KINDS)
    return f"case when {kind} in ({kinds}) then ({score} >= 1.0)::double else {score} end"


def climb_sql(pipeline: str) -> str:
    """Per policy of a loop's chain (each complete round's sampled policy, then the last round's candidate),
    per reward model: the mean over held-out prompts of each prompt's mean score (a pass-rate kind: the share
    of samples meeting every constraint, score >= 1) with its two-sided 95% interval,
    the gain over round 1's sampled policy (the base) and the step gain over the policy in the step before
    (what the round before's candidate added; the same policy, so noise only, when that candidate was not
    promoted), each with its interval, paired by prompt."""
    p = lit(pipeline)
    value = f"avg({model_value_sql()})"
    return f"""
    with rounds as (
        select round, run_id, method, seed, promoted from loop_rounds where pipeline = {p}
    ),
    held_out as (
        select run_id, prompt_id from prompts where pipeline = {p} and split = 'eval'
    ),
    sampled as (
        select r.round as step, 'round ' || r.round || ' sampled' as policy, w.reward_model, w.kind, w.prompt_id,
               w.score
        from rewards w join rounds r using (run_id) join held_out h using (run_id, prompt_id)
        where w.pipeline = {p}
    ),
    last_round as (
        select * from rounds order by round desc limit 1
    ),
    candidate as (
        select r.round + 1 as step, 'round ' || r.round || ' candidate'
               || case when r.promoted then ' (promoted)' else '' end as policy,
               e.reward_model, e.kind, e.prompt_id, e.score
        from eval_rewards e join last_round r on e.run_id = r.run_id and e.method = r.method and e.seed = r.seed
        where e.pipeline = {p}
    ),
    per_prompt as (
        select step, policy, reward_model, any_value(kind) as kind, prompt_id, {value} as v
        from (select * from sampled union all by name select * from candidate)
        group by step, policy, reward_model, prompt_id
    ),
    paired as (
        select q.*, q.v - b.v as gain, q.v - p.v as step_gain
        from per_prompt q
             left join per_prompt b on b.step = 1 and b.reward_model = q.reward_model and b.prompt_id = q.prompt_id
             left join per_prompt p
                  on p.step = q.step - 1 and p.reward_model = q.reward_model and p.prompt_id = q.prompt_id
    ),
    final as (
        select step, policy, reward_model, any_value(kind) as kind, count(*) as prompts,
               {interval_sql("v", "value")}, {interval_sql("gain", "gain")}, {interval_sql("step_gain", "step_gain")}
        from paired group by step, policy, reward_model
    )
    select * from final order by step, reward_model"""


def render_climb(rows: list[dict]) -> str:
    """climb_sql's rows as one table: a row per policy, per reward model 'value [low, high]', the gain over the
    base and the gain over the policy before it."""
    models = list(dict.fromkeys(r["reward_model"] for r in rows))
    kinds = {r["reward_model"]: r["kind"] for r in rows}
    head = [f"{m} {'pass rate' if kinds[m] in PASS_RATE_KINDS else 'mean'}" for m in models]
    header = ["policy", "prompts", *(c for h in head for c in (h, "vs base", "vs previous"))]
    table = []
    for step in dict.fromkeys(r["step"] for r in rows):
        mine = {r["reward_model"]: r for r in rows if r["step"] == step}
        first = next(iter(mine.values()))
        cells = []
        for m in models:
            r = mine.get(m, {})
            gains = [interval(r, g, signed=True) if step != 1 else "" for g in ("gain", "step_gain")]
            cells += [interval(r, "value"), *gains]
        table.append([first["policy"], first["prompts"], *cells])
    return markdown_table(header, table)
