"""Throughput and memory of exact top-k retrieval (`moon2.bench.retrieval.topk_search`).

Every figure is measured in the same run, each in a fresh subprocess so that its peak memory
(``VmHWM``, the resident-set high-water mark of that process) belongs to that measurement alone:

1. ``peak``: this machine's float32 matmul rate, ``torch.matmul`` of 2048 x 2048 matrices, best
   of several repeats (GFLOP/s), measured at the start and at the end of the run and around each
   top-k run. Ratios use the highest rate seen, so a slow phase of a shared host cannot flatter
   them.
2. ``topk``: ``--queries`` x ``--candidates`` random L2-normalised vectors of ``--dim``, top-k for
   each ``--k``: wall time, achieved GFLOP/s (``2 * nq * nc * dim / time``), ratio to the peak,
   and peak memory. Candidates are generated chunk-wise straight into one float32 array, so the
   data set costs its own size (1 GB at 1M x 256) and nothing more.
3. ``split``: where ``topk_search``'s time goes for one query chunk over all candidates (torch
   profiler: the matrix product vs everything else), and per block the matrix product against a
   plain ``torch.topk`` over the block (what a naive selection would cost).
4. ``dense``: the approach of CLIP_benchmark's retrieval metric (the full queries x candidates
   score matrix, then ``torch.topk``) against ``topk_search`` on a size both can run.

``--tune`` adds a grid of (query_chunk, candidate_chunk) pairs at the first k, interleaved in
rounds and keeping each pair's best time (the host's speed drifts), on ``--tune-queries`` queries
over ``--tune-candidates`` candidates; the defaults in ``moon2/bench/retrieval.py`` come from it.

    python perf/bench_retrieval.py                 # full run, several minutes on 2 cores
    python perf/bench_retrieval.py --quick         # smoke run
    python perf/bench_retrieval.py --tune --json retrieval.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moon2.bench.retrieval import DEFAULT_CANDIDATE_CHUNK, DEFAULT_QUERY_CHUNK, topk_search

GIB = 1024**3
PEAK_TARGET_RATIO = 0.5
MEMORY_TARGET_GIB = 2.0
TUNE_GRID = [
    (256, 16384),
    (256, 65536),
    (512, 16384),
    (512, 65536),
    (1024, 8192),
    (1024, 16384),
    (1024, 32768),
    (1024, 65536),
    (2048, 16384),
    (2048, 32768),
]


# --- measurements (each runs inside its own subprocess) ----------------------------------------


def _memory_gib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmHWM`` = peak resident, ``VmRSS`` = current)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    import resource  # off Linux: ru_maxrss (bytes on macOS) is the only figure available

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / GIB


def _random_unit_rows(n: int, dim: int, seed: int, chunk: int = 65536) -> np.ndarray:
    """``n`` random L2-normalised float32 rows, generated chunk-wise in place (no 2x memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        part = out[start : start + chunk]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
    return out


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def measure_peak(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best-of-``repeats`` float32 matmul rate of ``size x size`` matrices."""
    spec = spec or {}
    size, repeats = spec.get("size", 2048), spec.get("repeats", 10)
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    with torch.inference_mode():
        torch.matmul(a, b, out=out)  # warm-up: MKL thread pool and buffers
        best = _best_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return {"size": size, "best_s": best, "gflops": 2 * size**3 / best / 1e9}


def measure_topk(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``topk_search`` run: time, GFLOP/s and peak memory of this process."""
    nq, nc, dim, k = spec["queries"], spec["candidates"], spec["dim"], spec["k"]
    # Short peak measurements around the run (before the data exists, so they do not raise the
    # memory high-water mark) show how fast the host was at the time.
    peak_before = measure_peak({"repeats": 5})["gflops"]
    candidates = _random_unit_rows(nc, dim, seed=1)
    queries = _random_unit_rows(nq, dim, seed=2)
    data_rss = _memory_gib("VmRSS")
    started = time.perf_counter()
    scores, indices = topk_search(
        queries,
        candidates,
        k,
        query_chunk=spec["query_chunk"],
        candidate_chunk=spec["candidate_chunk"],
    )
    seconds = time.perf_counter() - started
    peak_memory = _memory_gib("VmHWM")
    del candidates, queries
    peak_after = measure_peak({"repeats": 5})["gflops"]
    assert scores.shape == (nq, min(k, nc)) and indices.dtype == np.int64
    return {
        **spec,
        "seconds": seconds,
        "gflops": 2 * nq * nc * dim / seconds / 1e9,
        "local_peak_gflops": max(peak_before, peak_after),
        "data_gib": (nq + nc) * dim * 4 / GIB,
        "rss_after_data_gib": data_rss,
        "peak_gib": peak_memory,
    }


def measure_dense(spec: dict[str, Any]) -> dict[str, Any]:
    """CLIP_benchmark style: ``scores = queries @ candidates.T`` in full, then ``topk``."""
    nq, nc, dim, k = spec["queries"], spec["candidates"], spec["dim"], spec["k"]
    candidates = torch.from_numpy(_random_unit_rows(nc, dim, seed=1))
    queries = torch.from_numpy(_random_unit_rows(nq, dim, seed=2))
    started = time.perf_counter()
    with torch.inference_mode():
        scores = queries @ candidates.T
        _, top_indices = torch.topk(scores, k, dim=1)
        del scores
    seconds = time.perf_counter() - started
    assert top_indices.shape == (nq, k)
    return {
        **spec,
        "seconds": seconds,
        "gflops": 2 * nq * nc * dim / seconds / 1e9,
        "data_gib": (nq + nc) * dim * 4 / GIB,
        "peak_gib": _memory_gib("VmHWM"),
    }


def measure_split(spec: dict[str, Any]) -> dict[str, Any]:
    """Matrix product vs selection: profiled over one query chunk, and per block."""
    from torch.profiler import ProfilerActivity, profile

    qc, cc, dim, k = spec["query_chunk"], spec["candidate_chunk"], spec["dim"], spec["k"]
    candidates = _random_unit_rows(spec["candidates"], dim, seed=1)
    queries = _random_unit_rows(qc, dim, seed=2)
    topk_search(queries[:8], candidates[: 2 * cc], k, query_chunk=qc, candidate_chunk=cc)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        topk_search(queries, candidates, k, query_chunk=qc, candidate_chunk=cc)
    self_us = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    total_us = sum(self_us.values())
    matmul_us = self_us.get("aten::mm", 0.0)
    top_ops = sorted(
        ((name, us) for name, us in self_us.items() if name != "aten::mm"),
        key=lambda item: -item[1],
    )[:4]

    q = torch.from_numpy(queries)
    c = torch.from_numpy(candidates[:cc])
    block = torch.empty(qc, cc)
    with torch.inference_mode():
        block_matmul = _best_seconds(lambda: torch.mm(q, c.T, out=block), 5)
        block_plain_topk = _best_seconds(lambda: torch.topk(block, k, dim=1), 5)
    return {
        **spec,
        "queries": qc,
        "matmul_share": matmul_us / total_us,
        "selection_share": 1 - matmul_us / total_us,
        "selection_top_ops": {name: round(us / total_us, 4) for name, us in top_ops},
        "block_matmul_ms": block_matmul * 1e3,
        "block_plain_topk_ms": block_plain_topk * 1e3,
    }


def measure_tune(spec: dict[str, Any]) -> dict[str, Any]:
    """Best time of each (query_chunk, candidate_chunk) pair, interleaved over ``rounds``."""
    nq, nc, dim, k = spec["queries"], spec["candidates"], spec["dim"], spec["k"]
    candidates = _random_unit_rows(nc, dim, seed=1)
    queries = _random_unit_rows(nq, dim, seed=2)
    best = {tuple(pair): float("inf") for pair in spec["grid"]}
    peak = 0.0
    for _ in range(spec["rounds"]):
        for qc, cc in best:
            peak = max(peak, measure_peak({"repeats": 3})["gflops"])
            started = time.perf_counter()
            topk_search(queries, candidates, k, query_chunk=qc, candidate_chunk=cc)
            best[qc, cc] = min(best[qc, cc], time.perf_counter() - started)
    rows = [
        {
            "query_chunk": qc,
            "candidate_chunk": cc,
            "seconds": seconds,
            "gflops": 2 * nq * nc * dim / seconds / 1e9,
            "block_mib": qc * cc * 4 / 2**20,
        }
        for (qc, cc), seconds in best.items()
    ]
    return {**spec, "peak_gflops": peak, "rows": rows}


MEASUREMENTS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "peak": measure_peak,
    "topk": measure_topk,
    "dense": measure_dense,
    "split": measure_split,
    "tune": measure_tune,
}


def run_isolated(kind: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter so that its peak memory is its own."""
    completed = subprocess.run(
        [sys.executable, __file__, "--_measure", kind, json.dumps(spec or {})],
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        sys.exit(f"measurement {kind} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- driver --------------------------------------------------------------------------------------


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 100], help="one run per value")
    parser.add_argument("--query-chunk", type=int, default=DEFAULT_QUERY_CHUNK)
    parser.add_argument("--candidate-chunk", type=int, default=DEFAULT_CANDIDATE_CHUNK)
    parser.add_argument("--dense-queries", type=int, default=2_000)
    parser.add_argument("--dense-candidates", type=int, default=100_000)
    parser.add_argument("--tune", action="store_true", help="also try a grid of chunk sizes")
    parser.add_argument("--tune-queries", type=int, default=2_048)
    parser.add_argument("--tune-candidates", type=int, default=262_144)
    parser.add_argument("--tune-rounds", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.queries, args.candidates = 1_000, 100_000
        args.dense_queries, args.dense_candidates = 500, 20_000
        args.tune_queries, args.tune_candidates, args.tune_rounds = 512, 65_536, 1
    return args


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--_measure":
        print(json.dumps(MEASUREMENTS[sys.argv[2]](json.loads(sys.argv[3]))))
        return
    args = _parse_args()
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    peaks = [run_isolated("peak")["gflops"]]
    base = {
        "queries": args.queries,
        "candidates": args.candidates,
        "dim": args.dim,
        "query_chunk": args.query_chunk,
        "candidate_chunk": args.candidate_chunk,
    }

    results["topk"] = [run_isolated("topk", {**base, "k": k}) for k in args.k]
    results["split"] = [run_isolated("split", {**base, "k": k}) for k in args.k]
    dense_spec = {
        **base,
        "queries": args.dense_queries,
        "candidates": args.dense_candidates,
        "k": args.k[0],
    }
    dense, chunked = run_isolated("dense", dense_spec), run_isolated("topk", dense_spec)
    if args.tune:
        results["tune"] = run_isolated(
            "tune",
            {
                **base,
                "queries": args.tune_queries,
                "candidates": args.tune_candidates,
                "k": args.k[0],
                "rounds": args.tune_rounds,
                "grid": TUNE_GRID,
            },
        )
        peaks.append(results["tune"]["peak_gflops"])
    peaks.append(run_isolated("peak")["gflops"])
    peaks += [row["local_peak_gflops"] for row in [*results["topk"], chunked]]
    peak = max(peaks)
    results["peak_gflops"] = peak
    results["peak_gflops_samples"] = peaks

    print(
        f"fp32 matmul peak (2048^2, best of repeats, max of {len(peaks)} measurements): "
        f"{peak:.1f} GFLOP/s (range {min(peaks):.0f}-{peak:.0f}: the host's speed varies)"
    )

    print(
        f"\ntop-k of {args.queries:,} queries over {args.candidates:,} x {args.dim}, "
        f"chunks {args.query_chunk} x {args.candidate_chunk}"
    )
    print(
        f"{'k':>5} {'seconds':>8} {'GFLOP/s':>8} {'of peak':>8} {'of local':>9} "
        f"{'peak GiB':>9} {'data GiB':>9}"
    )
    for row in results["topk"]:
        row["ratio_to_peak"] = row["gflops"] / peak
        print(
            f"{row['k']:>5} {row['seconds']:>8.2f} {row['gflops']:>8.1f} "
            f"{row['ratio_to_peak']:>8.0%} {row['gflops'] / row['local_peak_gflops']:>9.0%} "
            f"{row['peak_gib']:>9.2f} {row['data_gib']:>9.2f}"
        )
    print("('of local': against the best matmul rate measured just before and after that run)")

    print(
        f"\nsplit: {args.query_chunk} queries over {args.candidates:,} candidates (profiled), "
        f"and one {args.query_chunk} x {args.candidate_chunk} block"
    )
    print(
        f"{'k':>5} {'matmul':>7} {'select':>7} {'block matmul ms':>16} "
        f"{'plain topk ms':>14}  largest selection ops"
    )
    for row in results["split"]:
        ops = ", ".join(
            f"{name.removeprefix('aten::')} {share:.0%}"
            for name, share in row["selection_top_ops"].items()
        )
        print(
            f"{row['k']:>5} {row['matmul_share']:>7.0%} {row['selection_share']:>7.0%} "
            f"{row['block_matmul_ms']:>16.1f} {row['block_plain_topk_ms']:>14.1f}  {ops}"
        )

    results["dense_vs_chunked"] = {
        "dense": dense,
        "chunked": chunked,
        "time_ratio_dense_over_chunked": dense["seconds"] / chunked["seconds"],
        "memory_ratio_dense_over_chunked": dense["peak_gib"] / chunked["peak_gib"],
        "memory_above_data_ratio": (dense["peak_gib"] - dense["data_gib"])
        / (chunked["peak_gib"] - chunked["data_gib"]),
    }
    print(
        f"\ndense (CLIP_benchmark: full score matrix, then topk) vs topk_search, "
        f"{args.dense_queries:,} x {args.dense_candidates:,}, k={args.k[0]}"
    )
    print(f"{'method':>12} {'seconds':>8} {'GFLOP/s':>8} {'peak GiB':>9}")
    for name, row in (("dense", dense), ("topk_search", chunked)):
        print(f"{name:>12} {row['seconds']:>8.2f} {row['gflops']:>8.1f} {row['peak_gib']:>9.2f}")
    ratios = results["dense_vs_chunked"]
    print(
        f"dense / topk_search: time x{ratios['time_ratio_dense_over_chunked']:.2f}, "
        f"peak memory x{ratios['memory_ratio_dense_over_chunked']:.2f} "
        f"(memory beyond the data x{ratios['memory_above_data_ratio']:.2f})"
    )

    if args.tune:
        tune = results["tune"]
        print(
            f"\nchunk tuning: {tune['queries']:,} queries over {tune['candidates']:,}, "
            f"k={tune['k']}, best of {tune['rounds']} interleaved rounds"
        )
        print(
            f"{'query_chunk':>12} {'cand_chunk':>11} {'block MiB':>10} {'seconds':>8} "
            f"{'GFLOP/s':>8} {'of peak':>8}"
        )
        for row in sorted(tune["rows"], key=lambda row: row["seconds"]):
            print(
                f"{row['query_chunk']:>12} {row['candidate_chunk']:>11} "
                f"{row['block_mib']:>10.0f} {row['seconds']:>8.2f} {row['gflops']:>8.1f} "
                f"{row['gflops'] / peak:>8.0%}"
            )

    main_row = results["topk"][0]
    speed_ok = main_row["ratio_to_peak"] >= PEAK_TARGET_RATIO
    memory_ok = main_row["peak_gib"] < MEMORY_TARGET_GIB
    print(
        f"\ntargets at k={main_row['k']}: >= {PEAK_TARGET_RATIO:.0%} of peak "
        f"{'met' if speed_ok else 'MISSED'} ({main_row['ratio_to_peak']:.0%}); "
        f"peak memory < {MEMORY_TARGET_GIB:g} GiB {'met' if memory_ok else 'MISSED'} "
        f"({main_row['peak_gib']:.2f} GiB)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
