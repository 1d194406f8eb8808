"""Parquet input and output for the contract tables.

Reading streams record batches, file after file, so no stage ever needs a whole catalog in
memory. A dataset is a Parquet file, a directory of part files (searched recursively) or a
glob. Files and directories whose name starts with ``.`` or ``_`` are not data (temporary
files, ``_rejects/``, ``_removed/``), the same convention as Spark, Hive and pyarrow.

Writing is atomic per part file: rows go to a hidden temporary name in the target directory
and are renamed into place only when the file is complete, so a crash never leaves a
half-written file that a reader would take for a finished one.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moon2.data.schema import TableSpec, check_columns, conform
from moon2.errors import InputError

PART_TEMPLATE = "part-{index:05d}.parquet"
DEFAULT_BATCH_ROWS = 1024
DEFAULT_ROW_GROUP_ROWS = 1024
PARQUET_COMPRESSION = "zstd"
_GLOB_CHARS = set("*?[")


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def resolve_files(path: str | os.PathLike[str]) -> list[Path]:
    """The Parquet files of a dataset (file, directory or glob), in a stable sorted order."""
    text = os.fspath(path)
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in globlib.glob(text, recursive=True))
        files = [p for p in matches if p.is_file() and not _is_hidden(p.name)]
        if not files:
            raise InputError(f"no files match {text}")
        return files
    root = Path(text)
    if not root.exists():
        raise InputError(f"{root} does not exist")
    if root.is_file():
        return [root]
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if not _is_hidden(name) and name.endswith((".parquet", ".pq", ".parq")):
                files.append(Path(directory) / name)
    if not files:
        raise InputError(f"no Parquet files found in directory {root}")
    return files


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open one Parquet file, turning every failure into an InputError naming it."""
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a Parquet file") from None
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Batch:
    """A conformed slice of one input file; ``offset`` is the file row of its first row."""

    file: Path
    offset: int
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def align_to_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order: cast, missing ones null."""
    columns = []
    for field_ in schema:
        if field_.name in table.column_names:
            columns.append(table.column(field_.name).cast(field_.type))
        else:
            columns.append(pa.nulls(table.num_rows, field_.type))
    return pa.Table.from_arrays(columns, schema=schema)


def count_rows(path: str | os.PathLike[str]) -> int:
    """Total rows of a dataset, from Parquet footers only."""
    return sum(open_parquet(f).metadata.num_rows for f in resolve_files(path))


def iter_batches(
    path: str | os.PathLike[str],
    spec: TableSpec | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    columns: list[str] | None = None,
) -> Iterator[Batch]:
    """Stream a dataset as conformed batches of at most ``batch_rows`` rows.

    With ``spec`` every file's columns are checked first (InputError on a missing or
    unconvertible column) and each batch is conformed to the contract; ``columns`` restricts
    what is read (for example only the id column).
    """
    files = resolve_files(path)
    readers = [(file, open_parquet(file)) for file in files]
    for file, reader in readers:
        if spec is not None and columns is None:
            check_columns(_arrow_schema(reader, file), spec, str(file))
    for file, reader in readers:
        offset = 0
        try:
            for record_batch in reader.iter_batches(batch_size=batch_rows, columns=columns):
                table = pa.Table.from_batches([record_batch])
                if spec is not None and columns is None:
                    table = conform(table, spec, str(file))
                yield Batch(file, offset, table)
                offset += record_batch.num_rows
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise InputError(
                f"{file} could not be read after row {offset} ({_first_line(exc)})"
            ) from None


def _arrow_schema(reader: pq.ParquetFile, file: Path) -> pa.Schema:
    try:
        return reader.schema_arrow
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise InputError(f"{file} has a schema Arrow cannot read ({_first_line(exc)})") from None


def read_json_object(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON file holding an object, as a dict; None when it cannot be read, does not parse
    (UTF-8 JSON) or holds something else (the caller says why in its own words)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def read_schema(path: str | os.PathLike[str]) -> pa.Schema:
    """The Arrow schema of a dataset's first file."""
    first = resolve_files(path)[0]
    return _arrow_schema(open_parquet(first), first)


# --- writing ------------------------------------------------------------------------------


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path next to ``final``; rename it into place on success.

    On any exception the temporary file is removed and ``final`` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_name(final)
    try:
        yield temp
        with open(temp, "rb") as handle:  # make the bytes durable before they become visible
            os.fsync(handle.fileno())
        os.replace(temp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def write_table(
    table: pa.Table,
    final: str | os.PathLike[str],
    schema: pa.Schema | None = None,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
) -> Path:
    """Write one complete Parquet file atomically."""
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(final) as temp:
        pq.write_table(table, temp, row_group_size=row_group_rows, compression=PARQUET_COMPRESSION)
    return Path(final)


class PartWriter:
    """Writes a stream of tables as ``part-NNNNN.parquet`` files in ``directory``.

    Each part is written under a hidden temporary name and renamed when it reaches
    ``rows_per_part`` rows or when the writer closes; if the writer is left by an exception,
    the unfinished part is deleted. ``clear=True`` first removes part files from an earlier
    run so that re-running a stage replaces its output instead of adding to it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        schema: pa.Schema,
        rows_per_part: int = 100_000,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        clear: bool = True,
        first_index: int = 0,
    ) -> None:
        self.directory = Path(directory)
        self.schema = schema
        self.rows_per_part = rows_per_part
        self.row_group_rows = row_group_rows
        if clear:  # the directory itself is created with the first part, never empty
            remove_parts(self.directory)
        self._index = first_index
        self._writer: pq.ParquetWriter | None = None
        self._temp: Path | None = None
        self._final: Path | None = None
        self._rows_in_part = 0
        self.rows_written = 0
        self.files: list[Path] = []

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = table.select(self.schema.names).cast(self.schema)
        start = 0
        while start < table.num_rows:
            if self._writer is None:
                self._open()
            take = min(self.rows_per_part - self._rows_in_part, table.num_rows - start)
            assert self._writer is not None
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
            self._rows_in_part += take
            self.rows_written += take
            start += take
            if self._rows_in_part >= self.rows_per_part:
                self._finish()

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._final = self.directory / PART_TEMPLATE.format(index=self._index)
        self._temp = _temp_name(self._final)
        self._writer = pq.ParquetWriter(self._temp, self.schema, compression=PARQUET_COMPRESSION)
        self._rows_in_part = 0

    def _finish(self) -> None:
        assert self._writer is not None and self._temp is not None and self._final is not None
        self._writer.close()
        with open(self._temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._temp, self._final)
        self.files.append(self._final)
        self._writer = None
        self._index += 1

    def close(self) -> None:
        if self._writer is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the unfinished part, if any (finished parts stay)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self._temp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._temp.unlink()

    def __enter__(self) -> PartWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def remove_parts(directory: str | os.PathLike[str], keep_finished: bool = False) -> None:
    """Delete ``part-*.parquet`` files and stale temporaries directly in ``directory``.

    ``keep_finished`` removes only the temporaries an interrupted writer left behind.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        name = entry.name
        is_part = name.startswith("part-") and name.endswith(".parquet") and not keep_finished
        is_temp = name.startswith(".part-") and ".tmp-" in name
        if entry.is_file() and (is_part or is_temp):
            entry.unlink()


def write_parts(
    tables: Iterable[pa.Table],
    directory: str | os.PathLike[str],
    schema: pa.Schema,
    rows_per_part: int = 100_000,
) -> list[Path]:
    """Write an iterable of tables as atomic part files; returns the files written."""
    with PartWriter(directory, schema, rows_per_part=rows_per_part) as writer:
        for table in tables:
            writer.write(table)
    return writer.files
