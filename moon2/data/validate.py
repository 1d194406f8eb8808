"""``moon2 validate``: check a products or queries dataset (or a whole catalog) row by row.

The dataset is streamed twice: once reading only the id column (ids are checked for
uniqueness with polars, so memory grows with the id column, never with images), then batch by
batch for the row rules. Every problem names file, row (0-based, within that file), id and
reason. Invalid rows can be written, unchanged plus ``reject_stage``/``reject_reason``, to a
rejects dataset.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from moon2 import progress
from moon2.data.images import ImageRoots, RemoteImageError, decode_image
from moon2.data.io import (
    PartWriter,
    count_rows,
    iter_batches,
    open_parquet,
    resolve_files,
)
from moon2.data.outdir import claim_output
from moon2.data.schema import (
    PRODUCTS,
    QUERIES,
    TableSpec,
    check_columns,
    infer_kind,
    rejects_schema,
    table_spec,
)
from moon2.errors import ImageDecodeError, InputError

STAGE = "validate"
DEFAULT_MAX_EXAMPLES = 20


@dataclass(frozen=True)
class Problem:
    """One invalid row."""

    file: str
    row: int | None
    record_id: str | None
    reason: str
    code: str


@dataclass
class TableReport:
    """What validation found in one table."""

    kind: str
    path: str
    files: int = 0
    rows: int = 0
    invalid_rows: int = 0
    examples: list[Problem] = field(default_factory=list)
    reason_counts: Counter[str] = field(default_factory=Counter)
    modality: Counter[str] = field(default_factory=Counter)
    images_decoded: int = 0
    images_remote: int = 0
    rejects_path: str | None = None

    @property
    def valid_rows(self) -> int:
        return self.rows - self.invalid_rows

    @property
    def ok(self) -> bool:
        return self.invalid_rows == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": self.path,
            "files": self.files,
            "rows": self.rows,
            "valid_rows": self.valid_rows,
            "invalid_rows": self.invalid_rows,
            "reason_counts": dict(self.reason_counts),
            "modality": dict(self.modality),
            "images_decoded": self.images_decoded,
            "images_remote": self.images_remote,
            "examples": [problem.__dict__ for problem in self.examples],
            "rejects_path": self.rejects_path,
        }


@dataclass
class ValidationReport:
    tables: list[TableReport]

    @property
    def ok(self) -> bool:
        return all(table.ok for table in self.tables)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tables": [table.to_dict() for table in self.tables]}


# what --rejects writes in its folder (a re-run deletes these, and only in its own folder)
REJECTS = (PRODUCTS.kind, QUERIES.kind, "part-*.parquet")


def validate(
    path: str | os.PathLike[str],
    kind: str | None = None,
    rejects: str | os.PathLike[str] | None = None,
    check_images: bool = True,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
    image_roots: ImageRoots | None = None,
) -> ValidationReport:
    """Validate a dataset or a catalog directory (``products/`` and/or ``queries/``).

    ``kind`` forces the table kind; otherwise it is inferred from the directory layout or the
    id column. ``image_roots``: folders every local image path must resolve into (None: the
    ``MOON2_IMAGE_ROOTS`` setting, else no limit); a path outside them makes its row invalid.
    Raises InputError when the input cannot be read at all.
    """
    root = Path(path)
    sub_tables = [k for k in (PRODUCTS.kind, QUERIES.kind) if (root / k).is_dir()]
    if root.is_dir() and sub_tables and (kind is None or kind in sub_tables):
        kinds = [kind] if kind else sub_tables
        targets = [(table_spec(k), root / k) for k in kinds]
    else:
        if kind is None:
            files = resolve_files(path)
            schema = open_parquet(files[0]).schema_arrow
            kind = infer_kind(schema)
            if kind is None:
                raise InputError(
                    f"{files[0]} has neither a product_id nor a query_id column, so it is not a "
                    f"products or queries table (columns: {', '.join(schema.names)})"
                )
        targets = [(table_spec(kind), Path(path))]
    rejects_root = Path(rejects) if rejects is not None else None
    with contextlib.ExitStack() as stack:
        if rejects_root is not None:
            # a re-run replaces its own earlier rejects whole; any other folder is refused
            stack.enter_context(
                claim_output(
                    rejects_root,
                    "validate",
                    inputs=[path, *(f for _, t in targets for f in resolve_files(t))],
                    outputs=REJECTS,
                    resume=False,
                )
            )
        return _validate_targets(
            targets, root, rejects_root, check_images, max_examples, image_roots
        )


def _validate_targets(
    targets: list[tuple[TableSpec, Path]],
    root: Path,
    rejects_root: Path | None,
    check_images: bool,
    max_examples: int,
    image_roots: ImageRoots | None,
) -> ValidationReport:
    product_ids: pa.Array | None = None
    reports = []
    for spec, table_path in targets:
        reject_dir = None
        if rejects_root is not None:
            reject_dir = rejects_root / spec.kind if len(targets) > 1 else rejects_root
        if spec is QUERIES and len(targets) > 1:
            product_ids = _load_ids(root / PRODUCTS.kind, PRODUCTS)
        checker = _rules(spec, product_ids, image_roots)
        reports.append(
            _validate_table(table_path, spec, reject_dir, check_images, max_examples, checker)
        )
    return ValidationReport(reports)


def _load_ids(path: Path, spec: TableSpec) -> pa.Array:
    arrays = [
        batch.table.column(spec.id_column).combine_chunks().cast(pa.string())
        for batch in iter_batches(path, columns=[spec.id_column], batch_rows=65_536)
    ]
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())


def _check_all_schemas(path: Path, spec: TableSpec) -> tuple[list[Path], pa.Schema]:
    """Check every file's columns; return the files and the union of their extra columns."""
    files = resolve_files(path)
    extras: list[pa.Schema] = []
    for file in files:
        schema = open_parquet(file).schema_arrow
        check_columns(schema, spec, str(file))
        extras.append(pa.schema([f for f in schema if f.name not in spec.names]))
    try:
        extra = pa.unify_schemas(extras) if extras else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"files under {path} disagree on a column's type ({exc})") from None
    return files, extra


def _duplicate_rows(path: Path, spec: TableSpec, files: list[Path]) -> dict[tuple[str, int], str]:
    """(file, row) of every repeated id after its first occurrence -> where the first one is."""
    file_index = {str(f): i for i, f in enumerate(files)}
    frames = []
    for batch in iter_batches(path, columns=[spec.id_column], batch_rows=65_536):
        ids = batch.table.column(spec.id_column).combine_chunks().cast(pa.string())
        frames.append(
            pl.DataFrame(
                {
                    "file": pl.Series(
                        [file_index[str(batch.file)]] * batch.num_rows, dtype=pl.Int32
                    ),
                    "row": pl.arange(batch.offset, batch.offset + batch.num_rows, eager=True),
                    "id": pl.from_arrow(ids),
                }
            )
        )
    if not frames:
        return {}
    ids = pl.concat(frames).with_row_index("order")
    repeated = ids.filter(pl.col("id").is_not_null() & pl.col("id").is_duplicated())
    if repeated.is_empty():
        return {}
    first = repeated.sort("order").group_by("id", maintain_order=True).first()
    firsts = {row["id"]: (row["file"], row["row"]) for row in first.iter_rows(named=True)}
    duplicates = {}
    for row in repeated.iter_rows(named=True):
        first_file, first_row = firsts[row["id"]]
        if (first_file, first_row) != (row["file"], row["row"]):
            where = f"{files[first_file].name} row {first_row}"
            duplicates[(str(files[row["file"]]), row["row"])] = where
    return duplicates


def _validate_table(
    path: Path,
    spec: TableSpec,
    reject_dir: Path | None,
    check_images: bool,
    max_examples: int,
    checker: _ProductRules | _QueryRules,
) -> TableReport:
    files, extra = _check_all_schemas(path, spec)
    report = TableReport(kind=spec.kind, path=str(path), files=len(files))
    duplicates = _duplicate_rows(path, spec, files)
    writer = None
    if reject_dir is not None:
        schema = rejects_schema(pa.schema([*spec.arrow_schema(strict=False), *extra]))
        writer = PartWriter(reject_dir, schema)
        report.rejects_path = str(reject_dir)
    total = count_rows(path)
    try:
        with progress.task(f"validating {spec.kind}", total) as bar:
            for batch in iter_batches(path, spec):
                reasons = checker.check(batch.table, batch.file, check_images, report)
                invalid_rows: list[int] = []
                invalid_reasons: list[str] = []
                ids = batch.table.column(spec.id_column).to_pylist()
                for i in range(batch.num_rows):
                    row_reasons = reasons.get(i, [])
                    first = duplicates.get((str(batch.file), batch.offset + i))
                    if first is not None:
                        row_reasons.insert(
                            0, ("duplicate_id", f"duplicate {spec.id_column} (first at {first})")
                        )
                    if not row_reasons:
                        continue
                    invalid_rows.append(i)
                    invalid_reasons.append("; ".join(text for _, text in row_reasons))
                    report.invalid_rows += 1
                    for code, _ in row_reasons:
                        report.reason_counts[code] += 1
                    if len(report.examples) < max_examples:
                        report.examples.append(
                            Problem(
                                file=str(batch.file),
                                row=batch.offset + i,
                                record_id=ids[i],
                                reason=invalid_reasons[-1],
                                code=row_reasons[0][0],
                            )
                        )
                report.rows += batch.num_rows
                if writer is not None and invalid_rows:
                    rejected = batch.table.take(pa.array(invalid_rows, pa.int64()))
                    writer.write(_with_reject_columns(rejected, writer.schema, invalid_reasons))
                bar.advance(batch.num_rows)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
        if writer.rows_written == 0:
            report.rejects_path = None
    return report


def _with_reject_columns(table: pa.Table, schema: pa.Schema, reasons: list[str]) -> pa.Table:
    n = table.num_rows
    columns = {}
    for field_ in schema:
        if field_.name == "reject_stage":
            columns[field_.name] = pa.array([STAGE] * n, pa.string())
        elif field_.name == "reject_reason":
            columns[field_.name] = pa.array(reasons, pa.string())
        elif field_.name in table.column_names:
            columns[field_.name] = table.column(field_.name).cast(field_.type)
        else:
            columns[field_.name] = pa.nulls(n, field_.type)
    return pa.table(columns, schema=schema)


# --- row rules ----------------------------------------------------------------------------

Reasons = dict[int, list[tuple[str, str]]]


def _blank(value: str | None) -> bool:
    return value is None or not value.strip()


def _rules(
    spec: TableSpec, product_ids: pa.Array | None, image_roots: ImageRoots | None
) -> _ProductRules | _QueryRules:
    if spec is PRODUCTS:
        return _ProductRules(image_roots)
    return _QueryRules(product_ids, image_roots)


def row_problems(
    table: pa.Table,
    spec: TableSpec,
    file: str | os.PathLike[str],
    check_images: bool = True,
    image_roots: ImageRoots | None = None,
) -> dict[int, str]:
    """Why ``moon2 validate`` would reject each row of ``table`` (conformed to ``spec``, read
    from ``file``), by row index; valid rows are absent. The row rules only: ids repeated
    across rows and ids that must exist in products are left to the caller."""
    scratch = TableReport(kind=spec.kind, path=os.fspath(file))
    reasons = _rules(spec, None, image_roots).check(table, Path(file), check_images, scratch)
    return {i: "; ".join(text for _, text in found) for i, found in reasons.items()}


def _check_image(
    cell: dict[str, Any] | None,
    label: str,
    base_dir: Path,
    check: bool,
    report: TableReport,
    image_roots: ImageRoots | None,
) -> tuple[str, str] | None:
    if cell is None:
        return ("image_null", f"{label} is null")
    if cell.get("bytes") is None and not cell.get("path"):
        return ("image_empty", f"{label} has neither bytes nor path")
    if not check:
        return None
    try:
        decode_image(cell, base_dir=base_dir, mode=None, draft_size=64, image_roots=image_roots)
    except RemoteImageError:
        report.images_remote += 1
        return None
    except ImageDecodeError as exc:
        code = "image_missing" if "does not exist" in str(exc) else "image_corrupt"
        if "outside the allowed image roots" in str(exc):
            code = "image_not_allowed"
        return (code, f"{label}: {exc}")
    report.images_decoded += 1
    return None


class _ProductRules:
    def __init__(self, image_roots: ImageRoots | None = None) -> None:
        self.image_roots = image_roots

    def check(
        self, table: pa.Table, file: Path, check_images: bool, report: TableReport
    ) -> Reasons:
        reasons: Reasons = {}
        ids = table.column("product_id").to_pylist()
        titles = table.column("title").to_pylist()
        categories = table.column("category").to_pylist()
        attributes = table.column("attributes").to_pylist()
        images = table.column("images").to_pylist()
        for i in range(table.num_rows):
            found: list[tuple[str, str]] = []
            if _blank(ids[i]):
                found.append(("missing_id", "product_id is null or empty"))
            has_title = not _blank(titles[i])
            row_images = images[i] or []
            if not has_title and not row_images:
                found.append(("no_title_no_image", "no title and no image"))
            for level, name in enumerate(categories[i] or []):
                if _blank(name):
                    found.append(("bad_category", f"category level {level} is null or empty"))
                    break
            seen: set[str] = set()
            for pair in attributes[i] or []:
                if pair is None or _blank(pair.get("key")):
                    found.append(("bad_attribute", "an attribute has a null or empty key"))
                    continue
                key = pair["key"]
                if key in seen:
                    found.append(("bad_attribute", f"attribute key {key!r} appears twice"))
                seen.add(key)
                if pair.get("value") is None:
                    found.append(("bad_attribute", f"attribute {key!r} has a null value"))
            for position, cell in enumerate(row_images):
                problem = _check_image(
                    cell, f"image {position}", file.parent, check_images, report, self.image_roots
                )
                if problem is not None:
                    found.append(problem)
            if found:
                reasons[i] = found
            modality = (
                "text+image"
                if has_title and row_images
                else "text-only"
                if has_title
                else "image-only"
                if row_images
                else "empty"
            )
            report.modality[modality] += 1
        return reasons


class _QueryRules:
    def __init__(self, product_ids: pa.Array | None, image_roots: ImageRoots | None = None) -> None:
        self.product_ids = product_ids
        self.image_roots = image_roots

    def check(
        self, table: pa.Table, file: Path, check_images: bool, report: TableReport
    ) -> Reasons:
        reasons: Reasons = {}
        ids = table.column("query_id").to_pylist()
        texts = table.column("query_text").to_pylist()
        images = table.column("query_image").to_pylist()
        positives = table.column("positive_id").to_pylist()
        negatives = table.column("negative_ids").to_pylist()
        known_positive: list[bool] | None = None
        if self.product_ids is not None:
            known_positive = pc.is_in(
                table.column("positive_id"), value_set=self.product_ids
            ).to_pylist()
            flat_negatives = pc.list_flatten(table.column("negative_ids"))
            known_flat = pc.is_in(flat_negatives, value_set=self.product_ids).to_pylist()
            known_flat.reverse()  # consumed with pop() in row order below
        for i in range(table.num_rows):
            found: list[tuple[str, str]] = []
            if _blank(ids[i]):
                found.append(("missing_id", "query_id is null or empty"))
            has_text = not _blank(texts[i])
            has_image = images[i] is not None
            if not has_text and not has_image:
                found.append(("no_text_no_image", "no query_text and no query_image"))
            if _blank(positives[i]):
                found.append(("missing_positive", "positive_id is null or empty"))
            elif known_positive is not None and not known_positive[i]:
                found.append(
                    ("unknown_positive", f"positive_id {positives[i]!r} is not in products")
                )
            for negative in negatives[i] or []:
                known = known_flat.pop() if self.product_ids is not None else True
                if _blank(negative):
                    found.append(("bad_negative", "negative_ids holds a null or empty id"))
                elif negative == positives[i]:
                    found.append(("bad_negative", "negative_ids contains the positive_id"))
                elif not known:
                    found.append(
                        ("unknown_negative", f"negative id {negative!r} is not in products")
                    )
            if has_image:
                problem = _check_image(
                    images[i], "query_image", file.parent, check_images, report, self.image_roots
                )
                if problem is not None:
                    found.append(problem)
            if found:
                reasons[i] = found
            modality = (
                "multimodal"
                if has_text and has_image
                else "text"
                if has_text
                else "image"
                if has_image
                else "empty"
            )
            report.modality[modality] += 1
        return reasons


# --- rendering ----------------------------------------------------------------------------


def format_report(report: ValidationReport) -> str:
    """A readable plain-text report (what ``moon2 validate`` prints)."""
    lines: list[str] = []
    for table in report.tables:
        status = "OK" if table.ok else "INVALID"
        lines.append(
            f"{table.kind}: {table.path} - {table.files} file(s), {table.rows:,} rows - {status}"
        )
        lines.append(f"  valid rows: {table.valid_rows:,}   invalid rows: {table.invalid_rows:,}")
        if table.modality:
            mix = ", ".join(f"{k} {v:,}" for k, v in sorted(table.modality.items()))
            lines.append(f"  modality: {mix}")
        lines.append(
            f"  images decoded: {table.images_decoded:,}   remote (not fetched): "
            f"{table.images_remote:,}"
        )
        if table.reason_counts:
            counts = ", ".join(f"{k} {v:,}" for k, v in table.reason_counts.most_common())
            lines.append(f"  problems by reason: {counts}")
        if table.examples:
            lines.append("  problems:")
            for problem in table.examples:
                lines.append(
                    f"    {problem.file} row {problem.row} id={problem.record_id!r}: "
                    f"{problem.reason}"
                )
            hidden = table.invalid_rows - len(table.examples)
            if hidden > 0:
                lines.append(f"    ... and {hidden:,} more invalid row(s)")
        if table.rejects_path:
            lines.append(f"  invalid rows written to {table.rejects_path}")
    return "\n".join(lines)
