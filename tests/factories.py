"""Small builders of contract rows and tables for tests."""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
from PIL import Image

from moon2.data.schema import PRODUCTS, QUERIES
from moon2.train.config import TrainConfig
from moon2.train.data import Batch


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


# The smallest config that exercises every part: MoE, intra loss, filter, checkpoints.
TINY: dict = {
    "device": "cpu",
    "model": {
        "tiny": {
            "hidden_size": 32,
            "layers": 2,
            "vision_depth": 1,
            "init_token_embeddings": "random",
        },
        "image_min_pixels": 28 * 28,
        "image_max_pixels": 56 * 56,
        "max_text_tokens": 24,
    },
    "moe": {"num_experts": 4, "top_k": 2, "layers": "last:1"},
    "data": {"max_images": 1, "max_negatives": 1},
    "optim": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.1},
    "checkpoint": {"every_steps": 5, "keep": 2},
    "log_every": 1,
}


def tiny_config(**sections: dict) -> TrainConfig:
    data = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return TrainConfig.model_validate(data)


TRAINED_EPOCHS = 5


def duplicate_pair_batch() -> Batch:
    """A batch of 2 text queries and 3 candidates a, a2 (a duplicate listing of a: same
    group 7) and b (group 9): query 0 buys a and is given a2 as a negative, query 1 buys b;
    the intra loss aligns a, a2 and b. Rows: candidates 0-2, queries 3-4, intra images 5-7,
    intra texts 8-10."""
    return Batch(
        positions=[0, 1],
        query_ids=["q0", "q1"],
        inputs=None,
        groups={"candidates": (0, 3), "t2mm": (3, 5), "intra_image": (5, 8), "intra_text": (8, 11)},
        view_rows={"t2mm": [0, 1]},
        candidate_ids=["a", "a2", "b"],
        positive_col=[0, 2],
        negative_cols=[[1], [0]],
        intra_ids=["a", "a2", "b"],
        rejected=[],
        images_failed=0,
        candidate_dup_groups=[7, 7, 9],
        intra_dup_groups=[7, 7, 9],
    )
