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
    assert weighted_mean(losses, torch.tensor([1.0, 0.0])).item() == 1.0
    assert weighted_mean(losses, None).item() == 2.0


def test_gather_without_distributed_is_identity() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def test_unknown_reduction() -> None:
    with pytest.raises(ValueError):
        intra_product_nce(torch.eye(2), torch.eye(2), None, 1.0, reduction="max")
