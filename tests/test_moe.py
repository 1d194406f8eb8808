"""MoE pieces: router, upcycling equivalence, load balancing, W*/omega, sparsity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moon2.train.moe import (
    MoEMLP,
    ObjectiveMixer,
    Routing,
    TopKRouter,
    load_balancing_loss,
    routing_usage,
    sample_gates,
)


class DenseFFN(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 16)
        self.down = nn.Linear(16, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


def test_router_topk_renormalised() -> None:
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=2)
    h = torch.randn(5, 8)
    probs, weights, indices = router(h)
    expected = torch.softmax(h @ router.gate.weight.T, dim=-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(5))
    top2 = expected.topk(2, dim=-1)
    assert torch.equal(indices, top2.indices)
    assert torch.allclose(weights, top2.values / top2.values.sum(-1, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError):
        TopKRouter(8, num_experts=2, top_k=3)


def test_upcycled_moe_equals_dense_at_init() -> None:
    torch.manual_seed(1)
    dense = DenseFFN()
    moe = MoEMLP(dense, hidden_size=8, num_experts=4, top_k=2)
    x = torch.randn(3, 7, 8)
    assert torch.allclose(moe(x), dense(x), atol=1e-6)
    routing = moe.last_routing
    assert routing.probs.shape == (3, 7, 4) and routing.chosen.shape == (3, 7, 2)
    assert torch.allclose(routing.gates.sum(-1), torch.ones(3, 7))


def test_moe_routes_to_different_experts() -> None:
    torch.manual_seed(2)
    dense = DenseFFN()
    moe = MoEMLP(dense, hidden_size=8, num_experts=2, top_k=1)
    with torch.no_grad():
        moe.experts[1].down.bias.add_(10.0)
        moe.router.gate.weight.copy_(torch.tensor([[1.0] + [0] * 7, [-1.0] + [0] * 7]))
    x = torch.zeros(2, 1, 8)
    x[0, 0, 0], x[1, 0, 0] = 1.0, -1.0
    out = moe(x)
    assert torch.allclose(out[0], dense(x[0]), atol=1e-6)  # expert 0: the plain copy
    assert torch.allclose(out[1], dense(x[1]) + 10.0, atol=1e-5)  # expert 1: shifted


def _routing(probs: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> Routing:
    weights, chosen = probs.topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, chosen, weights)
    return Routing(probs=probs, gates=gates, chosen=chosen, mask=mask)


def test_load_balancing_loss_by_hand() -> None:
    # 1 sample, 4 tokens, 2 experts, top-1. Tokens 0-2 go to expert 0, token 3 to expert 1.
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]]])
    # f = (3/4, 1/4); P = (0.65, 0.35); loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert load_balancing_loss([_routing(probs, 1)], top_k=1).item() == pytest.approx(1.15)
    # the padded last token is ignored: f = (1, 0), P = (0.7667, 0.2333) -> 2 * 0.7667
    mask = torch.tensor([[1, 1, 1, 0]])
    loss = load_balancing_loss([_routing(probs, 1, mask)], top_k=1).item()
    assert loss == pytest.approx(2 * (0.9 + 0.8 + 0.6) / 3)
    uniform = torch.full((2, 3, 4), 0.25)
    assert load_balancing_loss([_routing(uniform, 2)], top_k=2).item() == pytest.approx(1.0)


def test_load_balancing_gradient_reaches_router() -> None:
    torch.manual_seed(3)
    moe = MoEMLP(DenseFFN(), hidden_size=8, num_experts=4, top_k=2)
    moe(torch.randn(2, 5, 8))
    load_balancing_loss([moe.last_routing], top_k=2).backward()
    assert moe.router.gate.weight.grad is not None
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_sample_gates_and_usage() -> None:
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])
    mask = torch.tensor([[1, 1, 0]])
    routing = _routing(probs, 1, mask)
    gates = sample_gates([routing, routing])
    assert torch.allclose(gates, torch.tensor([[0.5, 0.5]]))  # one token each, padding out
    assert torch.allclose(routing_usage([routing]), torch.tensor([0.5, 0.5]))


def test_objective_mixer_omega_and_sparsity_by_hand() -> None:
    mixer = ObjectiveMixer(num_experts=2, objectives=("t2mm", "i2mm", "intra"))
    with torch.no_grad():
        mixer.weight.copy_(torch.tensor([[math.log(2), 0.0, 0.0], [0.0, math.log(3), 0.0]]))
    p = mixer.preferences()  # expert 0: (1/2, 1/4, 1/4); expert 1: (1/5, 3/5, 1/5)
    assert torch.allclose(p, torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]), atol=1e-6)
    gates = {
        "t2mm": torch.tensor([[1.0, 0.0], [0.5, 0.5]]),  # omega = mean(0.5, 0.35) = 0.425
        "i2mm": torch.tensor([[0.0, 1.0]]),  # omega = 0.6
        "intra": torch.zeros(0, 2),  # absent from this batch
    }
    raw = mixer.omega(gates, normalize=False)
    assert set(raw) == {"t2mm", "i2mm"}
    assert raw["t2mm"].item() == pytest.approx(0.425)
    assert raw["i2mm"].item() == pytest.approx(0.6)
    normalised = mixer.omega(gates, normalize=True)
    assert normalised["t2mm"].item() == pytest.approx(2 * 0.425 / 1.025)
    assert sum(v.item() for v in normalised.values()) == pytest.approx(2.0)
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    h1 = -(2 * 0.2 * math.log(0.2) + 0.6 * math.log(0.6))
    assert mixer.sparsity_loss().item() == pytest.approx((h0 + h1) / 2)
    fresh = ObjectiveMixer(num_experts=3, objectives=("a", "b"))
    assert fresh.sparsity_loss().item() == pytest.approx(math.log(2))


def test_omega_is_differentiable_in_w_star_and_router() -> None:
    mixer = ObjectiveMixer(num_experts=2, objectives=("t2mm", "i2mm"))
    gates = torch.tensor([[0.7, 0.3]], requires_grad=True)
    omega = mixer.omega({"t2mm": gates, "i2mm": gates.flip(-1)}, normalize=False)
    (omega["t2mm"] * 2.0 + omega["i2mm"]).backward()
    assert mixer.weight.grad.abs().sum() > 0 and gates.grad.abs().sum() > 0
