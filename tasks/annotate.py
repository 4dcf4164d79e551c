"""Stage 4, annotate: simulated preference-over-preference (PoP) labels, "which of two preferences is stronger".

Each pair's ground truth is its gt_margin: chosen minus rejected reward (the aggregate, or one reward model
named by `annotate.ground_truth`). Two ways to choose comparisons (DPO-PoP, Chittepu et al. 2025):

    iterative  every pair anchors exactly k comparisons (pair_a = the anchor) with k distinct partners, so
               each pair is labelled about 2k times; the training set keeps every pair once
               (train_on: all_pairs) and weak preferences keep their natural frequency.
    random     k x (number of pairs) comparisons, both members drawn uniformly at random; the training set
               is resampled from the comparisons' winners (train_on: pop_winners), so strong preferences are
               over-represented. The paper publishes no code: this composition is our reading of it, and
               `train_on` makes it an explicit choice.

Partners come from the whole dataset or only from pairs of the same prompt (`partners: same_prompt`).
Noise: `flip` inverts the true order with probability p (the paper's model); `bradley_terry` labels
P(a stronger) = sigmoid((m_a - m_b) / tau). Exact ties: `drop` the comparison or a fair `coin`.
Same seed and inputs give identical labels. With `annotate.labels` the same comparisons are labelled by people
instead (tasks/human_labels.py: Label Studio tasks out, its export back in; pop_labels.source says which).

    .venv/bin/popflow sql "select sampling, avg(flipped::int) from pop_labels group by all"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from popflow import sql
from popflow.errors import PopflowError
from popflow.sql import lit
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns
from tasks.human_labels import human_labels


def group_layout(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Items sorted by group: (order, position of each item in that order, its group's start, its group's size)."""
    order = np.argsort(groups, kind="stable")
    sorted_groups = groups[order]
    starts_of_sorted = np.searchsorted(sorted_groups, sorted_groups, side="left")
    ends_of_sorted = np.searchsorted(sorted_groups, sorted_groups, side="right")
    pos = np.empty_like(order)
    pos[order] = np.arange(len(order))
    return order, pos, starts_of_sorted[pos], (ends_of_sorted - starts_of_sorted)[pos]


def check_k(k: int, sizes: np.ndarray, partners: str) -> None:
    possible = int(sizes.min()) - 1 if len(sizes) else 0
    if k > possible:
        where = "in the dataset" if partners == "all" else "among some prompt's pairs (partners: same_prompt)"
        raise PopflowError(f"annotate.k = {k} is larger than the {possible} possible partner(s) {where}")


def draw_iterative(groups: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Every item anchors k comparisons with k distinct partners of its own group (never itself)."""
    order, pos, start, size = group_layout(groups)
    n = len(groups)
    offsets = rng.integers(1, size[:, None], size=(n, k))
    for _ in range(100):  # redraw the rows that repeated a partner; with k << group size this ends at once
        srt = np.sort(offsets, axis=1)
        dup = (np.diff(srt, axis=1) == 0).any(axis=1) if k > 1 else np.zeros(n, bool)
        if not dup.any():
            break
        offsets[dup] = rng.integers(1, size[dup, None], size=(int(dup.sum()), k))
    else:  # k close to the group size: draw those rows as permutations
        for i in np.flatnonzero((np.diff(np.sort(offsets, axis=1), axis=1) == 0).any(axis=1)):
            offsets[i] = rng.permutation(np.arange(1, size[i]))[:k]
    partner_pos = start[:, None] + (pos[:, None] - start[:, None] + offsets) % size[:, None]
    return np.repeat(np.arange(n), k), order[partner_pos].ravel()


def draw_random(groups: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k x n comparisons: a uniform item, and a uniform other item of its group."""
    order, pos, start, size = group_layout(groups)
    a = rng.integers(0, len(groups), size=k * len(groups))
    offset = rng.integers(1, size[a])
    b = order[start[a] + (pos[a] - start[a] + offset) % size[a]]
    return a, b


def label(gt_a: np.ndarray, gt_b: np.ndarray, noise: str, p: float, tau: float, ties: str,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a_stronger, flipped, keep): simulated labels, whether each disagrees with the truth, rows kept."""
    diff = gt_a - gt_b
    truth = diff > 0
    tie = diff == 0
    u = rng.random(len(diff))
    if noise == "flip":
        labels = truth ^ (u < p)
    else:
        labels = u < 1.0 / (1.0 + np.exp(-diff / tau))
    coin = rng.random(len(diff)) < 0.5
    labels = np.where(tie, coin, labels)
    flipped = (labels != truth) & ~tie
    keep = ~tie if ties == "drop" else np.ones(len(diff), bool)
    return labels, flipped, keep


def simulate_pop_labels(gt: np.ndarray, groups: np.ndarray, sampling: str, k: int, noise: str, p: float,
                        tau: float, ties: str, seed: int, partners: str = "all") -> dict[str, np.ndarray]:
    """Comparisons and their labels over items 0..n-1 (indices into gt)."""
    if len(gt) < 2:
        raise PopflowError("annotate: PoP labels need at least two pairs")
    if np.isnan(gt).any():
        bad = int(np.flatnonzero(np.isnan(gt))[0])
        raise PopflowError(f"annotate: gt_margin is NaN for pair #{bad}: a ground truth is needed for every pair")
    a, b, rng = draw_comparisons(groups, sampling, k, seed, partners)
    a_stronger, flipped, keep = label(gt[a], gt[b], noise, p, tau, ties, rng)
    return {"a": a[keep], "b": b[keep], "a_stronger": a_stronger[keep], "flipped": flipped[keep]}


def draw_comparisons(groups: np.ndarray, sampling: str, k: int, seed: int, partners: str = "all"
                     ) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The comparisons (a, b) of one sampling over items 0..n-1, and the generator after the draw (the
    simulated labels go on drawing from it): what people label too (tasks/human_labels.py)."""
    if len(groups) < 2:
        raise PopflowError("annotate: PoP labels need at least two pairs")
    _, _, _, size = group_layout(groups)
    check_k(k, size, partners)
    rng = np.random.default_rng(seed)
    a, b = (draw_iterative if sampling == "iterative" else draw_random)(groups, k, rng)
    return a, b, rng


def winner_counts(n: int, a: np.ndarray, b: np.ndarray, a_stronger: np.ndarray) -> np.ndarray:
    """How often each item is the stronger member of a comparison (the pop_winners training set)."""
    return np.bincount(np.where(a_stronger, a, b), minlength=n)


def annotated_pairs_sql(pairs: str, rewards: str | None, strategy: str, gt_model: str) -> str:
    """The train pairs of `strategy` (pair_id, prompt_id, gt): gt is the pair's gt_margin, or the gap of one
    reward model's scores (`gt_model`, from the relation `rewards`) unless gt_model is 'aggregate'."""
    if gt_model == "aggregate":
        gt_sql, joins = "p.gt_margin", ""
    else:
        gt_sql = "rc.score - rr.score"
        joins = (f"left join {rewards} rc on rc.prompt_id = p.prompt_id and rc.sample_idx = p.chosen_idx "
                 f"and rc.reward_model = {lit(gt_model)} "
                 f"left join {rewards} rr on rr.prompt_id = p.prompt_id and rr.sample_idx = p.rejected_idx "
                 f"and rr.reward_model = {lit(gt_model)}")
    return f"""
        with final as (
            select p.pair_id, p.prompt_id, {gt_sql} as gt
            from {pairs} p {joins}
            where p.strategy = {lit(strategy)} and p.split = 'train'
        )
        select * from final order by pair_id
    """


def pair_texts(ctx: RunContext, con) -> dict[str, dict]:
    """pair_id -> the pair's prompt, chosen and rejected message lists (what people read)."""
    rows = con.sql(f"select pair_id, prompt, chosen, rejected from {ctx.table('pairs')}").to_arrow_table()
    return {r["pair_id"]: r for r in rows.to_pylist()}


def annotated_pairs(ctx: RunContext, con, need_gt: bool = True) -> pa.Table:
    """The pairs to annotate (pair_id, prompt_id, gt) in a stable order; gt from a named reward model if asked,
    and required unless `need_gt` is false (people label pairs no reward model scored)."""
    cfg, strategy = ctx.config, ctx.config.annotated_strategy()
    gt_model = cfg.annotate.ground_truth
    if gt_model != "aggregate" and (cfg.import_pairs or gt_model not in {m.name for m in cfg.score.models}):
        raise PopflowError(f"annotate.ground_truth: {gt_model!r} is not a reward model of this pipeline "
                           "(use 'aggregate' or a name from score.models)")
    rewards = ctx.table("rewards") if gt_model != "aggregate" else None
    table = con.sql(annotated_pairs_sql(ctx.table("pairs"), rewards, strategy, gt_model)).to_arrow_table()
    if table.num_rows == 0:
        raise PopflowError(f"annotate: run {ctx.run_id} has no pairs with strategy {strategy!r} (annotate.pairs)")
    missing = table.filter(pc.is_null(table.column("gt"), nan_is_null=True))
    if missing.num_rows and need_gt:
        raise PopflowError(f"annotate: pair {missing.column('pair_id')[0].as_py()!r} has no ground-truth margin "
                           f"({missing.num_rows} such pairs): PoP simulation needs chosen and rejected scores")
    return table


def answered(cfg, ids: np.ndarray, gt: np.ndarray, groups: np.ndarray, sampling: str, run_id: str,
             texts: dict[str, dict]) -> tuple[dict, dict]:
    """People's labels of the comparisons the simulation would draw (annotate.labels: tasks/human_labels.py):
    the labels as simulate_pop_labels gives them (`flipped`: disagrees with the reward models' order), and what
    the report adds."""
    a, b, _ = draw_comparisons(groups, sampling, cfg.k, cfg.seed, cfg.partners)
    rows, strong, unanswered = human_labels(cfg.labels, sampling, a, b, ids, run_id, texts)
    a, b = a[rows], b[rows]
    with np.errstate(invalid="ignore"):  # a pair without a ground truth (unscored import): never "flipped"
        truth, known = gt[a] > gt[b], ~np.isnan(gt[a]) & ~np.isnan(gt[b])
    import hashlib

    digest = hashlib.sha256(Path(cfg.labels).read_bytes()).hexdigest()[:16]
    return ({"a": a, "b": b, "a_stronger": strong, "flipped": (strong != truth) & (gt[a] != gt[b]) & known},
            {"source": "human", "answers": len(rows), "unanswered": unanswered, "labels_sha256": digest})


def annotation(ids: np.ndarray, gt: np.ndarray, groups: np.ndarray, cfg, sampling: str,
               train_on: str, people: tuple[str, dict] | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """PoP labels (simulated, or people's: annotate.labels) and the training-set composition of one sampling."""
    extra = {"source": "simulated"}
    if cfg.labels:  # people: (run id, pair_id -> its texts)
        lab, extra = answered(cfg, ids, gt, groups, sampling, *people)
    else:
        lab = simulate_pop_labels(gt, groups, sampling, cfg.k, cfg.noise, cfg.p, cfg.tau, cfg.ties, cfg.seed,
                                  cfg.partners)
    n = len(lab["a"])
    labels = pa.table({
        "pop_id": pa.array(np.arange(n), pa.int64()), "pair_a": ids[lab["a"]], "pair_b": ids[lab["b"]],
        "a_stronger": lab["a_stronger"], "flipped": lab["flipped"], "gt_margin_a": gt[lab["a"]],
        "gt_margin_b": gt[lab["b"]], "sampling": [sampling] * n, "k": pa.array([cfg.k] * n, pa.int32()),
        "noise": [cfg.noise if not cfg.labels else "human"] * n, "source": [extra["source"]] * n,
    })
    copies = (np.ones(len(ids), dtype=np.int64) if train_on == "all_pairs"
              else winner_counts(len(ids), lab["a"], lab["b"], lab["a_stronger"]))
    keep = copies > 0
    train = pa.table({"pair_id": ids[keep], "copies": copies[keep], "train_on": [train_on] * int(keep.sum()),
                      "sampling": [sampling] * int(keep.sum())})
    report = {"comparisons": n, "flip_rate": round(float(lab["flipped"].mean()), 4) if n else 0.0,
              "train_on": train_on, "train_pairs": int(keep.sum()), "train_examples": int(copies.sum()), **extra}
    return labels, train, report


def partner_groups(pairs: pa.Table, partners: str) -> np.ndarray:
    """Each pair's group for drawing partners: its prompt (partners: same_prompt), else one group."""
    if partners == "same_prompt":
        return np.unique(pairs.column("prompt_id").to_numpy(zero_copy_only=False), return_inverse=True)[1]
    return np.zeros(pairs.num_rows, dtype=np.int64)


@stage("annotate", reads=("pair", "import_pairs", "score"), sections=("annotate",),
       writes=("pop_labels", "train_pairs"))
def annotate(ctx: RunContext) -> Output:
    """Simulate PoP labels over the run's train pairs, once per sampling strategy; write pop_labels and
    the training-set composition (train_pairs)."""
    cfg = ctx.config.annotate
    con = sql.connect()
    pairs = annotated_pairs(ctx, con, need_gt=not cfg.labels)  # people need no ground truth
    people = (ctx.run_id, pair_texts(ctx, con)) if cfg.labels else None
    ids = pairs.column("pair_id").to_numpy(zero_copy_only=False)
    gt = pairs.column("gt").to_numpy()
    groups = partner_groups(pairs, cfg.partners)
    labels, train, report = [], [], {"pairs": len(ids), "k": cfg.k, "noise": cfg.noise}
    for sampling in cfg.sampling:
        lab, tr, rep = annotation(ids, gt, groups, cfg, sampling, ctx.config.train_on(sampling), people)
        labels.append(lab)
        train.append(tr)
        report[sampling] = rep
    labels, train = pa.concat_tables(labels), pa.concat_tables(train)
    ctx.lake.write_table("pop_labels", ctx.pipeline, ctx.run_id, with_run_columns(ctx, labels))
    ctx.lake.write_table("train_pairs", ctx.pipeline, ctx.run_id, with_run_columns(ctx, train))
    run_logger().info("PoP labels: %s", report)
    return Output({"pop_labels": labels.num_rows, "train_pairs": train.num_rows}, report)
