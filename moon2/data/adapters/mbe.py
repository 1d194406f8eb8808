"""Convert MBE v1-style product records (``Daoze/MM-Bench-E-Commerce``) to the products contract.

Input: a ``.json`` file (one JSON array), a ``.jsonl``/``.ndjson`` file (one object per line),
a ``.parquet`` file, or a directory/glob of these. Columns used:

- ``id`` -> ``product_id`` (any scalar, written as a string)
- ``doc_title`` -> ``title``
- ``doc_image`` -> ``images``: a URL/path string, a list of them (also as JSON text), or an
  image struct/bytes; several URLs in one string are split at a ``,`` or ``;`` that is
  followed by a new ``scheme://`` (a comma inside a URL stays). URLs are kept as image paths
  (moon2 never fetches at conversion time)
- ``doc_cate1_name`` .. ``doc_cate4_name`` -> ``category`` (empty levels dropped); with
  ``industry_as_root`` the ``doc_industry_name`` becomes the first level
- ``doc_attributes`` -> ``attributes``; accepted forms: a mapping, a list of ``{key, value}``
  objects or ``[key, value]`` pairs, a JSON string of either, or MBE's text form
  ``"key:value,,key:value"`` (``!!!`` separates several values of one key; ``;`` and newlines
  also separate pairs, and the full-width colon is accepted). Values of a repeated key are
  joined with ``|``; an item without a colon becomes ``{key: item, value: ""}``.

Every other source column is kept as ``mbe_<name>`` (nested values as JSON text). A row that
cannot become a product (no id, a repeated id, neither title nor image, a relative image path
leading outside the source folder) goes to ``OUT/_rejects/products`` with the reason;
nothing is dropped.
"""

from __future__ import annotations

import base64
import contextlib
import glob as globlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moon2 import progress
from moon2.data.io import PartWriter
from moon2.data.outdir import claim_output
from moon2.data.schema import PRODUCTS, QUERIES, rejects_schema
from moon2.errors import InputError

STAGE = "convert-mbe"
# what the conversion writes directly in OUT (a re-run deletes these, only in its own folder)
OUTPUTS = ("products", "queries", "_rejects", "manifest.json")
CATEGORY_COLUMNS = tuple(f"doc_cate{level}_name" for level in range(1, 5))
KNOWN_COLUMNS = {
    "id",
    "doc_title",
    "doc_image",
    "doc_industry_name",
    "doc_attributes",
    *CATEGORY_COLUMNS,
}
_SOURCE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".parquet", ".pq")
# Several image references in one cell are split on "," or ";" only where a new URI starts,
# so that a comma inside a URL (e.g. "?x-oss-process=image/resize,w_800") stays part of it.
_IMAGE_SPLIT = re.compile(r"\s*[,;]\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


@dataclass
class ConvertResult:
    out_dir: Path
    rows_in: int = 0
    products: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    extra_columns: list[str] = field(default_factory=list)
    merged_repeats: int = 0
    queries: int = 0
    queries_rejected: int = 0


def _source_files(src: str | os.PathLike[str]) -> list[Path]:
    text = os.fspath(src)
    if set("*?[") & set(text):
        files = sorted(Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file())
    else:
        root = Path(text)
        if not root.exists():
            raise InputError(f"{root} does not exist")
        # Like moon2.data.io: files and directories named ".*" or "_*" are not data (this
        # also keeps an OUT/_rejects or a hidden cache inside SRC from being read back).
        files = (
            [root]
            if root.is_file()
            else sorted(
                p
                for p in root.rglob("*")
                if p.is_file()
                and p.suffix.lower() in _SOURCE_SUFFIXES
                and not any(part.startswith((".", "_")) for part in p.relative_to(root).parts)
            )
        )
    files = [f for f in files if not f.name.startswith((".", "_"))]
    unsupported = [f for f in files if f.suffix.lower() not in _SOURCE_SUFFIXES]
    if unsupported:
        raise InputError(f"{unsupported[0]} is not a .json, .jsonl, .ndjson or .parquet file")
    if not files:
        raise InputError(f"no .json, .jsonl or .parquet files found at {text}")
    return files


def _source_root(src: str | os.PathLike[str], files: list[Path]) -> Path:
    """The folder relative image paths must stay in: SRC when it is a folder, else the
    folder holding every source file."""
    if Path(os.fspath(src)).is_dir():
        return Path(src).resolve()
    return Path(os.path.commonpath([f.parent.resolve() for f in files]))


def _iter_records(file: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(row number, record or None, parse error or None) for every row of a source file."""
    suffix = file.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            reader = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{file} is not a readable Parquet file ({exc})") from None
        row = 0
        try:
            for batch in reader.iter_batches(batch_size=2048):
                for record in batch.to_pylist():
                    yield row, record, None
                    row += 1
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{file} could not be read after row {row} ({exc})") from None
        return
    with open(file, encoding="utf-8-sig") as handle:  # tolerate a byte-order mark
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if head.startswith("["):
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise InputError(f"{file} is not valid JSON ({exc})") from None
            for row, record in enumerate(records):
                if isinstance(record, dict):
                    yield row, record, None
                else:
                    yield row, None, f"element is a {type(record).__name__}, not an object"
            return
        for row, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield row, None, f"line is not valid JSON ({exc.msg})"
                continue
            if isinstance(record, dict):
                yield row, record, None
            else:
                yield row, None, f"line holds a {type(record).__name__}, not an object"


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-made files
        return ""
    return str(value).strip()


def parse_attributes(value: Any) -> list[dict[str, str]] | None:
    """MBE attribute value (see module docstring) -> list of {key, value}, or None if empty."""
    pairs: list[tuple[str, str]] = []
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip()[:1] in "{[":
        with contextlib.suppress(json.JSONDecodeError):  # text that merely starts with "{["
            value = json.loads(value)
    if isinstance(value, dict):
        pairs = [(_text(k), _value_text(v)) for k, v in value.items()]
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and "key" in item:
                pairs.append((_text(item["key"]), _value_text(item.get("value"))))
            elif isinstance(item, dict):
                pairs.extend((_text(k), _value_text(v)) for k, v in item.items())
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((_text(item[0]), _value_text(item[1])))
            elif _text(item):
                pairs.extend(_parse_attribute_text(_text(item)))
    else:
        pairs = _parse_attribute_text(_text(value))
    merged: dict[str, list[str]] = {}
    for key, val in pairs:
        if not key:
            continue
        values = merged.setdefault(key, [])
        for part in val.split("|"):  # dedupe single values, also inside "a|b" (from "!!!")
            part = part.strip()
            if part and part not in values:
                values.append(part)
    if not merged:
        return None
    return [{"key": key, "value": "|".join(values)} for key, values in merged.items()]


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "|".join(_text(v) for v in value if _text(v))
    return _text(value).replace("!!!", "|")


def _parse_attribute_text(text: str) -> list[tuple[str, str]]:
    for separator in (",,", ";", "；", "\n"):
        if separator in text:
            items = text.split(separator)
            break
    else:
        items = [text]
    pairs = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        colon = min((i for i in (item.find(":"), item.find("：")) if i >= 0), default=-1)
        if colon < 0:
            pairs.append((item, ""))
        else:
            pairs.append((item[:colon].strip(), item[colon + 1 :].strip().replace("!!!", "|")))
    return pairs


class PathOutsideSource(ValueError):
    """A relative image path that leads out of the source folder (e.g. ``../../etc/x``)."""


def parse_images(
    value: Any, base_dir: Path | None = None, root: Path | None = None
) -> list[dict[str, Any]] | None:
    """MBE ``doc_image`` -> list of image cells (paths/URLs kept, bytes kept).

    A relative local path is made absolute against ``base_dir`` (the source file's folder),
    so it still points at the image from wherever the converted catalog is read. One that
    resolves outside ``root`` (the source folder; default ``base_dir``) raises
    PathOutsideSource: conversion never turns it into a path to somewhere else.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):  # a JSON list of URLs written as text
            value = json.loads(value)
    items = value if isinstance(value, (list, tuple)) else [value]
    cells = []
    for item in items:
        if isinstance(item, dict):
            data, path = item.get("bytes"), item.get("path")
            if isinstance(data, str):  # base64 in JSON exports
                data = base64.b64decode(data)
            if data is not None or path:
                cells.append({"bytes": data, "path": path or None})
        elif isinstance(item, (bytes, bytearray)):
            cells.append({"bytes": bytes(item), "path": None})
        elif _text(item):
            text = _text(item)
            # several URLs in one cell, as some exports write them
            for part in _IMAGE_SPLIT.split(text):
                if part:
                    cells.append({"bytes": None, "path": _absolute(part, base_dir, root)})
    return cells or None


def _id_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():  # 123.0 from pandas-made files
        return str(int(value))
    return _text(value)


def _extra_value(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    return str(value)


def _absolute(path: str, base_dir: Path | None, root: Path | None = None) -> str:
    if base_dir is None or "://" in path or Path(path).expanduser().is_absolute():
        return path
    resolved = (base_dir / path).resolve()
    if not resolved.is_relative_to((root or base_dir).resolve()):
        raise PathOutsideSource("a relative doc_image path leads outside the source folder")
    return str(resolved)


RESERVED_EXTRAS = {"mbe_industry_name", "mbe_parse_error", "mbe_split"}


def extra_column(key: str) -> str:
    """Name of the output column that keeps source column ``key``."""
    name = f"mbe_{key}"
    return f"mbe_src_{key}" if name in RESERVED_EXTRAS else name


def convert_record(
    record: dict[str, Any],
    industry_as_root: bool,
    base_dir: Path | None = None,
    root: Path | None = None,
) -> dict[str, Any]:
    """One MBE record -> one products row (contract columns + mbe_* extras); raises
    PathOutsideSource as :func:`parse_images` does."""
    category = [_text(record.get(column)) for column in CATEGORY_COLUMNS]
    category = [level for level in category if level]
    industry = _text(record.get("doc_industry_name"))
    if industry_as_root and industry:
        category.insert(0, industry)
    row = {
        "product_id": _id_text(record.get("id")) or None,
        "title": _text(record.get("doc_title")),
        "description": None,
        "category": category or None,
        "attributes": parse_attributes(record.get("doc_attributes")),
        "images": parse_images(record.get("doc_image"), base_dir, root),
        "mbe_industry_name": industry or None,
    }
    for key, value in record.items():
        if key not in KNOWN_COLUMNS:
            row[extra_column(key)] = _extra_value(value)
    return row


def _source_keys(files: list[Path]) -> list[str]:
    """The union of source column names, in first-seen order (a cheap first pass)."""
    keys: dict[str, None] = {}
    for file in files:
        if file.suffix.lower() in (".parquet", ".pq"):
            try:
                names = pq.ParquetFile(file).schema_arrow.names
            except (pa.ArrowException, OSError) as exc:
                raise InputError(f"{file} is not a readable Parquet file ({exc})") from None
            keys.update(dict.fromkeys(names))
            continue
        for _, record, _ in _iter_records(file):
            if record is not None:
                keys.update(dict.fromkeys(record))
    return list(keys)


QUERY_TEXT_COLUMNS = ("query", "query_text", "query_title")
QUERY_IMAGE_COLUMNS = ("query_image", "query_img", "query_image_url")
QUERY_ID_COLUMNS = ("query_id", "qid")
NEGATIVE_COLUMNS = ("negative_ids", "neg_ids", "negatives")
_SPLIT_WORDS = {"train": "train", "test": "test", "eval": "test", "valid": "test", "dev": "test"}


def infer_split(file: Path) -> str | None:
    """'train' or 'test' from a file name such as ``train-00001.parquet``, else None."""
    words = re.split(r"[^a-z]+", file.stem.lower())
    for word in words:
        if word in _SPLIT_WORDS:
            return _SPLIT_WORDS[word]
    return None


@dataclass
class _QueryColumns:
    text: str | None
    image: str | None
    query_id: str | None
    negatives: str | None

    @property
    def present(self) -> bool:
        return self.text is not None or self.image is not None

    def names(self) -> set[str]:
        return {n for n in (self.text, self.image, self.query_id, self.negatives) if n}


def _first_present(keys: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in keys), None)


def _negatives(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(text)
        if isinstance(value, str):
            value = [v for v in re.split(r"[,;\s]+", text) if v]
    if isinstance(value, (list, tuple)):
        return [_id_text(v) for v in value if _id_text(v)]
    return [_id_text(value)]


def _content_key(row: dict[str, Any]) -> str:
    data = {k: row[k] for k in ("title", "category", "attributes")}
    data["images"] = [
        (hashlib.sha1(c["bytes"], usedforsecurity=False).hexdigest() if c["bytes"] else c["path"])
        for c in row["images"] or []
    ]
    return hashlib.sha1(
        json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode(),
        usedforsecurity=False,
    ).hexdigest()


def convert_mbe(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    industry_as_root: bool = False,
    split: str | None = None,
    rows_per_part: int = 50_000,
    batch_rows: int = 2048,
) -> ConvertResult:
    """Convert MBE-style records at ``src`` into ``out_dir`` (see :func:`_convert`); a re-run
    into its own OUT replaces the earlier output whole, so two conversions never mix."""
    files = _source_files(src)  # a missing or empty source is refused before OUT is made
    inputs = [src, *files]
    with claim_output(out_dir, STAGE, inputs=inputs, outputs=OUTPUTS, resume=False) as claim:
        return _convert(
            src, files, claim.path, industry_as_root, split, rows_per_part, batch_rows
        )


def _convert(
    src: str | os.PathLike[str],
    files: list[Path],
    out_dir: str | os.PathLike[str],
    industry_as_root: bool,
    split: str | None,
    rows_per_part: int,
    batch_rows: int,
) -> ConvertResult:
    """Convert MBE-style records at ``src`` into ``out_dir/products`` (+ ``queries``, rejects).

    Query-document pair files (a query text and/or image column next to the product columns)
    also yield ``queries/``: one query per row, ``positive_id`` = the row's product. A product
    repeated with identical content (one product bought after several queries) is written
    once; a repeated id with different content is rejected. ``split`` ('train'/'test', or
    None to infer it from file names) fills an ``mbe_split`` column on both tables, which
    ``moon2 build-bench`` can follow (``split.column: mbe_split``).

    Streams: memory holds one batch of rows plus, per product id seen, a content hash.
    """
    if split not in (None, "train", "test"):
        raise InputError(f"split must be 'train' or 'test', not {split!r}")
    root = _source_root(src, files)
    out = Path(out_dir)
    result = ConvertResult(out_dir=out)
    keys = _source_keys(files)
    query_columns = _QueryColumns(
        text=_first_present(keys, QUERY_TEXT_COLUMNS),
        image=_first_present(keys, QUERY_IMAGE_COLUMNS),
        query_id=_first_present(keys, QUERY_ID_COLUMNS),
        negatives=_first_present(keys, NEGATIVE_COLUMNS),
    )
    known = KNOWN_COLUMNS | query_columns.names()
    extra = [extra_column(key) for key in keys if key not in known]
    columns = [
        *PRODUCTS.arrow_schema(strict=False),
        pa.field("mbe_industry_name", pa.string()),
        pa.field("mbe_split", pa.string()),
    ]
    columns += [pa.field(name, pa.string()) for name in extra if name not in RESERVED_EXTRAS]
    schema = pa.schema(columns)
    reject_schema = rejects_schema(pa.schema([*schema, pa.field("mbe_parse_error", pa.string())]))
    query_schema = pa.schema(
        [*QUERIES.arrow_schema(strict=False), pa.field("mbe_split", pa.string())]
    )
    seen: dict[str, tuple[str, int, str]] = {}
    buffers: dict[str, list[dict[str, Any]]] = {
        "products": [],
        "rejects": [],
        "queries": [],
        "query_rejects": [],
    }
    writers = {
        "products": PartWriter(out / "products", schema, rows_per_part=rows_per_part),
        "rejects": PartWriter(out / "_rejects" / "products", reject_schema),
    }
    schemas = {"products": schema, "rejects": reject_schema}
    if query_columns.present:
        writers["queries"] = PartWriter(out / "queries", query_schema, rows_per_part=rows_per_part)
        writers["query_rejects"] = PartWriter(
            out / "_rejects" / "queries", rejects_schema(query_schema)
        )
        schemas["queries"] = query_schema
        schemas["query_rejects"] = rejects_schema(query_schema)
    query_ids: set[str] = set()

    def flush() -> None:
        for name, rows in buffers.items():
            if rows:
                writers[name].write(pa.Table.from_pylist(rows, schema=schemas[name]))
                rows.clear()

    try:
        with progress.task("converting MBE records", None) as bar:
            for file in files:
                file_split = split or infer_split(file)
                base = file.parent.resolve()
                for row_number, record, error in _iter_records(file):
                    result.rows_in += 1
                    bar.advance(1)
                    where = f"{file.name} row {row_number}"
                    if record is None:
                        result.reasons[str(error).split(" (")[0]] = (
                            result.reasons.get(str(error).split(" (")[0], 0) + 1
                        )
                        buffers["rejects"].append(
                            {
                                "mbe_parse_error": error,
                                "reject_stage": STAGE,
                                "reject_reason": f"{where}: {error}",
                            }
                        )
                        continue
                    outside = None
                    try:
                        row = convert_record(record, industry_as_root, base, root)
                    except PathOutsideSource as exc:
                        # rejected with its paths as written, never resolved outside SRC
                        row = convert_record(record, industry_as_root)
                        outside = str(exc)
                    row["mbe_split"] = file_split
                    product_id = row["product_id"]
                    reason = None
                    merged = False
                    if outside is not None:
                        reason = outside
                    elif product_id is None:
                        reason = "missing id"
                    elif not row["title"] and not row["images"]:
                        reason = "no doc_title and no doc_image"
                    elif product_id in seen:
                        first_file, first_row, first_key = seen[product_id]
                        if _content_key(row) == first_key:
                            merged = True
                        else:
                            reason = f"repeated id (first at {first_file} row {first_row})"
                    if reason is not None:
                        code = reason.split(" (")[0]
                        result.reasons[code] = result.reasons.get(code, 0) + 1
                        row["reject_stage"] = STAGE
                        row["reject_reason"] = f"{where}: {reason}"
                        buffers["rejects"].append(row)
                    elif merged:
                        result.merged_repeats += 1
                    else:
                        seen[product_id] = (file.name, row_number, _content_key(row))
                        buffers["products"].append(row)
                    if query_columns.present:
                        _add_query(
                            record,
                            row,
                            reason,
                            where,
                            file,
                            row_number,
                            (base, root),
                            query_columns,
                            query_ids,
                            buffers,
                            result,
                        )
                    if sum(len(rows) for rows in buffers.values()) >= batch_rows:
                        flush()
            flush()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    result.products = writers["products"].rows_written
    result.rejected = writers["rejects"].rows_written
    if query_columns.present:
        result.queries = writers["queries"].rows_written
        result.queries_rejected = writers["query_rejects"].rows_written
    result.extra_columns = extra
    out.mkdir(parents=True, exist_ok=True)  # no part was written when the source is empty
    manifest = {
        "stage": STAGE,
        "source": [str(f) for f in files],
        "industry_as_root": industry_as_root,
        "split": split or "inferred from file names",
        "rows_in": result.rows_in,
        "products": result.products,
        "merged_repeats": result.merged_repeats,
        "rejected": result.rejected,
        "reject_reasons": result.reasons,
        "queries": result.queries,
        "queries_rejected": result.queries_rejected,
        "query_columns": {
            "text": query_columns.text,
            "image": query_columns.image,
            "query_id": query_columns.query_id,
            "negatives": query_columns.negatives,
        },
        "extra_columns": extra,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return result


def _add_query(
    record: dict[str, Any],
    product: dict[str, Any],
    product_reason: str | None,
    where: str,
    file: Path,
    row_number: int,
    folders: tuple[Path, Path],
    columns: _QueryColumns,
    seen: set[str],
    buffers: dict[str, list[dict[str, Any]]],
    result: ConvertResult,
) -> None:
    """``folders``: the source file's folder and the source root (see :func:`parse_images`)."""
    text = _text(record.get(columns.text)) if columns.text else ""
    outside = None
    try:
        images = parse_images(record.get(columns.image), *folders) if columns.image else None
    except PathOutsideSource as exc:
        images = parse_images(record.get(columns.image))  # kept as written in the reject
        outside = str(exc).replace("doc_image", columns.image or "query image")
    if not text and not images:
        return  # a product-only row
    query_id = _id_text(record.get(columns.query_id)) if columns.query_id else ""
    query_id = query_id or f"{file.stem}:{row_number}"
    row = {
        "query_id": query_id,
        "query_text": text or None,
        "query_image": images[0] if images else None,
        "positive_id": product["product_id"],
        "negative_ids": _negatives(record.get(columns.negatives)) if columns.negatives else None,
        "ts": None,
        "mbe_split": product.get("mbe_split"),
    }
    reason = None
    if outside is not None:
        reason = outside
    elif query_id in seen:
        reason = f"repeated query id {query_id}"
    elif product_reason is not None and product_reason != "no doc_title and no doc_image":
        reason = f"its product was rejected ({product_reason})"
    elif product["product_id"] is None:
        reason = "no product id"
    if reason is None:
        seen.add(query_id)
        buffers["queries"].append(row)
    else:
        row["reject_stage"] = STAGE
        row["reject_reason"] = f"{where}: {reason}"
        buffers["query_rejects"].append(row)
