"""popflow's losses against values worked out by hand (sigmoid(1) = 0.7310586, e = 2.7182818)."""

from __future__ import annotations

import math

import pytest
import torch

from tasks.losses import distill_loss, margin_dpo_loss, pair_loss, pessimistic_distill_loss

T = torch.tensor


def test_margin_dpo_loss_by_hand():
    """beta = 0.5, h = 2: beta*h = 1.
    m = 0:   -log sigmoid(1)    = log(1 + e^-1)  = 0.3132617
    m = 1:   -log sigmoid(0)    = log 2          = 0.6931472
    m = 1.5: -log sigmoid(-0.5) = log(1 + e^0.5) = 0.9740770
    The margin raises the loss of a pair whose gap is below it: DPO-PoP's push on strong preferences."""
    loss = margin_dpo_loss(T([2.0, 2.0, 2.0]), T([0.0, 1.0, 1.5]), beta=0.5)
    assert loss.tolist() == pytest.approx([0.3132617, 0.6931472, 0.9740770], abs=1e-6)
    assert loss[0] == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-7)


def test_distill_loss_by_hand():
    """(beta*h - gap)^2: beta = 0.5, h = 3, gap 1 -> (1.5 - 1)^2 = 0.25; h = -2, gap 1 -> (-1 - 1)^2 = 4."""
    assert distill_loss(T([3.0, -2.0]), T([1.0, 1.0]), beta=0.5).tolist() == pytest.approx([0.25, 4.0])


def test_pessimistic_distill_takes_the_closest_reward_model():
    """beta = 1, h = 2, gaps of three reward models (0.5, 1.5, 4): squared errors 2.25, 0.25, 4 -> 0.25.
    Second pair, h = 0, gaps (-1, 3, 2): 1, 9, 4 -> 1."""
    loss = pessimistic_distill_loss(T([2.0, 0.0]), T([[0.5, 1.5, 4.0], [-1.0, 3.0, 2.0]]), beta=1.0)
    assert loss.tolist() == pytest.approx([0.25, 1.0])


def test_pair_loss_routes_by_name():
    """dpo ignores nothing it is given: the method's margin is already 0 for dpo (set by the train stage)."""
    h, m, gap, gaps = T([2.0]), T([1.0]), T([1.0]), T([[0.5, 1.5]])
    assert pair_loss("dpo_pop", h, 0.5, m, gap, gaps).item() == pytest.approx(math.log(2), abs=1e-6)
    assert pair_loss("distill", h, 0.5, m, gap, gaps).item() == pytest.approx(0.0)
    assert pair_loss("distill_pessimistic", h, 0.5, m, gap, gaps).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not a popflow loss"):
        pair_loss("ipo", h, 0.5, m, gap, gaps)
