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
cannot become a product (no id, a repeated id, neither title nor image) goes to
``OUT/_rejects/products`` with the reason; nothing is dropped.
"""

from __future__ import annotations

import base64
import contextlib
import glob as globlib
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
from moon2.data.schema import PRODUCTS, rejects_schema
from moon2.errors import InputError

STAGE = "convert-mbe"
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


def parse_images(value: Any, base_dir: Path | None = None) -> list[dict[str, Any]] | None:
    """MBE ``doc_image`` -> list of image cells (paths/URLs kept, bytes kept).

    A relative local path is made absolute against ``base_dir`` (the source file's folder),
    so it still points at the image from wherever the converted catalog is read.
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
                    cells.append({"bytes": None, "path": _absolute(part, base_dir)})
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


def _absolute(path: str, base_dir: Path | None) -> str:
    if base_dir is None or "://" in path or Path(path).expanduser().is_absolute():
        return path
    return str((base_dir / path).resolve())


RESERVED_EXTRAS = {"mbe_industry_name", "mbe_parse_error"}


def extra_column(key: str) -> str:
    """Name of the output column that keeps source column ``key``."""
    name = f"mbe_{key}"
    return f"mbe_src_{key}" if name in RESERVED_EXTRAS else name


def convert_record(
    record: dict[str, Any], industry_as_root: bool, base_dir: Path | None = None
) -> dict[str, Any]:
    """One MBE record -> one products row (contract columns + mbe_* extras)."""
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
        "images": parse_images(record.get("doc_image"), base_dir),
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


def convert_mbe(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    industry_as_root: bool = False,
    rows_per_part: int = 50_000,
    batch_rows: int = 2048,
) -> ConvertResult:
    """Convert MBE v1-style records at ``src`` into ``out_dir/products`` (+ ``_rejects``).

    Streams: memory holds one batch of rows plus the set of ids seen (to catch repeats).
    """
    files = _source_files(src)
    out = Path(out_dir)
    result = ConvertResult(out_dir=out)
    extra = [extra_column(key) for key in _source_keys(files) if key not in KNOWN_COLUMNS]
    columns = [*PRODUCTS.arrow_schema(strict=False), pa.field("mbe_industry_name", pa.string())]
    columns += [pa.field(name, pa.string()) for name in extra if name != "mbe_industry_name"]
    schema = pa.schema(columns)
    reject_schema = rejects_schema(pa.schema([*schema, pa.field("mbe_parse_error", pa.string())]))
    seen: dict[str, tuple[str, int]] = {}
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    with (
        PartWriter(out / "products", schema, rows_per_part=rows_per_part) as writer,
        PartWriter(out / "_rejects" / "products", reject_schema) as reject_writer,
        progress.task("converting MBE records", None) as bar,
    ):

        def flush() -> None:
            if rows:
                writer.write(pa.Table.from_pylist(rows, schema=schema))
                rows.clear()
            if rejects:
                reject_writer.write(pa.Table.from_pylist(rejects, schema=reject_schema))
                rejects.clear()

        for file in files:
            for row_number, record, error in _iter_records(file):
                result.rows_in += 1
                bar.advance(1)
                where = f"{file.name} row {row_number}"
                if record is None:
                    reason, row = str(error), {"mbe_parse_error": error}
                else:
                    row = convert_record(record, industry_as_root, file.parent.resolve())
                    reason = None
                    product_id = row["product_id"]
                    if product_id is None:
                        reason = "missing id"
                    elif product_id in seen:
                        first_file, first_row = seen[product_id]
                        reason = f"repeated id (first at {first_file} row {first_row})"
                    elif not row["title"] and not row["images"]:
                        reason = "no doc_title and no doc_image"
                if reason is None:
                    seen[row["product_id"]] = (file.name, row_number)
                    rows.append(row)
                else:
                    code = reason.split(" (")[0]
                    result.reasons[code] = result.reasons.get(code, 0) + 1
                    row["reject_stage"] = STAGE
                    row["reject_reason"] = f"{where}: {reason}"
                    rejects.append(row)
                if len(rows) + len(rejects) >= batch_rows:
                    flush()
        flush()
    result.products = writer.rows_written
    result.rejected = reject_writer.rows_written
    result.extra_columns = extra
    out.mkdir(parents=True, exist_ok=True)  # no part was written when the source is empty
    manifest = {
        "stage": STAGE,
        "source": [str(f) for f in files],
        "industry_as_root": industry_as_root,
        "rows_in": result.rows_in,
        "products": result.products,
        "rejected": result.rejected,
        "reject_reasons": result.reasons,
        "extra_columns": extra,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return result
