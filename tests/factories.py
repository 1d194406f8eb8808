"""Small builders of contract rows and tables for tests."""

from __future__ import annotations

import hashlib
import io

import pyarrow as pa
from PIL import Image

from moon2.data.schema import PRODUCTS, QUERIES


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _color_of(key: str | None) -> tuple[int, int, int]:
    digest = hashlib.sha1(str(key).encode()).digest()
    return digest[0], digest[1], digest[2]


def product_row(product_id: str | None, **overrides: object) -> dict[str, object]:
    """A valid product; its image is a flat colour derived from the id (distinct per id)."""
    row: dict[str, object] = {
        "product_id": product_id,
        "title": f"red cotton t-shirt {product_id}",
        "description": "Made of cotton.",
        "category": ["Apparel", "Tops", "T-Shirts"],
        "attributes": [{"key": "color", "value": "red"}, {"key": "material", "value": "cotton"}],
        "images": [{"bytes": png_bytes(_color_of(product_id)), "path": None}],
    }
    row.update(overrides)
    return row


def query_row(query_id: str | None, positive: str | None, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "query_id": query_id,
        "query_text": "red tee",
        "query_image": None,
        "positive_id": positive,
        "negative_ids": [],
        "ts": None,
    }
    row.update(overrides)
    return row


def products_table(rows: list[dict[str, object]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PRODUCTS.arrow_schema(strict=False))


def queries_table(rows: list[dict[str, object]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUERIES.arrow_schema(strict=False))
