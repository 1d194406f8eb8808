"""Throughput of ``moon2 augment``, as ratios against baselines measured in the same run:

1. batched generation (with the shared-prompt prefix cache) vs one plain ``generate`` call
   per row (what Data-Juicer did), same model, same rows, same greedy settings: tokens/s;
   batched without the prefix cache is reported too;
2. the Ray Data pipeline vs a plain Python loop over the same engines, one image worker:
   wall time for the same rows (Ray started beforehand, as on a running cluster);
3. two classic image workers vs one on Ray: rows/s, next to the machine's own ceiling for
   the same work: two plain loops in two processes at once (each over half the rows) vs one
   loop over all of them.

    python perf/bench_augment.py               # ~6 minutes on 2 cores
    python perf/bench_augment.py --quick       # a smoke run
    python perf/bench_augment.py --json out.json

The catalog is synthetic (``moon2 synth``), with ``--image-size`` pixel images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from moon2 import progress
from moon2.augment.config import AugmentConfig
from moon2.augment.pipeline import augment


def make_catalog(root: Path, products: int, image_size: int) -> Path:
    from moon2.data.synth.generator import SynthConfig, synth

    synth(SynthConfig(products=products, image_size=image_size, workers=1, seed=3), root)
    return root / "products"


def bench_generation(rows: int, batch_size: int, max_new_tokens: int) -> dict[str, Any]:
    """Tokens/s of the transformers engine: batched vs one row per call (same requests)."""
    import pyarrow.dataset as ds

    from moon2.augment.config import EntityConfig, TextConfig
    from moon2.augment.entities import extract_entities
    from moon2.augment.text import TextRequest, TransformersTextEngine, build_messages

    catalog = Path(tempfile.mkdtemp(prefix="moon2-bench-gen-"))
    try:
        source = make_catalog(catalog, max(rows, 8), 64)
        table = ds.dataset(source).to_table().slice(0, rows).to_pylist()
    finally:
        shutil.rmtree(catalog, ignore_errors=True)
    config = TextConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    engine = TransformersTextEngine(config)
    plain = TransformersTextEngine(config.model_copy(update={"prefix_cache": False}))
    requests = [
        TextRequest(
            build_messages(
                config,
                r["title"],
                extract_entities(r, EntityConfig()),
                r["description"],
                r["category"],
            ),
            key=r["product_id"],
        )
        for r in table
    ]
    tokenizer = engine.tokenizer

    def tokens(texts: list[str]) -> int:
        return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)

    plain.generate(requests[:2])  # warm-up
    started = time.perf_counter()
    batched = engine.generate(requests)
    batched_s = time.perf_counter() - started
    started = time.perf_counter()
    uncached = plain.generate(requests)
    uncached_s = time.perf_counter() - started
    started = time.perf_counter()
    single = [plain.generate([r])[0] for r in requests]
    single_s = time.perf_counter() - started
    same = sum(a == b == c for a, b, c in zip(batched, uncached, single, strict=True))
    result = {
        "rows": rows,
        "batch_size": batch_size,
        "batched_tok_s": tokens(batched) / batched_s,
        "batched_no_prefix_cache_tok_s": tokens(uncached) / uncached_s,
        "one_by_one_tok_s": tokens(single) / single_s,
        "batched_rows_s": rows / batched_s,
        "one_by_one_rows_s": rows / single_s,
        "identical_outputs": f"{same}/{rows}",
    }
    result["speedup"] = result["batched_rows_s"] / result["one_by_one_rows_s"]
    result["speedup_without_prefix_cache"] = single_s / uncached_s
    return result


def _timed(source: Path, config: AugmentConfig, rows: int | None, use_ray: bool) -> float:
    out = Path(tempfile.mkdtemp(prefix="moon2-bench-aug-"))
    try:
        started = time.perf_counter()
        augment(source, out, config, limit=rows, use_ray=use_ray, resume=False)
        return time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _halves(source: Path, rows: int, root: Path) -> list[Path]:
    """The first ``rows`` rows split into two catalogs of half the rows each."""
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(source.glob("*.parquet"))).slice(0, rows)
    halves = []
    for number, (offset, length) in enumerate(((0, rows // 2), (rows // 2, rows - rows // 2))):
        half = root / f"half-{number}"
        half.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(offset, length), half / "part.parquet")
        halves.append(half)
    return halves


def _two_loops(halves: list[Path], config: AugmentConfig) -> float:
    """Wall time of two plain loops running at once in two processes, half the rows each."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(2, initializer=progress.set_quiet, initargs=(True,)) as pool:
        pool.map(time.sleep, [0.5, 0.5])  # both workers up before the clock starts
        started = time.perf_counter()
        pool.starmap(_timed, [(half, config, None, False) for half in halves])
        return time.perf_counter() - started


def bench_pipeline(rows: int, image_size: int, repeats: int) -> dict[str, Any]:
    import ray

    root = Path(tempfile.mkdtemp(prefix="moon2-bench-cat-"))
    try:
        source = make_catalog(root, rows, image_size)
        halves = _halves(source, rows, root / "halves")
        config = AugmentConfig(rows_per_part=16)
        config.text.engine = "none"  # the image engine is the work; titles by the rule rewrite
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one = config.model_copy(deep=True)
        one.ray.image_workers = 1
        two = config.model_copy(deep=True)
        two.ray.image_workers = 2
        _timed(source, one, min(rows, 32), True)  # warm Ray workers
        loop_s, ray1_s, ray2_s, pair_s = [], [], [], []
        for _ in range(repeats):  # interleaved, so load changes hit all four alike
            loop_s.append(_timed(source, one, rows, False))
            ray1_s.append(_timed(source, one, rows, True))
            ray2_s.append(_timed(source, two, rows, True))
            pair_s.append(_two_loops(halves, one))
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    loop, ray1, ray2, pair = min(loop_s), min(ray1_s), min(ray2_s), min(pair_s)
    return {
        "rows": rows,
        "image_size": image_size,
        "loop_rows_s": rows / loop,
        "ray_1_worker_rows_s": rows / ray1,
        "ray_2_workers_rows_s": rows / ray2,
        "ray_overhead_vs_loop": ray1 / loop - 1,
        "two_vs_one_worker": ray1 / ray2,
        "two_loops_rows_s": rows / pair,
        "machine_two_process_ceiling": loop / pair,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes (a smoke run).")
    parser.add_argument("--rows", type=int, default=256, help="Rows for the pipeline runs.")
    parser.add_argument("--image-size", type=int, default=384, help="Catalog image side.")
    parser.add_argument("--gen-rows", type=int, default=32, help="Rows for generation.")
    parser.add_argument("--batch-size", type=int, default=32, help="Generation batch.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per variant.")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.image_size, args.gen_rows, args.batch_size = 48, 128, 8, 8
        args.repeats = 1
    progress.set_quiet(True)
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    if not args.skip_generation:
        results["generation"] = bench_generation(args.gen_rows, args.batch_size, 40)
        g = results["generation"]
        print(
            f"generation, {g['rows']} rows: batched (batch {g['batch_size']}) "
            f"{g['batched_tok_s']:.1f} tok/s vs one by one {g['one_by_one_tok_s']:.1f} tok/s: "
            f"{g['speedup']:.2f}x (batched without the prefix cache "
            f"{g['batched_no_prefix_cache_tok_s']:.1f} tok/s, "
            f"{g['speedup_without_prefix_cache']:.2f}x; identical outputs "
            f"{g['identical_outputs']})"
        )
    if args.skip_pipeline:
        return _finish(results, args.json)
    results["pipeline"] = bench_pipeline(args.rows, args.image_size, args.repeats)
    p = results["pipeline"]
    print(
        f"pipeline, {p['rows']} rows at {p['image_size']} px (classic engine): loop "
        f"{p['loop_rows_s']:.2f} rows/s, Ray 1 worker {p['ray_1_worker_rows_s']:.2f} rows/s "
        f"(overhead {100 * p['ray_overhead_vs_loop']:+.1f}%), Ray 2 workers "
        f"{p['ray_2_workers_rows_s']:.2f} rows/s ({p['two_vs_one_worker']:.2f}x of 1 worker); "
        f"two plain loops in two processes {p['two_loops_rows_s']:.2f} rows/s "
        f"({p['machine_two_process_ceiling']:.2f}x of one loop: this machine's ceiling)"
    )
    return _finish(results, args.json)


def _finish(results: dict[str, Any], path: Path | None) -> int:
    if path is not None:
        path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
