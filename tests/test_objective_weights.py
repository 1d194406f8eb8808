"""Objective weights omega (issue #23): bounded, steered by losses on a common scale, and W*
trained at its own learning rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moon2.curate.dynamic import FilterPolicy
from moon2.errors import ConfigError
from moon2.train import objective as objective_module
from moon2.train.config import OBJECTIVES, OptimConfig, TrainConfig
from moon2.train.losses import inter_product_nce
from moon2.train.model import Encoded
from moon2.train.moe import ObjectiveMixer, chance_loss, weigh_objectives
from moon2.train.objective import Objective
from moon2.train.recipes import load_recipe
from moon2.train.trainer import make_optimizer
from tests.factories import duplicate_pair_batch, tiny_config

ROOT = Path(__file__).resolve().parents[1]
FLOOR = 0.5
CEILING = len(OBJECTIVES) - (len(OBJECTIVES) - 1) * FLOOR  # 2.5 for the four objectives
# the fixed losses, and their uniform-guess losses: ~100 inter columns, 16 intra
LOSSES = dict(zip(OBJECTIVES, (2.0, 1.0, 0.8, 1.5), strict=True))
CHANCE = dict(zip(OBJECTIVES, (math.log(100),) * 3 + (math.log(16),), strict=True))


def _gates(seed: int, experts: int = 4) -> dict[str, torch.Tensor]:
    """Fixed per-sample routing weights (rows sum to 1) for each objective."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.softmax(2 * torch.randn(16, experts, generator=generator), dim=-1)
        for name in OBJECTIVES
    }


def _step_omega(mode: str, scales: dict[str, float], lr: float = 0.5) -> dict[str, float]:
    """omega before minus after one SGD step of W* on the fixed LOSSES."""
    mixer = ObjectiveMixer(4, OBJECTIVES)
    gates = _gates(0)
    terms = {name: torch.tensor(value) for name, value in LOSSES.items()}
    with torch.no_grad():
        before = {k: float(v) for k, v in mixer.omega(gates, floor=FLOOR).items()}
    omega = mixer.omega(gates, floor=FLOOR)
    scale = {k: torch.tensor(v) for k, v in scales.items()}
    weigh_objectives(terms, omega, scale, ascend=mode == "balance").backward()
    with torch.no_grad():
        mixer.weight -= lr * mixer.weight.grad
        after = mixer.omega(gates, floor=FLOOR)
    return {k: float(after[k]) - before[k] for k in before}


def test_balance_moves_weight_to_the_harder_objective_on_the_common_scale() -> None:
    # per uniform guess: t2mm 2 / log 100 = 0.43, intra 1.5 / log 16 = 0.54 (the hardest);
    # raw, t2mm (2.0) looks hardest only because it has more columns
    moved = _step_omega("balance", CHANCE)
    assert max(moved, key=moved.get) == "intra"
    assert moved["intra"] > 0 and moved["mm2mm"] < 0
    raw = _step_omega("balance", {})
    assert max(raw, key=raw.get) == "t2mm"


def test_paper_descends_the_weighted_loss_onto_the_easiest_objective() -> None:
    # the method's L = sum omega_m L_m: descent moves weight to the lowest (scaled) loss, mm2mm
    moved = _step_omega("paper", CHANCE)
    assert max(moved, key=moved.get) == "mm2mm"
    assert min(moved, key=moved.get) == "intra" and moved["intra"] < 0


def test_the_model_sees_omega_as_weights_and_the_steering_term_adds_nothing() -> None:
    mixer = ObjectiveMixer(4, OBJECTIVES)
    omega = mixer.omega(_gates(1), floor=FLOOR)
    weights = {k: float(v.detach()) for k, v in omega.items()}
    terms = {name: torch.tensor(value, requires_grad=True) for name, value in LOSSES.items()}
    scale = {k: torch.tensor(v) for k, v in CHANCE.items()}
    for ascend in (True, False):
        total = weigh_objectives(terms, omega, scale, ascend=ascend)
        expected = sum(weights[k] * LOSSES[k] for k in OBJECTIVES)
        assert float(total.detach()) == pytest.approx(expected, rel=1e-6)
        grads = torch.autograd.grad(total, list(terms.values()), retain_graph=True)
        for name, grad in zip(terms, grads, strict=True):
            assert float(grad) == pytest.approx(weights[name], rel=1e-6)


@pytest.mark.parametrize("mode", ["balance", "paper"])
def test_omega_stays_within_its_bounds_for_5000_adam_steps(mode: str) -> None:
    torch.manual_seed(0)
    mixer = ObjectiveMixer(4, OBJECTIVES)
    gates = _gates(2)
    terms = {name: torch.tensor(value) for name, value in LOSSES.items()}
    scale = {k: torch.tensor(v) for k, v in CHANCE.items()}
    # tiny-cpu's peak wstar_lr without its schedule: ~3x the recipe's travel
    optimizer = torch.optim.Adam(mixer.parameters(), lr=3e-3, fused=True)
    lowest, highest = 1.0, 1.0
    for _ in range(5000):
        omega = mixer.omega(gates, floor=FLOOR)
        steer = weigh_objectives(terms, omega, scale, ascend=mode == "balance")
        loss = steer + 0.01 * mixer.sparsity_loss()  # the entropy term saturates p
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values = torch.stack(list(omega.values())).detach()
        lowest, highest = min(lowest, float(values.min())), max(highest, float(values.max()))
    assert lowest >= FLOOR - 1e-6 and highest <= CEILING + 1e-6
    assert highest > CEILING - 0.2  # W* did push to the bound: the bound held it
    with torch.no_grad():  # the same W* without the floor leaves the band
        unbounded = mixer.omega(gates, floor=0.0)
    assert max(float(v) for v in unbounded.values()) > CEILING


def test_omega_bounds_hold_for_any_routing_and_keep_the_mean() -> None:
    mixer = ObjectiveMixer(4, OBJECTIVES)
    with torch.no_grad():
        mixer.weight.copy_(torch.tensor([[30.0, 0, 0, 0]] * 4))  # every expert: only t2mm
        omega = mixer.omega(_gates(3), floor=0.25)
    values = torch.stack(list(omega.values()))
    assert float(values.mean()) == pytest.approx(1.0)
    assert float(omega["t2mm"]) == pytest.approx(4 - 3 * 0.25, abs=1e-4)
    assert float(values.min()) == pytest.approx(0.25, abs=1e-4)


def test_more_candidates_at_the_same_difficulty_is_not_harder() -> None:
    # two objectives whose queries cannot tell their positive from any candidate (a uniform
    # guess each): 100 candidates give log 100, 16 give log 16
    losses, scales = {}, {}
    for name, columns in (("t2mm", 100), ("intra", 16)):
        queries = torch.nn.functional.normalize(torch.ones(8, 4), dim=-1)
        candidates = queries[:1].expand(columns, 4)
        allowed = torch.ones(8, columns, dtype=torch.bool)
        positive = torch.zeros(8, dtype=torch.long)
        loss, _ = inter_product_nce(queries, candidates, positive, allowed, 0.1)
        losses[name], scales[name] = loss, chance_loss(allowed).mean()
    assert float(losses["t2mm"] / scales["t2mm"]) == pytest.approx(1.0)
    assert float(losses["intra"] / scales["intra"]) == pytest.approx(1.0)

    def wstar_grad(scale: dict[str, torch.Tensor]) -> torch.Tensor:
        mixer = ObjectiveMixer(2, ("t2mm", "intra"))
        gates = {k: v for k, v in _gates(4, experts=2).items() if k in losses}
        omega = mixer.omega(gates, floor=FLOOR)
        weigh_objectives(losses, omega, scale, ascend=True).backward()
        return mixer.weight.grad

    assert wstar_grad(scales).abs().max() < 1e-6  # neither is harder: W* stays put
    assert wstar_grad({}).abs().max() > 1e-3  # raw, the 100-column loss looked harder


class _FixedEmbeddings(torch.nn.Module):
    """Stands in for Moon2Model: its encoding of a batch is given, row for row."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = torch.nn.functional.normalize(rows, dim=-1)

    def encode(self, inputs: object) -> Encoded:
        return Encoded(embeddings=self.rows, gates=None, routings=[])


def _scales_seen(monkeypatch: pytest.MonkeyPatch, loss_scale: str) -> dict[str, float]:
    """The scales the objective hands to weigh_objectives for a batch of 3 candidates (a, its
    duplicate a2, b), 2 text queries (buying a and b) and 3 intra-product rows."""
    seen: dict[str, float] = {}

    def spy(terms, omega, scales, ascend, levels=None):
        seen.update({k: float(v) for k, v in scales.items()})
        return weigh_objectives(terms, omega, scales, ascend, levels)

    monkeypatch.setattr(objective_module, "weigh_objectives", spy)
    batch = duplicate_pair_batch()
    config = tiny_config(
        moe={"enabled": False, "loss_scale": loss_scale}, filter={"enabled": False}
    )
    rows = torch.randn(11, 4, generator=torch.Generator().manual_seed(0))
    objective = Objective(_FixedEmbeddings(rows), config)
    with torch.no_grad():
        objective(batch, 0.5, 0, FilterPolicy(config.filter))
    return seen


def test_each_objective_is_scaled_by_the_loss_of_a_uniform_guess_over_its_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scales = _scales_seen(monkeypatch, "chance")
    # q0 (buys a) competes over a and b (a2 is a's duplicate), q1 (buys b) over all three
    assert scales["t2mm"] == pytest.approx((math.log(2) + math.log(3)) / 2)
    # intra: a and a2 never see each other's text
    assert scales["intra"] == pytest.approx((2 * math.log(2) + math.log(3)) / 3)
    assert _scales_seen(monkeypatch, "raw") == {}


def test_wstar_gets_its_own_param_group_at_its_own_learning_rate() -> None:
    matrix = torch.nn.Parameter(torch.zeros(3, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    wstar = ObjectiveMixer(4, OBJECTIVES).weight
    optim = OptimConfig(lr=1e-5, weight_decay=0.01)
    optimizer = make_optimizer(
        [matrix, bias, wstar], optim, torch.device("cpu"), wstar=wstar, wstar_lr=1e-3
    )
    own = [g for g in optimizer.param_groups if g.get("name") == "wstar"]
    assert len(own) == 1 and own[0]["params"] == [wstar]
    assert own[0]["lr"] == 1e-3 and own[0]["weight_decay"] == 0.0
    others = [p for g in optimizer.param_groups if g is not own[0] for p in g["params"]]
    assert all(p is not wstar for p in others) and len(others) == 2
    assert all(g["lr"] == 1e-5 for g in optimizer.param_groups if g is not own[0])
    without = make_optimizer([matrix, bias], optim, torch.device("cpu"), wstar=wstar)
    assert not [g for g in without.param_groups if g.get("name") == "wstar"]


def test_both_recipes_set_wstar_lr_and_a_bad_floor_is_one_sentence(tmp_path: Path) -> None:
    tiny = load_recipe(ROOT / "configs" / "train" / "tiny-cpu.yaml")
    gpu = load_recipe(ROOT / "configs" / "train" / "qwen2vl-2b-gpu.yaml")
    assert tiny.moe.wstar_lr == 3e-3 and gpu.moe.wstar_lr == 1e-3
    assert gpu.moe.wstar_lr > 10 * gpu.optim.lr  # not the backbone's rate
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe:\n  omega_floor: 1.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"moe.omega_floor: Input should be less than or equal"):
        TrainConfig.from_yaml(bad)


def test_wstar_steers_by_the_loss_level_not_the_term_the_filter_shrank():
    """The filter halves objective a's term (its rows down-weighted); a is no easier for it:
    W* must see both objectives as equally hard, while the model trains on the shrunk term."""
    omega = {name: torch.tensor(1.0, requires_grad=True) for name in ("a", "b")}
    terms = {"a": torch.tensor(0.5), "b": torch.tensor(1.0)}
    levels = {"a": torch.tensor(1.0), "b": torch.tensor(1.0)}
    total = weigh_objectives(terms, omega, {}, ascend=True, levels=levels)
    total.backward()
    assert float(total) == pytest.approx(1.5)
    assert float(omega["a"].grad) == pytest.approx(float(omega["b"].grad))
