"""Training throughput of ``moon2 train``: samples/s, FLOP/s against this machine's fp32 matmul
peak, MoE vs dense at equal active parameters, score-table bookkeeping, length-bucketed vs one
padded forward, multimodal RoPE positions vectorised vs transformers' row loop, the vision
tower once per distinct photo vs in every backbone call, vision attention grouped by image
size vs one call per image, photos ordered by size vs batch order, quick GELU as one SiLU vs
transformers' three passes, the data worker with and without its decoded-photo cache, DDP 2
vs 1 process.

Everything is measured in one run on the same batches, and reported as ratios against a
baseline measured in that run (the development machine is shared and noisy):

    python perf/bench_train.py                  # ~5 minutes on 2 cores
    python perf/bench_train.py --quick          # a smoke run
    python perf/bench_train.py --data BENCH/train --json out.json

Step times are the median over ``--steps`` timed steps after ``--warmup`` untimed ones; FLOPs
per step come from ``torch.utils.flop_counter`` (forward + backward of one step).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """Best fp32 matmul GFLOP/s of this process (same threads as the training steps)."""
    a, b, out = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    with torch.inference_mode():
        torch.matmul(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def _synthetic_data(root: Path, products: int) -> Path:
    from moon2 import progress
    from moon2.data.synth.generator import SynthConfig, synth

    progress.set_quiet(True)
    synth(SynthConfig(products=products, queries_per_product=2.0, workers=1), root)
    return root


class Harness:
    """One model + objective + optimizer and pre-collated batches, timed step by step."""

    def __init__(self, data: Path, config: Any, batches: int, dense_equal_active: bool) -> None:
        from moon2.curate.dynamic import FilterPolicy
        from moon2.train.data import Collator, TripletDataset, build_index, prepare_stores
        from moon2.train.model import Moon2Model, build_backbone
        from moon2.train.objective import Objective
        from moon2.train.trainer import make_optimizer

        torch.manual_seed(0)
        cache = Path(tempfile.mkdtemp(prefix="moon2-bench-cache-"))
        products, queries = prepare_stores(data, cache)
        index = build_index(products, queries)
        self.stores = (products, queries, index)
        self.config = config
        self.dataset = TripletDataset(products, queries, index, config.data, config.seed)
        backbone, processor = build_backbone(config.model, config.seed)
        if dense_equal_active:
            _widen_mlps(backbone, config)
        model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
        self.objective = Objective(model, config)
        self.optimizer = make_optimizer(
            list(self.objective.parameters()), config.optim, torch.device("cpu")
        )
        self.policy = FilterPolicy(config.filter)
        self.collator = collator = Collator(
            processor,
            config.model,
            intra=config.loss.intra,
            intra_products=config.loss.intra_products,
        )
        size = config.optim.batch_size
        self.batches = [
            collator([self.dataset[i] for i in range(b * size, (b + 1) * size)])
            for b in range(batches)
        ]
        self.batch_size = size
        self.parameters_total = sum(p.numel() for p in self.objective.parameters())

    def step(self, batch: Any) -> Any:
        result = self.objective(batch, 0.5, 1, self.policy)
        self.optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.objective.parameters(), 1.0)
        self.optimizer.step()
        return result

    def step_seconds(self, steps: int, warmup: int) -> float:
        for i in range(warmup):
            self.step(self.batches[i % len(self.batches)])
        times = []
        for i in range(steps):
            started = time.perf_counter()
            self.step(self.batches[i % len(self.batches)])
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def data_seconds(self, batches: int, cache_mb: int, pixel_cache_mb: int = 0) -> float:
        """Data-worker time per batch (samples + collate) as the trainer's dataset does it, in a
        third epoch (so the caches are warm: a processed photo is kept when seen twice), with
        ``cache_mb`` of decoded photos and ``pixel_cache_mb`` of processed ones."""
        from moon2.train.data import Collator, TripletDataset

        config = self.config
        data_config = config.data.model_copy(update={"image_cache_mb": cache_mb})
        dataset = TripletDataset(
            *self.stores,
            data_config,
            config.seed,
            intra_products=config.loss.intra_products if config.loss.intra else "none",
        )
        collator = Collator(
            self.collator.processor,
            config.model,
            intra=config.loss.intra,
            intra_products=config.loss.intra_products,
            pixel_cache_mb=pixel_cache_mb,
        )
        size = self.batch_size
        positions = [range(b * size, (b + 1) * size) for b in range(batches)]
        for epoch in (0, 1):  # fill the caches
            for batch in positions:
                collator([dataset[(epoch, i)] for i in batch])
        started = time.perf_counter()
        for batch in positions:
            collator([dataset[(2, i)] for i in batch])
        return (time.perf_counter() - started) / batches

    def flops_per_step(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            result = self.objective(self.batches[0], 0.5, 1, self.policy)
            result.loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def bookkeeping_seconds(self, steps: int) -> float:
        """Per-step time of the score table: margins, phi/weights, score rows, epoch write."""
        from moon2.train.trainer import _finish_epoch, _score_rows

        out = Path(tempfile.mkdtemp(prefix="moon2-bench-scores-"))
        total = 0.0
        rows = []
        for i in range(steps):
            batch = self.batches[i % len(self.batches)]
            with torch.no_grad():
                result = self.objective(batch, 0.5, 1, self.policy)
            started = time.perf_counter()
            # the margins: recomputed exactly as the objective does for one view's scores
            scores = torch.randn(len(batch.positions), len(batch.candidate_ids))
            positive = torch.tensor([batch.positive_col[r] for r in range(len(batch.positions))])
            allowed = torch.ones_like(scores, dtype=torch.bool)
            margins = self.objective._margins(
                batch, list(range(len(batch.positions))), scores, positive, allowed, 0
            )
            self.policy.weights(margins, 0.5)
            rows.append(_score_rows(result, self.dataset, 0, kept=True))
            total += time.perf_counter() - started
        started = time.perf_counter()
        _finish_epoch(out, 0, rows, is_main=True)
        total += time.perf_counter() - started
        return total / steps


def _widen_mlps(backbone: Any, config: Any) -> None:
    """Dense baseline at equal active parameters: the layers that would hold the MoE get an
    FFN ``top_k`` times as wide (a token then runs as many FFN weights as under top-k MoE)."""
    from moon2.train.model import decoder_layers, select_layers

    layers = decoder_layers(backbone)
    for index in select_layers(config.moe.layers, len(layers)):
        mlp = layers[index].mlp
        text_config = backbone.config.get_text_config()
        wide = text_config.__class__(**text_config.to_dict())
        wide.intermediate_size = text_config.intermediate_size * config.moe.top_k
        layers[index].mlp = type(mlp)(wide)


def measure_single(data: Path, args: argparse.Namespace) -> dict[str, Any]:
    from moon2.train.config import TrainConfig
    from moon2.train.model import use_grouped_vision_attention

    config = TrainConfig()
    moe = Harness(data, config, args.batches, dense_equal_active=False)
    dense_config = config.model_copy(
        update={"moe": config.moe.model_copy(update={"enabled": False})}
    )
    dense = Harness(data, dense_config, args.batches, dense_equal_active=True)
    peak = matmul_peak()
    moe_s = moe.step_seconds(args.steps, args.warmup)
    dense_s = dense.step_seconds(args.steps, args.warmup)
    peak = max(peak, matmul_peak())  # best of before and after, like the steps
    model_config = moe.objective.model.model_config
    buckets = model_config.length_buckets
    model_config.length_buckets = 1
    one_call_s = moe.step_seconds(args.steps, args.warmup)
    model_config.length_buckets = buckets
    model = moe.objective.model
    model.mrope = False  # transformers' get_rope_index, row by row, in every call
    rope_index_s = moe.step_seconds(args.steps, args.warmup)
    model.mrope = True
    model._takes_features = False  # the backbone runs its vision tower per call, every slot
    per_call_vision_s = moe.step_seconds(args.steps, args.warmup)
    model._takes_features = None
    turned = [
        m
        for m in model.backbone.modules()
        if type(m).__name__ == "VisionAttention" and "forward" in vars(m)
    ]
    for module in turned:  # transformers' own attention: one SDPA call per image
        del module.forward
    per_image_attention_s = moe.step_seconds(args.steps, args.warmup)
    use_grouped_vision_attention(model.backbone)
    from moon2.train import model as model_module

    # each bucket's backbone call does its own token-embedding lookup
    with mock.patch.object(
        model_module, "one_token_lookup", lambda embedding, input_ids: contextlib.nullcontext()
    ):
        per_call_lookup_s = moe.step_seconds(args.steps, args.warmup)
    # photos in batch order: a grouped attention call per run of equal sizes, not per size
    with mock.patch.object(model_module, "vision_order", lambda first, patches: sorted(set(first))):
        batch_order_s = moe.step_seconds(args.steps, args.warmup)
    from transformers.activations import QuickGELUActivation

    swapped = [
        (parent, name)
        for parent in model.backbone.modules()
        for name, child in parent.named_children()
        if type(child) is model_module.SiLUQuickGELU
    ]
    for parent, name in swapped:  # transformers' x * sigmoid(1.702 x)
        setattr(parent, name, QuickGELUActivation())
    quick_gelu_s = moe.step_seconds(args.steps, args.warmup)
    model_module.use_silu_quick_gelu(model.backbone)
    flops = moe.flops_per_step()
    bookkeeping = moe.bookkeeping_seconds(args.steps)
    data_cold = moe.data_seconds(args.batches, cache_mb=0)
    data_cached = moe.data_seconds(args.batches, cache_mb=config.data.image_cache_mb)
    data_pixels = moe.data_seconds(
        args.batches, cache_mb=config.data.image_cache_mb, pixel_cache_mb=config.data.pixel_cache_mb
    )
    from moon2.train import inputs as inputs_module

    # the processor's row loop
    with mock.patch.object(inputs_module, "_returns_token_types", lambda processor: False):
        data_processor_types = moe.data_seconds(
            args.batches,
            cache_mb=config.data.image_cache_mb,
            pixel_cache_mb=config.data.pixel_cache_mb,
        )
    return {
        "threads": torch.get_num_threads(),
        "batch_size": moe.batch_size,
        "parameters": moe.parameters_total,
        "matmul_peak_gflops": round(peak, 1),
        "moe_step_s": round(moe_s, 4),
        "dense_equal_active_step_s": round(dense_s, 4),
        "samples_per_s": round(moe.batch_size / moe_s, 2),
        "gflops_per_step": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / moe_s / 1e9, 2),
        "achieved_vs_peak": round(flops / moe_s / 1e9 / peak, 4),
        "moe_overhead_vs_dense": round(moe_s / dense_s - 1, 4),
        "bookkeeping_s_per_step": round(bookkeeping, 5),
        "bookkeeping_overhead": round(bookkeeping / moe_s, 4),
        "one_call_step_s": round(one_call_s, 4),
        "length_buckets_speedup": round(one_call_s / moe_s, 3),
        "data_s_per_batch_no_cache": round(data_cold, 4),
        "data_s_per_batch_cached": round(data_cached, 4),
        "photo_cache_speedup": round(data_cold / data_cached, 3),
        "data_s_per_batch_pixel_cached": round(data_pixels, 4),
        "pixel_cache_speedup": round(data_cached / data_pixels, 3),
        "vectorised_token_types_speedup": round(data_processor_types / data_pixels, 3),
        "rope_index_step_s": round(rope_index_s, 4),
        "vectorised_mrope_speedup": round(rope_index_s / moe_s, 3),
        "per_call_vision_step_s": round(per_call_vision_s, 4),
        "shared_vision_speedup": round(per_call_vision_s / moe_s, 3),
        "per_image_attention_step_s": round(per_image_attention_s, 4),
        "grouped_vision_attention_speedup": round(per_image_attention_s / moe_s, 3),
        "per_call_lookup_step_s": round(per_call_lookup_s, 4),
        "one_token_lookup_speedup": round(per_call_lookup_s / moe_s, 3),
        "batch_order_vision_step_s": round(batch_order_s, 4),
        "size_ordered_vision_speedup": round(batch_order_s / moe_s, 3),
        "quick_gelu_step_s": round(quick_gelu_s, 4),
        "silu_quick_gelu_speedup": round(quick_gelu_s / moe_s, 3),
    }


def measure_ddp(data: Path, steps: int) -> dict[str, Any]:
    """Global samples/s of the real trainer: 1 process (all cores) vs 2 DDP processes."""
    from moon2.train.config import TrainConfig

    results = {}
    with tempfile.TemporaryDirectory(prefix="moon2-bench-ddp-") as temp:
        root = Path(temp)
        for world in (1, 2):
            per_process = 16 // world  # the same global batch
            config = TrainConfig.model_validate(
                {
                    "optim": {"batch_size": per_process, "max_steps": steps, "epochs": 1},
                    "log_every": 1,
                    "data": {"num_workers": 0},
                }
            )
            path = root / f"config-{world}.yaml"
            config.to_yaml(path)
            out = root / f"run-{world}"
            command = [
                sys.executable,
                "-m",
                "moon2.cli",
                "train",
                str(data),
                str(out),
                "--config",
                str(path),
            ]
            env = dict(os.environ)
            if world > 1:
                command[1:3] = [
                    "-m",
                    "torch.distributed.run",
                    "--nproc_per_node",
                    str(world),
                    "--standalone",
                    "-m",
                    "moon2.cli",
                ]
                env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // world))
            completed = subprocess.run(command, env=env, capture_output=True, text=True)
            if completed.returncode != 0:
                raise SystemExit(f"DDP run ({world}) failed:\n{completed.stderr[-3000:]}")
            records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            rates = [r["samples_per_s"] for r in records[2:]] or [records[-1]["samples_per_s"]]
            results[world] = statistics.median(rates)
    return {
        "ddp_samples_per_s": {str(k): round(v, 2) for k, v in results.items()},
        "ddp_2_vs_1": round(results[2] / results[1], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="products/ + queries/ (default: synthetic)")
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--ddp-steps", type=int, default=12)
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a few steps only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batches, args.ddp_steps = 4, 1, 2, 4
    with tempfile.TemporaryDirectory(prefix="moon2-bench-data-") as temp:
        data = args.data or _synthetic_data(Path(temp) / "catalog", args.products)
        result = measure_single(data, args)
        if not args.no_ddp:
            result.update(measure_ddp(data, args.ddp_steps))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
