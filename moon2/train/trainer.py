"""``moon2 train``: one training function for a single process, torchrun DDP and Ray Train.

Outputs under OUT::

    train_config.yaml            the resolved config
    metrics.jsonl                loss parts, omega_m, routing usage, lr, throughput per log step
    scores/epoch-NNN.parquet     sample_id, epoch, loss, margin, phi, weight, kept (+ position)
    checkpoints/step-NNNNNNN/    resumable state (see checkpoint.py); --resume continues it
                                 only on the same data and config (see resume.py)
    final/                       the trained model (moon2.load_model / moon2 eval / moon2 embed)
    filter_report.json           noise detection of the dynamic filter (when truth_* exists)
    _rejects/queries/            queries that could not be trained on, with the reason
    train_summary.json           counts, timings and ``mechanisms``: what each switch of the
                                 ablation grid did (filter: samples down-weighted / pruned per
                                 epoch; intra loss and MoE: forward passes they ran in; co-
                                 augmentation: candidates that carried aug_*), summed over
                                 processes

The process group comes from the environment (torchrun) or from Ray Train; gloo on CPU, NCCL
on GPU. Rank 0 writes every file; all ranks compute the same filter decisions from the
gathered score table.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import torch
import torch.distributed as dist

from moon2 import progress
from moon2.bench.config import SplitConfig
from moon2.curate.dynamic import FilterPolicy, detection_report
from moon2.data.io import PartWriter, atomic_path
from moon2.data.outdir import check_output, claim_output
from moon2.data.schema import rejects_schema
from moon2.errors import InputError, Moon2Error
from moon2.models.base import check_device
from moon2.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from moon2.train.config import OptimConfig, TrainConfig
from moon2.train.data import (
    ArrowStore,
    Batch,
    Collator,
    TripletDataset,
    build_index,
    prepare_duplicate_groups,
    prepare_stores,
)
from moon2.train.model import Moon2Model, build_backbone, save_model
from moon2.train.objective import Objective
from moon2.train.resume import check_resume, run_plan

STAGE = "train"
SCORE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("epoch", pa.int32()),
        pa.field("position", pa.int64()),
        pa.field("loss", pa.float32()),
        pa.field("margin", pa.float32()),
        pa.field("phi", pa.float32()),
        pa.field("weight", pa.float32()),
        pa.field("kept", pa.bool_()),
    ]
)


@dataclass
class TrainResult:
    out_dir: Path
    final_dir: Path
    steps: int
    epochs: int
    seconds: float
    summary: dict[str, Any]


@dataclass
class Mechanisms:
    """What the switchable mechanisms did, counted by each process over its training forward
    passes; :meth:`summed` adds up every process's (checkpoints and train_summary.json keep
    the run's totals). The dynamic filter's effect is read from the score tables instead."""

    steps: int = 0
    """training forward passes"""
    intra_steps: int = 0
    """... with a non-zero intra-product term"""
    moe_steps: int = 0
    """... in which MoE layers routed tokens"""
    candidates: int = 0
    """candidate inputs encoded (each step's distinct products)"""
    aug_title_candidates: int = 0
    """... that carried their aug_title"""
    aug_image_candidates: int = 0
    """... that carried at least one of their aug_images"""

    def add(self, batch: Batch, result: Any) -> None:
        self.steps += 1
        self.intra_steps += int(result.intra_ran)
        self.moe_steps += int(result.routed)
        self.candidates += len(batch.candidate_ids)
        self.aug_title_candidates += batch.aug_title_candidates
        self.aug_image_candidates += batch.aug_image_candidates

    def __add__(self, other: Mechanisms) -> Mechanisms:
        return Mechanisms(**{k: v + getattr(other, k) for k, v in self.as_dict().items()})

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summed(self) -> Mechanisms:
        """The totals over every process (a collective: every rank calls it)."""
        total = Mechanisms()
        for part in _gather_objects(self):
            total = total + part
        return total


# --- process setup ----------------------------------------------------------------------


def _setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    if config.device != "auto":
        check_device(config.device)  # before the process group: every rank refuses alike
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _every_rank_has_samples(count: int, device: torch.device) -> bool:
    """Whether every process's batch kept samples (``count`` here) after runtime rejects (a
    collective): a step runs on all processes or on none, since its forward and backward
    hold collectives every rank must issue; a skipped step's samples get no score."""
    if not dist.is_initialized():
        return count > 0
    fewest = torch.tensor([count], device=device)
    dist.all_reduce(fewest, op=dist.ReduceOp.MIN)
    return bool(fewest.item() > 0)


def _duplicate_groups(config: TrainConfig, products: ArrowStore, cache: Path) -> np.ndarray | None:
    """Each products row's duplicate group by build-bench's default rule (None when
    ``loss.mask_duplicates`` is off: only copies of one product_id are kept apart)."""
    if not config.loss.mask_duplicates:
        return None
    rule = SplitConfig()
    return prepare_duplicate_groups(
        products, cache, rule.min_title_tokens, rule.max_duplicate_group
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device, dtype: str) -> Any:
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return torch.autocast(device_type=device.type, enabled=False)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=torch_dtype)


def _schedule(warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        remaining = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / remaining)))

    return factor


class _EpochBatches(torch.utils.data.Sampler):
    """The current epoch's batches of ``(epoch, position)`` keys: one DataLoader serves every
    epoch, so its workers (and their decoded-photo caches) persist."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _epoch_batches(
    size: int, epoch: int, seed: int, dropped: set[int], batch_size: int, rank: int, world: int
) -> list[list[int]]:
    """This rank's batches of sample positions for ``epoch`` (same order on every run)."""
    order = np.random.default_rng([seed, epoch, 0xDA7A]).permutation(size)
    order = [int(p) for p in order if int(p) not in dropped]
    per_step = batch_size * world
    steps = len(order) // per_step
    batches = []
    for step in range(steps):
        chunk = order[step * per_step : (step + 1) * per_step]
        batches.append(chunk[rank::world])
    return batches


def make_optimizer(
    parameters: list[torch.nn.Parameter],
    optim: OptimConfig,
    device: torch.device,
    wstar: torch.nn.Parameter | None = None,
    wstar_lr: float | None = None,
) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, norms, temperatures); ``wstar``
    (the expert x objective matrix W*), when among ``parameters``, in a group of its own named
    "wstar" at ``wstar_lr`` (moe.wstar_lr), without weight decay."""
    own = [p for p in parameters if p is wstar]
    rest = [p for p in parameters if p is not wstar]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    if own:
        lr = optim.lr if wstar_lr is None else wstar_lr
        groups.append({"params": own, "lr": lr, "weight_decay": 0.0, "name": "wstar"})
    return torch.optim.AdamW(
        groups,
        lr=optim.lr,
        # one fused kernel instead of a loop over tensors: on CPU the loop took 13% of the
        # tiny model's update time, fused 2% (the 6.3M-parameter token embedding dominates)
        fused=device.type in ("cpu", "cuda"),
    )


def _gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _apply_lora(model: Moon2Model, config: TrainConfig) -> None:
    if not config.model.lora.enabled:
        return
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("model.lora.enabled needs peft: pip install peft") from None
    lora = config.model.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    inject_adapter_in_model(peft_config, model.backbone)
    for name, parameter in model.backbone.named_parameters():
        is_moe = ".experts." in name or ".router." in name
        parameter.requires_grad = "lora_" in name or is_moe
    if model.projection is not None:
        model.projection.requires_grad_(True)


def _merge_lora(model: Moon2Model) -> None:
    """Fold LoRA deltas into the base weights so the final model needs no peft."""
    from peft.tuners.lora import LoraLayer

    for module in list(model.backbone.modules()):
        if isinstance(module, LoraLayer):
            module.merge()
    # replace LoRA wrappers by their merged base layers
    for parent in list(model.backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer) and hasattr(child, "base_layer"):
                setattr(parent, name, child.base_layer)


# --- the loop -----------------------------------------------------------------------------


# recognises a run folder from before output markers, so that it still resumes
LEGACY_OUTPUT = (("train_config.yaml", "moon2 train"),)


def train(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    resume: bool = False,
    claim: bool = True,
) -> TrainResult:
    """Train a MOON2.0 model on DATA (products/ + queries/) into OUT.

    OUT must be new, empty or a folder moon2 train wrote (see :mod:`moon2.data.outdir`); the
    main process holds its lock until training ends. ``claim=False``: the caller holds it
    already (the Ray driver, whose workers run this)."""
    data = Path(data_dir)
    out = Path(out_dir)
    rank, world, device = _setup_distributed(config)
    # every rank checks (read only), so all refuse alike; before train_config.yaml is rewritten
    check_output(out, STAGE, inputs=[data], legacy=LEGACY_OUTPUT)
    plan = run_plan(data, config)
    check_resume(out, plan, resume)
    _barrier()  # no rank may see OUT half-claimed (its lock written, not yet its marker)
    with _claim_on_main(out, data, rank, claim):
        return _train(data, out, config, resume, plan, rank, world, device)


@contextlib.contextmanager
def _claim_on_main(out: Path, data: Path, rank: int, claim: bool) -> Iterator[None]:
    """The main process claims OUT; every process learns whether it could, so that all raise
    the same error rather than the others waiting for it at the next collective."""
    with contextlib.ExitStack() as stack:
        error: str | None = None
        if rank == 0 and claim:
            try:
                stack.enter_context(
                    claim_output(out, STAGE, inputs=[data], legacy=LEGACY_OUTPUT)
                )
            except Moon2Error as exc:
                error = str(exc)
        if dist.is_initialized():
            shared = [error]
            dist.broadcast_object_list(shared, src=0)
            error = shared[0]
        if error is not None:
            raise InputError(error)
        yield


def _train(
    data: Path,
    out: Path,
    config: TrainConfig,
    resume: bool,
    plan: dict[str, Any],
    rank: int,
    world: int,
    device: torch.device,
) -> TrainResult:
    started = time.perf_counter()
    is_main = rank == 0
    _seed_everything(config.seed)
    if is_main:
        config.to_yaml(out / "train_config.yaml", "moon2 train: resolved config of this run")
        _duplicate_groups(config, prepare_stores(data, out / "cache")[0], out / "cache")
    _barrier()
    products, queries = prepare_stores(data, out / "cache")
    duplicate_groups = _duplicate_groups(config, products, out / "cache")
    index = build_index(products, queries)
    if len(index.query_rows) < config.optim.batch_size * world:
        raise InputError(
            f"{data}: {len(index.query_rows)} usable queries, fewer than one global batch "
            f"({config.optim.batch_size} x {world} processes)"
        )
    dataset = TripletDataset(
        products,
        queries,
        index,
        config.data,
        config.seed,
        intra_products=config.loss.intra_products if config.loss.intra else "none",
        duplicate_groups=duplicate_groups,
    )

    backbone, processor = build_backbone(config.model, config.seed)
    model = Moon2Model.with_processor(backbone, processor, config.model, config.moe)
    if config.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    _apply_lora(model, config)
    if config.model.freeze_token_embeddings:
        backbone.get_input_embeddings().weight.requires_grad_(False)
    objective = Objective(model, config).to(device)
    wrapped: torch.nn.Module = objective
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # experts that no token chose in a step
        )
    parameters = [p for p in objective.parameters() if p.requires_grad]
    wstar = objective.mixer.weight if objective.mixer is not None else None
    optimizer = make_optimizer(
        parameters, config.optim, device, wstar=wstar, wstar_lr=config.moe.wstar_lr
    )
    total_updates = config.optim.planned_updates(len(index.query_rows), world)
    warmup = int(config.optim.warmup_ratio * total_updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(warmup, total_updates))
    policy = FilterPolicy(config.filter)
    if is_main:
        _warn_idle_filter(policy, total_updates)
    counters = Mechanisms()

    start_epoch, skip_batches, update = 0, 0, 0
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, objective, optimizer, scheduler, device)
        start_epoch, skip_batches, update = state["epoch"], state["batch"], state["update"]
        policy.load_state_dict(state["filter"])
        if is_main:  # the run's totals so far; the other ranks count from here on
            counters = Mechanisms(**state.get("mechanisms", {}))
        if is_main:
            progress.info(f"resuming from {checkpoint.name} (epoch {start_epoch}, update {update})")
    collator = Collator(
        processor,
        config.model,
        intra=config.loss.intra,
        intra_products=config.loss.intra_products,
        pixel_cache_mb=config.data.pixel_cache_mb,
    )
    metrics_path = out / "metrics.jsonl"
    if is_main and metrics_path.exists():
        _truncate_metrics(metrics_path, update)
    runtime_rejects: dict[str, str] = {}
    seen_samples = 0
    window_start = time.perf_counter()
    window_samples = 0
    accumulated = 0  # micro-batches of the current accumulation window that ran
    done = False
    sampler = _EpochBatches()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=config.data.num_workers,
        persistent_workers=config.data.num_workers > 0,
    )
    with progress.task("training", total_updates) as bar:
        bar.advance(update)
        for epoch in range(start_epoch, config.optim.epochs):
            dataset.epoch = epoch
            batches = _epoch_batches(
                len(dataset),
                epoch,
                config.seed,
                policy.dropped,
                config.optim.batch_size,
                rank,
                world,
            )
            first = skip_batches if epoch == start_epoch else 0
            scores = _load_partial_scores(out, epoch) if first else []
            sampler.batches = [[(epoch, p) for p in batch] for batch in batches[first:]]
            wrapped.train()
            for batch_index, batch in enumerate(loader, start=first):
                fraction = update / max(1, total_updates)
                if policy.wants_cut(fraction):  # the same batch on every rank
                    policy.set_cut(_epoch_losses(scores))
                for query_id, reason in batch.rejected:
                    runtime_rejects.setdefault(query_id, reason)
                if _every_rank_has_samples(len(batch.positions), device):
                    batch = batch.to(device)
                    with _autocast(device, config.model.dtype):
                        result = wrapped(batch, fraction, epoch, policy)
                    (result.loss / config.optim.grad_accum).backward()
                    scores.append(_score_rows(result, dataset, epoch, kept=True))
                    counters.add(batch, result)
                    seen_samples += len(batch.positions)
                    window_samples += len(batch.positions) * world
                    accumulated += 1
                # a skipped micro-batch still closes its accumulation window, so one update
                # never sums two windows; a window whose every micro-batch was skipped
                # makes no update (the same on every rank: the skip is agreed)
                if (batch_index + 1) % config.optim.grad_accum or not accumulated:
                    continue
                accumulated = 0
                torch.nn.utils.clip_grad_norm_(parameters, config.optim.clip_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                update += 1
                bar.advance(1)
                if is_main and update % config.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    _log(
                        metrics_path,
                        update,
                        epoch,
                        result,
                        scheduler,
                        window_samples / elapsed,
                        batch.images_failed,
                    )
                    window_start, window_samples = time.perf_counter(), 0
                if update % config.checkpoint.every_steps == 0 and update < total_updates:
                    _save_partial_scores(out, epoch, scores, is_main)
                    totals = counters.summed()
                    if is_main:
                        save_checkpoint(
                            out / "checkpoints",
                            update,
                            objective,
                            optimizer,
                            scheduler,
                            {
                                "epoch": epoch,
                                "batch": batch_index + 1,
                                "update": update,
                                "filter": policy.state_dict(),
                                "mechanisms": totals.as_dict(),
                            },
                            config.checkpoint.keep,
                            plan,
                        )
                    _barrier()
                if update >= total_updates:
                    done = True
                    break
            scores += _rescore_dropped(
                wrapped,
                objective,
                dataset,
                collator,
                policy,
                epoch,
                config,
                device,
                rank,
                world,
                update / max(1, total_updates),
            )
            table = _finish_epoch(out, epoch, scores, is_main)
            policy.end_epoch(table, update / max(1, total_updates))
            if done:
                break
            totals = counters.summed() if update % config.checkpoint.every_steps else None
            if is_main and totals is not None:
                save_checkpoint(
                    out / "checkpoints",
                    update,
                    objective,
                    optimizer,
                    scheduler,
                    {
                        "epoch": epoch + 1,
                        "batch": 0,
                        "update": update,
                        "filter": policy.state_dict(),
                        "mechanisms": totals.as_dict(),
                    },
                    config.checkpoint.keep,
                    plan,
                )
            _barrier()

    all_rejects = {}
    totals = Mechanisms()
    for rejects, counted in _gather_objects((runtime_rejects, counters)):
        all_rejects.update(rejects)
        totals = totals + counted
    summary: dict[str, Any] = {}
    final = out / "final"
    if is_main:
        if config.model.lora.enabled:
            _merge_lora(model)
        save_model(model, processor, final, max_images=config.data.max_images)
        _write_rejects(out, queries, index, all_rejects)
        report = _filter_report(out, data, config)
        seconds = time.perf_counter() - started
        summary = {
            "updates": update,
            "epochs_completed": config.optim.epochs if not done else epoch + 1,
            "samples_seen_per_process": seen_samples,
            "world_size": world,
            "queries_used": len(index.query_rows),
            "queries_rejected": len(index.rejected) + len(all_rejects),
            "negatives_not_in_products": index.negatives_unknown,
            "seconds": round(seconds, 1),
            "filter_policy": policy.name,
            "filter_report": report,
            "mechanisms": _mechanisms(out, config, policy, totals, total_updates),
            "final": str(final),
        }
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _barrier()
    return TrainResult(
        out, final, update, config.optim.epochs, time.perf_counter() - started, summary
    )


def _score_rows(result: Any, dataset: TripletDataset, epoch: int, kept: bool) -> dict[str, list]:
    positions = list(result.positions)
    return {
        "sample_id": [dataset.index.query_ids[p] for p in positions],
        "epoch": [epoch] * len(positions),
        "position": positions,
        "loss": result.sample_loss.float().cpu().tolist(),
        "margin": result.margin.float().cpu().tolist(),
        "phi": result.phi.float().cpu().tolist(),
        "weight": result.weight.float().cpu().tolist(),
        "kept": [kept] * len(positions),
    }


@torch.no_grad()
def _rescore_dropped(
    wrapped: torch.nn.Module,
    objective: Objective,
    dataset: TripletDataset,
    collator: Collator,
    policy: FilterPolicy,
    epoch: int,
    config: TrainConfig,
    device: torch.device,
    rank: int,
    world: int,
    fraction: float,
) -> list[dict[str, list]]:
    """Score the samples that sat out this epoch, so they can come back next epoch.

    Each forward holds collectives, so every rank makes the same number of calls
    (:func:`_rescore_calls`), each on at least two samples (:func:`_rescore_samples`)."""
    dropped = sorted(policy.dropped)
    mine = dropped[rank::world]
    size = config.optim.batch_size
    rows = []
    objective.eval()
    for call in range(_rescore_calls(_gather_objects(len(mine)), size)):
        chunk = mine[call * size : (call + 1) * size]
        samples, real = _rescore_samples(dataset, chunk, dropped)
        with _autocast(device, config.model.dtype):
            result = objective(collator(samples).to(device), fraction, epoch, policy)
        if real:
            scored = _score_rows(result, dataset, epoch, kept=False)
            rows.append({name: values[:real] for name, values in scored.items()})
    objective.train()
    del wrapped
    return rows


RESCORE_MIN_SAMPLES = 2
"""Samples of a re-scoring forward at least (padding included)."""


def _rescore_calls(counts: list[int], batch_size: int) -> int:
    """Forward calls every rank makes to re-score its dropped samples, from each rank's count
    of them: as many as the rank with the most needs (the others pad, see
    :func:`_rescore_samples`)."""
    return max((math.ceil(count / batch_size) for count in counts), default=0)


def _rescore_samples(
    dataset: TripletDataset, chunk: list[int], fillers: list[int]
) -> tuple[list[dict[str, Any]], int]:
    """The readable samples of ``chunk`` and how many they are, followed by padding up to
    :data:`RESCORE_MIN_SAMPLES` (whose scores are discarded): readable samples of ``fillers``
    not in ``chunk``, else copies. ``chunk`` may be empty (a rank with fewer samples)."""
    samples = _readable(dataset, chunk)
    real = len(samples)
    for position in fillers:
        if len(samples) >= RESCORE_MIN_SAMPLES:
            break
        if position not in chunk:
            samples += _readable(dataset, [position])
    if not samples:
        raise Moon2Error("no readable sample to pad a re-scoring batch with")
    samples += [samples[0]] * (RESCORE_MIN_SAMPLES - len(samples))
    return samples, real


def _readable(dataset: TripletDataset, positions: list[int]) -> list[dict[str, Any]]:
    """The samples at ``positions`` that are not rejected when read (unreadable images)."""
    return [s for s in (dataset[p] for p in positions) if "rejected" not in s]


def _partial_path(out: Path, epoch: int) -> Path:
    return out / "scores" / f".epoch-{epoch:03d}.partial.json"


def _save_partial_scores(out: Path, epoch: int, scores: list[dict], is_main: bool) -> None:
    """Scores of the epoch so far, kept with a checkpoint so a resumed epoch is complete."""
    gathered = _gather_objects(scores)
    if is_main:
        path = _partial_path(out, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = [row for part in gathered for row in part]
        path.write_text(json.dumps(merged))


def _load_partial_scores(out: Path, epoch: int) -> list[dict]:
    path = _partial_path(out, epoch)
    if not path.exists() or (dist.is_initialized() and dist.get_rank() != 0):
        return []
    return json.loads(path.read_text())


def _finish_epoch(out: Path, epoch: int, scores: list[dict], is_main: bool) -> pl.DataFrame:
    merged: dict[str, list] = {name: [] for name in SCORE_SCHEMA.names}
    for part in _gather_objects(scores):
        for rows in part:
            for name in merged:
                merged[name] += rows[name]
    table = pa.table(merged, schema=SCORE_SCHEMA)
    frame = pl.from_arrow(table)
    # a sample seen twice in one epoch (resumed partial scores) keeps its first score
    frame = frame.unique("position", keep="first", maintain_order=True).sort("position")
    if is_main:
        from moon2.data.io import write_table

        write_table(
            frame.to_arrow().cast(SCORE_SCHEMA), out / "scores" / f"epoch-{epoch:03d}.parquet"
        )
        _partial_path(out, epoch).unlink(missing_ok=True)
    return frame


def _truncate_metrics(path: Path, update: int) -> None:
    """Keep the records up to ``update`` (the resumed checkpoint's; 0 = a fresh run), so the
    steps a killed run logged after its last checkpoint are not there twice."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            # a line cut by the kill that interrupted the run (or not a record at all)
            progress.warn(f"{path} line {number}: not a metrics record, dropped on resume")
            continue
        if step <= update:
            kept.append(line if line.endswith("\n") else line + "\n")
    if not kept:
        path.unlink()
    elif len(kept) != len(lines):
        with atomic_path(path) as temp:
            temp.write_text("".join(kept), encoding="utf-8")


def _log(
    path: Path,
    update: int,
    epoch: int,
    result: Any,
    scheduler: Any,
    throughput: float,
    images_failed: int,
) -> None:
    weights = result.weight
    record = {
        "step": update,
        "epoch": epoch,
        "lr": scheduler.get_last_lr()[0],
        **{k: round(v, 6) for k, v in result.parts.items()},
        **{f"omega_{k}": round(v, 6) for k, v in result.omega.items()},
        **{f"usage_{k}": v for k, v in result.usage.items()},
        "phi_mean": round(float(result.phi.mean()), 4),
        "downweighted": round(float((weights < 1).float().mean()), 4),
        "samples_per_s": round(throughput, 2),
        "images_failed": images_failed,
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _write_rejects(out: Path, queries: Any, index: Any, runtime: dict[str, str]) -> None:
    rows = [(row, reason) for row, reason in index.rejected]
    if runtime:
        position_of = {q: i for i, q in enumerate(queries.column("query_id"))}
        rows += [(position_of[q], reason) for q, reason in runtime.items() if q in position_of]
    directory = out / "_rejects" / "queries"
    if not rows:
        return
    table = queries.table.take(pa.array([r for r, _ in rows], pa.int64()))
    table = table.append_column("reject_stage", pa.array([STAGE] * len(rows), pa.string()))
    table = table.append_column("reject_reason", pa.array([r for _, r in rows], pa.string()))
    with PartWriter(directory, rejects_schema(queries.table.schema)) as writer:
        writer.write(table)


def _warn_idle_filter(policy: FilterPolicy, total_updates: int) -> None:
    if policy.name != "none" and policy.config.first_update(total_updates) >= total_updates:
        progress.warn(
            f"the dynamic filter will not act: its warm-up (filter.warmup "
            f"{policy.config.warmup}) covers all {total_updates} updates of this run"
        )


def _epoch_losses(scores: list[dict[str, list]]) -> list[float]:
    """The losses of every process's samples of the epoch so far (a collective)."""
    return [loss for part in _gather_objects(scores) for rows in part for loss in rows["loss"]]


def _mechanisms(
    out: Path, config: TrainConfig, policy: FilterPolicy, totals: Mechanisms, total_updates: int
) -> dict[str, Any]:
    """train_summary.json's ``mechanisms``: whether each switch of the ablation grid acted."""
    aug = totals.aug_title_candidates + totals.aug_image_candidates
    return {
        "steps": totals.steps,
        "dynamic_filter": {
            "policy": policy.name,
            "warmup": config.filter.warmup,
            "first_update": config.filter.first_update(total_updates),
            "updates": total_updates,
            **_filter_effect(out),
        },
        "intra_loss": {"ran": totals.intra_steps > 0, "steps": totals.intra_steps},
        "moe": {"ran": totals.moe_steps > 0, "steps": totals.moe_steps},
        "co_augmentation": {
            "ran": aug > 0,
            "candidates": totals.candidates,
            "with_aug_title": totals.aug_title_candidates,
            "with_aug_images": totals.aug_image_candidates,
        },
    }


def _filter_effect(out: Path) -> dict[str, Any]:
    """What the dynamic filter did, from the epochs' score tables (every process's samples):
    per epoch, the samples trained with a weight below 1 and those that sat the epoch out;
    ``samples`` sums both over the epochs (0: it never acted)."""
    per_epoch = {}
    for path in sorted((out / "scores").glob("epoch-*.parquet")):
        frame = pl.read_parquet(path, columns=["weight", "kept"])
        per_epoch[path.stem] = {
            "downweighted": frame.filter(pl.col("kept") & (pl.col("weight") < 1)).height,
            "pruned": frame.filter(~pl.col("kept")).height,
        }
    counts = [v["downweighted"] + v["pruned"] for v in per_epoch.values()]
    return {
        "acted": any(counts),
        "epochs": sum(1 for c in counts if c),
        "samples": sum(counts),
        "per_epoch": per_epoch,
    }


def _filter_report(out: Path, data: Path, config: TrainConfig) -> dict[str, Any] | None:
    """Evaluation only: compare flagged samples with truth_* columns when the data has them."""
    import pyarrow.parquet as pq

    from moon2.data.io import resolve_files

    files = resolve_files(data / "queries")
    if "truth_is_noisy" not in pq.read_schema(files[0]).names:
        return None
    truth = pl.concat(
        [pl.from_arrow(pq.read_table(f, columns=["query_id", "truth_is_noisy"])) for f in files]
    ).rename({"query_id": "sample_id", "truth_is_noisy": "is_noisy"})
    score_files = sorted((out / "scores").glob("epoch-*.parquet"))
    if not score_files:
        return None
    scores = pl.concat([pl.read_parquet(f) for f in score_files])
    report = {
        "policy": config.filter.policy if config.filter.enabled else "none",
        "noise_kind": "wrong_positive queries (truth_is_noisy)",
        "flagged_means": "weight < 1 (down-weighted) or not kept (dropped) in that epoch",
        "epochs": detection_report(scores, truth),
    }
    (out / "filter_report.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = ["Batch", "TrainResult", "train"]
