"""Exact top-k retrieval by dot product, in bounded memory.

:func:`topk_search` scores every query against every candidate without ever holding a
``queries x candidates`` matrix: it walks the product in blocks of ``query_chunk x
candidate_chunk``, selects each block's top-k and merges it into a running top-k per query.
The result is *exact* (not approximate) and *deterministic*, including the order of tied scores.

Tie rule
--------
Rows are ordered by score descending; equal scores are ordered by candidate index ascending (the
lower index wins a place in the top-k and comes first). This is the order of a stable sort on
``-score``, i.e. ``np.lexsort((index, -score))``, and it holds across chunk boundaries:

- inside a block, ``torch.topk`` is used for speed, but ``topk`` picks an arbitrary subset of
  elements tied with the k-th value. A boundary tie exists exactly when the block holds more than
  k elements ``>=`` its k-th largest value, which is the same as "the (k+1)-th largest value
  equals the k-th". So each block asks ``topk`` for k + 1 values, and only the rows where those two
  are equal are redone with a stable sort; the other rows' k winners are unambiguous and are merely
  re-ordered by (score desc, index asc).
- the running top-k always holds lower candidate indices than the current block (candidates are
  visited in order), so a stable descending sort of ``[running, block]`` keeps lower indices first.

Selection cost
--------------
On a CPU, ``torch.topk`` over a whole block row costs more than half of the matrix product that
produced it (it copies each row into (value, index) pairs). For wide blocks the selection is
therefore done in two exact stages: the block row is cut into contiguous groups of ``g`` scores,
the group maxima are computed (one vectorised pass, memory bound), the k best *groups* are chosen
with the tie rule above, and the final top-k is selected among the ``k * g`` scores of those
groups only. This is exact: a score in an unchosen group h is preceded by the maximum of each of
the k chosen groups, each of which is larger, or equal and in a group (hence at an index) before
h; so k scores precede it and it cannot be in the top-k.

Once a query chunk has a full running top-k, its k-th score is a per-row threshold for later
blocks: their scores have higher indices, so only scores strictly above it can enter. Only groups
whose maximum beats the threshold are then gathered (usually a handful per row after the first
few blocks), and a block where no row has such a group is skipped after the group maxima.

Memory
------
Peak working memory is about ``4 * query_chunk * candidate_chunk`` bytes for the score block,
plus ``4 * candidate_chunk * dim`` for a candidate chunk when the candidates must be converted
(float32 C-contiguous numpy arrays and memmaps are used in place, without copying), plus small
per-query state (``query_chunk x k``). With the defaults (1024 x 65536) that is 256 MiB for the
block and 64 MiB per converted candidate chunk at ``dim=256``, independent of the number of
candidates. Halving either chunk halves the block; 1024 x 32768 (128 MiB) measured 3-10% slower.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_CANDIDATE_CHUNK", "DEFAULT_QUERY_CHUNK", "topk_search"]

# Tuned with perf/bench_retrieval.py --tune on a 2-core AVX-512 Xeon (dim 256, k 10 and 100):
# 1024 x 65536 was fastest or within noise of it in every round. Fewer than ~1024 queries per
# product lose to MKL re-packing each candidate chunk per call; narrower candidate chunks pay
# the per-block selection overhead (first stage, merge) more often, which shows most at k=100.
# Wider or taller blocks gained nothing measurable and cost memory.
DEFAULT_QUERY_CHUNK = 1024
DEFAULT_CANDIDATE_CHUNK = 65536

# Group sizes for the two-stage selection. Below 32, reducing tiny groups is slower than the
# final selection it saves (measured: g=16 amax is ~4x slower than g=32 on CPU).
_MIN_GROUP = 32
_MAX_GROUP = 512

Array2D = Any  # np.ndarray (incl. np.memmap) or torch.Tensor; kept loose for array subclasses


def topk_search(
    queries: Array2D,
    candidates: Array2D,
    k: int,
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    candidate_chunk: int = DEFAULT_CANDIDATE_CHUNK,
    device: str | torch.device = "cpu",
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k candidates by dot product for every query.

    Args:
        queries: ``[n_queries, dim]`` float array (numpy, memmap or torch tensor).
        candidates: ``[n_candidates, dim]`` float array; read one ``candidate_chunk`` at a time,
            so it may be a memmap larger than memory.
        k: number of candidates to return per query (clipped to ``n_candidates``).
        query_chunk: queries scored together; the score block is ``query_chunk x
            candidate_chunk`` float32 values.
        candidate_chunk: candidates scored together (see the module docstring for memory).
        device: torch device for the arithmetic (``"cpu"``, ``"cuda"``, ...). Math is float32.
        on_progress: called with the cumulative number of finished queries after each query
            chunk.

    Returns:
        ``(scores, indices)``: float32 and int64 arrays of shape ``[n_queries, k']`` with
        ``k' = min(k, n_candidates)``. Each row is ordered by score descending, ties by candidate
        index ascending (exactly, also across chunk boundaries).

    Raises:
        ValueError: inputs are not 2-D, dimensions differ, there are no candidates, ``k`` or a
            chunk size is below 1, or a score is NaN.
    """
    queries = _as_2d(queries, "queries")
    candidates = _as_2d(candidates, "candidates")
    k = _positive_int(k, "k")
    query_chunk = _positive_int(query_chunk, "query_chunk")
    candidate_chunk = _positive_int(candidate_chunk, "candidate_chunk")
    n_queries, dim = queries.shape
    n_candidates, cand_dim = candidates.shape
    if dim != cand_dim:
        raise ValueError(
            f"queries have dimension {dim} but candidates have dimension {cand_dim}; "
            "both must embed into the same space"
        )
    if n_candidates == 0:
        raise ValueError("candidates is empty: there is nothing to retrieve from")
    device = torch.device(device)
    k_out = min(k, n_candidates)
    out_scores = np.empty((n_queries, k_out), dtype=np.float32)
    out_indices = np.empty((n_queries, k_out), dtype=np.int64)
    if n_queries == 0:
        return out_scores, out_indices

    query_chunk = min(query_chunk, n_queries)
    candidate_chunk = min(candidate_chunk, n_candidates)
    with torch.inference_mode():
        # One flat buffer reused for every score block: a fresh 256 MiB block per product is
        # page-faulted anew each time, measured ~90 ms extra on a ~200 ms product on CPU.
        block_storage = torch.empty(
            query_chunk * candidate_chunk, dtype=torch.float32, device=device
        )
        for q_start in range(0, n_queries, query_chunk):
            q_stop = min(q_start + query_chunk, n_queries)
            q = _chunk_tensor(queries, q_start, q_stop, device)
            rows = q_stop - q_start
            best_scores: torch.Tensor | None = None
            best_indices: torch.Tensor | None = None
            for c_start in range(0, n_candidates, candidate_chunk):
                c_stop = min(c_start + candidate_chunk, n_candidates)
                c = _chunk_tensor(candidates, c_start, c_stop, device)
                width = c_stop - c_start
                block = block_storage[: rows * width].view(rows, width)
                torch.mm(q, c.T, out=block)
                threshold = None
                if best_scores is not None and best_scores.shape[1] == k_out:
                    threshold = best_scores[:, -1]
                found = _block_topk(block, min(k_out, width), threshold)
                if found is None:
                    continue  # no score in this block beats any row's running k-th score
                scores, positions = found
                indices = positions + c_start
                if best_scores is None or best_indices is None:
                    best_scores, best_indices = scores, indices
                else:
                    best_scores, best_indices = _merge(
                        best_scores, best_indices, scores, indices, k_out
                    )
            assert best_scores is not None and best_indices is not None
            # NaN sorts above everything in torch, so any NaN score in a row reaches its top-k.
            if bool(torch.isnan(best_scores).any()):
                raise ValueError(
                    "a query-candidate score is NaN: the embeddings contain NaN or infinite "
                    f"values (first affected query chunk starts at query {q_start})"
                )
            out_scores[q_start:q_stop] = best_scores.cpu().numpy()
            out_indices[q_start:q_stop] = best_indices.cpu().numpy()
            if on_progress is not None:
                on_progress(q_stop)
    return out_scores, out_indices


def _as_2d(array: Array2D, name: str) -> Array2D:
    """Accept torch tensors and numpy arrays (memmaps stay memmaps); check they are 2-D."""
    if not isinstance(array, (torch.Tensor, np.ndarray)):
        array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, dim], got shape {tuple(array.shape)}")
    return array


def _positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _chunk_tensor(array: Array2D, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` as a float32 tensor on ``device``, without a copy when possible."""
    if isinstance(array, torch.Tensor):
        return array[start:stop].to(device=device, dtype=torch.float32)
    chunk = array[start:stop]
    if chunk.dtype != np.float32 or not chunk.flags.c_contiguous:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    with warnings.catch_warnings():
        # Read-only memmaps are shared zero-copy; torch warns that the tensor would be
        # writable, but this module never writes to candidate or query tensors.
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        tensor = torch.from_numpy(np.asarray(chunk))
    return tensor.to(device)


def _group_size(width: int, k: int) -> int | None:
    """Group size for the two-stage selection of a ``width``-wide row, or None to select directly.

    Stage costs are roughly ``width`` (group maxima, a cheap vectorised pass) plus ``width / g``
    (choosing groups) plus ``k * g`` (final selection); ``g = sqrt(width / k)`` balances the last
    two. Grouping only pays when the rows it leaves are much narrower than the block.
    """
    g = 2 ** round(math.log2(max(math.sqrt(width / k), 1.0)))
    g = min(max(g, _MIN_GROUP), _MAX_GROUP)
    if k * g + width // g > width // 4:
        return None
    return g


def _block_topk(
    block: torch.Tensor, k: int, threshold: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact top-k of each row of ``block`` (``k <= width``) as (scores, column positions).

    Uses the two-stage group selection described in the module docstring when the block is wide.
    ``threshold`` (per row) is the k-th score of the running top-k, which holds only lower
    candidate indices: a score of this block can then enter the result only if it is strictly
    greater, so fewer groups are needed (often none, after the first few blocks). The result may
    then hold fewer than k columns, and None means no row can change; both are still exact for
    the merge, which only needs every block score that can reach the final top-k.
    """
    rows, width = block.shape
    g = _group_size(width, k)
    if g is None:
        return _topk_stable(block, k)
    n_groups = width // g
    main = block[:, : n_groups * g].view(rows, n_groups, g)
    group_max = main.amax(dim=2)
    tail = width - n_groups * g
    n_pick = k
    if threshold is not None:
        # ``~(max <= threshold)`` also counts NaN groups, so NaN scores still reach the result
        # (and the caller's NaN check) instead of being skipped.
        promising = ~(group_max <= threshold.unsqueeze(1))
        n_pick = min(k, int(promising.sum(dim=1).max()))
        if n_pick == 0 and not tail:
            return None
    if n_pick:
        # With fewer than k promising groups in every row, the n_pick best groups contain all of
        # them (a promising group outranks every other); otherwise the best k groups hold the
        # block's top-k (module docstring).
        _, groups = _topk_stable(group_max, n_pick)
        # Ascending group order makes the gathered row's order equal candidate order, so
        # position ties in the final selection are index ties.
        groups, _ = torch.sort(groups, dim=1)
        offsets = torch.arange(g, device=block.device)
        positions = (groups.unsqueeze(2) * g + offsets).reshape(rows, n_pick * g)
    else:
        positions = torch.empty(rows, 0, dtype=torch.int64, device=block.device)
    if tail:
        # Scores after the last whole group are always kept; they have the highest positions,
        # so appending them preserves candidate order.
        tail_positions = torch.arange(n_groups * g, width, device=block.device)
        positions = torch.cat([positions, tail_positions.expand(rows, tail)], dim=1)
    reduced = torch.gather(block, 1, positions)
    scores, picked = _topk_stable(reduced, min(k, reduced.shape[1]))
    return scores, torch.gather(positions, 1, picked)


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row ordered by (score desc, column asc); exact under ties. ``k <= width``."""
    width = scores.shape[1]
    if k >= width:
        return torch.sort(scores, dim=1, descending=True, stable=True)
    values, positions = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    # More than k elements >= the k-th value <=> the (k+1)-th value equals the k-th: topk chose
    # arbitrarily among the tied ones, so those rows are redone below.
    boundary_tie = values[:, k - 1] == values[:, k]
    values, positions = values[:, :k], positions[:, :k]
    # The k winners are right but topk may order equal scores arbitrarily: sort by column, then
    # stably by score.
    positions, order = torch.sort(positions, dim=1)
    values = torch.gather(values, 1, order)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    positions = torch.gather(positions, 1, order)
    if bool(boundary_tie.any()):
        tied = boundary_tie.nonzero().squeeze(1)
        tied_values, tied_positions = torch.sort(scores[tied], dim=1, descending=True, stable=True)
        values[tied] = tied_values[:, :k]
        positions[tied] = tied_positions[:, :k]
    return values, positions


def _merge(
    best_scores: torch.Tensor,
    best_indices: torch.Tensor,
    scores: torch.Tensor,
    indices: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the running top-k with a later block's top-k (all of whose indices are higher)."""
    all_scores = torch.cat([best_scores, scores], dim=1)
    all_indices = torch.cat([best_indices, indices], dim=1)
    # Both halves are already in (score desc, index asc) order and the running half has the lower
    # indices, so a stable sort on score alone yields the tie rule.
    merged, order = torch.sort(all_scores, dim=1, descending=True, stable=True)
    return merged[:, :k], torch.gather(all_indices, 1, order[:, :k])
