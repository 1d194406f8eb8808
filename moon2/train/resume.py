"""What a resumed training run must share with the checkpoint it continues.

Every checkpoint keeps the plan of its run (``plan.json``, see checkpoint.py): the fingerprint
of DATA's Parquet files (path in DATA, size, modification time) and the resolved config.
``--resume`` continues only when the data and config match it, up to the few fields in
:data:`RESUME_MAY_CHANGE`, as augment and filter do with their plans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moon2.data.io import resolve_files
from moon2.data.parts import fingerprint
from moon2.errors import ConfigError, InputError
from moon2.train.checkpoint import latest_checkpoint, read_plan
from moon2.train.config import TrainConfig

TABLES = ("products", "queries")

# Fields a resumed run may change: where and how fast it runs, what it logs and keeps, and
# how long it goes on (epochs / max_steps extend or cut a run; the learning-rate schedule is
# stretched to the new length from the resumed step on). Anything else would train another
# model than the checkpoint's, or the same model on another sample order.
RESUME_MAY_CHANGE = frozenset(
    {
        "device",
        "log_every",
        "optim.epochs",
        "optim.max_steps",
        "checkpoint.every_steps",
        "checkpoint.keep",
        "data.num_workers",
        "data.image_cache_mb",
        "data.pixel_cache_mb",
    }
)
_SHOWN = 6  # changed fields named in the message; a whole other recipe would fill a screen


def run_plan(data: Path, config: TrainConfig) -> dict[str, Any]:
    """The data fingerprint and resolved config of a run on ``data`` (what its checkpoints
    record)."""
    entries: list[list[Any]] = []
    for name in TABLES:
        if not (data / name).exists():
            raise InputError(f"{data} has no {name}/ table (moon2 train needs both)")
        # paths relative to DATA: a data folder moved or copied with its run (mv, cp -p, the
        # demo's copies) is the same data; sizes and modification times still tell a rewrite
        for path, size, mtime in fingerprint(resolve_files(data / name)):
            inside = Path(path).is_relative_to(data)
            key = Path(path).relative_to(data).as_posix() if inside else path
            entries.append([key, size, mtime])
    return {"data": entries, "config": config.model_dump(mode="json")}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_fields(previous: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """Config fields (dotted, in config order) and ``data`` that differ between two plans,
    leaving out those a resumed run may change."""
    old, new = _flatten(previous.get("config", {})), _flatten(plan["config"])
    changed = [k for k in {**new, **old} if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)]
    if previous.get("data") != plan["data"]:
        changed.append("data")
    return changed


def check_resume(out: Path, plan: dict[str, Any], resume: bool) -> None:
    """Refuse to resume the newest checkpoint under ``out`` with other data or config."""
    checkpoint = latest_checkpoint(out / "checkpoints")
    if checkpoint is not None and not resume:  # every rank refuses alike, before any writes
        raise InputError(
            f"{out} holds checkpoints of an earlier run; pass --resume to continue it or "
            "choose a new output directory"
        )
    if checkpoint is None:
        return
    previous = read_plan(checkpoint)
    if previous is None:
        return  # written before checkpoints kept their plan: the loader checks the shapes
    changed = changed_fields(previous, plan)
    if not changed:
        return
    unknown = [k for k in changed if k not in _flatten(previous.get("config", {})) and k != "data"]
    if unknown:  # fields this moon2 has and the checkpoint's did not: no config can match it
        raise ConfigError(
            f"{out} holds a run written by an older moon2 (before {', '.join(unknown[:_SHOWN])}),"
            " which cannot be resumed; train again in a new folder"
        )
    names = ", ".join(changed[:_SHOWN])
    if len(changed) > _SHOWN:
        names += f" and {len(changed) - _SHOWN} more"
    raise ConfigError(
        f"{out} holds a run trained with a different {names}; re-run without --resume in a "
        f"new folder, or resume with the checkpoint's data and config "
        f"({out / 'train_config.yaml'})"
    )
