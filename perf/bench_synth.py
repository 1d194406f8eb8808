"""Throughput of `moon2 synth`, reported as ratios against a baseline measured in the same run.

Baseline: the same generator with one worker process on the first ``--sample`` products.
Measured: the full ``--products`` catalog with every core. The script prints both rates, the
parallel speed-up, and the wall time of the full run (the README's "10,000 products at 128 px"
figure comes from the default invocation):

    python perf/bench_synth.py                      # 10,000 products, 128 px
    python perf/bench_synth.py --products 2000 --image-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from moon2 import progress
from moon2.data.synth.generator import SynthConfig, synth


def timed_synth(config: SynthConfig, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    synth(config, out)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--sample", type=int, default=1_000, help="products in the baseline run")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--queries-per-product", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=0, help="0 = one per core")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    progress.set_quiet(True)

    base = dict(
        image_size=args.image_size, queries_per_product=args.queries_per_product, noise=0.1, seed=0
    )
    with tempfile.TemporaryDirectory(prefix="moon2-bench-") as tmp:
        root = Path(tmp)
        baseline = SynthConfig(products=args.sample, workers=1, rows_per_part=250, **base)
        baseline_seconds = timed_synth(baseline, root / "baseline")
        full = SynthConfig(products=args.products, workers=args.workers, **base)
        full_seconds = timed_synth(full, root / "full")
        size_mb = sum(f.stat().st_size for f in (root / "full").rglob("*.parquet")) / 1e6

    rows_per_product = 1 + args.queries_per_product
    baseline_rate = args.sample * rows_per_product / baseline_seconds
    full_rate = args.products * rows_per_product / full_seconds
    workers = args.workers or min(os.cpu_count() or 1, 8)
    results = {
        "products": args.products,
        "image_size": args.image_size,
        "cpus": os.cpu_count(),
        "workers": workers,
        "baseline_1_worker_rows_per_s": round(baseline_rate, 1),
        "full_rows_per_s": round(full_rate, 1),
        "speedup_vs_1_worker": round(full_rate / baseline_rate, 2),
        "full_seconds": round(full_seconds, 1),
        "output_mb": round(size_mb, 1),
    }
    print(f"baseline  1 worker, {args.sample:>6,} products: {baseline_rate:8.1f} rows/s")
    print(
        f"full     {workers:>2} workers, {args.products:>6,} products: {full_rate:8.1f} rows/s "
        f"(x{results['speedup_vs_1_worker']} vs baseline)"
    )
    print(
        f"wall time for {args.products:,} products + queries at {args.image_size} px: "
        f"{full_seconds:.1f} s, {size_mb:.0f} MB of Parquet"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
