"""The contract schemas: round trips and the tolerant-but-strict conversion rules."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon2.data.io import iter_batches
from moon2.data.schema import (
    ATTRIBUTE_TYPE,
    IMAGE_TYPE,
    PRODUCTS,
    QUERIES,
    conform,
    infer_kind,
    rejects_schema,
)
from moon2.errors import InputError
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row


def test_products_round_trip(tmp_path):
    rows = [product_row("a"), product_row("b", description=None, attributes=None)]
    table = pa.Table.from_pylist(rows, schema=PRODUCTS.arrow_schema())
    pq.write_table(table, tmp_path / "p.parquet")
    batches = list(iter_batches(tmp_path / "p.parquet", PRODUCTS))
    assert len(batches) == 1
    back = batches[0].table
    assert back.schema.names == PRODUCTS.names
    assert back.to_pylist() == rows


def test_queries_round_trip(tmp_path):
    when = dt.datetime(2026, 3, 1, 12, 30)
    rows = [
        query_row("q1", "a", ts=when, negative_ids=["b", "c"]),
        query_row("q2", "b", query_text=None, query_image={"bytes": png_bytes(), "path": None}),
    ]
    pq.write_table(queries_table(rows), tmp_path / "q.parquet")
    back = next(iter_batches(tmp_path / "q.parquet", QUERIES)).table
    assert back.schema.field("ts").type == pa.timestamp("us")
    assert back.to_pylist() == rows


def test_canonical_schema_keeps_contract_nullability():
    schema = PRODUCTS.arrow_schema()
    assert not schema.field("product_id").nullable
    assert schema.field("description").nullable
    assert all(f.nullable for f in PRODUCTS.arrow_schema(strict=False))
    assert not QUERIES.arrow_schema().field("positive_id").nullable


def test_extra_columns_pass_through_after_contract_columns():
    table = products_table([product_row("a")]).append_column(
        "seller_score", pa.array([4.5], pa.float64())
    )
    out = conform(table, PRODUCTS, "t")
    assert out.schema.names == [*PRODUCTS.names, "seller_score"]
    assert out.column("seller_score").to_pylist() == [4.5]


def test_missing_optional_columns_become_null():
    table = pa.table({"product_id": ["a"], "title": ["x"]})
    out = conform(table, PRODUCTS, "t")
    assert out.schema.names == PRODUCTS.names
    assert out.column("images").to_pylist() == [None]


def test_tolerant_conversions():
    image = png_bytes()
    table = pa.table(
        {
            "product_id": pa.array([1, 2], pa.int64()),
            "title": pa.array(["a", None], pa.large_string()),
            "category": pa.array(["Shoes > Boots >Ankle Boots", None]),
            "attributes": pa.array([[("color", "red")], None], pa.map_(pa.string(), pa.string())),
            "images": pa.array([[image], []], pa.list_(pa.binary())),
        }
    )
    out = conform(table, PRODUCTS, "t").to_pylist()
    assert out[0]["product_id"] == "1"
    assert out[0]["category"] == ["Shoes", "Boots", "Ankle Boots"]
    assert out[1]["category"] is None
    assert out[0]["attributes"] == [{"key": "color", "value": "red"}]
    assert out[1]["attributes"] is None
    assert out[0]["images"] == [{"bytes": image, "path": None}]
    assert out[1]["images"] == []


def test_image_paths_and_single_image_structs():
    table = pa.table(
        {
            "product_id": ["a", "b"],
            "title": ["x", "y"],
            "images": pa.array([["img/1.jpg", "https://h/2.jpg"], None], pa.list_(pa.string())),
        }
    )
    out = conform(table, PRODUCTS, "t").column("images").to_pylist()
    assert out[0] == [
        {"bytes": None, "path": "img/1.jpg"},
        {"bytes": None, "path": "https://h/2.jpg"},
    ]
    assert out[1] is None
    single = pa.table(
        {
            "product_id": ["a"],
            "title": ["x"],
            "images": pa.array([{"bytes": b"xx", "path": None}], IMAGE_TYPE),
        }
    )
    assert conform(single, PRODUCTS, "t").column("images").to_pylist() == [
        [{"bytes": b"xx", "path": None}]
    ]


def test_query_image_from_large_binary_and_sliced_input():
    data = [b"one", None, b"three"]
    table = pa.table(
        {
            "query_id": ["q1", "q2", "q3"],
            "query_image": pa.array(data, pa.large_binary()),
            "positive_id": ["a", "b", "c"],
            "negative_ids": pa.array([["x"], ["y", "z"], None], pa.large_list(pa.large_string())),
        }
    )
    out = conform(table.slice(1, 2), QUERIES, "t")
    assert out.column("query_image").to_pylist() == [None, {"bytes": b"three", "path": None}]
    assert out.column("negative_ids").to_pylist() == [["y", "z"], None]
    assert out.column("query_text").null_count == 2


@pytest.mark.parametrize(
    ("column", "array", "expected"),
    [
        ("title", pa.array([1.5]), "column 'title' has type double, expected string"),
        ("product_id", pa.array([1.5]), "column 'product_id' has type double"),
        ("images", pa.array([3]), "column 'images' has type int64"),
        ("attributes", pa.array([["a"]]), "column 'attributes' has type list<item: string>"),
    ],
)
def test_unconvertible_types_name_file_and_column(column, array, expected):
    data = {"product_id": pa.array(["a"]), "title": pa.array(["t"])}
    data[column] = array
    with pytest.raises(InputError, match=r"f\.parquet") as info:
        conform(pa.table(data), PRODUCTS, "f.parquet")
    assert expected in str(info.value)


def test_missing_required_columns():
    with pytest.raises(InputError, match="missing required products column"):
        conform(pa.table({"product_id": ["a"]}), PRODUCTS, "x")
    with pytest.raises(InputError, match="neither a query_text nor a query_image"):
        conform(pa.table({"query_id": ["q"], "positive_id": ["a"]}), QUERIES, "x")


def test_infer_kind_and_rejects_schema():
    assert infer_kind(PRODUCTS.arrow_schema()) == "products"
    assert infer_kind(QUERIES.arrow_schema()) == "queries"
    assert infer_kind(pa.schema([("x", pa.int8())])) is None
    schema = rejects_schema(PRODUCTS.arrow_schema())
    assert schema.names[-2:] == ["reject_stage", "reject_reason"]
    assert schema.field("product_id").nullable
    assert PRODUCTS.column("attributes").type == pa.list_(ATTRIBUTE_TYPE)
