"""Run :func:`moon2.train.trainer.train` on a Ray cluster with Ray Train's ``TorchTrainer``.

Every Ray worker runs the very same training function; Ray Train sets up the torch process
group (gloo on CPU, NCCL on GPU) before it starts, which the trainer detects. DATA and OUT must
be paths every worker can reach (a shared file system on a multi-node cluster); rank 0 writes
the outputs, exactly as under torchrun.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moon2.data.outdir import check_output, claim_output
from moon2.errors import InputError
from moon2.train.config import TrainConfig
from moon2.train.resume import check_resume, run_plan
from moon2.train.trainer import LEGACY_OUTPUT, TrainResult


def _worker(payload: dict[str, Any]) -> None:
    from moon2 import progress
    from moon2.train.trainer import train

    progress.set_quiet(payload.get("quiet", True))
    config = TrainConfig.model_validate(payload["config"])
    out, data = Path(payload["out"]), Path(payload["data"])
    train(data, out, config, resume=payload["resume"], claim=False)


def train_on_ray(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    resume: bool,
    address: str,
    num_workers: int = 2,
    use_gpu: bool = False,
) -> TrainResult:
    """Train with ``num_workers`` Ray Train workers on the cluster at ``address``.

    ``address``: ``local`` starts a Ray instance on this machine; anything else (``auto``,
    ``ray://head:10001``) is passed to ``ray.init``.
    """
    try:
        import ray.train.torch  # noqa: F401 (ray[train] ships with ray[data]; say so if not)
    except ImportError as exc:
        raise InputError(f"Ray Train is not available ({exc}); pip install 'ray[train]'") from None
    data = Path(data_dir).resolve()
    out = Path(out_dir).resolve()
    # the workers check too; refusing here gives one sentence instead of a failed Ray job
    check_output(out, "train", inputs=[data], legacy=LEGACY_OUTPUT)
    check_resume(out, run_plan(data, config), resume)
    # the driver holds OUT's claim for the whole job (Ray writes OUT/ray/ before any worker
    # starts); the workers only check it
    with claim_output(out, "train", inputs=[data], legacy=LEGACY_OUTPUT):
        return _fit(data, out, config, resume, address, num_workers, use_gpu)


def _fit(
    data: Path,
    out: Path,
    config: TrainConfig,
    resume: bool,
    address: str,
    num_workers: int,
    use_gpu: bool,
) -> TrainResult:
    import json
    import time

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = time.perf_counter()
    if not ray.is_initialized():
        if address == "local":
            ray.init(
                num_cpus=max(num_workers, os.cpu_count() or 1),
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=address, log_to_driver=False)
    payload = {
        "data": str(data),
        "out": str(out),
        "config": config.model_dump(mode="json"),
        "resume": resume,
    }  # the workers do not claim OUT: the driver holds it
    trainer = TorchTrainer(
        _worker,
        train_loop_config=payload,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(storage_path=str(out / "ray"), name="moon2-train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise InputError(f"Ray Train failed: {result.error}")
    summary_path = out / "train_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return TrainResult(
        out_dir=out,
        final_dir=out / "final",
        steps=int(summary.get("updates", 0)),
        epochs=config.optim.epochs,
        seconds=time.perf_counter() - started,
        summary=summary,
    )
