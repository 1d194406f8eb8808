"""One training step's loss: the module DDP wraps (a single forward per step).

``L = sum_v omega_v L_inter^v + omega_intra L_intra + rho L_aux + varsigma L_sparsity``, with
per-sample dynamic-filter weights inside each ``L_inter^v``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moon2.curate.dynamic import FilterPolicy
from moon2.train.config import OBJECTIVES, TrainConfig
from moon2.train.data import CATALOG_QUERIES, VIEWS, Batch, id_hash
from moon2.train.losses import (
    Temperature,
    gather_no_grad,
    gather_with_grad,
    inter_product_nce,
    intra_product_nce,
    weighted_mean,
)
from moon2.train.model import Encoded, Moon2Model
from moon2.train.moe import (
    ObjectiveMixer,
    chance_loss,
    load_balancing_loss,
    routing_usage,
    weigh_objectives,
)


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)
    omega: dict[str, float] = field(default_factory=dict)
    usage: dict[str, list[float]] = field(default_factory=dict)
    positions: list[int] = field(default_factory=list)
    sample_loss: torch.Tensor | None = None
    margin: torch.Tensor | None = None
    phi: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    intra_ran: bool = False
    """the step had a non-zero intra-product term"""
    routed: bool = False
    """the backbone's MoE layers routed the step's tokens"""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_padded(
    embeddings: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Candidates of every rank (padded to the largest), their id hashes, a validity mask, and
    this rank's column offset."""
    rank, world = _world()
    if world == 1:
        valid = torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device)
        return embeddings, ids, valid, 0
    size = torch.tensor([len(embeddings)], device=embeddings.device)
    sizes = gather_no_grad(size).tolist()
    longest = max(sizes)
    pad = longest - len(embeddings)
    padded = torch.cat([embeddings, embeddings.new_zeros(pad, embeddings.shape[1])])
    padded_ids = torch.cat([ids, ids.new_zeros(pad)])
    valid = torch.cat(
        [
            torch.ones(len(embeddings), dtype=torch.bool, device=embeddings.device),
            torch.zeros(pad, dtype=torch.bool, device=embeddings.device),
        ]
    )
    return (
        gather_with_grad(padded),
        gather_no_grad(padded_ids),
        gather_no_grad(valid),
        rank * longest,
    )


@dataclass
class _Candidates:
    """The step's candidates across ranks (see :func:`_gather_padded`)."""

    embeddings: torch.Tensor
    ids: torch.Tensor
    """each candidate's item key (see :func:`_item_keys`): equal keys are never negatives of
    each other"""
    valid: torch.Tensor
    positive_ids: torch.Tensor
    """item key of each local sample's positive"""
    offset: int


def _item_keys(batch: Batch) -> list[int]:
    """Per candidate, which item it is: its duplicate group (products build-bench counts as
    the same item share one), else (a batch without groups) the hash of its product_id."""
    if batch.candidate_dup_groups:
        return list(batch.candidate_dup_groups)
    return [id_hash(c) for c in batch.candidate_ids]


def _same_item(batch: Batch, device: torch.device) -> torch.Tensor | None:
    """[P, P] True where two intra-product rows are the same item (None: groups unknown)."""
    if not batch.intra_dup_groups:
        return None
    groups = torch.tensor(batch.intra_dup_groups, device=device)
    return groups.unsqueeze(0) == groups.unsqueeze(1)


def _intra_candidates(batch: Batch, products: int, device: torch.device) -> torch.Tensor:
    """[P, P] the texts each intra-product image competes over: its own and every other
    item's (a duplicate of itself is no candidate)."""
    own = torch.eye(products, dtype=torch.bool, device=device)
    same = _same_item(batch, device)
    return own | ~same if same is not None else torch.ones_like(own)


class Objective(nn.Module):
    """Model + temperatures + the expert x objective matrix; forward = the step's loss."""

    def __init__(self, model: Moon2Model, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        loss = config.loss
        self.temperature = Temperature(loss.temperature, loss.learnable_temperature)
        self.intra_temperature = Temperature(loss.intra_temperature, loss.learnable_temperature)
        self.mixer = (
            ObjectiveMixer(config.moe.num_experts, OBJECTIVES) if config.moe.enabled else None
        )

    def forward(
        self, batch: Batch, progress: float, epoch: int, policy: FilterPolicy
    ) -> StepOutput:
        device = self.temperature.log_value.device
        n = len(batch.positions)
        everything = self.model.encode(batch.inputs)
        encoded: dict[str, Encoded] = {
            name: everything.rows(start, end) for name, (start, end) in batch.groups.items()
        }
        candidates = encoded["candidates"]
        cand_ids = torch.tensor(_item_keys(batch), dtype=torch.long, device=device)
        all_cand, all_ids, valid, offset = _gather_padded(candidates.embeddings, cand_ids)
        positive_ids = cand_ids[torch.tensor(batch.positive_col, device=device)]
        temperature = self.temperature()
        view_losses: dict[str, tuple[list[int], torch.Tensor]] = {}
        chance: dict[str, list[torch.Tensor]] = {}  # per objective: each row's chance loss
        loss_sum = torch.zeros(n, device=device)
        margin_sum = torch.zeros(n, device=device)
        count = torch.zeros(n, device=device)
        candidates_of = _Candidates(all_cand, all_ids, valid, positive_ids, offset)
        for view in VIEWS:
            if view not in batch.view_rows:
                continue
            rows = batch.view_rows[view]
            loss_v, scores, positive_index, allowed = self._inter(
                batch, rows, encoded[view].embeddings, candidates_of, temperature
            )
            margin_v = self._margins(batch, rows, scores, positive_index, allowed, offset)
            view_losses[view] = (rows, loss_v)
            chance[view] = [chance_loss(allowed)]
            rows_t = torch.tensor(rows, device=device)
            loss_sum = loss_sum.index_add(0, rows_t, loss_v.detach())
            margin_sum = margin_sum.index_add(0, rows_t, margin_v.detach())
            count = count.index_add(0, rows_t, torch.ones_like(loss_v))
        catalog_loss = None
        if CATALOG_QUERIES in encoded:
            catalog_loss, _, _, catalog_allowed = self._inter(
                batch,
                batch.catalog_rows,
                encoded[CATALOG_QUERIES].embeddings,
                candidates_of,
                temperature,
            )
            chance.setdefault("i2mm", []).append(chance_loss(catalog_allowed))
        sample_loss = loss_sum / count.clamp_min(1)
        margin = margin_sum / count.clamp_min(1)
        phi, weight = policy.weights(margin, progress, sample_loss)

        intra_loss = None
        if self.config.loss.intra and "intra_image" in encoded:
            intra_loss = intra_product_nce(
                encoded["intra_image"].embeddings,
                encoded["intra_text"].embeddings,
                _same_item(batch, device),
                self.intra_temperature(),
            )
            products = len(encoded["intra_image"].embeddings)
            chance["intra"] = [chance_loss(_intra_candidates(batch, products, device))]

        terms: dict[str, torch.Tensor] = {}
        # what each objective's loss is, whatever the filter's weights: the figure W* steers
        # by and the one logged (the filter shrinks a term's strength, not its difficulty)
        levels: dict[str, torch.Tensor] = {}
        for view, (rows, loss_v) in view_losses.items():
            row_weights = weight[torch.tensor(rows, device=device)]
            if view == "i2mm" and catalog_loss is not None:
                loss_v = torch.cat([loss_v, catalog_loss])
                row_weights = torch.cat([row_weights, torch.ones_like(catalog_loss)])
            terms[view] = weighted_mean(loss_v, row_weights)
            levels[view] = _level(loss_v.detach(), row_weights.detach())
        if catalog_loss is not None and "i2mm" not in terms:
            terms["i2mm"] = catalog_loss.mean()
        if intra_loss is not None:
            terms["intra"] = intra_loss
        mode = self.config.moe.objective_weighting
        omega = self._omega(encoded, detach_gates=mode == "balance")
        levels = {name: levels.get(name, term.detach()) for name, term in terms.items()}
        parts = {f"loss_{name}": float(level) for name, level in levels.items()}
        # the model descends with omega as a constant; omega descends (paper) or ascends
        # (balance) the weighted loss, the losses on a common scale
        scales = self._scales(chance)
        total = weigh_objectives(terms, omega, scales, ascend=mode == "balance", levels=levels)
        if self.mixer is not None:
            aux = load_balancing_loss(everything.routings, self.config.moe.top_k)
            sparsity = self.mixer.sparsity_loss()
            total = total + self.config.moe.rho * aux + self.config.moe.varsigma * sparsity
            parts["loss_aux"] = float(aux.detach())
            parts["loss_sparsity"] = float(sparsity.detach())
        parts["loss"] = float(total.detach())
        parts["temperature"] = float(temperature.detach())
        return StepOutput(
            loss=total,
            parts=parts,
            omega={k: float(v.detach()) for k, v in omega.items()},
            usage=self._usage(encoded),
            positions=batch.positions,
            sample_loss=sample_loss.detach(),
            margin=margin.detach(),
            phi=phi,
            weight=weight,
            intra_ran=parts.get("loss_intra", 0.0) != 0.0,
            routed=bool(everything.routings),
        )

    def _inter(
        self,
        batch: Batch,
        rows: list[int],
        queries: torch.Tensor,
        candidates: _Candidates,
        temperature: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row inter-product InfoNCE of ``queries`` (samples ``rows``) against the
        candidates; with the scores, each row's positive column and allowed columns."""
        device = queries.device
        offset = candidates.offset
        positive_index = torch.tensor(
            [offset + batch.positive_col[r] for r in rows], device=device, dtype=torch.long
        )
        positive_ids = candidates.positive_ids[torch.tensor(rows, device=device)]
        allowed = self._allowed(batch, rows, candidates.ids, candidates.valid, positive_ids, offset)
        loss, scores = inter_product_nce(
            queries, candidates.embeddings, positive_index, allowed, temperature, reduction="none"
        )
        return loss, scores, positive_index, allowed

    def _allowed(
        self,
        batch: Batch,
        rows: list[int],
        all_ids: torch.Tensor,
        valid: torch.Tensor,
        positive_ids: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        columns = len(all_ids)
        if self.config.loss.in_batch_negatives:
            # every real candidate competes
            allowed = valid.unsqueeze(0).expand(len(rows), columns).clone()
        else:
            allowed = torch.zeros(len(rows), columns, dtype=torch.bool, device=all_ids.device)
            for i, r in enumerate(rows):
                for col in batch.negative_cols[r]:
                    allowed[i, offset + col] = True
        # except other copies of the query's own product and its duplicates (the same item)
        allowed &= all_ids.unsqueeze(0) != positive_ids.unsqueeze(1)
        index = torch.arange(len(rows), device=all_ids.device)
        positive_cols = torch.tensor(
            [offset + batch.positive_col[r] for r in rows], device=all_ids.device
        )
        allowed[index, positive_cols] = True
        return allowed

    def _margins(
        self,
        batch: Batch,
        rows: list[int],
        scores: torch.Tensor,
        positive_index: torch.Tensor,
        allowed: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        """s(q, p) - s(q, n) with n the hardest given negative (else the hardest allowed); a
        given negative that is a duplicate of the positive is no negative."""
        scores = scores.detach()
        positive = scores.gather(1, positive_index.unsqueeze(1)).squeeze(1)
        margins = []
        allowed_rows = allowed.tolist()  # one transfer, not one device read per negative
        for i, r in enumerate(rows):
            given = [offset + c for c in batch.negative_cols[r] if allowed_rows[i][offset + c]]
            if given:
                hardest = scores[i, given].max()
            else:
                others = allowed[i].clone()
                others[positive_index[i]] = False
                hardest = scores[i][others].max() if others.any() else positive[i] - 1.0
            margins.append(positive[i] - hardest)
        return torch.stack(margins)

    def _omega(self, encoded: dict[str, Encoded], detach_gates: bool) -> dict[str, torch.Tensor]:
        if self.mixer is None or self.config.moe.objective_weighting == "off":
            return {}
        gates = {view: encoded[view].gates for view in VIEWS if view in encoded}
        if CATALOG_QUERIES in encoded and encoded[CATALOG_QUERIES].gates is not None:
            catalog = encoded[CATALOG_QUERIES].gates
            gates["i2mm"] = torch.cat([gates["i2mm"], catalog]) if "i2mm" in gates else catalog
        if "intra_image" in encoded:
            gates["intra"] = torch.cat([encoded["intra_image"].gates, encoded["intra_text"].gates])
        gates = {k: (v.detach() if detach_gates else v) for k, v in gates.items() if v is not None}
        moe = self.config.moe
        return self.mixer.omega(gates, normalize=moe.normalize_omega, floor=moe.omega_floor)

    def _scales(self, chance: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per objective, the mean loss of a uniform guess over its rows' candidates: the
        common scale its loss is divided by before W* compares objectives (moe.loss_scale)."""
        if self.config.moe.loss_scale == "raw":
            return {}
        return {name: torch.cat(rows).mean() for name, rows in chance.items()}

    @staticmethod
    def _usage(encoded: dict[str, Encoded]) -> dict[str, list[float]]:
        groups = {
            "text": ("t2mm", "intra_text"),
            "image": ("i2mm", CATALOG_QUERIES, "intra_image"),
            "multimodal": ("mm2mm", "candidates"),
        }
        usage = {}
        for modality, names in groups.items():
            routings = [r for name in names if name in encoded for r in encoded[name].routings]
            if routings:
                usage[modality] = [round(float(v), 4) for v in routing_usage(routings)]
        return usage


def _level(loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted mean of ``loss`` normalised by the weights' sum (the plain mean when they
    sum to 0): the objective's loss level, which the filter's weights do not shrink."""
    total = weights.sum()
    return (loss * weights).sum() / total if total > 0 else loss.mean()
