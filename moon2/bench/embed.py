"""``moon2 embed``: product and query embeddings of any encoder, written to Parquet.

Products are embedded multimodally (title + up to ``max_images`` images), queries by what they
hold (text, image or both). Output: ``OUT/products/`` (product_id, embedding) and
``OUT/queries/`` (query_id, embedding), ``embedding`` a list<float32> of the model's
dimension; images that cannot be decoded are left out of their item and counted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from moon2 import progress
from moon2.data.images import decode_images
from moon2.data.io import PartWriter, count_rows, iter_batches
from moon2.data.outdir import claim_output
from moon2.data.schema import PRODUCTS, QUERIES
from moon2.errors import InputError
from moon2.models.base import EncodeItem, Encoder, settle_max_images

# what embed writes directly in OUT (a re-run deletes these, and only in its own folder)
OUTPUTS = ("products", "queries", "manifest.json")


def _decode(cells: list, base: Path, limit: int, failures: list[int]) -> list:
    images, failed = decode_images(cells, limit, base_dir=base)
    failures[0] += failed
    return images


def embed_catalog(
    model: str | Encoder,
    catalog: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    batch_size: int = 32,
    device: str = "auto",
    max_images: int | None = None,
) -> dict[str, int]:
    """Embed ``catalog/products`` and ``catalog/queries`` (whichever exist); ``max_images``
    None: as many as a moon2 checkpoint trained with, else 4 (see ``settle_max_images``)."""
    from moon2.models.registry import load_encoder

    root = Path(catalog)
    tables = [name for name in ("products", "queries") if (root / name).exists()]
    if not tables:
        raise InputError(f"{root} has neither products/ nor queries/")
    inputs = [root, None if isinstance(model, Encoder) else model]
    # the model loads first: a bad one fails before an earlier output is replaced
    encoder = model if isinstance(model, Encoder) else load_encoder(model, device=device)
    max_images = settle_max_images(encoder, max_images)
    # a re-run replaces its own earlier output whole: parts of two runs never mix
    with claim_output(out_dir, "embed", inputs=inputs, outputs=OUTPUTS, resume=False) as claim:
        return _embed_tables(encoder, root, tables, claim.path, batch_size, max_images)


def _embed_tables(
    encoder: Encoder, root: Path, tables: list[str], out: Path, batch_size: int, max_images: int
) -> dict[str, int]:
    written = {}
    failures = [0]
    for name in tables:
        spec = PRODUCTS if name == "products" else QUERIES
        schema = pa.schema(
            [
                pa.field(spec.id_column, pa.string()),
                pa.field("embedding", pa.list_(pa.float32(), encoder.dim)),
            ]
        )
        with (
            PartWriter(out / name, schema) as writer,
            progress.task(f"embedding {name}", count_rows(root / name)) as bar,
        ):
            for batch in iter_batches(root / name, spec, batch_rows=batch_size):
                ids = batch.table.column(spec.id_column).to_pylist()
                items = list(_items(batch, name, max_images, failures))
                vectors = encoder.encode(items)
                writer.write(
                    pa.table(
                        {
                            spec.id_column: ids,
                            "embedding": pa.FixedSizeListArray.from_arrays(
                                pa.array(vectors.reshape(-1)), encoder.dim
                            ),
                        },
                        schema=schema,
                    )
                )
                bar.advance(len(ids))
        written[name] = writer.rows_written
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "model": encoder.name,
                "dim": encoder.dim,
                "rows": written,
                "max_images": max_images,
                "images_unreadable": failures[0],
            },
            indent=2,
        )
    )
    return written


def _items(batch, table: str, max_images: int, failures: list[int]) -> Iterator[EncodeItem]:
    base = batch.file.parent
    if table == "products":
        for title, cells in zip(
            batch.table.column("title").to_pylist(),
            batch.table.column("images").to_pylist(),
            strict=True,
        ):
            yield EncodeItem(
                text=(title or "").strip() or None,
                images=_decode(cells or [], base, max_images, failures),
            )
    else:
        for text, cell in zip(
            batch.table.column("query_text").to_pylist(),
            batch.table.column("query_image").to_pylist(),
            strict=True,
        ):
            yield EncodeItem(
                text=(text or "").strip() or None, images=_decode([cell], base, 1, failures)
            )
