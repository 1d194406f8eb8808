"""Find the folders of a run and read what the report needs from them, and nothing more.

A report reads the outputs of other stages, which may be huge (millions of rows with image
bytes), partial (a demo stopped half-way) or from an older version (a column missing). So:

- every reader takes only the columns it needs, from each part file that has them;
- rows with images are read in batches and the reading stops once enough examples are found;
- a missing folder, file or column is an absence to report, never an exception: the only
  :class:`~moon2.errors.InputError` is for a RUN_DIR (or an explicit folder) that does not exist
  or holds none of the stages.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from moon2 import progress
from moon2.data.io import resolve_files
from moon2.errors import InputError, Moon2Error

DEMO_DIRS: dict[str, str] = {
    "catalog": "catalog",
    "bench": "bench",
    "augment": "aug",
    "filter": "cur",
    "run": "run",
    "eval": "eval",
}
"""Stage -> its folder in a ``moon2 demo`` directory."""

RUN_MARKERS = ("metrics.jsonl", "train_summary.json", "train_config.yaml", "scores")
"""Any of these makes a folder a ``moon2 train`` output."""


STAGE_NAMES: tuple[str, ...] = ("run", "eval", "bench", "filter", "augment", "catalog")
"""The stage folders of a :class:`Layout`, in the order a report names them."""


@dataclass
class Layout:
    """The stage folders a report reads; None where a stage is not available."""

    root: Path
    run: Path | None = None
    eval: Path | None = None
    bench: Path | None = None
    filter: Path | None = None
    augment: Path | None = None
    catalog: Path | None = None


def _is_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def _looks_like(stage: str, path: Path) -> bool:
    """Whether ``path`` holds the output of ``stage`` (cheap checks on file names only)."""
    if not path.is_dir():
        return False
    if stage == "run":
        return _is_run(path)
    if stage == "eval":
        return (path / "results.json").is_file() or (path / "runs").is_dir()
    if stage == "bench":
        return (path / "manifest.json").is_file() or (path / "test" / "tasks").is_dir()
    if stage == "filter":
        return (path / "filter_report.json").is_file() or (path / "_removed").is_dir()
    return (path / "products").is_dir()  # catalog, augment


def _explicit(name: str, value: str | os.PathLike[str] | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise InputError(f"{path} ({name}) is not a directory")
    return path


def find_layout(
    run_dir: str | os.PathLike[str],
    eval_dir: str | os.PathLike[str] | None = None,
    bench_dir: str | os.PathLike[str] | None = None,
    filter_dir: str | os.PathLike[str] | None = None,
    augment_dir: str | os.PathLike[str] | None = None,
) -> Layout:
    """Where each stage's output is: a demo directory's subfolders, or a train run alone plus
    the folders passed explicitly (an explicit folder always wins).

    A train run alone does not look at its siblings: a folder next to it may belong to another
    run, and a report mixing two runs would be wrong without saying so. The one exception is the
    benchmark an eval names in its ``results.json``, which is by construction the right one.
    """
    root = Path(run_dir)
    if not root.exists():
        raise InputError(f"{root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory (expected a demo or train output folder)")
    layout = Layout(root=root)
    demo = {
        stage: root / folder
        for stage, folder in DEMO_DIRS.items()
        if _looks_like(stage, root / folder)
    }
    if demo:
        for stage, path in demo.items():
            setattr(layout, stage, path)
    elif _is_run(root):
        layout.run = root
    for stage, value in (
        ("eval", eval_dir),
        ("bench", bench_dir),
        ("filter", filter_dir),
        ("augment", augment_dir),
    ):
        path = _explicit(f"{stage}_dir", value)
        if path is not None:
            setattr(layout, stage, path)
    if layout.bench is None and layout.eval is not None:
        named = read_json(layout.eval / "results.json").get("bench")
        if isinstance(named, str) and _looks_like("bench", Path(named)):
            layout.bench = Path(named)
    if not any(
        getattr(layout, stage) is not None
        for stage in ("run", "eval", "bench", "filter", "augment", "catalog")
    ):
        raise InputError(
            f"{root} is neither a moon2 demo folder (catalog/, bench/, aug/, cur/, run/, eval/) "
            "nor a moon2 train output (metrics.jsonl, train_summary.json)"
        )
    return layout


# --- small files ---------------------------------------------------------------------------


PROBLEMS: list[str] = []
"""What the readers left out (unreadable files, cut lines) since the last :func:`reset_problems`;
the page lists them, so a damaged input shrinks a plot visibly, never silently."""


def reset_problems() -> None:
    PROBLEMS.clear()


def _left_out(what: Path | str, exc: BaseException | str) -> None:
    detail = (
        exc
        if isinstance(exc, str)
        else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    )
    message = f"{what}: {detail}; left out of the report"
    if message not in PROBLEMS:
        PROBLEMS.append(message)
        progress.warn(message)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when it is missing or unreadable (a stage still running)."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        _left_out(path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line that does not parse (the last one of a run
    killed while writing it) is skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            _left_out(f"{path} line {number}", "not JSON (a line cut by a kill?)")
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


# --- Parquet tables ------------------------------------------------------------------------


def parquet_files(path: Path | None) -> list[Path]:
    """The data files of a dataset folder, [] when there is none (never an error)."""
    if path is None or not path.exists():
        return []
    try:
        return resolve_files(path)
    except Moon2Error as exc:
        _left_out(path, exc)
        return []


def schema_of(file: Path) -> pa.Schema | None:
    try:
        return pq.read_schema(file)
    except (OSError, pa.ArrowException) as exc:
        _left_out(file, exc)
        return None


def column_names(files: Sequence[Path]) -> list[str]:
    """Every column name that occurs in any of ``files``, in first-seen order."""
    names: dict[str, None] = {}
    for file in files:
        schema = schema_of(file)
        if schema is not None:
            names.update(dict.fromkeys(schema.names))
    return list(names)


def count_rows(files: Sequence[Path]) -> int:
    """Rows of ``files`` from their footers (unreadable files count 0)."""
    total = 0
    for file in files:
        try:
            total += pq.ParquetFile(file).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            _left_out(file, exc)
    return total


def sample_step(files: Sequence[Path], max_rows: int | None) -> int:
    """Every how many rows to keep so that at most about ``max_rows`` are read (1: all)."""
    if max_rows is None:
        return 1
    return max(1, math.ceil(count_rows(files) / max_rows))


def _present(file: Path, wanted: Sequence[str]) -> list[str]:
    """The ``wanted`` columns ``file`` has (none when its footer cannot be read)."""
    schema = schema_of(file)
    return [] if schema is None else [name for name in wanted if name in schema.names]


def read_columns(
    files: Sequence[Path], wanted: Sequence[str], step: int = 1
) -> pl.DataFrame | None:
    """The ``wanted`` columns (those that exist) of every file, stacked; a file without some of
    them contributes nulls. ``step`` > 1 keeps every step-th row of each file (a deterministic
    sample whose peak memory is one file's columns). None when no file has any of them."""
    frames = []
    for file in files:
        present = _present(file, wanted)
        if not present:
            continue
        try:
            table = pq.read_table(file, columns=present)
        except (OSError, pa.ArrowException) as exc:
            _left_out(file, exc)
            continue
        if step > 1:
            table = table.take(pa.array(range(0, table.num_rows, step), pa.int64()))
        frames.append(pl.from_arrow(table))
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


@dataclass
class Row:
    """One row read for display, with the folder its relative image paths resolve against."""

    values: dict[str, Any]
    base_dir: Path


def iter_rows(files: Sequence[Path], wanted: Sequence[str], batch_rows: int = 256) -> Iterator[Row]:
    """Rows (only the ``wanted`` columns that exist) in file order, a batch at a time: the
    caller stops iterating as soon as it has what it shows, so a huge table is never read."""
    for file in files:
        present = _present(file, wanted)
        if not present:
            continue
        try:
            reader = pq.ParquetFile(file)
            for batch in reader.iter_batches(batch_size=batch_rows, columns=present):
                for values in batch.to_pylist():
                    yield Row(values, file.parent)
        except (OSError, pa.ArrowException) as exc:
            _left_out(file, exc)


def rows_by_id(
    files: Sequence[Path], id_column: str, ids: set[str], wanted: Sequence[str]
) -> dict[str, Row]:
    """The rows whose ``id_column`` is in ``ids`` (first occurrence of each), read a batch at
    a time and only the matching rows converted to Python; reading stops once every id is
    found."""
    found: dict[str, Row] = {}
    if not ids:
        return found
    value_set = pa.array(sorted(ids), pa.string())
    for file in files:
        schema = schema_of(file)
        if schema is None or id_column not in schema.names:
            continue
        present = [id_column, *[c for c in wanted if c in schema.names and c != id_column]]
        try:
            reader = pq.ParquetFile(file)
            for batch in reader.iter_batches(batch_size=1024, columns=present):
                keys = batch.column(id_column).cast(pa.string())
                matches = batch.filter(pc.is_in(keys, value_set=value_set))
                for values in matches.to_pylist():
                    key = str(values[id_column])
                    if key not in found:
                        found[key] = Row(values, file.parent)
                if len(found) == len(ids):
                    return found
        except (OSError, pa.ArrowException) as exc:
            _left_out(file, exc)
    return found


def last_scores_file(run: Path | None) -> Path | None:
    """The newest ``scores/epoch-NNN.parquet`` of a train run (the last epoch it finished)."""
    if run is None:
        return None
    files = sorted((run / "scores").glob("epoch-*.parquet"))
    return files[-1] if files else None


# --- the injected noise ----------------------------------------------------------------------


def query_noise_labels(frame: pl.DataFrame) -> pl.Series | None:
    """Per query: True when its logged purchase is injected noise, from ``truth_is_noisy`` or,
    without it, ``truth_positive_id`` differing from ``positive_id``; null where unknown. None
    when the table has no ground truth at all (a real catalog)."""
    if "truth_is_noisy" in frame.columns:
        labels = frame["truth_is_noisy"].cast(pl.Boolean)
        if labels.null_count() < frame.height:
            return labels.alias("is_noisy")
    if "truth_positive_id" in frame.columns and "positive_id" in frame.columns:
        truth = frame["truth_positive_id"].cast(pl.String)
        logged = frame["positive_id"].cast(pl.String)
        labels = (
            pl.DataFrame({"truth": truth, "logged": logged})
            .select(
                pl.when(pl.col("truth").is_null() | pl.col("logged").is_null())
                .then(None)
                .otherwise(pl.col("truth") != pl.col("logged"))
                .alias("is_noisy")
            )
            .to_series()
        )
        if labels.null_count() < frame.height:
            return labels
    return None


def product_noise_labels(frame: pl.DataFrame) -> pl.Series | None:
    """Per product: ``truth_is_noisy`` (None without it)."""
    if "truth_is_noisy" not in frame.columns:
        return None
    labels = frame["truth_is_noisy"].cast(pl.Boolean).alias("is_noisy")
    return labels if labels.null_count() < frame.height else None


TRUTH_COLUMNS = ("query_id", "positive_id", "truth_is_noisy", "truth_positive_id")


def cached_queries(run: Path | None) -> pl.DataFrame | None:
    """The truth columns of a train run's own copy of its training queries
    (``cache/queries.arrow``, memory-mapped: only these columns are touched), or None.

    A train run does not record where its data came from, but this copy is exactly what it
    trained on, so a run alone still knows which of its queries were noisy.
    """
    if run is None or not (run / "cache" / "queries.arrow").is_file():
        return None
    try:
        source = pa.memory_map(str(run / "cache" / "queries.arrow"), "r")
        table = ipc.open_file(source).read_all()
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        _left_out(run / "cache" / "queries.arrow", exc)
        return None
    present = [name for name in TRUTH_COLUMNS if name in table.column_names]
    if "query_id" not in present:
        return None
    return pl.from_arrow(table.select(present))


def query_truth(
    tables: Sequence[Path | None], extra: Sequence[pl.DataFrame | None] = ()
) -> pl.DataFrame | None:
    """query_id -> is_noisy over every query table given (the first one naming a query wins):
    the training data of a run may be a filtered copy, so any table holding the query will do.
    ``extra``: frames already read (e.g. :func:`cached_queries`), looked at first."""
    candidates: list[pl.DataFrame | None] = list(extra)
    candidates += [read_columns(parquet_files(path), TRUTH_COLUMNS) for path in tables]
    frames = []
    for frame in candidates:
        if frame is None or "query_id" not in frame.columns:
            continue
        labels = query_noise_labels(frame)
        if labels is None:
            continue
        frames.append(
            pl.DataFrame({"query_id": frame["query_id"].cast(pl.String), "is_noisy": labels})
        )
    if not frames:
        return None
    return pl.concat(frames).drop_nulls().unique("query_id", keep="first", maintain_order=True)
