"""Training triplets: queries joined to their positive and negative products.

The products and queries tables are copied once into Arrow IPC files under
``OUT/cache/`` and memory-mapped, so the map-style dataset reads any row in O(1) without
holding the catalog (or its images) in memory, in the main process and in every DataLoader
worker alike.

Products that build-bench counts as the same item share a duplicate group, computed once
per catalog (cached in ``OUT/cache/``); every batch carries its products' groups, so the
losses never use duplicates as each other's negatives.

Rows that cannot be trained on reach ``OUT/_rejects/queries`` with the reason: a positive
that is not in the products, a query with neither text nor image (found when the index is
built), or a query image that does not decode (found when the row is read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from moon2 import progress
from moon2.data.duplicates import RULE_VERSION, duplicate_labels, product_keys
from moon2.data.images import (
    ImageCache,
    check_image_header,
    decode_image,
    decode_images,
    product_matte,
    random_view,
)
from moon2.data.io import align_to_schema, atomic_path, count_rows, iter_batches
from moon2.data.schema import PRODUCTS, QUERIES
from moon2.errors import ImageDecodeError, InputError
from moon2.models.base import EncodeItem
from moon2.train.config import DataConfig, ModelConfig
from moon2.train.inputs import build_inputs, one_off, with_pixel_cache, with_token_cache

VIEWS: tuple[str, ...] = ("t2mm", "i2mm", "mm2mm")


def id_hash(value: str) -> int:
    """A stable signed 64-bit hash of an id (to compare ids across ranks as tensors)."""
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class ArrowStore:
    """A Parquet dataset copied to one memory-mapped Arrow IPC file, read row by row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: ipc.RecordBatchFileReader | None = None
        self._table: pa.Table | None = None

    @classmethod
    def build(cls, source: Path, target: Path, spec: Any, label: str) -> ArrowStore:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        schema = None
        writer = None
        try:
            with progress.task(label, count_rows(source)) as bar:
                for batch in iter_batches(source, spec, batch_rows=1024):
                    table = batch.table
                    if schema is None:
                        schema = table.schema
                        writer = ipc.new_file(str(temp), schema)
                    table = align_to_schema(table, schema)
                    writer.write_table(table, max_chunksize=1024)
                    bar.advance(table.num_rows)
            if writer is None:
                raise InputError(f"{source} has no rows")
            writer.close()
            os.replace(temp, target)
        finally:
            if temp.exists():
                temp.unlink()
        return cls(target)

    @property
    def table(self) -> pa.Table:
        if self._table is None:  # opened lazily: each worker process maps the file itself
            source = pa.memory_map(str(self.path), "r")
            self._table = ipc.open_file(source).read_all()
        return self._table

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, index: int) -> dict[str, Any]:
        return self.table.slice(index, 1).to_pylist()[0]

    def column(self, name: str) -> list[Any]:
        return self.table.column(name).to_pylist()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_reader": None, "_table": None}


@dataclass
class TripletIndex:
    """Which query rows train, with their positive and negative product rows."""

    query_rows: np.ndarray
    positive_rows: np.ndarray
    negative_rows: list[list[int]]
    query_ids: list[str]
    rejected: list[tuple[int, str]] = field(default_factory=list)
    negatives_unknown: int = 0


def build_index(products: ArrowStore, queries: ArrowStore) -> TripletIndex:
    product_ids = products.column("product_id")
    row_of = {pid: i for i, pid in enumerate(product_ids) if pid}
    query_ids = queries.column("query_id")
    texts = queries.column("query_text")
    has_image = queries.table.column("query_image").is_valid().to_pylist()
    unreadable = _unreadable_images(queries.table.column("query_image"))
    positives = queries.column("positive_id")
    negatives = queries.column("negative_ids")
    keep_rows, keep_pos, keep_neg, keep_ids = [], [], [], []
    rejected: list[tuple[int, str]] = []
    unknown = 0
    seen: set[str] = set()
    for i, query_id in enumerate(query_ids):
        reason = None
        if not query_id:
            reason = "query_id is empty"
        elif query_id in seen:
            reason = f"repeated query_id {query_id}"
        elif not (texts[i] and texts[i].strip()) and not has_image[i]:
            reason = "no query_text and no query_image"
        elif positives[i] not in row_of:
            reason = f"positive_id {positives[i]!r} is not in products"
        elif i in unreadable:
            reason = f"query_image: {unreadable[i]}"
        if reason is not None:
            rejected.append((i, reason))
            continue
        seen.add(query_id)
        negative_rows = []
        for negative in negatives[i] or []:
            if negative in row_of and negative != positives[i]:
                negative_rows.append(row_of[negative])
            else:
                unknown += 1
        keep_rows.append(i)
        keep_pos.append(row_of[positives[i]])
        keep_neg.append(negative_rows)
        keep_ids.append(query_id)
    return TripletIndex(
        query_rows=np.asarray(keep_rows, np.int64),
        positive_rows=np.asarray(keep_pos, np.int64),
        negative_rows=keep_neg,
        query_ids=keep_ids,
        rejected=rejected,
        negatives_unknown=unknown,
    )


def _unreadable_images(column: pa.ChunkedArray) -> dict[int, str]:
    """Rows whose image bytes carry no image header Pillow knows (read lazily, batch by batch;
    images given by path, and files that pass this check but fail to decode, are caught when
    their row is read). A header declaring a decompression bomb counts as unreadable."""
    bad: dict[int, str] = {}
    offset = 0
    for chunk in column.chunks:
        data = chunk.field("bytes") if pa.types.is_struct(chunk.type) else None
        if data is not None:
            for i, value in enumerate(data):
                raw = value.as_py() if value.is_valid else None
                if raw is None:
                    continue
                try:
                    check_image_header(raw)
                except ImageDecodeError as exc:
                    bad[offset + i] = f"not a readable image ({exc})"
        offset += len(chunk)
    return bad


def _photo_cells(record: dict[str, Any]) -> list[tuple[int, Any]]:
    """A products row's image cells with their positions in the list, without null entries."""
    return [(n, c) for n, c in enumerate(record.get("images") or []) if c is not None]


def _photo_key(record: dict[str, Any], column: str, number: int) -> tuple[Any, ...]:
    """Cache key of the ``number``-th cell of a products row's image ``column``."""
    return ("product", record["product_id"], column, number)


class TripletDataset(torch.utils.data.Dataset):
    """Map-style dataset of (query views, positive, negatives) samples."""

    def __init__(
        self,
        products: ArrowStore,
        queries: ArrowStore,
        index: TripletIndex,
        config: DataConfig,
        seed: int,
        intra_products: str = "all",
        duplicate_groups: np.ndarray | None = None,
    ) -> None:
        """``intra_products``: whose intra-product image a sample carries ("positives", "all",
        or "none"), so no photo is decoded that the intra loss will not use.
        ``duplicate_groups``: the duplicate group of every products row
        (:func:`product_duplicate_groups`); None: each product is its own group."""
        self.products = products
        self.queries = queries
        self.index = index
        self.config = config
        self.seed = seed
        self.epoch = 0
        self.intra_products = intra_products
        self.duplicate_groups = duplicate_groups
        self.images = ImageCache(config.image_cache_mb << 20)
        names = set(products.table.column_names)
        self.has_aug_title = config.use_augmented and "aug_title" in names
        self.has_aug_images = config.use_augmented and "aug_images" in names

    def __len__(self) -> int:
        return len(self.index.query_rows)

    def _rng(self, position: int, role: str) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{position}:{role}")

    def _duplicate_group(self, row: int) -> int:
        """The duplicate group of products row ``row`` (the row itself without groups)."""
        return row if self.duplicate_groups is None else int(self.duplicate_groups[row])

    def product(
        self, record: dict[str, Any], rng: random.Random | None = None, intra: bool = True
    ) -> dict[str, Any]:
        """A candidate's inputs from its products row; with ``rng`` its images are random views
        (view_augmentation); ``intra=False`` skips the intra-product image (the intra loss will
        not use it)."""
        title = (record.get("title") or "").strip()
        text = title
        if self.has_aug_title and record.get("aug_title"):
            text = f"{title}\n{record['aug_title']}".strip()
        images, failed = self._decode_cells(record, "images", self.config.max_images)
        first = images[0] if images else None
        extra: list[Any] = []
        if self.has_aug_images and self.config.max_aug_images:
            extra, more = self._decode_cells(record, "aug_images", self.config.max_aug_images)
            images += extra
            failed += more
        intra = self._intra_image(record, first) if intra else None
        if rng is not None:
            images = [(key, self._view(image, rng, key)) for key, image in images]
            intra = None if intra is None else (intra[0], self._view(intra[1], rng, intra[0]))
        return {
            "product_id": record["product_id"],
            "text": text or None,
            "title": title or None,
            "images": [image for _, image in images],
            "main_image": None if first is None else first[1],
            "intra_image": None if intra is None else intra[1],
            "images_failed": failed,
            "aug_title": text != title,
            "aug_images": len(extra),
        }

    def _decode(self, key: tuple[Any, ...], cell: Any) -> Any:
        return self.images.get(key, lambda: decode_image(cell))

    def _decode_cells(
        self, record: dict[str, Any], column: str, limit: int
    ) -> tuple[list[tuple[tuple[Any, ...], Any]], int]:
        """Up to ``limit`` (cache key, decoded image) of a row's image column (null cells
        skipped), and how many failed to decode."""

        def decode(number: int, cell: Any) -> tuple[tuple[Any, ...], Any]:
            key = _photo_key(record, column, number)
            return key, self._decode(key, cell)

        return decode_images(record.get(column) or [], limit, decode=decode)

    def _view(self, image: Any, rng: random.Random, key: tuple[Any, ...] | None = None) -> Any:
        """A random view; ``key`` (the photo's cache key) lets the photo's matte be cached."""
        matte_of = None
        if key is not None:

            def matte_of(photo: Any) -> Any:
                return self.images.get(("matte", *key), lambda: product_matte(photo))

        # drawn afresh each epoch: the processed-photo cache need not hash it
        return one_off(
            random_view(
                image, rng, background_probability=self.config.view_background, matte_of=matte_of
            )
        )

    def _catalog_query(self, record: dict[str, Any], rng: random.Random) -> Any:
        """An image query from the product's own photos (see ``catalog_queries``)."""
        cells = _photo_cells(record)
        if not cells:
            return None
        number, cell = rng.choice(cells[1:] or cells)
        key = _photo_key(record, "images", number)
        try:
            photo = self._decode(key, cell)
        except ImageDecodeError:
            return None
        return self._view(photo, rng, key)

    def _intra_image(self, record: dict[str, Any], main: Any) -> Any:
        """(cache key, image) the intra-product loss aligns with the title: ``main`` (the first
        photo that decodes, as (key, image)), or (``any``) one of the product's images drawn per
        epoch, so alignment also sees its other views."""
        cells = _photo_cells(record)
        if self.config.intra_image == "main" or len(cells) < 2:
            return main
        rng = random.Random(f"{self.seed}:{self.epoch}:{record['product_id']}")
        number, cell = rng.choice(cells)
        key = _photo_key(record, "images", number)
        try:
            return key, self._decode(key, cell)
        except ImageDecodeError:
            return main

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """The sample at ``position`` of the current epoch, or at ``(epoch, position)`` (how a
        persistent worker, whose copy of the dataset does not see ``epoch`` change, is told)."""
        if isinstance(key, tuple):
            self.epoch, position = int(key[0]), int(key[1])
        else:
            position = key
        query = self.queries.row(int(self.index.query_rows[position]))
        sample: dict[str, Any] = {"position": position, "query_id": query["query_id"]}
        image = None
        if query.get("query_image") is not None:
            try:
                image = self._decode(("query", query["query_id"]), query["query_image"])
            except ImageDecodeError as exc:
                sample["rejected"] = f"query_image: {exc}"
                return sample
        text = (query.get("query_text") or "").strip() or None
        views = {}
        if text:
            views["t2mm"] = EncodeItem(text=text)
        if image is not None and self.config.view_augmentation == "all":
            image = self._view(image, self._rng(position, "query"))
        if image is not None:
            views["i2mm"] = EncodeItem(images=[image])
        if text and image is not None:
            views["mm2mm"] = EncodeItem(text=text, images=[image])
        sample["views"] = views
        positive_row = int(self.index.positive_rows[position])
        positive = self.products.row(positive_row)
        if self.config.catalog_queries:
            rng = self._rng(position, "catalog-query")
            if rng.random() < self.config.catalog_queries:
                photo = self._catalog_query(positive, rng)
                if photo is not None:
                    sample["catalog_query"] = EncodeItem(images=[photo])
        augment = self.config.view_augmentation != "none"
        sample["positive"] = self.product(
            positive,
            self._rng(position, "positive") if augment else None,
            intra=self.intra_products != "none",
        )
        sample["positive"]["duplicate_group"] = self._duplicate_group(positive_row)
        negatives = self.index.negative_rows[position]
        if negatives and self.config.max_negatives:
            # a different subset each epoch, reproducible from (seed, epoch, sample)
            rng = random.Random(f"{self.seed}:{self.epoch}:{position}")
            chosen = rng.sample(negatives, min(len(negatives), self.config.max_negatives))
        else:
            chosen = []
        sample["negatives"] = [
            self.product(
                self.products.row(row),
                self._rng(position, f"negative-{k}") if augment else None,
                intra=self.intra_products == "all",
            )
            for k, row in enumerate(chosen)
        ]
        for negative, row in zip(sample["negatives"], chosen, strict=True):
            negative["duplicate_group"] = self._duplicate_group(row)
        return sample


CATALOG_QUERIES = "catalog_i2mm"
"""Group of the image queries made from the positives' catalog photos (part of i2mm)."""
GROUPS: tuple[str, ...] = ("candidates", *VIEWS, CATALOG_QUERIES, "intra_image", "intra_text")


@dataclass
class Batch:
    """Tensors and bookkeeping of one step (built in DataLoader workers).

    Every item of the step (candidates, query views, intra-product images and texts) goes
    through one processor call and one model forward; ``groups`` says which rows are which.
    One large forward costs far less than six small ones: the backbone's per-call overhead
    dominates at small sizes.
    """

    positions: list[int]
    query_ids: list[str]
    inputs: dict[str, torch.Tensor] | None
    groups: dict[str, tuple[int, int]]
    """group name -> [start, end) rows of ``inputs``"""
    view_rows: dict[str, list[int]]
    """view -> the samples (rows of ``positions``) that have it, in group order"""
    candidate_ids: list[str]
    positive_col: list[int]
    negative_cols: list[list[int]]
    intra_ids: list[str]
    rejected: list[tuple[str, str]]
    images_failed: int
    catalog_rows: list[int] = field(default_factory=list)
    """the samples (rows of ``positions``) with a catalog image query, in group order"""
    aug_title_candidates: int = 0
    """candidates whose input carries their aug_title"""
    aug_image_candidates: int = 0
    """candidates whose input carries at least one of their aug_images"""
    candidate_dup_groups: list[int] = field(default_factory=list)
    """each candidate's duplicate group: products build-bench counts as the same item share
    one and are never each other's negatives (empty: unknown, the ids decide)"""
    intra_dup_groups: list[int] = field(default_factory=list)
    """the duplicate group of each intra-product row (as ``candidate_dup_groups``)"""

    def to(self, device: torch.device) -> Batch:
        inputs = None if self.inputs is None else {k: v.to(device) for k, v in self.inputs.items()}
        return dataclasses.replace(self, inputs=inputs)


class Collator:
    """Builds a :class:`Batch`: de-duplicated candidates, one processor call for the step.

    Processed photos (``pixel_cache_mb``) and truncated texts are remembered from one epoch to
    the next: in a DataLoader worker that would otherwise redo them, the work competes with
    the training step for the same cores.
    """

    def __init__(
        self,
        processor: Any,
        model_config: ModelConfig,
        intra: bool,
        intra_products: str = "positives",
        pixel_cache_mb: int = 0,
    ) -> None:
        self.processor = with_token_cache(with_pixel_cache(processor, pixel_cache_mb << 20))
        self.texts: dict[str, str] = {}
        self.max_text_tokens = model_config.max_text_tokens
        self.intra = intra
        self.intra_products = intra_products

    def __call__(self, samples: list[dict[str, Any]]) -> Batch:
        rejected = [(s["query_id"], s["rejected"]) for s in samples if "rejected" in s]
        samples = [s for s in samples if "rejected" not in s]
        if not samples:
            return Batch([], [], None, {}, {}, [], [], [], [], rejected, 0)
        candidate_ids: list[str] = []
        candidate_items: list[EncodeItem] = []
        products: dict[str, dict[str, Any]] = {}
        column: dict[str, int] = {}
        failed = 0

        def add(product: dict[str, Any]) -> int:
            nonlocal failed
            pid = product["product_id"]
            if pid not in column:
                column[pid] = len(candidate_ids)
                candidate_ids.append(pid)
                candidate_items.append(EncodeItem(text=product["text"], images=product["images"]))
                products[pid] = product
                failed += product["images_failed"]
            return column[pid]

        positive_col = [add(s["positive"]) for s in samples]
        negative_cols = [[add(n) for n in s["negatives"]] for s in samples]
        items: dict[str, list[EncodeItem]] = {"candidates": candidate_items}
        view_rows: dict[str, list[int]] = {}
        for view in VIEWS:
            rows = [i for i, s in enumerate(samples) if view in s["views"]]
            if rows:
                view_rows[view] = rows
                items[view] = [samples[i]["views"][view] for i in rows]
        catalog_rows = [i for i, s in enumerate(samples) if "catalog_query" in s]
        if catalog_rows:
            items[CATALOG_QUERIES] = [samples[i]["catalog_query"] for i in catalog_rows]
        intra_ids: list[str] = []
        intra_dup_groups: list[int] = []
        if self.intra:
            pool = (
                [products[candidate_ids[c]] for c in dict.fromkeys(positive_col)]
                if self.intra_products == "positives"
                else list(products.values())
            )
            both = [p for p in pool if p["title"] and p["intra_image"] is not None]
            if len(both) >= 2:
                intra_ids = [p["product_id"] for p in both]
                intra_dup_groups = _dup_groups(both)
                items["intra_image"] = [EncodeItem(images=[p["intra_image"]]) for p in both]
                items["intra_text"] = [EncodeItem(text=p["title"]) for p in both]
        groups: dict[str, tuple[int, int]] = {}
        flat: list[EncodeItem] = []
        for name in GROUPS:
            if name in items:
                groups[name] = (len(flat), len(flat) + len(items[name]))
                flat.extend(items[name])
        return Batch(
            positions=[s["position"] for s in samples],
            query_ids=[s["query_id"] for s in samples],
            inputs=build_inputs(self.processor, flat, self.max_text_tokens, self.texts),
            groups=groups,
            view_rows=view_rows,
            candidate_ids=candidate_ids,
            positive_col=positive_col,
            negative_cols=negative_cols,
            intra_ids=intra_ids,
            rejected=rejected,
            images_failed=failed,
            catalog_rows=catalog_rows,
            aug_title_candidates=sum(bool(p.get("aug_title")) for p in products.values()),
            aug_image_candidates=sum(p.get("aug_images", 0) > 0 for p in products.values()),
            candidate_dup_groups=_dup_groups(list(products.values())),
            intra_dup_groups=intra_dup_groups,
        )


def _dup_groups(products: list[dict[str, Any]]) -> list[int]:
    """Each product's duplicate group, or [] when one is unknown (samples made without)."""
    groups = [p.get("duplicate_group") for p in products]
    return [] if None in groups else groups


def prepare_stores(data_dir: Path, cache: Path) -> tuple[ArrowStore, ArrowStore]:
    """Memory-mappable copies of DATA/products and DATA/queries (rebuilt when stale)."""
    stores = []
    for name, spec in (("products", PRODUCTS), ("queries", QUERIES)):
        source = data_dir / name
        if not source.exists():
            raise InputError(f"{data_dir} has no {name}/ table (moon2 train needs both)")
        target = cache / f"{name}.arrow"
        stamp = cache / f"{name}.source"
        signature = _signature(source)
        if target.exists() and stamp.exists() and stamp.read_text() == signature:
            stores.append(ArrowStore(target))
            continue
        stores.append(ArrowStore.build(source, target, spec, f"caching {name}"))
        stamp.write_text(signature)
    return stores[0], stores[1]


def _signature(source: Path) -> str:
    from moon2.data.io import resolve_files

    parts = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in resolve_files(source)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def product_duplicate_groups(
    products: ArrowStore, min_title_tokens: int, max_group: int
) -> np.ndarray:
    """The duplicate group of every products row, by build-bench's rule (see
    :mod:`moon2.data.duplicates`); a row without a product_id is its own group."""
    table = products.table
    columns = [c for c in ("product_id", "title", "images") if c in table.column_names]
    rows: list[int] = []
    keys: list[str] = []
    offset = 0
    with progress.task("grouping duplicate products", table.num_rows) as bar:
        for chunk in table.select(columns).to_batches(max_chunksize=1024):
            data = chunk.to_pydict()
            for i, pid in enumerate(data["product_id"]):
                if not pid:
                    continue
                images = data["images"][i] if "images" in data else None
                for key in product_keys(data["title"][i], images, min_title_tokens):
                    rows.append(offset + i)
                    keys.append(key)
            offset += chunk.num_rows
            bar.advance(chunk.num_rows)
    keyed = pl.DataFrame({"idx": rows, "key": keys}, schema={"idx": pl.Int64, "key": pl.String})
    labels, _ = duplicate_labels(keyed, table.num_rows, max_group)
    return labels.astype(np.int64)


def prepare_duplicate_groups(
    products: ArrowStore, cache: Path, min_title_tokens: int, max_group: int
) -> np.ndarray:
    """:func:`product_duplicate_groups` of the cached products, kept in ``cache`` (grouping
    hashes every image; recomputed when the products or the rule change)."""
    target = cache / "duplicate_groups.npy"
    stamp = cache / "duplicate_groups.source"
    source = cache / "products.source"
    if not source.is_file():  # no record of which products these are: nothing to trust
        return product_duplicate_groups(products, min_title_tokens, max_group)
    signature = f"{RULE_VERSION}:{source.read_text()}:{min_title_tokens}:{max_group}"
    if target.exists() and stamp.exists() and stamp.read_text() == signature:
        return np.load(target)
    labels = product_duplicate_groups(products, min_title_tokens, max_group)
    with atomic_path(target) as temp, open(temp, "wb") as handle:
        np.save(handle, labels)
    stamp.write_text(signature)
    return labels
