"""Stage 6a, ref_logps: the reference model's log-probs of every pair's chosen and rejected response, once.

Computed by TRL itself (DPOTrainer's own precompute pass, so tokenisation and truncation are exactly what
training sees) for every annotated pair, train and held-out split, and stored in the lake. Every method,
seed and rerun of the run then trains without loading the reference model: the train stage attaches these
columns and checks the reference's fingerprint and max_length against them.

    .venv/bin/popflow sql "select split, count(*), avg(ref_chosen_logps - ref_rejected_logps) from ref_logps group by 1"

Prompts that fill `train.max_length` have no room for a response: TRL drops them. `train.long_prompts:
reject` fails the stage naming the first such pair; `truncate` drops them with a warning and a count.
"""

from __future__ import annotations

import json
import logging
import tempfile

import pyarrow as pa
import pyarrow.compute as pc

from popflow import models, precision, sql
from popflow.errors import PopflowError
from popflow.sql import lit
from popflow.stage import Output, RunContext, run_logger, stage, with_run_columns

log = logging.getLogger(__name__)


def pair_rows_sql(pairs: str, strategies: list[str]) -> str:
    """The pairs trained on or measured, as TRL columns (prompt, chosen, rejected are message lists): all of the
    annotated strategy (`strategies[0]`: train and held-out), and the train pairs of the others (any train
    method's `pairs`; held-out accuracy is measured on the annotated pairs only)."""
    return f"""
        with final as (
            select pair_id, split, prompt, chosen, rejected
            from {pairs}
            where strategy = {lit(strategies[0])}
               or (strategy in {sql.values(strategies[1:])} and split = 'train')
        )
        select * from final order by pair_id
    """


def length_report(prepared: pa.Table, max_length: int) -> int:
    """How many pairs have a sequence (prompt + response) longer than max_length (TRL truncates them)."""
    prompt = pc.list_value_length(prepared.column("prompt_ids"))
    longest = pc.max_element_wise(pc.list_value_length(prepared.column("chosen_ids")),
                                  pc.list_value_length(prepared.column("rejected_ids")))
    return pc.sum(pc.greater(pc.add(prompt, longest), max_length)).as_py() or 0


def reject_long_prompts(pairs: pa.Table, tok, cfg) -> None:
    """Under `long_prompts: reject`, fail before any compute if a prompt (chat template applied, as TRL
    renders it) fills max_length, naming the first such pair."""
    if cfg.long_prompts != "reject":
        return
    ids = tok.apply_chat_template(pairs.column("prompt").to_pylist(), add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    too_long = [i for i, x in enumerate(ids) if len(x) >= cfg.max_length]
    if too_long:
        raise PopflowError(f"pair {pairs.column('pair_id')[too_long[0]].as_py()!r}: its prompt fills "
                           f"train.max_length={cfg.max_length} tokens ({len(too_long)} such pairs); raise "
                           "max_length or set train.long_prompts: truncate")


def count_dropped(pairs: pa.Table, kept: pa.Table, cfg) -> int:
    """Pairs TRL dropped because their prompt fills max_length (long_prompts: truncate), with a warning."""
    dropped = len(pairs) - len(kept)
    if dropped:
        log.warning("%d pair(s) dropped: prompt fills train.max_length=%d", dropped, cfg.max_length)
    return dropped


def compute_ref_logps(pairs: pa.Table, ref_path: str, ref_name: str, cfg) -> pa.Table:
    """TRL's precompute pass over `pairs` with the reference model; returns the prepared dataset as Arrow."""
    import datasets
    from transformers import AutoModelForCausalLM

    from tasks.trainer import PopDPOTrainer, dpo_args

    prec = cfg.precision()  # the policy's starting weights' (popflow/config/train.py)
    tok = models.load_tokenizer(ref_path, ref_name, "train.reference")
    reject_long_prompts(pairs, tok, cfg)
    model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=prec.torch_dtype()).to(prec.device)
    with tempfile.TemporaryDirectory() as out:
        # train.trl too: options such as ld_alpha change how TRL computes a sequence's log-prob, and the stored
        # reference must be computed as the trained policy's will be (its batch sizes are this pass's own)
        args = dpo_args(out, "dpo", cfg.beta, cfg.max_length, 0, prec.mixed, False, cfg.reference_trl(),
                        per_device_train_batch_size=cfg.ref_batch_size, precompute_ref_batch_size=cfg.ref_batch_size)
        trainer = PopDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset(pairs), processing_class=tok)
        return trainer.train_dataset.data.table.combine_chunks()


# not train.reference / max_length / trl: the train stage checks those against the stored log-probs and says
# which stage to rerun, rather than a generic "different config"
@stage("ref_logps", reads=("pair", "import_pairs"), sections=("trained_strategies", "train.long_prompts",
                                                            "train.dtype"),
       writes=("ref_logps",), retries=1, when=lambda cfg: cfg.train is not None)
def ref_logps(ctx: RunContext) -> Output:
    """Write ref_logps (pair_id, split, ref_chosen_logps, ref_rejected_logps, token counts, reference)."""
    cfg = ctx.config.train
    dtypes = precision.announce({"train.dtype": cfg.dtype})
    ref = models.resolve(ctx.config.reference_policy(), ctx.lake.data_dir, "train.reference")
    strategies = ctx.config.trained_strategies()
    pairs = sql.connect().sql(pair_rows_sql(ctx.table("pairs"), strategies)).to_arrow_table()
    if pairs.num_rows == 0:
        raise PopflowError(f"ref_logps: run {ctx.run_id} has no pairs of strategy {' or '.join(map(repr, strategies))}")
    prepared = compute_ref_logps(pairs, ref.path, ref.ref, cfg)
    dropped = count_dropped(pairs, prepared, cfg)
    n = prepared.num_rows
    table = pa.table({
        "pair_id": prepared.column("pair_id"), "split": prepared.column("split"),
        "ref_chosen_logps": pc.cast(prepared.column("ref_chosen_logps"), pa.float64()),
        "ref_rejected_logps": pc.cast(prepared.column("ref_rejected_logps"), pa.float64()),
        "prompt_tokens": pc.list_value_length(prepared.column("prompt_ids")),
        "chosen_tokens": pc.list_value_length(prepared.column("chosen_ids")),
        "rejected_tokens": pc.list_value_length(prepared.column("rejected_ids")),
        "reference": [ref.ref] * n, "ref_fingerprint": [ref.fingerprint] * n,
        "max_length": pa.array([cfg.max_length] * n, pa.int32()),
        "trl": [json.dumps(cfg.reference_trl(), sort_keys=True)] * n,
        "weights": [cfg.precision().weights] * n,
    })
    ctx.lake.write_table("ref_logps", ctx.pipeline, ctx.run_id, with_run_columns(ctx, table))
    report = {"pairs": n, "reference": ref.ref, "dropped_long_prompts": dropped,
              "truncated_sequences": length_report(prepared, cfg.max_length), "max_length": cfg.max_length}
    run_logger().info("reference log-probs: %s", report)
    return Output({"ref_logps": n}, report, {"reference": ref.identity()}, dtypes)
