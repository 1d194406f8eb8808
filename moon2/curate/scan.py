"""The one pass over the rows that ``moon2 filter`` makes before deciding anything.

For every product part it writes a light table: the row's position, duplicate keys, category
label and, from the encoder, the title, image, context (description + category + attributes)
and product vectors. For every query part: the query vector and its bought/shown products.
Rows that break the data contract are marked with a reject reason here and skipped by every
scorer. Parts are the unit of resume and of Ray scheduling; a part's output is written
atomically, so a killed run re-does at most the parts it was working on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from moon2.bench.build import image_key, normalise_title
from moon2.curate.config import CurateConfig
from moon2.data.images import ImageDecodeError, decode_images, read_image_bytes
from moon2.data.parts import PartSpec, read_slice
from moon2.data.schema import PRODUCTS, QUERIES, conform
from moon2.data.validate import row_problems
from moon2.models.base import EncodeItem, Encoder

PRODUCT_VECTORS = ("title_vec", "image_vec", "product_vec")
TEXT_VECTORS = ("text_title_vec", "text_context_vec")
SAME = "same"


def _minilm_spec() -> str:
    from moon2.models.offline import minilm_dir

    return f"hf:{minilm_dir()}"


def encoder_spec(config: CurateConfig) -> str:
    """The product encoder the config names; the offline MiniLM text model when none."""
    return config.embed.model or _minilm_spec()


def text_encoder_spec(config: CurateConfig) -> str:
    """The encoder of the text-only views."""
    if config.embed.text_model == SAME:
        return encoder_spec(config)
    return config.embed.text_model or _minilm_spec()


@dataclass
class Encoders:
    """The product encoder and the text encoder (the same object when the specs agree)."""

    model: Encoder
    text: Encoder


def load_curate_encoders(config: CurateConfig) -> Encoders:
    from moon2.models.registry import load_encoder

    model = load_encoder(encoder_spec(config), device=config.embed.device)
    if text_encoder_spec(config) == encoder_spec(config):
        return Encoders(model, model)
    return Encoders(model, load_encoder(text_encoder_spec(config), device=config.embed.device))


def context_text(
    description: str | None,
    category: Sequence[str] | None,
    attributes: Sequence[dict[str, Any]] | None,
) -> str | None:
    """What a listing says besides its title, as one text: category path, attributes,
    description. None when it says nothing."""
    parts = []
    if category:
        parts.append(" > ".join(c for c in category if c))
    pairs = [f"{a['key']}: {a['value']}" for a in attributes or [] if a and a.get("key")]
    if pairs:
        parts.append(", ".join(pairs))
    if description and description.strip():
        parts.append(description.strip())
    return ". ".join(parts) if parts else None


def images_key(cells: Sequence[dict[str, Any] | None] | None, base: Path) -> str | None:
    """Hash of every image's bytes, in order (None without images). Local paths are read; a
    remote URI counts by its address."""
    digest = hashlib.sha1(usedforsecurity=False)
    count = 0
    for cell in cells or []:
        if cell is None:
            continue
        try:
            data = read_image_bytes(cell, base)
            digest.update(hashlib.sha1(data, usedforsecurity=False).digest())
        except ImageDecodeError:
            digest.update((image_key(cell) or "").encode())
        count += 1
    return digest.hexdigest() if count else None


def category_label(category: Sequence[str] | None, level: int) -> str | None:
    if not category:
        return None
    path = list(category) if level == -1 or level >= len(category) else category[: level + 1]
    return " > ".join(path)


def _vectors(encoder: Encoder, items: list[EncodeItem | None], batch_size: int) -> list:
    """Embeddings of the non-None items (None where the item is None)."""
    rows = [i for i, item in enumerate(items) if item is not None]
    out: list[Any] = [None] * len(items)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        vectors = encoder.encode([items[i] for i in chunk])
        for i, vector in zip(chunk, vectors, strict=True):
            out[i] = vector if np.any(vector) else None
    return out


def _vector_column(vectors: list, dim: int) -> pa.Array:
    """Vectors (None where absent) as a fixed-size list<float32> column."""
    return pa.array(
        [None if v is None else v.tolist() for v in vectors], pa.list_(pa.float32(), dim)
    )


def scan_products(
    spec: PartSpec, config: CurateConfig, encoders: Encoders | None, first_row: int
) -> pa.Table:
    """The light table of one product part (``first_row``: the part's global row number)."""
    table = conform(read_slice(spec.file, spec.offset, spec.length), PRODUCTS, spec.file)
    base = Path(spec.file).parent
    ids = table.column("product_id").to_pylist()
    titles = table.column("title").to_pylist()
    descriptions = table.column("description").to_pylist()
    categories = table.column("category").to_pylist()
    attributes = table.column("attributes").to_pylist()
    images = table.column("images").to_pylist()
    n = table.num_rows
    wheres = [f"{spec.file} row {spec.offset + i}" for i in range(n)]
    rejects: list[str | None] = [None] * n
    title_items: list[EncodeItem | None] = [None] * n
    image_items: list[EncodeItem | None] = [None] * n
    context_items: list[EncodeItem | None] = [None] * n
    product_items: list[EncodeItem | None] = [None] * n
    unreadable = [0] * n
    encoder = encoders.model if encoders is not None else None
    reads_images = encoder is not None and encoder.supports_images
    invalid = row_problems(table, PRODUCTS, spec.file)  # OUT must pass moon2 validate
    for i in range(n):
        title = (titles[i] or "").strip()
        cells = [c for c in images[i] or [] if c is not None]
        where = wheres[i]
        if not (ids[i] or "").strip():
            rejects[i] = f"{where}, column product_id: null or empty"
            continue
        if not title and not cells:
            rejects[i] = f"{where}, columns title/images: no title and no image"
            continue
        if i in invalid:
            rejects[i] = f"{where}: {invalid[i]}"
            continue
        if encoder is None:
            continue
        decoded: list = []
        if reads_images and cells:
            decoded, unreadable[i] = decode_images(cells, config.embed.max_images, base_dir=base)
        if title:
            title_items[i] = EncodeItem(text=title)
        if decoded:
            image_items[i] = EncodeItem(images=decoded)
        context = context_text(descriptions[i], categories[i], attributes[i])
        if context:
            context_items[i] = EncodeItem(text=context)
        if config.embed.product_view == "mm" and (title or decoded):
            product_items[i] = EncodeItem(text=title or None, images=decoded)
    columns: dict[str, Any] = {
        "row": pa.array(range(first_row, first_row + n), pa.int64()),
        "where": pa.array(wheres, pa.string()),
        "product_id": pa.array(ids, pa.string()),
        "reject": pa.array(rejects, pa.string()),
        "title_key": pa.array([normalise_title(t) or None for t in titles], pa.string()),
        "images_key": pa.array([images_key(c, base) for c in images], pa.string()),
        "label": pa.array(
            [category_label(c, config.cleanlab.label_level) for c in categories], pa.string()
        ),
        "images_unreadable": pa.array(unreadable, pa.int32()),
    }
    if encoders is not None:
        batch = config.embed.batch_size
        vectors = {
            "title_vec": _vectors(encoders.model, title_items, batch),
            "image_vec": _vectors(encoders.model, image_items, batch),
        }
        if config.embed.product_view == "mm":
            vectors["product_vec"] = _vectors(encoder, product_items, batch)
        else:
            vectors["product_vec"] = [
                _mean_vector(t, v)
                for t, v in zip(vectors["title_vec"], vectors["image_vec"], strict=True)
            ]
        text_vectors = {
            "text_title_vec": vectors["title_vec"]
            if encoders.text is encoders.model
            else _vectors(encoders.text, title_items, batch),
            "text_context_vec": _vectors(encoders.text, context_items, batch),
        }
        for names, source, dim in (
            (PRODUCT_VECTORS, vectors, encoders.model.dim),
            (TEXT_VECTORS, text_vectors, encoders.text.dim),
        ):
            for name in names:
                columns[name] = _vector_column(source[name], dim)
    return pa.table(columns)


def _mean_vector(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    present = [v for v in (a, b) if v is not None]
    if not present:
        return None
    mean = np.mean(present, axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else None


def scan_queries(
    spec: PartSpec, encoders: Encoders | None, first_row: int, batch_size: int
) -> pa.Table:
    """The light table of one query part."""
    table = conform(read_slice(spec.file, spec.offset, spec.length), QUERIES, spec.file)
    base = Path(spec.file).parent
    ids = table.column("query_id").to_pylist()
    texts = table.column("query_text").to_pylist()
    images = table.column("query_image").to_pylist()
    positives = table.column("positive_id").to_pylist()
    n = table.num_rows
    wheres = [f"{spec.file} row {spec.offset + i}" for i in range(n)]
    rejects: list[str | None] = [None] * n
    items: list[EncodeItem | None] = [None] * n
    encoder = encoders.model if encoders is not None else None
    # validate's contract makes a query invalid (not repairable) when its negative_ids hold its
    # positive_id or a null id, or its image does not decode: such a query is rejected here,
    # so OUT passes moon2 validate. (Negatives that are not kept products are dropped later.)
    invalid = row_problems(table, QUERIES, spec.file)
    for i in range(n):
        where = wheres[i]
        text = (texts[i] or "").strip()
        if not (ids[i] or "").strip():
            rejects[i] = f"{where}, column query_id: null or empty"
        elif not (positives[i] or "").strip():
            rejects[i] = f"{where}, column positive_id: null or empty"
        elif not text and images[i] is None:
            rejects[i] = f"{where}, columns query_text/query_image: no text and no image"
        elif i in invalid:
            rejects[i] = f"{where}: {invalid[i]}"
        elif encoder is not None:
            decoded: list = []
            if images[i] is not None and encoder.supports_images:
                decoded, _ = decode_images([images[i]], 1, base_dir=base)
            if text or decoded:
                items[i] = EncodeItem(text=text or None, images=decoded)
    columns: dict[str, Any] = {
        "row": pa.array(range(first_row, first_row + n), pa.int64()),
        "where": pa.array(wheres, pa.string()),
        "query_id": pa.array(ids, pa.string()),
        "reject": pa.array(rejects, pa.string()),
        "positive_id": pa.array(positives, pa.string()),
        "negative_ids": table.column("negative_ids"),
    }
    if encoder is not None:
        columns["query_vec"] = _vector_column(_vectors(encoder, items, batch_size), encoder.dim)
    return pa.table(columns)
