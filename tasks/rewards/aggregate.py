"""From per-model scores to one reward per sample: optional z-normalisation of each reward model over a
run, then mean, min or weighted mean (score.aggregate). SQL over named CTEs; evaluate passes the run's
stats so its new samples share the run's scale. `win_outcome_sql` compares two samples on that scale.

    from tasks.rewards.aggregate import aggregate_sql
    con.sql(aggregate_sql(ctx.table("rewards"), ctx.config.score))
"""

from __future__ import annotations

from popflow.config import ScoreConfig
from popflow.sql import lit


def normalised_sql(scores: str, stats: str, cfg: ScoreConfig) -> str:
    """CTEs `model_stats` and `normalised` (prompt_id, sample_idx, reward_model, weight, value): each model's
    scores of `scores`, z-normalised with the mean and std of that model over `stats` when asked."""
    weights = ", ".join(f"({lit(m.name)}, {lit(float(m.weight))})" for m in cfg.models)
    value = "(s.score - st.mu) / st.sd" if cfg.normalize == "zscore" else "s.score"
    return f"""
    weights (reward_model, weight) as (values {weights}),
    model_stats as (
        select reward_model, avg(score) as mu, stddev_pop(score) as sd from {stats} group by reward_model
    ),
    normalised as (
        select s.* exclude (score), w.weight,
               case when st.sd > 0 or {lit(cfg.normalize)} = 'none' then {value} else 0.0 end as value
        from {scores} s join model_stats st using (reward_model) join weights w using (reward_model)
    )"""


def aggregate_sql(rewards: str, cfg: ScoreConfig, stats: str | None = None, keys: tuple = ()) -> str:
    """SQL from per-model scores (the relation `rewards`, e.g. ctx.table("rewards")) to one reward per sample;
    normalised with the stats of the relation `stats` (default: the same scores; evaluate passes the run's
    rewards so new samples share the run's scale). `keys`: extra columns that identify a sample (evaluate's
    method, seed)."""
    key = "".join(f"{k}, " for k in keys)
    combine = {
        "mean": "avg(value)",
        "min": "min(value)",
        "weighted": "sum(weight * value) / sum(weight)",
    }[cfg.aggregate]
    return f"""
    with scores as (
        select {key}prompt_id, sample_idx, reward_model, score from {rewards}
    ),
    stats_source as (
        select reward_model, score from {stats or rewards}
    ),
    {normalised_sql("scores", "stats_source", cfg)},
    final as (
        select {key}prompt_id, sample_idx, {combine} as reward
        from normalised group by {key}prompt_id, sample_idx
    )
    select * from final order by {key}prompt_id, sample_idx
    """


def win_outcome_sql(reward: str, other: str, same_text: str) -> str:
    """One comparison of two samples' aggregate rewards as a number: 1 a win, 0.5 a tie, 0 a loss (a double:
    DuckDB would type the bare literals DECIMAL). Two identical responses are a tie whatever their scores: the
    same text scored in another batch (other padding, bf16) can score a rounding step apart. evaluate's
    win_rate averages it; promote's gate reads it."""
    return (f"(case when {same_text} then 0.5 when {reward} > {other} then 1.0 when {reward} = {other} then 0.5 "
            "else 0.0 end)::double")

