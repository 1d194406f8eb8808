"""Modality-driven Mixture-of-Experts (MOON2.0), as small standalone pieces.

- :class:`TopKRouter`: ``G = softmax(W_g h)``, top-k, renormalised weights ``G~``.
- :class:`MoEMLP`: replaces a decoder layer's dense FFN by Z experts upcycled from it
  (copies), output ``sum_z G~_z f_z(h)``; an MoE of exact copies equals the dense FFN.
- :func:`load_balancing_loss`: Switch-style ``Z * sum_z f_z P_z`` over the *global* batch
  (dispatch fractions summed across ranks, router probabilities local so gradients flow).
- :class:`ObjectiveMixer`: the learnable expert x objective matrix ``W*``;
  ``p_{z,m} = softmax_m(W*)``, per-batch objective weights
  ``omega_m = mean_{b in B_m} sum_z p_{z,m} G~_{z,b}`` and the specialisation loss
  ``L_sparsity = (1/Z) sum_z H(p_{z,.})``; omega is bounded around the uniform weight by a
  floor (see :meth:`ObjectiveMixer.omega`).
- :func:`weigh_objectives`: the weighted loss, with W* steered by the losses on a common scale
  (each divided by :func:`chance_loss`, the loss of a uniform guess over its candidates).

Padding tokens are excluded from routing statistics through a token mask that the model
sets on every MoE layer before its forward pass.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Routing:
    """What one MoE layer decided for a [B, T] batch of tokens."""

    probs: torch.Tensor
    """[B, T, Z] router softmax (differentiable)"""
    gates: torch.Tensor
    """[B, T, Z] renormalised top-k weights G~, zero for experts not chosen (differentiable)"""
    chosen: torch.Tensor
    """[B, T, k] expert indices"""
    mask: torch.Tensor | None
    """[B, T] 1 for real tokens, 0 for padding (None: all real)"""


class TopKRouter(nn.Module):
    """Token router: softmax over experts, keep the top-k, renormalise their weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [..., H] -> (probs [..., Z], top weights [..., k], top indices [..., k])."""
        logits = self.gate(hidden)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, indices


class MoEMLP(nn.Module):
    """A sparse MoE FFN whose experts start as copies of a dense FFN module."""

    def __init__(
        self,
        dense: nn.Module,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.experts = nn.ModuleList(copy.deepcopy(dense) for _ in range(num_experts))
        if noise_std > 0:  # optional symmetry breaking between the copies
            with torch.no_grad():
                for expert in self.experts:
                    for parameter in expert.parameters():
                        parameter.add_(torch.randn_like(parameter) * noise_std)
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.num_experts = num_experts
        self.token_mask: torch.Tensor | None = None
        self.last_routing: Routing | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        probs, weights, indices = self.router(flat)
        out = torch.zeros_like(flat)
        for expert_id, expert in enumerate(self.experts):
            token_idx, slot = torch.where(indices == expert_id)
            if token_idx.numel() == 0:
                continue
            expert_out = expert(flat[token_idx])
            scale = weights[token_idx, slot].unsqueeze(-1).to(expert_out.dtype)
            out.index_add_(0, token_idx, expert_out * scale)
        gates = torch.zeros_like(probs).scatter(-1, indices, weights)
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(shape[:-1]):
            mask = None  # a forward the mask was not set for (e.g. a different batch)
        self.last_routing = Routing(
            probs=probs.reshape(*shape[:-1], -1),
            gates=gates.reshape(*shape[:-1], -1),
            chosen=indices.reshape(*shape[:-1], -1),
            mask=mask,
        )
        return out.reshape(shape)


def _valid(routing: Routing) -> torch.Tensor:
    if routing.mask is None:
        return torch.ones(routing.probs.shape[:-1], device=routing.probs.device)
    return routing.mask.to(routing.probs.dtype)


def load_balancing_loss(routings: list[Routing], top_k: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss averaged over layers: ``Z * sum_z f_z * P_z``.

    ``f_z`` (share of token->expert assignments going to z) is summed over every rank, so the
    balance is that of the global batch; ``P_z`` (mean router probability) stays local and
    carries the gradient. Equals 1 for perfectly uniform routing.
    """
    if not routings:
        raise ValueError("no routing decisions recorded")
    losses = []
    for routing in routings:
        valid = _valid(routing)
        num_experts = routing.probs.shape[-1]
        one_hot = torch.nn.functional.one_hot(routing.chosen, num_experts).sum(-2).float()
        counts = (one_hot * valid.unsqueeze(-1)).sum(dim=tuple(range(one_hot.dim() - 1)))
        tokens = valid.sum().detach().reshape(1)
        counts = counts.detach()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
            dist.all_reduce(tokens)
        fraction = counts / (tokens * top_k).clamp_min(1.0)
        local_tokens = valid.sum().clamp_min(1.0)
        mean_prob = (routing.probs * valid.unsqueeze(-1)).sum(
            dim=tuple(range(routing.probs.dim() - 1))
        ) / local_tokens
        losses.append(num_experts * (fraction * mean_prob).sum())
    return torch.stack(losses).mean()


def sample_gates(routings: list[Routing]) -> torch.Tensor:
    """Each sample's mean routing weight per expert, ``G~_{z,b}``: [B, Z].

    Mean over the sample's real tokens and over the MoE layers; rows sum to 1.
    """
    per_layer = []
    for routing in routings:
        valid = _valid(routing).unsqueeze(-1)
        per_layer.append((routing.gates * valid).sum(1) / valid.sum(1).clamp_min(1.0))
    return torch.stack(per_layer).mean(0)


def routing_usage(routings: list[Routing]) -> torch.Tensor:
    """Share of top-1 assignments per expert over real tokens (averaged over layers): [Z]."""
    shares = []
    for routing in routings:
        valid = _valid(routing).bool()
        top1 = routing.chosen[..., 0][valid]
        counts = torch.bincount(top1, minlength=routing.probs.shape[-1]).float()
        shares.append(counts / counts.sum().clamp_min(1.0))
    return torch.stack(shares).mean(0)


class ObjectiveMixer(nn.Module):
    """The expert x objective preference ``W*`` and the objective weights it induces."""

    def __init__(self, num_experts: int, objectives: tuple[str, ...]) -> None:
        super().__init__()
        self.objectives = objectives
        # zeros: every expert starts indifferent between objectives (p = 1/M)
        self.weight = nn.Parameter(torch.zeros(num_experts, len(objectives)))

    def preferences(self) -> torch.Tensor:
        """``p_{z,m}`` = softmax over objectives of ``W*``: [Z, M]."""
        return torch.softmax(self.weight, dim=1)

    def omega(
        self,
        gates_by_objective: dict[str, torch.Tensor],
        normalize: bool = True,
        floor: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """``omega_m = mean_b sum_z p_{z,m} G~_{z,b}`` for the objectives present in the batch.

        ``floor`` (moon2's choice) mixes each weight with the present objectives' mean weight,
        ``floor * mean + (1 - floor) * omega_m``: whatever W* and the routing, ``omega_m / mean``
        stays in ``[floor, M - (M - 1) * floor]`` for M objectives present, and the mean is
        unchanged (0: unbounded, the paper). ``normalize`` (moon2's choice, the paper leaves it
        open) then divides by the mean, so the weights sum to M and the loss scale does not
        drift.
        """
        p = self.preferences()
        omega = {}
        for name, gates in gates_by_objective.items():
            if gates.numel() == 0:
                continue
            column = p[:, self.objectives.index(name)]
            omega[name] = (gates @ column).mean()
        if not omega:
            return omega
        mean = torch.stack(list(omega.values())).mean()
        omega = {k: floor * mean + (1.0 - floor) * v for k, v in omega.items()}
        if normalize:
            omega = {k: v / mean for k, v in omega.items()}
        return omega

    def sparsity_loss(self) -> torch.Tensor:
        """Mean entropy of each expert's objective preference (low = specialised experts)."""
        p = self.preferences()
        return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1).mean()


def chance_loss(allowed: torch.Tensor) -> torch.Tensor:
    """Per query row, the InfoNCE loss of a uniform guess over its candidates:
    ``log(number of allowed columns)`` of an [N, C] mask (at least log 2): [N]."""
    return allowed.sum(dim=1).clamp_min(2).float().log()


def weigh_objectives(
    terms: dict[str, torch.Tensor],
    omega: dict[str, torch.Tensor],
    scales: dict[str, torch.Tensor],
    ascend: bool,
    levels: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``sum_m omega_m L_m`` (1 for an objective without omega) as the model sees it, omega a
    constant; plus a term of value zero through which omega alone (W*, and the router when the
    gates keep their gradient) descends (``ascend`` False: the paper) or ascends (balance)
    ``sum_m omega_m L_m / scale_m``, the losses on a common scale (``scales``: e.g. each
    objective's :func:`chance_loss`; a missing one is 1). ``levels``: the figure to steer by
    in place of a term (its loss level before the filter's weights shrank it)."""
    levels = levels or {}
    total = []
    for name, term in terms.items():
        if name not in omega:
            total.append(term)
            continue
        weight = omega[name]
        scale = scales.get(name)
        level = levels.get(name, term)
        scaled = (level if scale is None else level / scale).detach()
        signal = weight * scaled
        steer = signal.detach() - signal if ascend else signal - signal.detach()
        total.append(weight.detach() * term + steer)
    if total:
        return torch.stack(total).sum()
    return torch.zeros((), device=next(iter(omega.values())).device) if omega else torch.zeros(())
