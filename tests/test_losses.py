"""Contrastive losses against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moon2.train.losses import (
    Temperature,
    gather_with_grad,
    inter_product_nce,
    intra_product_nce,
    weighted_mean,
)


def test_inter_product_nce_by_hand() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    positive = torch.tensor([0, 1])
    allowed = torch.ones(2, 3, dtype=torch.bool)
    loss, scores = inter_product_nce(q, c, positive, allowed, temperature=0.5, reduction="none")
    # query 0 logits: (1, 0, 0.7071) / 0.5 = (2, 0, 1.4142)
    expected0 = -2 + math.log(math.exp(2) + math.exp(0) + math.exp(math.sqrt(2)))
    assert loss[0].item() == pytest.approx(expected0, rel=1e-5)
    assert torch.allclose(scores, q @ c.T)
    # masking the third candidate for query 0: only (2, 0) compete
    allowed[0, 2] = False
    loss, _ = inter_product_nce(q, c, positive, allowed, temperature=0.5, reduction="none")
    assert loss[0].item() == pytest.approx(-2 + math.log(math.exp(2) + 1), rel=1e-5)
    mean, _ = inter_product_nce(q, c, positive, allowed, temperature=0.5)
    assert mean.item() == pytest.approx(loss.mean().item())


def test_intra_product_nce_symmetric_by_hand() -> None:
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    loss = intra_product_nce(image, text, None, temperature=1.0, reduction="none")
    # logits = image @ text.T = [[1, 0.6], [0, 0.8]]
    i2t = [-1 + math.log(math.e + math.exp(0.6)), -0.8 + math.log(1 + math.exp(0.8))]
    t2i = [-1 + math.log(math.e + 1), -0.8 + math.log(math.exp(0.6) + math.exp(0.8))]
    assert loss[0].item() == pytest.approx((i2t[0] + t2i[0]) / 2, rel=1e-5)
    assert loss[1].item() == pytest.approx((i2t[1] + t2i[1]) / 2, rel=1e-5)
    same = torch.tensor([[True, True], [True, True]])  # both rows are the same product
    masked = intra_product_nce(image, text, same, temperature=1.0, reduction="none")
    assert torch.allclose(masked, torch.zeros(2), atol=1e-6)


def test_temperature_and_weighted_mean() -> None:
    learnable = Temperature(0.05, learnable=True)
    assert learnable().item() == pytest.approx(0.05)
    assert any(p.requires_grad for p in learnable.parameters())
    fixed = Temperature(0.07, learnable=False)
    assert list(fixed.parameters()) == [] and fixed().item() == pytest.approx(0.07)
    with pytest.raises(ValueError):
        Temperature(0.0, learnable=False)
    losses = torch.tensor([1.0, 3.0])
    assert weighted_mean(losses, torch.tensor([1.0, 0.0])).item() == 0.5  # over the 2 rows
    assert weighted_mean(losses, None).item() == 2.0


def test_gather_without_distributed_is_identity() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_unknown_reduction() -> None:
    with pytest.raises(ValueError):
        intra_product_nce(torch.eye(2), torch.eye(2), None, 1.0, reduction="max")


def _nce_by_hand(logits: list[list[float]], row: int, columns: list[int]) -> float:
    """-log softmax of logits[row][row] among ``columns``."""
    return -logits[row][row] + math.log(sum(math.exp(logits[row][c]) for c in columns))


def test_intra_product_nce_leaves_duplicates_out_of_each_others_denominators() -> None:
    # rows 0 and 1 are two listings of one item (a duplicate group), row 2 another product
    image = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    text = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
    groups = torch.tensor([0, 0, 1])
    same = groups.unsqueeze(0) == groups.unsqueeze(1)
    masked = intra_product_nce(image, text, same, temperature=0.5, reduction="none")
    logits = (image @ text.T / 0.5).tolist()
    transposed = [list(column) for column in zip(*logits, strict=True)]
    keep = [[0, 2], [1, 2], [0, 1, 2]]  # each row without its duplicate's column
    expected = [
        0.5 * (_nce_by_hand(logits, i, keep[i]) + _nce_by_hand(transposed, i, keep[i]))
        for i in range(3)
    ]
    assert masked.tolist() == pytest.approx(expected, rel=1e-5)
    unmasked = intra_product_nce(image, text, None, temperature=0.5, reduction="none")
    assert unmasked[0].item() != pytest.approx(masked[0].item(), rel=1e-3)
    assert unmasked[1].item() != pytest.approx(masked[1].item(), rel=1e-3)


def test_learnable_temperature_at_its_floor_can_leave_it() -> None:
    temperature = Temperature(0.05, learnable=True, min_value=0.01)
    assert list(temperature.state_dict()) == ["log_value"]  # checkpoints load as before
    with torch.no_grad():  # a step took it below the floor
        temperature.log_value.fill_(math.log(0.01) - 0.5)
    assert temperature().item() == pytest.approx(0.01)
    query = torch.tensor([[1.0, 0.0]])
    candidates = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    both = torch.ones(1, 2, dtype=torch.bool)
    # the positive (column 0) scores below the negative: a warmer softmax lowers the loss
    loss, _ = inter_product_nce(query, candidates, torch.tensor([0]), both, temperature())
    loss.backward()
    assert temperature.log_value.grad.item() < 0  # descent raises it off the floor
    # the positive scores above: the loss wants it colder, the floor holds and nothing drifts
    temperature.log_value.grad = None
    loss, _ = inter_product_nce(query, candidates.flip(0), torch.tensor([0]), both, temperature())
    loss.backward()
    assert temperature.log_value.grad.item() == 0
