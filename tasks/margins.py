"""Stage 5, margins: a margin per pair for the DPO loss -log sigmoid(beta * h - m), from PoP labels or otherwise.

    method: pop    fit a latent strength s_i per pair by Bradley-Terry maximum a posteriori estimation,
                   P(a stronger than b) = sigmoid(s_a - s_b), Gaussian prior s ~ N(0, prior_sigma^2);
                   scipy's L-BFGS with a vectorised gradient (np.bincount over the comparisons), so a
                   million comparisons take seconds. Then strengths -> margins in [0, max]:
                     scale: rank    m = max * (rank(s) - 1) / (n - 1)        (average ranks for ties)
                     scale: affine  m = clip(target_mean * (s - min s) / (mean s - min s), 0, max)
                   A pair with no comparison keeps the prior mean s = 0 (and is counted in the report).
    method: gt     m = clip(alpha * gt_margin, 0, max)        the ground-truth-margin baseline
    method: fixed  m = gamma                                   the fixed-margin baseline
    method: none   m = 0                                       plain DPO

    .venv/bin/popflow sql "select corr(margin, gt_margin) from margins"
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from scipy.optimize import minimize
from scipy.stats import pearsonr, rankdata, spearmanr

from popflow import sql
from popflow.errors import PopflowError
from popflow.sql import lit
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns


def bt_objective(s: np.ndarray, a: np.ndarray, b: np.ndarray, sign: np.ndarray, prior_var: float):
    """Negative log posterior and its gradient. sign = +1 when a won, -1 when b won."""
    z = sign * (s[a] - s[b])
    loss = np.logaddexp(0.0, -z).sum() + 0.5 * np.dot(s, s) / prior_var
    g = -sign / (1.0 + np.exp(z))  # d loss / d s_a per comparison; d / d s_b is its negative
    n = len(s)
    grad = np.bincount(a, g, minlength=n) - np.bincount(b, g, minlength=n) + s / prior_var
    return loss, grad


def fit_strengths(n: int, a: np.ndarray, b: np.ndarray, a_stronger: np.ndarray, prior_sigma: float = 1.0,
                  tol: float = 1e-8) -> np.ndarray:
    """Bradley-Terry MAP strengths of n items from comparisons (a[i], b[i], a_stronger[i])."""
    sign = np.where(a_stronger, 1.0, -1.0)
    result = minimize(bt_objective, np.zeros(n), args=(a, b, sign, prior_sigma**2), jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000, "gtol": tol})
    return result.x


def strengths_to_margins(s: np.ndarray, scale: str, m_max: float, target_mean: float) -> np.ndarray:
    if len(s) == 1:
        return np.full(1, target_mean if scale == "affine" else m_max)
    if scale == "rank":
        return m_max * (rankdata(s, method="average") - 1.0) / (len(s) - 1.0)
    spread = s.mean() - s.min()
    if spread <= 0:
        return np.full(len(s), min(target_mean, m_max))
    return np.clip(target_mean * (s - s.min()) / spread, 0.0, m_max)


def fixed_margins(method: str, gt: np.ndarray, alpha: float, gamma: float, m_max: float) -> np.ndarray:
    """The baselines that need no PoP labels."""
    if method == "gt":
        return np.clip(alpha * gt, 0.0, m_max)
    if method == "fixed":
        return np.full(len(gt), gamma)
    return np.zeros(len(gt))


def agreement(margins: np.ndarray, gt: np.ndarray) -> dict:
    """Spearman and Pearson of margins against the ground truth, over pairs that have one."""
    ok = ~np.isnan(gt)
    if ok.sum() < 3 or np.ptp(margins[ok]) == 0 or np.ptp(gt[ok]) == 0:
        return {"spearman": None, "pearson": None, "pairs_with_gt": int(ok.sum())}
    return {"spearman": round(float(spearmanr(margins[ok], gt[ok]).statistic), 4),
            "pearson": round(float(pearsonr(margins[ok], gt[ok]).statistic), 4), "pairs_with_gt": int(ok.sum())}


def train_pairs_sql(pairs: str, strategy: str) -> str:
    """The annotated strategy's train pairs (pair_id, gt_margin), ordered by pair_id: the items margins are
    fitted for, numbered in that order."""
    return f"""
        with final as (
            select pair_id, gt_margin from {pairs} where strategy = {lit(strategy)} and split = 'train'
        )
        select * from final order by pair_id"""


def pop_labels_sql(labels: str, pairs_sql: str, sampling: str) -> str:
    """One sampling's PoP labels as item indices (a, b, a_stronger), numbered like `pairs_sql`."""
    return f"""
        with pairs as (
            select pair_id, row_number() over (order by pair_id) - 1 as i from ({pairs_sql})
        ),
        final as (
            select pa.i as a, pb.i as b, l.a_stronger
            from {labels} l
            join pairs pa on pa.pair_id = l.pair_a
            join pairs pb on pb.pair_id = l.pair_b
            where l.sampling = {lit(sampling)}
        )
        select * from final
    """


def pop_labels_of(ctx: RunContext, con, pairs_sql: str, sampling: str) -> pa.Table:
    """The run's PoP labels of one sampling as item indices (see pop_labels_sql)."""
    if not ctx.has("pop_labels"):
        raise PopflowError(f"margins.method: pop needs PoP labels, and run {ctx.run_id} has none "
                           "(run the annotate stage, or choose method gt, fixed or none)")
    return con.sql(pop_labels_sql(ctx.table("pop_labels"), pairs_sql, sampling)).to_arrow_table()


def margins_of(ctx: RunContext, con, pairs_sql: str, ids: np.ndarray, gt: np.ndarray, sampling: str):
    """Margins, strengths and comparison counts of the pairs under one PoP sampling's labels."""
    cfg = ctx.config.margins
    strength, counts = np.full(len(ids), np.nan), np.zeros(len(ids), dtype=np.int64)
    if cfg.method != "pop":
        if cfg.method == "gt" and np.isnan(gt).any():
            raise PopflowError(f"margins.method: gt needs gt_margin, and pair {ids[np.isnan(gt)][0]!r} has none")
        return fixed_margins(cfg.method, gt, cfg.alpha, cfg.gamma, cfg.max_margin), strength, counts
    labels = pop_labels_of(ctx, con, pairs_sql, sampling)
    a, b = (labels.column(c).to_numpy().astype(np.int64) for c in ("a", "b"))
    if len(a) == 0:
        raise PopflowError(f"margins.method: pop needs PoP labels, and run {ctx.run_id} has 0 ({sampling})")
    strength = fit_strengths(len(ids), a, b, labels.column("a_stronger").to_numpy(zero_copy_only=False),
                             cfg.prior_sigma)
    counts = np.bincount(a, minlength=len(ids)) + np.bincount(b, minlength=len(ids))
    return strengths_to_margins(strength, cfg.scale, cfg.max_margin, cfg.target_mean), strength, counts


@stage("margins", reads=("annotate", "pair", "import_pairs"), sections=("margins",), writes=("margins",))
def infer_margins(ctx: RunContext) -> Output:
    """Write a margin per annotated train pair and PoP sampling (`margins` table), with agreement figures
    and a scatter plot."""
    from popflow.plots import plot_margins

    cfg, con = ctx.config.margins, sql.connect()
    pairs_sql = train_pairs_sql(ctx.table("pairs"), ctx.config.annotated_strategy())
    pairs = con.sql(pairs_sql).to_arrow_table()
    ids = pairs.column("pair_id").to_numpy(zero_copy_only=False)
    gt = pairs.column("gt_margin").to_numpy(zero_copy_only=False).astype(np.float64)
    tables, report = [], {"method": cfg.method, "pairs": len(ids)}
    for sampling in ctx.config.annotate.sampling:
        margins, strength, counts = margins_of(ctx, con, pairs_sql, ids, gt, sampling)
        tables.append(pa.table({
            "pair_id": ids, "margin": margins, "strength": strength, "method": [cfg.method] * len(ids),
            "sampling": [sampling] * len(ids), "gt_margin": gt, "n_comparisons": counts}))
        report[sampling] = {"mean_margin": round(float(margins.mean()), 4), **agreement(margins, gt),
                            "uncompared_pairs": int((counts == 0).sum()) if cfg.method == "pop" else None}
        if cfg.method == "pop" and not np.isnan(gt).all() and sampling == ctx.config.annotate.sampling[0]:
            report["plot"] = str(plot_margins(gt, margins, strength, ctx.run_dir / "margins_vs_gt.png",
                                              ctx.run_id))
    table = pa.concat_tables(tables)
    ctx.lake.write_table("margins", ctx.pipeline, ctx.run_id, with_run_columns(ctx, table))
    run_logger().info("margins: %s", report)
    return Output({"margins": table.num_rows}, report)
