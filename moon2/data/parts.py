"""Units of work over a Parquet dataset: contiguous row ranges of one file.

A part's key names its file number and first row, so the same input gives the same keys in
every run: a stage writes one output per part and a re-run skips the parts already written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moon2.data.io import atomic_path, open_parquet
from moon2.data.schema import TableSpec, check_columns
from moon2.errors import ConfigError

PLAN_FILE = "plan.json"


@dataclass
class PartSpec:
    """Rows ``[offset, offset + length)`` of input file number ``file_index``."""

    key: str
    file: str
    file_index: int
    offset: int
    length: int


def fingerprint(files: list[Path]) -> list[list[Any]]:
    """Path, size and modification time of each file: what a resumed job checks its input
    against."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def part_key(file_index: int, offset: int) -> str:
    return f"part-{file_index:05d}-{offset:012d}"


def plan_parts(
    files: list[Path], rows_per_part: int, limit: int | None = None, spec: TableSpec | None = None
) -> list[PartSpec]:
    """Cut the input into parts of ``rows_per_part`` rows (the first ``limit`` rows only);
    with ``spec`` each file's columns are checked against the contract first."""
    specs: list[PartSpec] = []
    remaining = limit
    for index, file in enumerate(files):
        reader = open_parquet(file)
        if spec is not None:
            check_columns(reader.schema_arrow, spec, str(file))
        rows = reader.metadata.num_rows
        if remaining is not None:
            rows = min(rows, remaining)
            remaining -= rows
        for offset in range(0, rows, rows_per_part):
            length = min(rows_per_part, rows - offset)
            specs.append(PartSpec(part_key(index, offset), str(file), index, offset, length))
        if remaining == 0:
            break
    return specs


def read_slice(file: str, offset: int, length: int, columns: list[str] | None = None) -> pa.Table:
    """Rows ``[offset, offset + length)`` of a Parquet file (only ``columns`` when given),
    reading only the row groups that hold them."""
    reader = pq.ParquetFile(file)
    groups, first, start = [], None, 0
    for index in range(reader.metadata.num_row_groups):
        rows = reader.metadata.row_group(index).num_rows
        if start + rows > offset and start < offset + length:
            groups.append(index)
            first = start if first is None else first
        start += rows
    if not groups:
        empty = reader.schema_arrow.empty_table()
        return empty.select(columns) if columns is not None else empty
    table = reader.read_row_groups(groups, columns=columns)
    return table.slice(offset - (first or 0), length)


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local one (quietly)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
        )


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def check_plan(out: Path, plan: dict[str, Any], resume: bool, stage: str) -> None:
    """Make sure the finished parts under ``out`` belong to this very job (same config and
    inputs), then record the plan; ``resume=False`` only records it (the caller's
    :func:`moon2.data.outdir.claim_output` has already deleted the command's own outputs)."""
    plan_path = out / "_parts" / PLAN_FILE
    if resume and plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            changed = [k for k in plan if previous.get(k) != plan[k]]
            raise ConfigError(
                f"{out} holds a previous {stage} run with a different {', '.join(changed)}; re-run "
                "with --no-resume to start over, or choose another OUT"
            )
    with atomic_path(plan_path) as temp:
        temp.write_text(json.dumps(plan, indent=1, sort_keys=True))
