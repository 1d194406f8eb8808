"""The moon2 Parquet contract as code: the single source of truth for column names and types.

See ``shared/design/data-contract.md``. Two tables, ``products`` and ``queries``, plus the
``_rejects`` variant of either (same columns + ``reject_stage`` + ``reject_reason``).

Reading is tolerant where the meaning is unambiguous (``large_string`` for ``string``, integer
ids, a list of paths or of raw bytes for a list of images, a ``map`` for the attribute list, a
``"A > B > C"`` string for a category path) and strict everywhere else: a column that cannot be
converted without guessing is an :class:`~moon2.errors.InputError` naming file and column.
Columns outside the contract pass through unchanged, after the contract columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from moon2.errors import InputError

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""An image cell: the Hugging Face ``datasets`` Image struct."""

ATTRIBUTE_TYPE = pa.struct([pa.field("key", pa.string()), pa.field("value", pa.string())])
"""One attribute; a product holds a list of them, each key at most once."""

CATEGORY_SEPARATOR = ">"
"""A category given as one string is read as a path split on this character."""


@dataclass(frozen=True)
class ColumnSpec:
    """One contract column."""

    name: str
    type: pa.DataType
    nullable: bool
    required: bool
    """Must be present as a column in every input file (others default to all-null)."""
    doc: str
    is_id: bool = False
    """Holds product/query ids: integer ids are accepted and read as strings."""


@dataclass(frozen=True)
class TableSpec:
    """One contract table."""

    kind: str
    id_column: str
    columns: tuple[ColumnSpec, ...]

    @property
    def names(self) -> list[str]:
        return [column.name for column in self.columns]

    def column(self, name: str) -> ColumnSpec:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def arrow_schema(self, strict: bool = True) -> pa.Schema:
        """The Arrow schema of the contract columns.

        ``strict`` keeps the contract's non-null flags (for writing canonical output); the
        relaxed form, with every field nullable, holds rows that break the contract (rejects,
        validation input).
        """
        return pa.schema(
            [pa.field(c.name, c.type, nullable=c.nullable or not strict) for c in self.columns]
        )


PRODUCTS = TableSpec(
    kind="products",
    id_column="product_id",
    columns=(
        ColumnSpec("product_id", pa.string(), False, True, "unique key", is_id=True),
        ColumnSpec(
            "title",
            pa.string(),
            # The contract says non-null, but an image-only product has no title; a null title
            # is read as "no title" and the row rule (title or image) decides validity.
            True,
            True,
            "seller title as listed (noisy, any language); empty for image-only products",
        ),
        ColumnSpec("description", pa.string(), True, False, "free text"),
        ColumnSpec("category", pa.list_(pa.string()), True, False, "category path, root first"),
        ColumnSpec(
            "attributes", pa.list_(ATTRIBUTE_TYPE), True, False, "key/value pairs, unique keys"
        ),
        ColumnSpec("images", pa.list_(IMAGE_TYPE), True, False, "main image first, then views"),
    ),
)

QUERIES = TableSpec(
    kind="queries",
    id_column="query_id",
    columns=(
        ColumnSpec("query_id", pa.string(), False, True, "unique key", is_id=True),
        ColumnSpec("query_text", pa.string(), True, False, "what the user typed"),
        ColumnSpec("query_image", IMAGE_TYPE, True, False, "what the user photographed"),
        ColumnSpec(
            "positive_id", pa.string(), False, True, "product bought after the query", is_id=True
        ),
        ColumnSpec(
            "negative_ids",
            pa.list_(pa.string()),
            True,
            False,
            "products shown but not chosen",
            is_id=True,
        ),
        ColumnSpec("ts", pa.timestamp("us"), True, False, "when"),
    ),
)

TABLES: dict[str, TableSpec] = {PRODUCTS.kind: PRODUCTS, QUERIES.kind: QUERIES}

REJECT_COLUMNS: tuple[pa.Field, ...] = (
    pa.field("reject_stage", pa.string(), nullable=False),
    pa.field("reject_reason", pa.string(), nullable=False),
)


def table_spec(kind: str) -> TableSpec:
    try:
        return TABLES[kind]
    except KeyError:
        raise InputError(f"unknown table kind {kind!r}; expected one of {sorted(TABLES)}") from None


def rejects_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` relaxed to all-nullable, plus the two reject columns."""
    fields = [field.with_nullable(True) for field in schema if field.name not in _reject_names()]
    return pa.schema([*fields, *REJECT_COLUMNS])


def _reject_names() -> set[str]:
    return {field.name for field in REJECT_COLUMNS}


def infer_kind(schema: pa.Schema) -> str | None:
    """Guess the table kind from its id column; None when neither id column is present."""
    names = set(schema.names)
    if PRODUCTS.id_column in names and QUERIES.id_column not in names:
        return PRODUCTS.kind
    if QUERIES.id_column in names and PRODUCTS.id_column not in names:
        return QUERIES.kind
    return None


def check_columns(schema: pa.Schema, spec: TableSpec, source: str) -> None:
    """Raise InputError when a required column is missing or a column cannot be converted."""
    missing = [c.name for c in spec.columns if c.required and c.name not in schema.names]
    if missing:
        raise InputError(
            f"{source} is missing required {spec.kind} column(s) {', '.join(missing)} "
            f"(found: {', '.join(schema.names) or 'no columns'})"
        )
    if spec is QUERIES and not {"query_text", "query_image"} & set(schema.names):
        raise InputError(f"{source} has neither a query_text nor a query_image column")
    for column in spec.columns:
        if column.name in schema.names:
            field = schema.field(column.name)
            if not _convertible(field.type, column.type, column.is_id):
                raise InputError(
                    f"{source}: column {column.name!r} has type {field.type}, expected "
                    f"{column.type}{_type_hint(column)}"
                )


def conform(batch: pa.RecordBatch | pa.Table, spec: TableSpec, source: str) -> pa.Table:
    """Return ``batch`` with the contract columns in contract types and order, extras after.

    Missing optional columns are added as all-null; nothing else about the data changes.
    """
    check_columns(batch.schema, spec, source)
    table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
    table = table.combine_chunks()
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for column in spec.columns:
        if column.name in table.column_names:
            chunked = table.column(column.name)
            array = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            array = _convert(array, column.type)
        else:
            array = pa.nulls(table.num_rows, column.type)
        arrays.append(array)
        fields.append(pa.field(column.name, column.type, nullable=True))
    for name in table.column_names:
        if name not in spec.names:
            chunked = table.column(name)
            arrays.append(chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


# --- conversion rules ---------------------------------------------------------------------


def _is_stringish(t: pa.DataType) -> bool:
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or (pa.types.is_dictionary(t) and _is_stringish(t.value_type))
    )


def _is_binaryish(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def _is_listish(t: pa.DataType) -> bool:
    return (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )


def _is_image_struct(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name for i in range(t.num_fields)}
    if not names or not names <= {"bytes", "path"}:
        return False
    ok_bytes = (
        "bytes" not in names
        or _is_binaryish(t.field("bytes").type)
        or pa.types.is_null(t.field("bytes").type)
    )
    ok_path = (
        "path" not in names
        or _is_stringish(t.field("path").type)
        or pa.types.is_null(t.field("path").type)
    )
    return ok_bytes and ok_path


def _is_attribute_struct(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t) or t.num_fields != 2:
        return False
    names = [t.field(i).name for i in range(2)]
    return names == ["key", "value"] and _is_stringish(t.field(0).type)


def _convertible(source: pa.DataType, target: pa.DataType, integers: bool = False) -> bool:
    if pa.types.is_null(source) or source == target:
        return True
    if pa.types.is_dictionary(source):
        return _convertible(source.value_type, target, integers)
    if pa.types.is_string(target):
        return _is_stringish(source) or (integers and pa.types.is_integer(source))
    if pa.types.is_timestamp(target):
        return pa.types.is_timestamp(source) or pa.types.is_date(source)
    if target == IMAGE_TYPE:
        return _is_image_struct(source) or _is_binaryish(source) or _is_stringish(source)
    if pa.types.is_list(target):
        value_type = target.value_type
        if pa.types.is_map(source) and value_type == ATTRIBUTE_TYPE:
            return _is_stringish(source.key_type)
        if _is_listish(source):
            inner = source.value_type
            if value_type == ATTRIBUTE_TYPE:
                return _is_attribute_struct(inner) or pa.types.is_null(inner)
            return _convertible(inner, value_type, integers)
        if value_type == IMAGE_TYPE:  # a single image where a list is expected
            return _convertible(source, IMAGE_TYPE)
        if pa.types.is_string(value_type):  # "A > B > C" category path
            return _is_stringish(source)
    return False


def _convert(array: pa.Array, target: pa.DataType) -> pa.Array:
    source = array.type
    if source == target:
        return array
    if array.offset:  # sliced nested arrays expose unsliced children: materialise the slice
        array = array.take(pa.array(range(len(array)), pa.int64()))
    if pa.types.is_null(source):
        return pa.nulls(len(array), target)
    if pa.types.is_dictionary(source):
        return _convert(array.dictionary_decode(), target)
    if pa.types.is_string(target) or pa.types.is_timestamp(target):
        return array.cast(target)
    if target == IMAGE_TYPE:
        return _to_image_struct(array)
    # target is a list type
    value_type = target.value_type
    if pa.types.is_map(source):
        values = pa.StructArray.from_arrays(
            [array.keys.cast(pa.string()), array.items.cast(pa.string())],
            fields=list(ATTRIBUTE_TYPE),
        )
        return pa.ListArray.from_arrays(array.offsets, values, type=target, mask=array.is_null())
    if _is_listish(source):
        if (
            pa.types.is_fixed_size_list(source)
            or pa.types.is_list_view(source)
            or (pa.types.is_large_list_view(source))
        ):
            array = array.cast(pa.large_list(source.value_type))
        inner = _convert_values(array.values, value_type)
        offsets = array.offsets.cast(pa.int32())
        return pa.ListArray.from_arrays(offsets, inner, type=target, mask=array.is_null())
    if value_type == IMAGE_TYPE:
        images = _to_image_struct(array)
        offsets = pa.array(range(len(array) + 1), pa.int32())
        return pa.ListArray.from_arrays(offsets, images, type=target, mask=array.is_null())
    # category path given as one string
    text = array.cast(pa.string())
    parts = pc.split_pattern(text, CATEGORY_SEPARATOR)
    parts = pa.ListArray.from_arrays(
        parts.offsets, pc.utf8_trim_whitespace(parts.values), type=target, mask=text.is_null()
    )
    return parts


def _convert_values(values: pa.Array, value_type: pa.DataType) -> pa.Array:
    if value_type == ATTRIBUTE_TYPE:
        if pa.types.is_null(values.type):
            return pa.nulls(len(values), ATTRIBUTE_TYPE)
        keys = pc.struct_field(values, "key").cast(pa.string())
        vals = pc.struct_field(values, "value").cast(pa.string())
        return pa.StructArray.from_arrays(
            [keys, vals], fields=list(ATTRIBUTE_TYPE), mask=values.is_null()
        )
    return _convert(values, value_type)


def _to_image_struct(array: pa.Array) -> pa.Array:
    source = array.type
    n = len(array)
    if pa.types.is_struct(source):
        names = {source.field(i).name for i in range(source.num_fields)}
        data = (
            pc.struct_field(array, "bytes").cast(pa.binary())
            if "bytes" in names
            else pa.nulls(n, pa.binary())
        )
        path = (
            pc.struct_field(array, "path").cast(pa.string())
            if "path" in names
            else pa.nulls(n, pa.string())
        )
    elif _is_binaryish(source):
        data, path = array.cast(pa.binary()), pa.nulls(n, pa.string())
    else:
        data, path = pa.nulls(n, pa.binary()), array.cast(pa.string())
    return pa.StructArray.from_arrays([data, path], fields=list(IMAGE_TYPE), mask=array.is_null())


def _type_hint(column: ColumnSpec) -> str:
    hints = {
        "images": " (a list of {bytes, path} structs, of raw image bytes or of paths/URIs)",
        "query_image": " (a {bytes, path} struct, raw image bytes or a path/URI)",
        "attributes": " (a list of {key, value} structs or a map<string, string>)",
        "category": " (a list of strings, root first, or one 'A > B > C' string)",
    }
    return hints.get(column.name, "")
