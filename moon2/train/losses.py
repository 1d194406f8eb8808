"""Contrastive losses with per-sample outputs (``reduction="none"``) for the score table.

- :func:`inter_product_nce`: a query view against multimodal candidates: its positive, the
  negatives given for it and every other candidate in the (global) batch; candidates that
  are the same item as the positive (the same product, or a duplicate of it) are never
  negatives (the caller's ``allowed`` mask).
- :func:`intra_product_nce`: a product's image against its own text and the other
  products' texts, and the reverse (dual-level alignment); duplicates are never negatives.
- :func:`gather_with_grad`: all-gather across DDP ranks keeping gradients (open_clip style).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably (identity alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (ids, masks) from every rank along dim 0."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


class _FloorKeepingGradient(torch.autograd.Function):
    """``max(value, floor)`` whose gradient still reaches a value below the floor when
    descent would raise it, so a temperature that touched its floor can leave it (a plain
    clamp's gradient is zero there: it would stay at the floor for good). A push further down
    is dropped, so the raw value does not drift away below the floor."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, floor: float) -> torch.Tensor:
        ctx.save_for_backward(value)
        ctx.floor = floor
        return value.clamp_min(floor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (value,) = ctx.saved_tensors
        # descent moves the value by -grad: below the floor only grad < 0 (upwards) passes
        return grad.masked_fill((value < ctx.floor) & (grad > 0), 0.0), None


class Temperature(nn.Module):
    """A softmax temperature, learnable in log space (as CLIP's logit scale) or fixed; never
    below ``min_value``, which it can leave again (see :class:`_FloorKeepingGradient`)."""

    def __init__(self, value: float, learnable: bool, min_value: float = 0.01) -> None:
        super().__init__()
        if value <= 0:
            raise ValueError("temperature must be positive")
        self.min_value = min_value
        log = torch.tensor(math.log(value))
        if learnable:
            self.log_value = nn.Parameter(log)
        else:
            self.register_buffer("log_value", log)

    def forward(self) -> torch.Tensor:
        return _FloorKeepingGradient.apply(self.log_value.exp(), self.min_value)


def inter_product_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    allowed: torch.Tensor,
    temperature: torch.Tensor | float,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against its allowed candidates.

    queries [B, D] and candidates [C, D] are L2-normalised; ``positive_index`` [B] points at
    each query's positive column; ``allowed`` [B, C] is True where a column may compete (the
    positive itself must be allowed). Returns (loss, scores) where scores [B, C] are the
    cosine similarities (before the temperature).
    """
    scores = queries @ candidates.T
    logits = scores / temperature
    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, positive_index, reduction="none")
    return _reduce(loss, reduction), scores


def intra_product_nce(
    image: torch.Tensor,
    text: torch.Tensor,
    same_product: torch.Tensor | None,
    temperature: torch.Tensor | float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Symmetric image<->text InfoNCE over products: row i's image matches row i's text.

    ``same_product`` [P, P] marks pairs of rows that are the same item (the same product or
    duplicates: never negatives of each other); per-sample loss is the mean of the two
    directions.
    """
    logits = image @ text.T / temperature
    if same_product is not None:
        off_diagonal = same_product & ~torch.eye(len(image), dtype=torch.bool, device=image.device)
        logits = logits.masked_fill(off_diagonal, torch.finfo(logits.dtype).min)
    target = torch.arange(len(image), device=image.device)
    loss = 0.5 * (
        F.cross_entropy(logits, target, reduction="none")
        + F.cross_entropy(logits.T, target, reduction="none")
    )
    return _reduce(loss, reduction)


def weighted_mean(loss: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample losses times per-sample weights, averaged over the rows (plain mean when
    None): divided by the number of rows, not by the weights' sum, so a down-weighted row
    always counts less than a clean one would, even when every row of the batch is down-
    weighted (a sum would scale such a batch back up to full strength)."""
    if weights is None:
        return loss.mean()
    return (loss * weights).sum() / max(len(loss), 1)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"unknown reduction {reduction!r}")
