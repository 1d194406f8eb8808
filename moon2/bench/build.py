"""``moon2 build-bench``: split a catalog by product and build MBE2.0-style zero-shot tasks.

Layout written under OUT::

    train/products, train/queries       every column kept (aug_* included)
    test/products, test/queries         aug_* columns stripped: test data is never augmented
    test/tasks/<task>/task.json         what the task is, sizes, modalities
    test/tasks/<retrieval task>/queries/, candidates.parquet, qrels.parquet, qrels.trec
    test/tasks/cls/labels.parquet       product_id, label, label_text
    test/tasks/attr/labels.parquet      product_id, key, value
    _rejects/products, _rejects/queries rows that could not be used, with the reason
    manifest.json, bench_config.yaml

Retrieval tasks, as MBE2.0 defines them: the test queries of one modality (t2mm and t2i:
text, i2mm and i2t: image, mm2mm: both) against the test products seen through one modality
(t2mm / i2mm / mm2mm: title and images; t2i: the main image only; i2t: the title only). A
product without an image (t2i) or without a title (i2t) cannot be a candidate there, and a
query none of whose relevant products is a candidate is left out; task.json and the manifest
count both (``products_left_out``, ``queries_left_out``). Two more tasks pair each test product
with itself, not a query: title2image (its title finds its main image) and image2title (back).

Retrieval candidates refer to ``test/products`` by id (the pool is embedded once per
candidate modality) and are listed in a seeded random order: the evaluator breaks score ties
by pool position, so a degenerate model scores at chance, not by luck of the input order.

Near-duplicate products (same normalised title, or a shared image: same bytes or same path)
form groups with scipy's connected components; a group goes to one side as a whole, and every
member of a positive's group counts as relevant in the qrels.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from moon2 import progress
from moon2.bench.config import ALL_TASKS, BenchConfig
from moon2.bench.metrics import trec_id, write_trec_qrels

# the duplicate rule lives in the data layer (training uses it too); still importable from here
from moon2.data.duplicates import (
    TITLE_PREFIX,
    duplicate_labels,
    image_key,
    title_key,
)
from moon2.data.duplicates import normalise_title as normalise_title
from moon2.data.images import is_remote, local_path
from moon2.data.io import (
    PartWriter,
    align_to_schema,
    count_rows,
    iter_batches,
    resolve_files,
    write_table,
)
from moon2.data.outdir import claim_output
from moon2.data.schema import IMAGE_TYPE, PRODUCTS, QUERIES, rejects_schema
from moon2.errors import InputError

STAGE = "build-bench"
TRAIN, TEST = "train", "test"
# what build-bench writes directly in OUT (a re-run deletes these, only in its own folder)
OUTPUTS = (TRAIN, TEST, "_rejects", "bench_config.yaml", "manifest.json")
AUG_PREFIX = "aug_"

# tasks built from the test queries: task -> (query modality, candidate modality)
QUERY_TASKS = {
    "t2mm": ("text", "mm"),
    "i2mm": ("image", "mm"),
    "mm2mm": ("mm", "mm"),
    "t2i": ("text", "image"),
    "i2t": ("image", "text"),
}
# tasks pairing a test product's title with its own main image: task -> (query, candidate)
OWN_PAIR_TASKS = {"title2image": ("text", "image"), "image2title": ("image", "text")}
# what a product needs to be a candidate of each modality, and what a candidate's input is
CANDIDATE_NEEDS = {"image": "an image", "text": "a title"}
CANDIDATE_INPUT = {"mm": "title and images", "image": "main image", "text": "title"}
TASK_QUERY_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_text", pa.string()),
        pa.field("query_image", IMAGE_TYPE),
    ]
)
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("product_id", pa.string(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
    ]
)
QRELS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("candidate_id", pa.string(), nullable=False),
        pa.field("relevance", pa.int32(), nullable=False),
    ]
)


def _stratum(category: list[str] | None, level: int) -> str:
    if not category:
        return ""
    if level == -1 or level >= len(category):
        return " > ".join(category)
    return " > ".join(category[: max(level, 1)])


def _category_problem(category: list[str | None] | None) -> str | None:
    """Why a category path cannot be used (a null or blank level), in moon2 validate's words."""
    for level, name in enumerate(category or []):
        if name is None or not name.strip():
            return f"category level {level} is null or empty"
    return None


def _gives_its_share(strata: list[str], fraction: float) -> bool:
    """Whether strata are big enough for the test split: a stratum of n groups gives
    floor(fraction * n) test groups for sure and one more by chance, so strata smaller than
    1 / fraction leave the test size to chance (40 products in 37 leaves once drew 1 test
    product). Enough when the sure part is at least half of the expected test size."""
    sure = sum(int(np.floor(fraction * n)) for n in Counter(strata).values())
    return sure >= 0.5 * fraction * len(strata)


def _strata(
    categories: list[list[str] | None], level: int, fraction: float
) -> tuple[list[str], str]:
    """Each group's stratum at ``level``, or at a coarser one (parent levels, then none) when
    that level's strata are too small; also which level was used, for the manifest."""
    deepest = max((len(c) for c in categories if c), default=0)
    start = deepest if level == -1 else min(max(level, 1), deepest)
    for candidate in (level, *range(start - 1, 0, -1)):
        strata = [_stratum(c, candidate) for c in categories]
        if _gives_its_share(strata, fraction):
            return strata, "leaf" if candidate == -1 else f"level {max(candidate, 1)}"
    return [""] * len(categories), "none"


@dataclass
class BenchResult:
    out_dir: Path
    manifest: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)


# --- pass 1: what the split needs --------------------------------------------------------


def _scan_products(catalog: Path, config: BenchConfig) -> pl.DataFrame:
    """One light row per product: ids, duplicate keys, category, split column, problems."""
    split = config.split
    records: dict[str, list[Any]] = {
        "product_id": [],
        "title_key": [],
        "image_keys": [],
        "category": [],
        "split_value": [],
        "problem": [],
    }
    total = count_rows(catalog / "products")
    columns_checked = False
    with progress.task("build-bench: scanning products", total) as bar:
        for batch in iter_batches(catalog / "products", PRODUCTS):
            table = batch.table
            if split.column and not columns_checked:
                if split.column not in table.column_names:
                    raise InputError(
                        f"split.column {split.column!r} is not a column of {batch.file}"
                    )
                columns_checked = True
            ids = table.column("product_id").to_pylist()
            titles = table.column("title").to_pylist()
            categories = table.column("category").to_pylist()
            images = table.column("images").to_pylist()
            split_values = (
                table.column(split.column).cast(pa.string()).to_pylist()
                if split.column
                else [None] * table.num_rows
            )
            for i in range(table.num_rows):
                title = titles[i] or ""
                cells = images[i] or []
                problem = None
                if not ids[i] or not str(ids[i]).strip():
                    problem = f"{batch.file.name} row {batch.offset + i}: product_id is empty"
                elif not title.strip() and not cells:
                    problem = f"{batch.file.name} row {batch.offset + i}: no title and no image"
                elif bad_level := _category_problem(categories[i]):
                    problem = f"{batch.file.name} row {batch.offset + i}: {bad_level}"
                value = split_values[i]
                if problem is None and split.column:
                    value = (value or "").strip().lower()
                    if value not in (TRAIN, TEST):
                        problem = (
                            f"{batch.file.name} row {batch.offset + i}: {split.column}="
                            f"{split_values[i]!r} is neither 'train' nor 'test'"
                        )
                records["product_id"].append(ids[i])
                records["title_key"].append(
                    title_key(title, split.min_title_tokens) if split.dedupe_titles else None
                )
                keys = [image_key(c) for c in cells] if split.dedupe_images else []
                records["image_keys"].append(sorted({k for k in keys if k}))
                records["category"].append(categories[i] if problem is None else None)
                records["split_value"].append(value)
                records["problem"].append(problem)
            bar.advance(table.num_rows)
    frame = pl.DataFrame(
        records,
        schema={
            "product_id": pl.String,
            "title_key": pl.String,
            "image_keys": pl.List(pl.String),
            "category": pl.List(pl.String),
            "split_value": pl.String,
            "problem": pl.String,
        },
    ).with_row_index("idx")
    # a repeated id: the first occurrence is kept, later ones are rejected
    first_idx = frame.group_by("product_id").agg(pl.col("idx").min().alias("first"))
    frame = frame.join(first_idx, on="product_id", how="left", maintain_order="left")
    return frame.with_columns(
        pl.when(pl.col("problem").is_null() & (pl.col("idx") != pl.col("first")))
        .then(pl.lit("repeated product_id ") + pl.col("product_id"))
        .otherwise(pl.col("problem"))
        .alias("problem")
    ).drop("first")


def _duplicate_groups(frame: pl.DataFrame, max_group: int) -> tuple[np.ndarray, dict[str, int]]:
    """Connected components of 'shares a title key or an image key'; one label per row."""
    valid = frame.filter(pl.col("problem").is_null())
    keyed = pl.concat(
        [
            valid.select("idx", key=pl.lit(TITLE_PREFIX) + pl.col("title_key")).drop_nulls("key"),
            valid.select("idx", key=pl.col("image_keys")).explode("key").drop_nulls("key"),
        ]
    )
    return duplicate_labels(keyed, frame.height, max_group)


def _assign_sides(frame: pl.DataFrame, config: BenchConfig) -> tuple[pl.DataFrame, str | None]:
    """Add a 'side' column (train/test, null for rejected rows), whole groups at a time; also
    the category level the split was stratified by (None: the catalog's own split)."""
    split = config.split
    valid = frame.filter(pl.col("problem").is_null())
    if split.column:
        return frame.with_columns(
            side=pl.when(pl.col("problem").is_null()).then(pl.col("split_value"))
        ), None
    # a group's category is its first member's
    groups = (
        valid.sort("idx")
        .group_by("group", maintain_order=True)
        .agg(pl.col("category").first(), pl.len().alias("size"))
        .sort("group")
    )
    fraction = split.test_fraction
    if split.test_products is not None:
        fraction = min(0.99, split.test_products / max(1, valid.height))
    strata, stratified_by = _strata(groups["category"].to_list(), split.stratify_level, fraction)
    level = split.stratify_level
    if stratified_by != ("leaf" if level == -1 else f"level {max(level, 1)}"):
        progress.info(
            f"build-bench: too few products per category at split.stratify_level={level} "
            "to give the test split its share; stratified by "
            f"{stratified_by} instead"
        )
    groups = groups.with_columns(stratum=pl.Series(strata, dtype=pl.String))
    rng = np.random.default_rng([config.seed, 0x5B11])
    test_groups: list[int] = []
    for stratum, members in groups.group_by("stratum", maintain_order=True):
        del stratum
        ids = members["group"].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        expected = fraction * len(ids)
        count = int(np.floor(expected))
        if rng.random() < expected - count:  # unbiased rounding, so small strata still count
            count += 1
        test_groups.extend(ids[:count].tolist())
    return frame.with_columns(
        side=pl.when(pl.col("problem").is_not_null())
        .then(None)
        .when(pl.col("group").is_in(test_groups))
        .then(pl.lit(TEST))
        .otherwise(pl.lit(TRAIN))
    ), stratified_by


# --- pass 2: write the split --------------------------------------------------------------


def _rebase_images(table: pa.Table, source_dir: Path, column: str) -> pa.Table:
    """Make relative local image paths absolute, so they survive being written elsewhere."""
    if column not in table.column_names:
        return table
    values = table.column(column).to_pylist()
    changed = False

    def fix(cell: dict[str, Any] | None) -> dict[str, Any] | None:
        nonlocal changed
        if not cell or cell.get("bytes") is not None or not cell.get("path"):
            return cell
        path = cell["path"]
        if is_remote(path) or path.startswith("file://") or Path(path).is_absolute():
            return cell
        changed = True
        return {"bytes": None, "path": str(local_path(path, source_dir).resolve())}

    if column == "images":
        values = [[fix(c) for c in cells] if cells is not None else None for cells in values]
    else:
        values = [fix(cell) for cell in values]
    if not changed:
        return table
    index = table.column_names.index(column)
    return table.set_column(index, column, pa.array(values, table.schema.field(column).type))


def _strip_augmented(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f for f in schema if not f.name.startswith(AUG_PREFIX)])


def _union_schema(path: Path, spec: Any) -> pa.Schema:
    """The contract columns plus every extra column found in any file of the dataset."""
    from moon2.data.io import open_parquet
    from moon2.data.schema import check_columns

    extras = []
    for file in resolve_files(path):
        schema = open_parquet(file).schema_arrow
        check_columns(schema, spec, str(file))
        extras.append(pa.schema([f for f in schema if f.name not in spec.names]))
    try:
        extra = pa.unify_schemas(extras)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"files under {path} disagree on a column's type ({exc})") from None
    return pa.schema([*spec.arrow_schema(strict=False), *extra])


def _reject(table: pa.Table, schema: pa.Schema, reasons: list[str]) -> pa.Table:
    kept = pa.schema([f for f in schema if not f.name.startswith("reject_")])
    aligned = align_to_schema(table, kept)
    return aligned.append_column(
        "reject_stage", pa.array([STAGE] * table.num_rows, pa.string())
    ).append_column("reject_reason", pa.array(reasons, pa.string()))


def _write_products(catalog: Path, out: Path, frame: pl.DataFrame) -> dict[str, int]:
    schema = _union_schema(catalog / "products", PRODUCTS)
    test_schema = _strip_augmented(schema)
    sides = frame["side"].to_list()
    problems = frame["problem"].to_list()
    counts = Counter()
    position = 0
    writers = {
        TRAIN: PartWriter(out / TRAIN / "products", schema),
        TEST: PartWriter(out / TEST / "products", test_schema),
        "reject": PartWriter(out / "_rejects" / "products", rejects_schema(schema)),
    }
    try:
        with progress.task("build-bench: writing products", frame.height) as bar:
            for batch in iter_batches(catalog / "products", PRODUCTS):
                table = _rebase_images(batch.table, batch.file.parent, "images")
                n = table.num_rows
                batch_sides = sides[position : position + n]
                batch_problems = problems[position : position + n]
                position += n
                for side in (TRAIN, TEST):
                    mask = pa.array([s == side for s in batch_sides])
                    chosen = table.filter(mask)
                    if chosen.num_rows:
                        writers[side].write(align_to_schema(chosen, writers[side].schema))
                        counts[side] += chosen.num_rows
                rejected = [i for i, s in enumerate(batch_sides) if s is None]
                if rejected:
                    taken = table.take(pa.array(rejected, pa.int64()))
                    reasons = [batch_problems[i] or "not assigned" for i in rejected]
                    writers["reject"].write(_reject(taken, writers["reject"].schema, reasons))
                    counts["rejected"] += len(rejected)
                bar.advance(n)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return dict(counts)


def _write_queries(
    catalog: Path, out: Path, products: pl.DataFrame
) -> tuple[dict[str, int], pl.DataFrame]:
    """Route each query to its positive's side; filter negatives to that side.

    Returns counts and a light table of the test queries (id, modality) for the tasks.
    """
    path = catalog / "queries"
    schema = _union_schema(path, QUERIES)
    test_schema = _strip_augmented(schema)
    side_of = dict(
        zip(
            products.filter(pl.col("side").is_not_null())["product_id"].to_list(),
            products.filter(pl.col("side").is_not_null())["side"].to_list(),
            strict=True,
        )
    )
    # ids: first occurrence wins, as for products
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    test_rows: dict[str, list[Any]] = {"query_id": [], "positive_id": [], "modality": []}
    writers = {
        TRAIN: PartWriter(out / TRAIN / "queries", schema),
        TEST: PartWriter(out / TEST / "queries", test_schema),
        "reject": PartWriter(out / "_rejects" / "queries", rejects_schema(schema)),
    }
    try:
        with progress.task("build-bench: routing queries", count_rows(path)) as bar:
            for batch in iter_batches(path, QUERIES):
                table = _rebase_images(batch.table, batch.file.parent, "query_image")
                ids = table.column("query_id").to_pylist()
                positives = table.column("positive_id").to_pylist()
                texts = table.column("query_text").to_pylist()
                images = table.column("query_image").to_pylist()
                negatives = table.column("negative_ids").to_pylist()
                routed: dict[str, list[int]] = {TRAIN: [], TEST: []}
                kept_negatives: dict[str, list[list[str] | None]] = {TRAIN: [], TEST: []}
                rejected: list[int] = []
                reasons: list[str] = []
                for i in range(table.num_rows):
                    where = f"{batch.file.name} row {batch.offset + i}"
                    has_text = bool(texts[i] and texts[i].strip())
                    has_image = images[i] is not None
                    side = side_of.get(positives[i]) if positives[i] else None
                    reason = None
                    if not ids[i]:
                        reason = f"{where}: query_id is empty"
                    elif ids[i] in seen:
                        reason = f"{where}: repeated query_id {ids[i]}"
                    elif not has_text and not has_image:
                        reason = f"{where}: no query_text and no query_image"
                    elif side is None:
                        reason = f"{where}: positive_id {positives[i]!r} is not a usable product"
                    if reason is not None:
                        rejected.append(i)
                        reasons.append(reason)
                        continue
                    seen.add(ids[i])
                    routed[side].append(i)
                    own = [n for n in negatives[i] or [] if side_of.get(n) == side]
                    counts[f"{side}_negatives_dropped"] += len(negatives[i] or []) - len(own)
                    kept_negatives[side].append(own if negatives[i] is not None else None)
                    if side == TEST:
                        test_rows["query_id"].append(ids[i])
                        test_rows["positive_id"].append(positives[i])
                        test_rows["modality"].append(
                            "mm" if has_text and has_image else "text" if has_text else "image"
                        )
                for side in (TRAIN, TEST):
                    if not routed[side]:
                        continue
                    chosen = table.take(pa.array(routed[side], pa.int64()))
                    index = chosen.column_names.index("negative_ids")
                    chosen = chosen.set_column(
                        index,
                        "negative_ids",
                        pa.array(kept_negatives[side], pa.list_(pa.string())),
                    )
                    writers[side].write(align_to_schema(chosen, writers[side].schema))
                    counts[side] += chosen.num_rows
                if rejected:
                    taken = table.take(pa.array(rejected, pa.int64()))
                    writers["reject"].write(_reject(taken, writers["reject"].schema, reasons))
                    counts["rejected"] += len(rejected)
                bar.advance(table.num_rows)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    return dict(counts), pl.DataFrame(
        test_rows, schema={"query_id": pl.String, "positive_id": pl.String, "modality": pl.String}
    )


# --- tasks --------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _write_qrels(task_dir: Path, qrels: pl.DataFrame) -> None:
    qrels = qrels.unique(["query_id", "candidate_id"], keep="first", maintain_order=True)
    table = qrels.select("query_id", "candidate_id", "relevance").to_arrow()
    write_table(table.cast(QRELS_SCHEMA), task_dir / "qrels.parquet")
    write_trec_qrels(
        task_dir / "qrels.trec",
        (
            (trec_id(q), trec_id(c), int(r))
            for q, c, r in zip(
                qrels["query_id"], qrels["candidate_id"], qrels["relevance"], strict=True
            )
        ),
    )


def _write_candidates(task_dir: Path, ids: list[str], rng: np.random.Generator) -> list[str]:
    order = rng.permutation(len(ids))
    shuffled = [ids[i] for i in order]
    table = pa.table(
        {
            "candidate_id": shuffled,
            "product_id": shuffled,
            "position": np.arange(len(shuffled), dtype=np.int64),
        },
        schema=CANDIDATES_SCHEMA,
    )
    write_table(table, task_dir / "candidates.parquet")
    return shuffled


def _relevant_members(
    qrels: pl.DataFrame, groups: pl.DataFrame, eligible: set[str] | None
) -> pl.DataFrame:
    """Expand (query, positive) to (query, every member of the positive's duplicate group)."""
    expanded = (
        qrels.join(groups, left_on="candidate_id", right_on="product_id", how="left")
        .join(groups.rename({"product_id": "member"}), on="group", how="left")
        .with_columns(pl.coalesce("member", "candidate_id").alias("member"))
        .select("query_id", pl.col("member").alias("candidate_id"), "relevance")
    )
    if eligible is not None:
        expanded = expanded.filter(pl.col("candidate_id").is_in(list(eligible)))
    return expanded


def _test_products_light(out: Path) -> pl.DataFrame:
    rows: dict[str, list[Any]] = {
        "product_id": [],
        "has_title": [],
        "has_image": [],
        "category": [],
        "attributes": [],
    }
    columns = ["product_id", "title", "images", "category", "attributes"]
    for batch in iter_batches(out / TEST / "products", PRODUCTS):
        table = batch.table.select(columns)
        rows["product_id"] += table.column("product_id").to_pylist()
        rows["has_title"] += [bool(t and t.strip()) for t in table.column("title").to_pylist()]
        rows["has_image"] += pc.fill_null(
            pc.greater(pc.list_value_length(table.column("images")), 0), False
        ).to_pylist()
        rows["category"] += table.column("category").to_pylist()
        rows["attributes"] += table.column("attributes").to_pylist()
    return pl.DataFrame(
        rows,
        schema={
            "product_id": pl.String,
            "has_title": pl.Boolean,
            "has_image": pl.Boolean,
            "category": pl.List(pl.String),
            "attributes": pl.List(pl.Struct({"key": pl.String, "value": pl.String})),
        },
    )


def _candidate_pools(light: pl.DataFrame) -> dict[str, list[str]]:
    """The test products that can be a candidate of each modality: every one as a product
    (mm), those with an image as an image, those with a title as a text."""
    return {
        "mm": light["product_id"].to_list(),
        "image": light.filter(pl.col("has_image"))["product_id"].to_list(),
        "text": light.filter(pl.col("has_title"))["product_id"].to_list(),
    }


@dataclass
class _Selection:
    """A query task before it is written: its queries, candidate pool and qrels."""

    queries: pl.DataFrame  # query_id, positive_id, modality
    pool: list[str]
    qrels: pl.DataFrame
    queries_left_out: int


def _select_queries(
    task: str,
    config: BenchConfig,
    test_queries: pl.DataFrame,
    pools: dict[str, list[str]],
    groups: pl.DataFrame,
    skipped: dict[str, str],
) -> _Selection | None:
    """The test queries of the task's modality that have a relevant candidate in its pool
    (None, with the reason in ``skipped``, when fewer than min_items are left)."""
    query_modality, candidate_modality = QUERY_TASKS[task]
    allowed = [query_modality]
    if config.tasks.query_views == "all" and query_modality in ("text", "image"):
        allowed.append("mm")
    chosen = test_queries.filter(pl.col("modality").is_in(allowed))
    pool = pools[candidate_modality]
    qrels = chosen.select(
        "query_id", pl.col("positive_id").alias("candidate_id"), relevance=pl.lit(1, pl.Int32)
    )
    qrels = _relevant_members(qrels, groups, set(pool))
    answerable = chosen.filter(pl.col("query_id").is_in(qrels["query_id"].unique().to_list()))
    minimum = config.tasks.min_items
    if answerable.height < minimum and answerable.height < chosen.height:
        needs = CANDIDATE_NEEDS[candidate_modality]
        skipped[task] = (
            f"only {answerable.height} of {chosen.height} test {query_modality} queries have a "
            f"relevant product with {needs} (min_items={minimum}); a product without "
            f"{needs} cannot be a {candidate_modality} candidate"
        )
        return None
    if answerable.height < minimum:
        skipped[task] = (
            f"only {chosen.height} test {query_modality} queries (min_items={minimum}); the "
            "catalog has no such queries on the test side"
        )
        return None
    return _Selection(answerable, pool, qrels, chosen.height - answerable.height)


def _retrieval_spec(
    task: str, modalities: tuple[str, str], query_source: str, counts: dict[str, int]
) -> dict[str, Any]:
    """A retrieval task's task.json: what its queries and candidates are, and its sizes."""
    query_modality, candidate_modality = modalities
    spec: dict[str, Any] = {
        "task": task,
        "kind": "retrieval",
        "query_modality": query_modality,
        "candidate_modality": candidate_modality,
        "query_source": query_source,
        "candidate_source": "products",
        "candidate_input": CANDIDATE_INPUT[candidate_modality],
        **counts,
    }
    if "products_left_out" in counts:
        needs = CANDIDATE_NEEDS[candidate_modality]
        spec["left_out"] = (
            f"test products without {needs} are not candidates (products_left_out); queries "
            f"none of whose relevant products has {needs} are left out (queries_left_out)"
        )
    return spec


def _build_query_tasks(
    out: Path,
    config: BenchConfig,
    test_queries: pl.DataFrame,
    pools: dict[str, list[str]],
    groups: pl.DataFrame,
    skipped: dict[str, str],
    rng: np.random.Generator,
) -> dict[str, dict[str, int]]:
    """t2mm, i2mm, mm2mm, t2i and i2t: test queries against test products."""
    counts: dict[str, dict[str, int]] = {}
    selected: dict[str, _Selection] = {}
    for task in QUERY_TASKS:
        if task in config.tasks.tasks:
            chosen = _select_queries(task, config, test_queries, pools, groups, skipped)
            if chosen is not None:
                selected[task] = chosen
    if not selected:
        return counts
    task_ids = {task: set(s.queries["query_id"].to_list()) for task, s in selected.items()}
    writers = {
        task: PartWriter(out / TEST / "tasks" / task / "queries", TASK_QUERY_SCHEMA)
        for task in selected
    }
    try:
        for batch in iter_batches(out / TEST / "queries", QUERIES):
            table = batch.table
            ids = table.column("query_id").to_pylist()
            for task, writer in writers.items():
                keep = [i for i, q in enumerate(ids) if q in task_ids[task]]
                if not keep:
                    continue
                chosen = table.take(pa.array(keep, pa.int64())).select(TASK_QUERY_SCHEMA.names)
                modality = QUERY_TASKS[task][0]
                if modality == "text":  # the text view only, even of a multimodal query
                    chosen = chosen.set_column(
                        2, "query_image", pa.nulls(chosen.num_rows, IMAGE_TYPE)
                    )
                elif modality == "image":
                    chosen = chosen.set_column(
                        1, "query_text", pa.nulls(chosen.num_rows, pa.string())
                    )
                writer.write(chosen.cast(TASK_QUERY_SCHEMA))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for task, writer in writers.items():
        writer.close()
        task_dir = out / TEST / "tasks" / task
        chosen = selected[task]
        _write_candidates(task_dir, chosen.pool, rng)
        _write_qrels(task_dir, chosen.qrels)
        counts[task] = {
            "queries": chosen.queries.height,
            "candidates": len(chosen.pool),
            "qrels": chosen.qrels.height,
        }
        if QUERY_TASKS[task][1] != "mm":  # only t2i / i2t can leave products out
            counts[task]["products_left_out"] = len(pools["mm"]) - len(chosen.pool)
            counts[task]["queries_left_out"] = chosen.queries_left_out
        spec = _retrieval_spec(task, QUERY_TASKS[task], "test queries", counts[task])
        _write_json(task_dir / "task.json", spec)
    return counts


def _build_own_pair_tasks(
    out: Path,
    config: BenchConfig,
    light: pl.DataFrame,
    pools: dict[str, list[str]],
    groups: pl.DataFrame,
    skipped: dict[str, str],
    rng: np.random.Generator,
) -> dict[str, dict[str, int]]:
    """title2image: a product's title finds its main image; image2title: its main image finds
    its title (the query id is the product id). Not MBE2.0's t2i / i2t, which use queries."""
    counts: dict[str, dict[str, int]] = {}
    both = light.filter(pl.col("has_title") & pl.col("has_image"))["product_id"].to_list()
    for task, (query_modality, candidate_modality) in OWN_PAIR_TASKS.items():
        if task not in config.tasks.tasks:
            continue
        pool = pools[candidate_modality]
        if len(both) < config.tasks.min_items:
            skipped[task] = (
                f"only {len(both)} test products have both a title and an image "
                f"(min_items={config.tasks.min_items})"
            )
            continue
        task_dir = out / TEST / "tasks" / task
        wanted = set(both)
        with PartWriter(task_dir / "queries", TASK_QUERY_SCHEMA) as writer:
            for batch in iter_batches(out / TEST / "products", PRODUCTS):
                table = batch.table
                ids = table.column("product_id").to_pylist()
                keep = [i for i, p in enumerate(ids) if p in wanted]
                if not keep:
                    continue
                chosen = table.take(pa.array(keep, pa.int64()))
                if query_modality == "text":
                    text = chosen.column("title")
                    image = pa.nulls(chosen.num_rows, IMAGE_TYPE)
                else:
                    text = pa.nulls(chosen.num_rows, pa.string())
                    image = pc.list_element(chosen.column("images"), 0)
                writer.write(
                    pa.table(
                        {
                            "query_id": chosen.column("product_id"),
                            "query_text": text,
                            "query_image": image,
                        },
                        schema=TASK_QUERY_SCHEMA,
                    )
                )
        _write_candidates(task_dir, pool, rng)
        qrels = pl.DataFrame(
            {"query_id": both, "candidate_id": both},
            schema={"query_id": pl.String, "candidate_id": pl.String},
        ).with_columns(relevance=pl.lit(1, pl.Int32))
        qrels = _relevant_members(qrels, groups, set(pool))
        _write_qrels(task_dir, qrels)
        counts[task] = {"queries": len(both), "candidates": len(pool), "qrels": qrels.height}
        source = "test products (own title / main image)"
        spec = _retrieval_spec(task, (query_modality, candidate_modality), source, counts[task])
        _write_json(task_dir / "task.json", spec)
    return counts


def _build_cls(
    out: Path, config: BenchConfig, light: pl.DataFrame, skipped: dict[str, str]
) -> dict[str, int] | None:
    level = config.tasks.cls_level
    rows = {"product_id": [], "label": [], "label_text": []}
    for product_id, category in zip(
        light["product_id"].to_list(), light["category"].to_list(), strict=True
    ):
        if not category:
            continue
        path = list(category)
        if level != -1:
            if len(path) < level:
                continue
            path = path[:level]
        rows["product_id"].append(product_id)
        rows["label"].append(" > ".join(path))
        rows["label_text"].append(path[-1])
    labels = sorted(set(rows["label"]))
    if len(rows["product_id"]) < config.tasks.min_items or len(labels) < 2:
        skipped["cls"] = (
            f"{len(rows['product_id'])} test products with a category at level {level} and "
            f"{len(labels)} distinct labels: need min_items={config.tasks.min_items} and 2 labels"
        )
        return None
    task_dir = out / TEST / "tasks" / "cls"
    write_table(pa.table(rows), task_dir / "labels.parquet")
    label_text = dict(zip(rows["label"], rows["label_text"], strict=True))
    _write_json(
        task_dir / "task.json",
        {
            "task": "cls",
            "kind": "classification",
            "level": level,
            "labels": labels,
            "label_text": {label: label_text[label] for label in labels},
            "products": len(rows["product_id"]),
        },
    )
    return {"products": len(rows["product_id"]), "labels": len(labels)}


def _build_attr(
    out: Path, config: BenchConfig, light: pl.DataFrame, skipped: dict[str, str]
) -> dict[str, int] | None:
    cfg = config.tasks
    pairs = (
        light.select("product_id", "attributes")
        .explode("attributes")
        .drop_nulls("attributes")
        .unnest("attributes")
        .with_columns(pl.col("value").str.strip_chars())
        .filter(pl.col("key").is_not_null() & (pl.col("value").fill_null("") != ""))
        .unique(["product_id", "key"], keep="first", maintain_order=True)
    )
    value_counts = pairs.group_by("key", "value").len()
    pairs = pairs.join(value_counts, on=["key", "value"]).filter(
        pl.col("len") >= cfg.attr_min_value_count
    )
    stats = pairs.group_by("key").agg(
        pl.col("product_id").n_unique().alias("products"), pl.col("value").n_unique().alias("n")
    )
    if cfg.attr_keys is not None:
        keys = [k for k in cfg.attr_keys if k in set(stats["key"].to_list())]
    else:
        keys = stats.filter(
            (pl.col("products") >= cfg.attr_min_coverage * max(light.height, 1))
            & (pl.col("n") >= 2)
            & (pl.col("n") <= cfg.attr_max_values)
        )["key"].to_list()
    keys = sorted(keys)
    pairs = pairs.filter(pl.col("key").is_in(keys)).select("product_id", "key", "value")
    if pairs.height < cfg.min_items or not keys:
        skipped["attr"] = (
            f"no attribute key qualifies (need coverage >= {cfg.attr_min_coverage}, 2 to "
            f"{cfg.attr_max_values} values, min_items={cfg.min_items}); found {pairs.height} pairs"
        )
        return None
    task_dir = out / TEST / "tasks" / "attr"
    write_table(pairs.to_arrow(), task_dir / "labels.parquet")
    values = {
        key: sorted(pairs.filter(pl.col("key") == key)["value"].unique().to_list()) for key in keys
    }
    _write_json(
        task_dir / "task.json",
        {"task": "attr", "kind": "attribute", "keys": values, "pairs": pairs.height},
    )
    return {"pairs": pairs.height, "keys": len(keys), "products": pairs["product_id"].n_unique()}


# --- leakage checks -----------------------------------------------------------------------


def _leakage(frame: pl.DataFrame, out: Path, test_pool: set[str]) -> dict[str, Any]:
    assigned = frame.filter(pl.col("side").is_not_null())
    by_id = assigned.group_by("product_id").agg(pl.col("side").n_unique().alias("sides"))
    shared_ids = int((by_id["sides"] > 1).sum())
    keyed = pl.concat(
        [
            assigned.select("side", key=pl.lit("t:") + pl.col("title_key")).drop_nulls("key"),
            assigned.select("side", key=pl.col("image_keys")).explode("key").drop_nulls("key"),
        ]
    )
    crossing = keyed.group_by("key").agg(pl.col("side").n_unique().alias("sides"))
    shared_keys = int((crossing["sides"] > 1).sum())
    train_refs = 0
    train_queries: set[str] = set()
    if (out / TRAIN / "queries").exists():
        for batch in iter_batches(out / TRAIN / "queries", QUERIES):
            positives = batch.table.column("positive_id").to_pylist()
            negatives = batch.table.column("negative_ids").to_pylist()
            train_queries.update(batch.table.column("query_id").to_pylist())
            for positive, negative in zip(positives, negatives, strict=True):
                train_refs += positive in test_pool
                train_refs += sum(n in test_pool for n in negative or [])
    test_in_train = 0
    if (out / TEST / "queries").exists():
        for batch in iter_batches(out / TEST / "queries", QUERIES, columns=["query_id"]):
            test_in_train += sum(q in train_queries for q in batch.table.column(0).to_pylist())
    return {
        "products_in_both_splits": shared_ids,
        "duplicate_keys_across_splits": shared_keys,
        "train_queries_referencing_test_products": train_refs,
        "test_queries_also_in_train": test_in_train,
        "ok": shared_ids == 0 and shared_keys == 0 and train_refs == 0 and test_in_train == 0,
    }


# --- the command --------------------------------------------------------------------------


def build_bench(
    catalog: str | os.PathLike[str], out_dir: str | os.PathLike[str], config: BenchConfig
) -> BenchResult:
    """Split ``catalog`` (products/ + queries/) and build the test tasks under ``out_dir``;
    a re-run into its own OUT replaces the earlier benchmark whole."""
    catalog = Path(catalog)
    for table in ("products", "queries"):
        if not (catalog / table).exists():
            raise InputError(
                f"{catalog} has no {table}/ table; build-bench needs a catalog directory "
                "holding products/ and queries/"
            )
    legacy = (("manifest.json", f'"stage": "{STAGE}"'),)  # from before output markers
    with claim_output(
        out_dir, STAGE, inputs=[catalog], outputs=OUTPUTS, resume=False, legacy=legacy
    ) as claim:
        return _build(catalog, claim.path, config)


def _build(catalog: Path, out: Path, config: BenchConfig) -> BenchResult:
    config.to_yaml(out / "bench_config.yaml")
    frame = _scan_products(catalog, config)
    labels, dup_stats = _duplicate_groups(frame, config.split.max_duplicate_group)
    frame = frame.with_columns(group=pl.Series(labels, dtype=pl.Int64))
    frame, stratified_by = _assign_sides(frame, config)
    product_counts = _write_products(catalog, out, frame)
    query_counts, test_queries = _write_queries(catalog, out, frame)

    skipped: dict[str, str] = {}
    rng = np.random.default_rng([config.seed, 0xB0B])
    task_counts: dict[str, Any] = {}
    test_frame = frame.filter(pl.col("side") == TEST)
    groups = test_frame.select("product_id", "group")
    if test_frame.height == 0:
        skipped.update({task: "the test split is empty" for task in config.tasks.tasks})
    else:
        light = _test_products_light(out)
        pools = _candidate_pools(light)
        task_counts.update(
            _build_query_tasks(out, config, test_queries, pools, groups, skipped, rng)
        )
        task_counts.update(_build_own_pair_tasks(out, config, light, pools, groups, skipped, rng))
        if "cls" in config.tasks.tasks and (cls := _build_cls(out, config, light, skipped)):
            task_counts["cls"] = cls
        if "attr" in config.tasks.tasks and (attr := _build_attr(out, config, light, skipped)):
            task_counts["attr"] = attr
    for task, reason in skipped.items():
        progress.warn(f"task {task} skipped: {reason}")
    leakage = _leakage(frame, out, set(test_frame["product_id"].to_list()))
    group_sizes = frame.filter(pl.col("side").is_not_null()).group_by("group").len()["len"]
    manifest = {
        "stage": STAGE,
        "catalog": str(catalog),
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "splits": {
            TRAIN: {
                "products": product_counts.get(TRAIN, 0),
                "queries": query_counts.get(TRAIN, 0),
            },
            TEST: {
                "products": product_counts.get(TEST, 0),
                "queries": query_counts.get(TEST, 0),
            },
        },
        "rejected": {
            "products": product_counts.get("rejected", 0),
            "queries": query_counts.get("rejected", 0),
        },
        "negatives_dropped_to_avoid_leakage": {
            TRAIN: query_counts.get("train_negatives_dropped", 0),
            TEST: query_counts.get("test_negatives_dropped", 0),
        },
        "duplicate_groups": {
            "groups_with_several_products": int((group_sizes > 1).sum()),
            "products_in_such_groups": int(group_sizes.filter(group_sizes > 1).sum() or 0),
            **dup_stats,
        },
        "tasks": task_counts,
        "skipped_tasks": skipped,
        "leakage": leakage,
        "task_order": [t for t in ALL_TASKS if t in task_counts],
        "stratified_by": stratified_by,
    }
    _write_json(out / "manifest.json", manifest)
    if not task_counts:
        # written all the same: its skipped_tasks say why each task could not be built
        raise InputError(
            f"build-bench built no task from {catalog}: the test split has "
            f"{manifest['splits'][TEST]['products']} products and "
            f"{manifest['splits'][TEST]['queries']} queries and every requested task was "
            f"skipped (the reasons are in {out / 'manifest.json'}); give it more products or "
            "lower tasks.min_items"
        )
    return BenchResult(out, manifest, skipped)
