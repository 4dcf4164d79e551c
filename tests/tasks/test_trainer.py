"""PopDPOTrainer against TRL's own DPOTrainer on the same batch (real tiny model, real TRL)."""

from __future__ import annotations

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOTrainer

from tasks.trainer import PopDPOTrainer, dpo_args

MODEL = "data/models/tiny-llama"


def pairs(n: int = 6) -> datasets.Dataset:
    msg = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return datasets.Dataset.from_list([
        {"prompt": msg("user", f"question {i}: name a colour"), "chosen": msg("assistant", "blue " * (i % 3 + 1)),
         "rejected": msg("assistant", f"no {i}")} for i in range(n)])


def perturbed(seed: int = 1):
    """The tiny model with every weight nudged the same way (seeded): a policy that differs from the reference."""
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def stored_ref(tmp_path_factory) -> datasets.Dataset:
    """Reference log-probs from TRL's own precompute pass with the unperturbed model (what ref_logps stores)."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    args = dpo_args(str(tmp_path_factory.mktemp("ref")), "dpo", 0.1, 128, 0, "no", False, {},
                    per_device_train_batch_size=6)
    trainer = PopDPOTrainer(model=AutoModelForCausalLM.from_pretrained(MODEL), args=args, train_dataset=pairs(),
                            processing_class=tok)
    ds = trainer.train_dataset
    return pairs().add_column("ref_chosen_logps", ds["ref_chosen_logps"]).add_column(
        "ref_rejected_logps", ds["ref_rejected_logps"])


def test_margin_zero_equals_trl_sigmoid(stored_ref, tmp_path):
    """Same policy, same reference, same batch: popflow's dpo (m = 0, its own forward pass over stored
    reference log-probs) and stock TRL sigmoid DPO (reference model run live) give the same loss."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    stock = DPOTrainer(model=perturbed(), ref_model=AutoModelForCausalLM.from_pretrained(MODEL), processing_class=tok,
                       args=dpo_args(str(tmp_path / "a"), "sigmoid", 0.1, 128, 0, "no", False, {},
                                     precompute_ref_log_probs=False),
                       train_dataset=pairs())
    ours = PopDPOTrainer(model=perturbed(), processing_class=tok, loss="dpo",
                         args=dpo_args(str(tmp_path / "b"), "dpo", 0.1, 128, 0, "no", False, {}),
                         train_dataset=stored_ref.add_column("margin", [0.0] * 6))
    ours_batch = ours.data_collator([ours.train_dataset[i] for i in range(6)])
    stock_batch = stock.data_collator([stock.train_dataset[i] for i in range(6)])
    assert torch.equal(ours_batch["input_ids"], stock_batch["input_ids"])
    with torch.no_grad():
        expected = stock.compute_loss(stock.model, stock_batch).item()
        got = ours.compute_loss(ours.model, ours_batch).item()
    assert abs(expected - 0.6931) > 1e-3, "policy and reference must differ for the comparison to mean anything"
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_margin_shifts_the_loss_as_the_formula_says(stored_ref, tmp_path):
    """With m = 0.7 on every pair, each pair's loss is -log sigmoid(beta*h - 0.7): recover beta*h from the
    m = 0 loss (beta*h = -log(exp(loss) - 1)) on a single pair and check the m = 0.7 loss from it."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    one = stored_ref.select([0])
    losses = []
    for m in (0.0, 0.7):
        t = PopDPOTrainer(model=perturbed(), processing_class=tok, loss="dpo_pop",
                          args=dpo_args(str(tmp_path / str(m)), "dpo", 0.1, 128, 0, "no", False, {}),
                          train_dataset=one.add_column("margin", [m]))
        with torch.no_grad():
            losses.append(t.compute_loss(t.model, t.data_collator([t.train_dataset[0]])).item())
    beta_h = -torch.log(torch.expm1(torch.tensor(losses[0], dtype=torch.float64))).item()
    assert losses[1] == pytest.approx(-torch.nn.functional.logsigmoid(torch.tensor(beta_h - 0.7)).item(), rel=1e-4)


def test_distinct_margins_reach_their_pairs_through_the_real_dataloader(stored_ref, tmp_path):
    """Pair i carries margin i / 10: every batch of TRL's own (shuffling) train dataloader holds, for each
    prompt 'question i', the margin i / 10. A margin loss without its column is refused, not trained as DPO."""
    tok = AutoTokenizer.from_pretrained(MODEL)
    margins = [i / 10 for i in range(6)]
    trainer = PopDPOTrainer(model=perturbed(), processing_class=tok, loss="dpo_pop",
                            args=dpo_args(str(tmp_path / "m"), "dpo", 0.1, 128, 0, "no", False, {},
                                          per_device_train_batch_size=4),
                            train_dataset=stored_ref.add_column("margin", margins))
    seen = {}
    for batch in trainer.get_train_dataloader():
        half = batch["input_ids"].shape[0] // 2  # chosen rows first, then rejected
        for row, margin in zip(batch["input_ids"][:half], batch["margin"].tolist(), strict=True):
            text = tok.decode(row, skip_special_tokens=True)
            pair = int(text.split("question ")[1].split(":")[0])
            seen[pair] = margin
    assert seen == pytest.approx({i: i / 10 for i in range(6)})
    bare = PopDPOTrainer(model=perturbed(), processing_class=tok, loss="dpo_pop",
                         args=dpo_args(str(tmp_path / "n"), "dpo", 0.1, 128, 0, "no", False, {}),
                         train_dataset=stored_ref)
    from popflow.errors import PopflowError

    with pytest.raises(PopflowError, match="loss dpo_pop needs the per-pair column 'margin'"):
        bare.compute_loss(bare.model, bare.data_collator([bare.train_dataset[0]]))
