"""popflow's preference losses, as pure functions of per-pair tensors (torch).

Papers: "Direct Preference Optimization with an Offset" (ODPO, arXiv 2402.10571); "Adaptive Margin
RLHF via Preference over Preferences" (DPO-PoP, Chittepu et al., arXiv 2509.22851); "Robust
Preference Optimization through Reward Model Distillation" (Fisch et al., arXiv 2405.19316).
Notation: for a pair (x, y_w, y_l) and policy pi against reference pi_ref,
    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)].

    dpo, dpo_fixed_margin, dpo_gt_margin, dpo_pop     -log sigmoid(beta * h - m)        (m = 0, gamma,
                                                      alpha * gt gap, the PoP margin; ODPO / DPO-PoP)
    distill                                           (beta * h - (r_w - r_l))^2        (Fisch et al.)
    distill_pessimistic                               min_k (beta * h - (r_w^k - r_l^k))^2 over reward models k

distill_pessimistic is a per-pair variant of Fisch et al.'s pessimism, named for what it is: the paper's
pessimistic objective takes the worst case over the reward-model family for the whole distillation objective
(one member of the family at a time) and adds a forward-KL term to the reference; here each pair picks the
member whose gap is closest to beta * h. Consequence: a pair where any member's gap is 0 (the constraints
reward often ties both responses) has its minimum at beta * h = 0, so it gives no gradient there and pulls
beta * h towards 0 elsewhere; the train stage logs how many training pairs are such.

Each returns the per-pair loss (shape [B]); the trainer takes the mean. tasks/train.py wires them into TRL's
DPOTrainer; tests/tasks/test_losses.py checks them against values worked out by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MARGIN_LOSSES = ("dpo", "dpo_fixed_margin", "dpo_gt_margin", "dpo_pop")


def margin_dpo_loss(h: torch.Tensor, margin: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * h - m): DPO that asks the implicit reward gap to exceed each pair's margin."""
    return -F.logsigmoid(beta * h - margin)


def distill_loss(h: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """(beta * h - target)^2: regress the implicit reward gap onto a reward model's gap."""
    return (beta * h - target) ** 2


def pessimistic_distill_loss(h: torch.Tensor, targets: torch.Tensor, beta: float) -> torch.Tensor:
    """min over reward models k of (beta * h - targets[:, k])^2 (targets: [B, K]): a per-pair variant of e-DPO's
    pessimism (see the module docstring)."""
    return ((beta * h).unsqueeze(1) - targets).pow(2).min(dim=1).values


def pair_loss(loss: str, h: torch.Tensor, beta: float, margin: torch.Tensor, target: torch.Tensor,
              targets: torch.Tensor) -> torch.Tensor:
    """The per-pair loss of one of popflow's losses; `margin` is already the method's m (0 for dpo)."""
    if loss in MARGIN_LOSSES:
        return margin_dpo_loss(h, margin, beta)
    if loss == "distill":
        return distill_loss(h, target, beta)
    if loss == "distill_pessimistic":
        return pessimistic_distill_loss(h, targets, beta)
    raise ValueError(f"not a popflow loss: {loss!r}")
