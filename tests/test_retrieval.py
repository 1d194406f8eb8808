"""Exact chunked top-k retrieval: equals a brute-force full-matrix search, ties included."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from moon2.bench.retrieval import topk_search


def brute_force(queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Full score matrix, then a stable order by (score desc, index asc), cut to k."""
    scores = queries.astype(np.float32).astype(np.float64) @ (
        candidates.astype(np.float32).astype(np.float64).T
    )
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((index, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_matches(queries: np.ndarray, candidates: np.ndarray, k: int, **kwargs: object) -> None:
    scores, indices = topk_search(queries, candidates, k, **kwargs)
    expected_scores, expected_indices = brute_force(queries, candidates, k)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert indices.shape == (len(queries), min(k, len(candidates)))
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


# (n_queries, n_candidates, k, query_chunk, candidate_chunk). Wide chunks with small k take the
# two-stage (group maxima) selection, with and without a partial last group; narrow ones and
# large k select directly.
CASE_FIELDS = ("n_queries", "n_candidates", "k", "query_chunk", "candidate_chunk")
CASES = [
    (37, 5003, 10, 8, 1000),  # nothing divides: partial query and candidate chunks
    (37, 5003, 1, 7, 999),  # k == 1
    (20, 300, 500, 6, 77),  # k > n_candidates: everything, sorted
    (20, 300, 300, 64, 300),  # k == n_candidates, one chunk
    (33, 20011, 5, 16, 4099),  # group selection, partial last group, 5 chunks
    (33, 20000, 3, 33, 20000),  # group selection, one chunk
    (16, 30000, 7, 5, 7777),  # group selection, threshold pruning over 4 chunks
    (16, 2000, 50, 16, 64),  # candidate chunk barely above k
    (5, 300, 10, 2, 3),  # candidate chunk below k: running top-k fills over chunks
    (8, 70001, 10, 1024, 65536),  # the defaults: one full chunk and a short one
]


@pytest.mark.parametrize(CASE_FIELDS, CASES)
def test_random_data_equals_brute_force(
    n_queries: int, n_candidates: int, k: int, query_chunk: int, candidate_chunk: int
) -> None:
    rng = np.random.default_rng(n_candidates + k)
    queries = rng.standard_normal((n_queries, 16))
    candidates = rng.standard_normal((n_candidates, 16))
    assert_matches(queries, candidates, k, query_chunk=query_chunk, candidate_chunk=candidate_chunk)


@pytest.mark.parametrize(CASE_FIELDS, CASES)
@pytest.mark.parametrize("low", [-1, 0])
def test_integer_embeddings_ties_follow_lower_index(
    n_queries: int, n_candidates: int, k: int, query_chunk: int, candidate_chunk: int, low: int
) -> None:
    # Small integer vectors: scores are exact in float32 and most of them are tied, so ties
    # straddle the k-th place, group maxima and chunk boundaries everywhere.
    rng = np.random.default_rng(n_candidates * 3 + k)
    queries = rng.integers(-2, 3, (n_queries, 8)).astype(np.float32)
    candidates = rng.integers(low, 2, (n_candidates, 8)).astype(np.float32)
    scores, indices = topk_search(
        queries, candidates, k, query_chunk=query_chunk, candidate_chunk=candidate_chunk
    )
    expected_scores, expected_indices = brute_force(queries, candidates, k)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(scores, expected_scores.astype(np.float32))


def test_tie_across_chunk_boundary_keeps_lower_indices() -> None:
    candidates = np.zeros((400, 4), dtype=np.float32)
    best = [5, 99, 100, 101, 250, 399]
    candidates[best] = 1.0
    queries = np.ones((3, 4), dtype=np.float32)
    for candidate_chunk in (100, 101, 7, 400):
        scores, indices = topk_search(queries, candidates, 4, candidate_chunk=candidate_chunk)
        np.testing.assert_array_equal(indices, [[5, 99, 100, 101]] * 3)
        np.testing.assert_array_equal(scores, np.full((3, 4), 4.0, dtype=np.float32))


def test_all_scores_equal_gives_first_indices() -> None:
    candidates = np.ones((50_000, 4), dtype=np.float32)
    scores, indices = topk_search(np.ones((4, 4)), candidates, 12, candidate_chunk=16_384)
    np.testing.assert_array_equal(indices, np.tile(np.arange(12), (4, 1)))
    assert (scores == 4.0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_memmap_candidates(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(3)
    data = rng.standard_normal((3001, 12)).astype(dtype)
    path = tmp_path / "candidates.bin"
    data.tofile(path)
    candidates = np.memmap(path, dtype=dtype, mode="r", shape=data.shape)
    queries = rng.standard_normal((21, 12)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a read-only memmap must not trigger torch's warning
        assert_matches(queries, candidates, 9, query_chunk=8, candidate_chunk=1000)


def test_torch_tensor_inputs() -> None:
    generator = torch.Generator().manual_seed(4)
    queries = torch.randn(19, 10, generator=generator, dtype=torch.float64)
    candidates = torch.randn(2500, 10, generator=generator).to(torch.bfloat16)
    scores, indices = topk_search(queries, candidates, 6, query_chunk=4, candidate_chunk=999)
    expected_scores, expected_indices = brute_force(queries.numpy(), candidates.float().numpy(), 6)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu() -> None:
    rng = np.random.default_rng(5)
    queries = rng.integers(-2, 3, (40, 8)).astype(np.float32)
    candidates = rng.integers(-1, 2, (20_000, 8)).astype(np.float32)
    on_cpu = topk_search(queries, candidates, 10, candidate_chunk=4096)
    on_gpu = topk_search(queries, candidates, 10, candidate_chunk=4096, device="cuda")
    np.testing.assert_array_equal(on_cpu[1], on_gpu[1])


def test_progress_reports_cumulative_queries() -> None:
    seen: list[int] = []
    rng = np.random.default_rng(6)
    topk_search(
        rng.standard_normal((25, 4)),
        rng.standard_normal((50, 4)),
        3,
        query_chunk=10,
        on_progress=seen.append,
    )
    assert seen == [10, 20, 25]


def test_no_queries_gives_empty_result() -> None:
    scores, indices = topk_search(np.empty((0, 4)), np.ones((7, 4)), 10)
    assert scores.shape == indices.shape == (0, 7)


@pytest.mark.parametrize(
    ("queries", "candidates", "k", "kwargs", "message"),
    [
        (np.ones((2, 4)), np.ones((5, 3)), 1, {}, "dimension 4 .* dimension 3"),
        (np.ones((2, 4)), np.ones((5, 4)), 0, {}, "k must be >= 1"),
        (np.ones((2, 4)), np.ones((5, 4)), 2.5, {}, "k must be an integer"),
        (np.ones((2, 4)), np.empty((0, 4)), 1, {}, "candidates is empty"),
        (np.ones(4), np.ones((5, 4)), 1, {}, "queries must be a 2-D array"),
        (np.ones((2, 4)), np.ones((2, 5, 4)), 1, {}, "candidates must be a 2-D array"),
        (np.ones((2, 4)), np.ones((5, 4)), 1, {"query_chunk": 0}, "query_chunk must be >= 1"),
        (np.ones((2, 4)), np.ones((5, 4)), 1, {"candidate_chunk": -1}, "candidate_chunk"),
    ],
)
def test_invalid_inputs(
    queries: np.ndarray, candidates: np.ndarray, k: int, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        topk_search(queries, candidates, k, **kwargs)


@pytest.mark.parametrize("candidate_chunk", [3000, 500])
def test_nan_scores_are_rejected(candidate_chunk: int) -> None:
    candidates = np.random.default_rng(7).standard_normal((3000, 4)).astype(np.float32)
    candidates[2222, 1] = np.nan  # in a later chunk, after the running threshold exists
    with pytest.raises(ValueError, match="NaN"):
        topk_search(np.ones((2, 4)), candidates, 3, candidate_chunk=candidate_chunk)
