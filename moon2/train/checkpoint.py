"""Training checkpoints that resume exactly and load without unpickling code.

A checkpoint is a directory ``OUT/checkpoints/step-NNNNNNN/`` written under a temporary name
and renamed when complete:

- ``model.safetensors``: every weight of the training module (model, temperatures, W*);
- ``optimizer.pt``, ``scheduler.pt``: state dicts (tensors and numbers only, read back with
  ``torch.load(weights_only=True)``);
- ``rng.pt`` (torch CPU/CUDA generator states) and ``rng.json`` (Python and NumPy);
- ``trainer.json``: epoch, position in the epoch, update count, filter state;
- ``plan.json``: the data fingerprint and resolved config of the run (see resume.py; missing
  in checkpoints written before it was kept).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moon2.errors import ConfigError

PREFIX = "step-"
PLAN = "plan.json"
_LOAD_ERROR = "Error(s) in loading state_dict"  # torch's and safetensors' mismatch message


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    plain = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [
            numpy_state[0],
            numpy_state[1].tolist(),
            int(numpy_state[2]),
            int(numpy_state[3]),
            float(numpy_state[4]),
        ],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    directory: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    keep: int,
    plan: dict[str, Any] | None = None,
) -> Path:
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{step:07d}"
    temp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    save_model(module, str(temp / "model.safetensors"))
    torch.save(optimizer.state_dict(), temp / "optimizer.pt")
    torch.save(scheduler.state_dict(), temp / "scheduler.pt")
    tensors, plain = _rng_state()
    torch.save(tensors, temp / "rng.pt")
    (temp / "rng.json").write_text(json.dumps(plain))
    (temp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    if plan is not None:
        (temp / PLAN).write_text(json.dumps(plan, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(temp, final)
    for old in sorted(directory.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    complete = [p for p in sorted(directory.glob(f"{PREFIX}*")) if (p / "trainer.json").exists()]
    return complete[-1] if complete else None


def load_checkpoint(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    map_location: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG; returns the trainer state.

    A checkpoint of another model shape (hidden size, experts, MoE layers, trained
    parameters) is a ConfigError naming the checkpoint."""
    from safetensors.torch import load_model

    try:
        load_model(module, str(path / "model.safetensors"), strict=True, device=str(map_location))
    except RuntimeError as exc:
        if _LOAD_ERROR not in str(exc):
            raise
        raise _shape_error(path, exc) from None
    try:
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        )
    except ValueError as exc:  # another set of trained parameters: other parameter groups
        raise _shape_error(path, exc) from None
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    tensors = torch.load(path / "rng.pt", weights_only=True)
    _set_rng_state(tensors, json.loads((path / "rng.json").read_text()))
    return json.loads((path / "trainer.json").read_text())


def read_plan(path: Path) -> dict[str, Any] | None:
    """The plan (data fingerprint and config) checkpoint ``path`` was trained with, if kept."""
    plan = path / PLAN
    return json.loads(plan.read_text()) if plan.exists() else None


def _shape_error(path: Path, exc: Exception) -> ConfigError:
    """One sentence for a checkpoint that does not fit the model being resumed."""
    # torch lists every mismatch on its own line; the first names the kind and a tensor
    details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    first = (details[0] if details else str(exc).strip())[:200].rstrip(".")
    return ConfigError(
        f"checkpoint {path} was written for another model shape than this config's ({first}); "
        "resume with the config it was trained with, or re-run without --resume in a new folder"
    )
