"""Dynamic sample filtering policies: per-sample scores in, per-sample weights out.

The trainer calls a policy twice:

- every step, :meth:`FilterPolicy.weights` turns the batch's margins ``s(q,p) - s(q,n)``
  into reliabilities ``phi = sigmoid(kappa (margin - m_bar))`` and loss weights (``m_bar``
  decays linearly from ``m_bar_start`` to ``m_bar_end`` over training);
- after every epoch, :meth:`FilterPolicy.end_epoch` reads that epoch's score table and says
  which samples sit out the next epoch.

Policies: ``margin_weighting`` (MOON2.0: triplets with phi < tau are down-weighted),
``loss_prune`` (after the warm-up, the highest-loss fraction is dropped for one epoch; dropped
samples are re-scored and come back when their loss falls) and ``none``.

The warm-up (``filter.warmup``) is a share of the run's updates, so the filter acts under any
budget. ``loss_prune`` decides per epoch from the previous epoch's losses; in the epoch where
the warm-up ends no such decision exists yet (always so in a 1-epoch run), so from then on
samples whose loss is above the ``1 - prune_fraction`` quantile of that epoch's warm-up part
(:meth:`FilterPolicy.set_cut`, all ranks' scores) get weight 0 for the rest of the epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import torch

from moon2.curate.report import prf
from moon2.train.config import FilterConfig


class FilterPolicy:
    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.name = config.policy if config.enabled else "none"
        self.dropped: set[int] = set()
        """sample positions sitting out the current epoch"""
        self.loss_cut: float | None = None
        """loss_prune, in the epoch where the warm-up ends: a higher loss gets weight 0"""
        self.pruning = False
        """loss_prune: an end-of-epoch decision made after the warm-up governs this epoch"""

    def m_bar(self, progress: float) -> float:
        """Expected margin of a reliable triplet at training progress in [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        return self.config.m_bar_start + (self.config.m_bar_end - self.config.m_bar_start) * (
            progress
        )

    def weights(
        self, margins: torch.Tensor, progress: float, losses: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi, weight) per sample at training progress ``update / total_updates``; weights
        are constants for the loss (no gradient). ``losses``: the samples' losses (loss_prune's
        cut in the epoch where the warm-up ends)."""
        margins = margins.detach()
        phi = torch.sigmoid(self.config.kappa * (margins - self.m_bar(progress)))
        weight = torch.ones_like(phi)
        if not self.config.active(progress):
            return phi, weight
        if self.name == "margin_weighting":
            low = phi if self.config.low_weight == "phi" else torch.zeros_like(phi)
            weight = torch.where(phi < self.config.tau, low, weight)
        elif self.name == "loss_prune" and self.loss_cut is not None and losses is not None:
            weight = torch.where(losses.detach() > self.loss_cut, torch.zeros_like(phi), weight)
        return phi, weight

    def wants_cut(self, progress: float) -> bool:
        """loss_prune: the warm-up is over inside an epoch that no end-of-epoch decision
        covers, and its cut is not set yet (the trainer then calls :meth:`set_cut`)."""
        return (
            self.name == "loss_prune"
            and self.config.prune_fraction > 0
            and not self.pruning
            and self.loss_cut is None
            and self.config.active(progress)
        )

    def set_cut(self, losses: list[float]) -> None:
        """The cut from the losses of the epoch so far (its warm-up part): the highest
        ``prune_fraction`` of them lie above it. No losses yet: no cut."""
        if losses:
            self.loss_cut = float(np.quantile(losses, 1 - self.config.prune_fraction))

    def end_epoch(self, scores: pl.DataFrame, progress: float) -> set[int]:
        """Decide the samples dropped for the next epoch from this epoch's scores, at training
        progress ``progress`` (pruning once the warm-up is over).

        ``scores`` has one row per sample (``position``, ``loss``); returns the new drop set.
        """
        self.dropped = set()
        self.loss_cut = None
        self.pruning = (
            self.name == "loss_prune"
            and self.config.prune_fraction > 0
            and self.config.active(progress)
        )
        if self.pruning:
            count = round(self.config.prune_fraction * scores.height)
            if count:
                worst = scores.sort(["loss", "position"], descending=[True, False]).head(count)
                self.dropped = set(worst["position"].to_list())
        return self.dropped

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dropped": sorted(self.dropped),
            "loss_cut": self.loss_cut,
            "pruning": self.pruning,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dropped = set(state.get("dropped", []))
        self.loss_cut = state.get("loss_cut")
        self.pruning = bool(state.get("pruning", bool(self.dropped)))


def detection_report(
    scores: pl.DataFrame, truth: pl.DataFrame, threshold: float = 1.0
) -> dict[str, Any]:
    """Precision/recall of what a policy down-weighted or dropped against injected noise.

    Evaluation code: ``truth`` (sample_id, is_noisy) comes from ``truth_*`` columns, which
    no training or filtering decision ever reads. A sample is flagged when its weight is
    below ``threshold`` or it sat out the epoch.
    """
    joined = scores.join(truth, on="sample_id", how="inner")
    flagged = (pl.col("weight") < threshold) | ~pl.col("kept")
    out: dict[str, Any] = {}
    for epoch, frame in joined.group_by("epoch", maintain_order=True):
        frame = frame.with_columns(flagged=flagged)
        tp = frame.filter(pl.col("flagged") & pl.col("is_noisy")).height
        fp = frame.filter(pl.col("flagged") & ~pl.col("is_noisy")).height
        fn = frame.filter(~pl.col("flagged") & pl.col("is_noisy")).height
        figures = prf(tp, fp, fn)
        noisy = frame.filter(pl.col("is_noisy"))
        clean = frame.filter(~pl.col("is_noisy"))
        out[f"epoch-{int(epoch[0]):03d}"] = {
            "flagged": tp + fp,
            "noisy": tp + fn,
            "precision": figures["precision"],
            "recall": figures["recall"],
            "f1": figures["f1"],
            "mean_margin_noisy": _mean(noisy, "margin"),
            "mean_margin_clean": _mean(clean, "margin"),
            "mean_loss_noisy": _mean(noisy, "loss"),
            "mean_loss_clean": _mean(clean, "loss"),
        }
    return out


def _mean(frame: pl.DataFrame, column: str) -> float | None:
    if frame.is_empty():
        return None
    value = frame[column].mean()
    return None if value is None or np.isnan(value) else round(float(value), 4)
