"""Plots saved into a run's folder (DATA_DIR/lake/_runs/pipeline=.../run=.../).

reward_distributions.png: for a few prompts, every sample's aggregate reward as a strip, with the seven
points (min, mu-2sigma, ..., max) marked where the picked samples lie.
margins_vs_gt.png: inferred PoP margins and strengths against the ground-truth margins.
point_growth.png: each of the seven points' mean reward as the samples per prompt grow (4, 8, 16, ...).
loop_rounds.png: an on-policy loop per round: sample score distributions and the gate's win rate.
climb (docs/proof/loop_climb.png): a loop's policies on held-out prompts, per reward model, with intervals.
"""

from __future__ import annotations

from pathlib import Path

from popflow.config import PASS_RATE_KINDS, POINTS

COLORS = dict(zip(POINTS, ["#67001f", "#d6604d", "#e08214", "#444444", "#35978f", "#4393c3", "#053061"], strict=True))


def save(fig, out: Path) -> Path:
    """Save under a temporary name and rename, so a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    from popflow.lake import atomic

    try:
        with atomic(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out


def plot_reward_distributions(con, rewards: str, seven: str, out: Path, title: str,
                              max_prompts: int = 6) -> Path:
    """Plot the prompts with the widest reward spread (the informative ones) and return the file. `rewards` and
    `seven` are SQL relations (the run's sample_rewards and seven_points).

    Per prompt: every sample's reward on the bottom row; above it one row per point, a dashed tick at the
    point's target (mu + k sigma) and a marker on the sample it picked, so coinciding picks stay visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prompts = [r[0] for r in con.execute(
        f"select prompt_id from {rewards} group by prompt_id "
        "order by stddev_pop(reward) desc, prompt_id limit ?", [max_prompts]).fetchall()]
    if not prompts:
        return out
    rewards = con.execute(
        f"select prompt_id, reward from {rewards} where prompt_id in ?", [prompts]).fetchall()
    points = con.execute(
        f"select prompt_id, point_rank, point, target, reward from {seven} "
        "where prompt_id in ?", [prompts]).fetchall()
    fig, axes = plt.subplots(len(prompts), 1, figsize=(8, 1.6 * len(prompts) + 0.8), sharex=True, squeeze=False)
    for ax, pid in zip(axes[:, 0], prompts, strict=True):
        values = [r for p, r in rewards if p == pid]
        ax.scatter(values, [0] * len(values), s=12, alpha=0.5, color="black", label="samples")
        for p, rank, point, target, reward in points:
            if p != pid:
                continue
            if target is not None:
                ax.plot([target, target], [rank + 0.6, rank + 1.4], ls="--", lw=1, color=COLORS[point])
            ax.scatter([reward], [rank + 1], s=30, color=COLORS[point], edgecolor="black", lw=0.4, label=point)
        ax.set_yticks([])
        ax.set_ylim(-0.8, len(POINTS) + 0.8)
        ax.set_ylabel(pid, rotation=0, ha="right", va="center", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles, labels, ncol=8, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.02))
    axes[-1, 0].set_xlabel("aggregate reward (markers: picked sample; dashed: target mu + k sigma)")
    fig.suptitle(f"reward distributions and the seven points - {title}", fontsize=9, y=0.995)
    fig.tight_layout()
    return save(fig, out)


def plot_point_growth(rows: list[dict], out: Path, title: str) -> Path:
    """Mean reward of each point against n (log scale), with its 95% interval over prompts (growth_curve_sql's
    rows: n, point, reward, reward_low, reward_high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for point in POINTS[::-1]:
        mine = sorted((r for r in rows if r["point"] == point), key=lambda r: r["n"])
        if not mine:
            continue
        n, y = [r["n"] for r in mine], [r["reward"] for r in mine]
        err = [[r["reward"] - (r["reward_low"] if r["reward_low"] is not None else r["reward"]) for r in mine],
               [(r["reward_high"] if r["reward_high"] is not None else r["reward"]) - r["reward"] for r in mine]]
        ax.errorbar(n, y, yerr=err, marker="o", ms=4, capsize=3, color=COLORS[point], label=point)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["n"] for r in rows}), [str(v) for v in sorted({r["n"] for r in rows})])
    ax.set_xlabel("samples per prompt (n)")
    ax.set_ylabel("mean reward of the point (95% interval)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title(f"the seven points as n grows - {title}", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_climb(rows: list[dict], out: Path, title: str) -> Path:
    """A loop's climb (popflow/report.py:climb_sql's rows): one panel per reward model, each policy of the chain
    in order with its held-out value and 95% interval over prompts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["reward_model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = sorted((r for r in rows if r["reward_model"] == model), key=lambda r: r["step"])
        x = list(range(len(mine)))
        low = [r["value"] - (r["value_low"] if r["value_low"] is not None else r["value"]) for r in mine]
        high = [(r["value_high"] if r["value_high"] is not None else r["value"]) - r["value"] for r in mine]
        ax.errorbar(x, [r["value"] for r in mine], yerr=[low, high], marker="o", capsize=4, color="#2166ac")
        ax.set_xticks(x, [r["policy"].replace(" (promoted)", "\n(promoted)").replace(" candidate", "\ncandidate")
                          for r in mine], fontsize=7)
        kind = mine[0]["kind"]
        ax.set_ylabel(f"{model}: {'pass rate' if kind in PASS_RATE_KINDS else 'mean score'} (95% interval)")
    fig.suptitle(f"held-out reward of each policy the loop sampled - {title}", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_pop_sweep(rows: list[dict], out: Path, title: str) -> Path:
    """Spearman of PoP margins against the ground truth by k, one line per sampling, 95% intervals over draws
    (pop_sweep_sql's rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for sampling, color in (("iterative", "#2166ac"), ("random", "#b2182b")):
        mine = sorted((r for r in rows if r["sampling"] == sampling and r["spearman"] is not None),
                      key=lambda r: r["k"])
        if not mine:
            continue
        err = [[r["spearman"] - (r["spearman_low"] if r["spearman_low"] is not None else r["spearman"]) for r in mine],
               [(r["spearman_high"] if r["spearman_high"] is not None else r["spearman"]) - r["spearman"]
                for r in mine]]
        ax.errorbar([r["k"] for r in mine], [r["spearman"] for r in mine], yerr=err, marker="o", capsize=3,
                    color=color, label=sampling)
    ax.set_xticks(sorted({r["k"] for r in rows}))
    ax.set_xlabel("PoP labels per pair (k)")
    ax.set_ylabel("Spearman, margins vs ground truth")
    ax.legend(fontsize=8)
    ax.set_title(f"PoP sampling - {title}", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_margins(gt, margins, strengths, out: Path, title: str) -> Path:
    """Inferred margins (left) and Bradley-Terry strengths (right) against the ground-truth reward margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import spearmanr

    ok = ~np.isnan(gt)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, values, label in ((axes[0], margins, "inferred margin"), (axes[1], strengths, "BT strength")):
        ax.scatter(gt[ok], values[ok], s=8, alpha=0.5, color="#2166ac")
        rho = spearmanr(gt[ok], values[ok]).statistic if ok.sum() > 2 else float("nan")
        ax.set_xlabel("ground-truth margin (chosen - rejected reward)")
        ax.set_ylabel(label)
        ax.set_title(f"Spearman {rho:.3f}", fontsize=9)
    fig.suptitle(f"PoP margins vs ground truth - {title}", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_comparison(rows: list[dict], metrics: list[str], out: Path, title: str) -> Path:
    """One bar panel per metric: each method's mean over seeds, its error bar the seeds-pooled 95% interval
    over held-out prompts (pairs) where the row has one (low, high), else the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "base", m))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        by = {r["method"]: r for r in rows if r["metric"] == metric}
        shown = [m for m in methods if m in by]
        means = [by[m]["mean"] for m in shown]
        below = [mean - by[m]["low"] if by[m].get("low") is not None else by[m]["std"] or 0.0
                 for m, mean in zip(shown, means, strict=True)]
        above = [by[m]["high"] - mean if by[m].get("high") is not None else by[m]["std"] or 0.0
                 for m, mean in zip(shown, means, strict=True)]
        ax.bar(range(len(shown)), means, yerr=[below, above],
               color=["#999999" if m == "base" else "#4393c3" for m in shown], capsize=3)
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.axhline(0, color="black", lw=0.5)
    fig.suptitle(f"{title}: mean, 95% interval over prompts (else ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return save(fig, out)


def plot_rounds(rounds: list[dict], scores: dict[int, dict[str, list[float]]], out: Path, title: str) -> Path:
    """The on-policy loop per round: one panel per reward model with the distribution of the round's sample
    scores (raw scale; the policy the round sampled), and a panel of the candidate's win rate against that
    policy with its confidence bound (filled: promoted, hollow: not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reward_models = sorted({m for by_model in scores.values() for m in by_model})
    fig, axes = plt.subplots(1, len(reward_models) + 1, figsize=(3.2 * (len(reward_models) + 1), 3.4), squeeze=False)
    for ax, model in zip(axes[0], reward_models, strict=False):
        shown = [r for r in sorted(scores) if model in scores[r]]
        ax.violinplot([scores[r][model] for r in shown], positions=shown, showmeans=True, widths=0.8)
        ax.set_xticks(shown)
        ax.set_xlabel("round", fontsize=8)
        ax.set_title(f"{model}: sample scores", fontsize=9)
    ax = axes[0][-1]
    for r in rounds:
        if r["win_rate"] is None:
            continue
        err = [[r["win_rate"] - r["win_lower"]], [r["win_upper"] - r["win_rate"]]]
        ax.errorbar([r["round"]], [r["win_rate"]], yerr=err, fmt="o", color="#4393c3",
                    mfc="#4393c3" if r["promoted"] else "white", capsize=3)
    ax.axhline(0.5, color="black", lw=0.5, ls="--")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted({r["round"] for r in rounds}))
    ax.set_xlabel("round", fontsize=8)
    ax.set_title("win rate vs the sampled policy", fontsize=9)
    fig.suptitle(f"{title} (filled: promoted)", fontsize=9)
    fig.tight_layout()
    return save(fig, out)
