"""``moon2 synth``: a synthetic product catalog and query log with known noise.

Design: the main process draws a small *plan* (numpy arrays: each product's leaf category and
modality, which rows are noisy and where their wrong title/images/category come from, each
query's positive product, the shuffled output order). Everything else about a row is a pure
function of ``(seed, row index, plan)``, computed by worker processes one part file at a time.
Output is therefore byte-identical for a seed whatever the number of workers, and a killed run
resumes by skipping the part files that already exist.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from moon2 import progress
from moon2.config import Config
from moon2.data.io import PART_TEMPLATE, remove_parts, write_table
from moon2.data.outdir import claim_output
from moon2.data.schema import PRODUCTS, QUERIES
from moon2.data.synth import texts
from moon2.data.synth.render import Appearance, View, render_bytes
from moon2.data.synth.taxonomy import BRANDS, DEPARTMENTS, LEAVES, Leaf, leaf_attribute_vocab
from moon2.errors import ConfigError

ProductNoise = Literal["title_swap", "image_swap", "wrong_category", "near_duplicate"]
PRODUCT_NOISE_KINDS: tuple[str, ...] = (
    "title_swap",
    "image_swap",
    "wrong_category",
    "near_duplicate",
)
CLEAN = "clean"
WRONG_POSITIVE = "wrong_positive"

# modality codes of a base product
TEXT_AND_IMAGE, TEXT_ONLY, IMAGE_ONLY = 0, 1, 2
# query modality codes
Q_TEXT, Q_IMAGE, Q_MULTIMODAL = 0, 1, 2


class SynthConfig(Config):
    """How ``moon2 synth`` builds a catalog. Every field has a default (the demo catalog)."""

    products: int = Field(2000, ge=1, description="Product rows, near-duplicate listings included.")
    queries_per_product: float = Field(
        2.0, ge=0, description="Queries per product on average (query rows = round(Q * products))."
    )
    noise: float = Field(
        0.1,
        ge=0,
        le=0.9,
        description="Fraction of noisy product rows and, separately, of noisy query rows.",
    )
    noise_kinds: list[ProductNoise] = Field(
        default_factory=lambda: list(PRODUCT_NOISE_KINDS),
        min_length=1,
        description="Product noise kinds to inject, in equal shares.",
    )
    seed: int = Field(0, ge=0, description="Seed; the same seed gives byte-identical Parquet.")
    image_size: int = Field(128, ge=16, le=2048, description="Shorter image side in pixels.")
    no_image_fraction: float = Field(0.05, ge=0, le=1, description="Products with no image.")
    image_only_fraction: float = Field(
        0.03, ge=0, le=1, description="Products with images but an empty title."
    )
    empty_description_fraction: float = Field(
        0.2, ge=0, le=1, description="Products whose description is null or empty."
    )
    missing_attributes_fraction: float = Field(
        0.08, ge=0, le=1, description="Products with no attribute list at all."
    )
    missing_category_fraction: float = Field(
        0.02, ge=0, le=1, description="Products with no category path."
    )
    mean_images: float = Field(
        2.2, ge=1, le=6, description="Mean number of images of a product that has images."
    )
    max_images: int = Field(6, ge=1, le=12, description="Most images a product has.")
    query_mix: dict[Literal["text", "image", "multimodal"], float] = Field(
        default_factory=lambda: {"text": 0.4, "image": 0.3, "multimodal": 0.3},
        description="Share of text, image and multimodal queries (normalised).",
    )
    hard_negatives: int = Field(
        3, ge=0, description="Negatives per query from the same leaf category, other attributes."
    )
    random_negatives: int = Field(2, ge=0, description="Negatives per query drawn at random.")
    rows_per_part: int = Field(1000, ge=1, description="Rows per Parquet part file.")
    workers: int = Field(0, ge=0, description="Worker processes; 0 = one per CPU core (at most 8).")

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.no_image_fraction + self.image_only_fraction > 1:
            raise ValueError("no_image_fraction + image_only_fraction must be <= 1")
        if sum(self.query_mix.values()) <= 0:
            raise ValueError("query_mix must have a positive share")
        return self

    def content_hash(self) -> str:
        """Hash of every field that changes the output (not the worker count)."""
        data = self.model_dump(mode="json")
        data.pop("workers")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --- the plan -----------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything about the catalog that couples rows; the rest is derived per row."""

    config: SynthConfig
    n_base: int
    n_total: int
    n_queries: int
    leaf: np.ndarray
    """int16 [n_base] leaf index of each base product"""
    modality: np.ndarray
    """int8 [n_base] TEXT_AND_IMAGE / TEXT_ONLY / IMAGE_ONLY"""
    noise_kind: np.ndarray
    """int8 [n_total] index into PRODUCT_NOISE_KINDS, -1 for clean rows"""
    noise_source: np.ndarray
    """int32 [n_total] base product whose title/images a noisy row took, or that it duplicates"""
    wrong_leaf: np.ndarray
    """int16 [n_total] the category a wrong_category row claims, -1 otherwise"""
    order: np.ndarray
    """int32 [n_total] product row index written at each output position"""
    position: np.ndarray
    """int32 [n_total] inverse of ``order``: output position of each product row"""
    query_positive: np.ndarray
    """int32 [n_queries] true positive base product of each query"""
    query_modality: np.ndarray
    """int8 [n_queries]"""
    query_wrong_positive: np.ndarray
    """int32 [n_queries] the logged (wrong) positive of a noisy query, -1 otherwise"""

    @functools.cached_property
    def by_leaf(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.leaf == k) for k in range(len(LEAVES))]

    def product_id(self, index: int) -> str:
        width = max(7, len(str(self.n_total)))
        return f"P{int(self.position[index]):0{width}d}"

    def query_id(self, index: int) -> str:
        width = max(8, len(str(self.n_queries)))
        return f"Q{index:0{width}d}"


def _split_counts(total: int, shares: list[float]) -> list[int]:
    """Integers proportional to ``shares`` summing exactly to ``total`` (largest remainder)."""
    weights = np.asarray(shares, float) / float(sum(shares))
    raw = weights * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def make_plan(config: SynthConfig) -> Plan:
    rng = np.random.default_rng([config.seed, 0xCA7A])
    n_total = config.products
    n_noisy = round(config.noise * n_total)
    kinds = list(dict.fromkeys(config.noise_kinds))
    per_kind = dict(zip(kinds, _split_counts(n_noisy, [1.0] * len(kinds)), strict=True))
    n_dup = per_kind.get("near_duplicate", 0)
    n_base = n_total - n_dup
    if n_base < 2:
        raise ConfigError("too few products for this noise level: need at least 2 clean ones")
    n_leaves = len(LEAVES)
    # every leaf is used when there are enough products; the rest are drawn uniformly
    leaf = np.concatenate(
        [np.arange(min(n_base, n_leaves)), rng.integers(0, n_leaves, max(0, n_base - n_leaves))]
    )
    leaf = rng.permutation(leaf).astype(np.int16)
    counts = _split_counts(
        n_base,
        [
            1 - config.no_image_fraction - config.image_only_fraction,
            config.no_image_fraction,
            config.image_only_fraction,
        ],
    )
    modality = rng.permutation(np.repeat(np.arange(3), counts)).astype(np.int8)

    noise_kind = np.full(n_total, -1, np.int8)
    noise_source = np.full(n_total, -1, np.int32)
    wrong_leaf = np.full(n_total, -1, np.int16)
    # title/image swaps need a title and an image on both sides to be a swap at all
    both = np.flatnonzero(modality == TEXT_AND_IMAGE)
    swap_targets = rng.permutation(both)
    others = rng.permutation(np.flatnonzero(modality != TEXT_AND_IMAGE))
    taken = 0
    target_pool = np.concatenate([swap_targets, others])
    for kind in kinds:
        if kind == "near_duplicate":
            continue
        count = per_kind[kind]
        if kind in ("title_swap", "image_swap"):
            pool = swap_targets[taken : taken + count]
            if len(pool) < count:
                raise ConfigError(f"not enough products with title and image for {count} {kind}")
        else:
            pool = target_pool[taken : taken + count]
        taken += count
        code = PRODUCT_NOISE_KINDS.index(kind)
        noise_kind[pool] = code
        for index in pool:
            if kind == "wrong_category":
                wrong_leaf[index] = _other_leaf(rng, int(leaf[index]))
            else:
                noise_source[index] = _source_from_other_leaf(rng, both, leaf, int(leaf[index]))
    if n_dup:
        code = PRODUCT_NOISE_KINDS.index("near_duplicate")
        noise_kind[n_base:] = code
        clean_with_content = np.flatnonzero(noise_kind[:n_base] == -1)
        noise_source[n_base:] = rng.choice(clean_with_content, n_dup, replace=True)
    order = rng.permutation(n_total).astype(np.int32)
    position = np.empty_like(order)
    position[order] = np.arange(n_total, dtype=np.int32)

    n_queries = round(config.queries_per_product * n_total)
    base_order = rng.permutation(n_base)
    query_positive = base_order[np.arange(n_queries) % n_base].astype(np.int32)
    mix = config.query_mix
    q_counts = _split_counts(
        n_queries, [mix.get("text", 0.0), mix.get("image", 0.0), mix.get("multimodal", 0.0)]
    )
    query_modality = rng.permutation(np.repeat(np.arange(3), q_counts)).astype(np.int8)
    query_wrong = np.full(n_queries, -1, np.int32)
    n_noisy_queries = round(config.noise * n_queries)
    for q in rng.permutation(n_queries)[:n_noisy_queries]:
        true_leaf = int(leaf[query_positive[q]])
        query_wrong[q] = _source_from_other_leaf(rng, np.arange(n_base), leaf, true_leaf)
    return Plan(
        config=config,
        n_base=n_base,
        n_total=n_total,
        n_queries=n_queries,
        leaf=leaf,
        modality=modality,
        noise_kind=noise_kind,
        noise_source=noise_source,
        wrong_leaf=wrong_leaf,
        order=order,
        position=position,
        query_positive=query_positive,
        query_modality=query_modality,
        query_wrong_positive=query_wrong,
    )


def _other_leaf(rng: np.random.Generator, leaf: int) -> int:
    choice = int(rng.integers(0, len(LEAVES) - 1))
    return choice + 1 if choice >= leaf else choice


def _source_from_other_leaf(
    rng: np.random.Generator, pool: np.ndarray, leaf: np.ndarray, own_leaf: int
) -> int:
    for _ in range(64):
        candidate = int(pool[rng.integers(0, len(pool))])
        if int(leaf[candidate]) != own_leaf:
            return candidate
    return int(pool[rng.integers(0, len(pool))])  # a one-leaf catalog: any other product


# --- one product ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductSpec:
    """A base product as it really is (before any injected noise)."""

    index: int
    leaf: Leaf
    attributes: dict[str, str]
    listed_attributes: list[dict[str, str]] | None
    title: str
    description: str | None
    appearance: Appearance
    n_images: int
    width: int
    height: int
    transparent_main: bool
    main_format: str


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def true_attributes(plan: Plan, index: int) -> dict[str, str]:
    """The attributes a base product really has (its picture is drawn from them)."""
    leaf = LEAVES[int(plan.leaf[index])]
    rng = _rng(plan.config.seed, "attr", index)
    attributes = {key: rng.choice(values) for key, values in leaf_attribute_vocab(leaf).items()}
    department = DEPARTMENTS[leaf.department]
    for key in department.extra:  # department-specific keys are present on about half
        if rng.random() < 0.5:
            attributes.pop(key)
    if rng.random() < 0.6:
        attributes["brand"] = rng.choice(BRANDS)
    return attributes


@functools.lru_cache(maxsize=4096)
def product_spec(plan_key: int, index: int) -> ProductSpec:
    return _product_spec(_PLANS[plan_key], index)


def _product_spec(plan: Plan, index: int) -> ProductSpec:
    config = plan.config
    leaf = LEAVES[int(plan.leaf[index])]
    attributes = true_attributes(plan, index)
    rng = _rng(config.seed, "product", index)
    department = DEPARTMENTS[leaf.department]
    audience = rng.choice(department.audiences) if department.audiences else None
    modality = int(plan.modality[index])
    title = texts.make_title(rng, leaf, attributes, attributes.get("brand"), audience)
    if modality == IMAGE_ONLY:
        title = ""
    description: str | None = texts.make_description(rng, leaf, attributes)
    if rng.random() < config.empty_description_fraction:
        description = None if rng.random() < 0.5 else ""
    listed: list[dict[str, str]] | None = [{"key": k, "value": v} for k, v in attributes.items()]
    roll = rng.random()
    if roll < config.missing_attributes_fraction:
        listed = None
    elif roll < config.missing_attributes_fraction + 0.15:  # an incomplete attribute list
        listed = [pair for pair in listed if rng.random() < 0.6]
    n_images = 0
    if modality != TEXT_ONLY:
        # 1 + geometric, capped: most products have one to three photos
        p = 1.0 / config.mean_images
        n_images = 1
        while n_images < config.max_images and rng.random() > p:
            n_images += 1
    size = config.image_size
    layout = rng.random()
    if layout < 0.8:
        width, height = size, size
    elif layout < 0.9:
        width, height = size, round(size * 1.25)
    else:
        width, height = round(size * 4 / 3), size
    fmt_roll = rng.random()
    main_format = "JPEG" if fmt_roll < 0.85 else "PNG" if fmt_roll < 0.95 else "WEBP"
    appearance = Appearance(
        shape=leaf.shape,
        color=attributes["color"],
        pattern=attributes["pattern"],
        material=attributes["material"],
        variant=rng.randrange(16),
    )
    return ProductSpec(
        index=index,
        leaf=leaf,
        attributes=attributes,
        listed_attributes=listed,
        title=title,
        description=description,
        appearance=appearance,
        n_images=n_images,
        width=width,
        height=height,
        transparent_main=rng.random() < 0.03,
        main_format=main_format,
    )


def catalog_view(spec: ProductSpec, number: int, seed: int, salt: str = "") -> View:
    """The ``number``-th catalog photo of a product: view 0 is the clean main image."""
    rng = _rng(seed, "view", spec.index, number, salt)
    if number == 0:
        return View(
            width=spec.width,
            height=spec.height,
            background=rng.choice(("white", "white", "studio")),
            background_seed=rng.randrange(1 << 30),
            scale=rng.uniform(0.82, 0.95),
            transparent=spec.transparent_main,
            image_format=spec.main_format,
            quality=rng.randint(85, 95),
        )
    zoomed = rng.random() < 0.3
    return View(
        width=spec.width,
        height=spec.height,
        background=rng.choice(("white", "studio", "pastel", "gradient", "lifestyle")),
        background_seed=rng.randrange(1 << 30),
        scale=rng.uniform(0.55, 0.95),
        angle=rng.uniform(-20, 20),
        dx=rng.uniform(-0.08, 0.08),
        dy=rng.uniform(-0.08, 0.08),
        flip=rng.random() < 0.5,
        zoom=rng.uniform(1.3, 1.8) if zoomed else 1.0,
        zoom_x=rng.random(),
        zoom_y=rng.random(),
        brightness=rng.uniform(0.88, 1.12),
        contrast=rng.uniform(0.9, 1.1),
        image_format=rng.choice(("JPEG", "JPEG", "JPEG", "WEBP")),
        quality=rng.randint(80, 95),
    )


def query_view(spec: ProductSpec, query_index: int, seed: int) -> View:
    """A shopper's photo: cluttered scene, tilted, off-centre, soft, noisy, JPEG."""
    rng = _rng(seed, "query-view", query_index)
    size = spec.width if spec.width == spec.height else min(spec.width, spec.height)
    portrait = rng.random() < 0.3
    return View(
        width=size,
        height=round(size * 4 / 3) if portrait else size,
        background=rng.choice(("lifestyle", "clutter", "clutter", "pastel", "gradient")),
        background_seed=rng.randrange(1 << 30),
        scale=rng.uniform(0.45, 0.85),
        angle=rng.uniform(-35, 35),
        dx=rng.uniform(-0.12, 0.12),
        dy=rng.uniform(-0.12, 0.12),
        flip=rng.random() < 0.5,
        zoom=rng.uniform(1.0, 1.35),
        zoom_x=rng.random(),
        zoom_y=rng.random(),
        brightness=rng.uniform(0.72, 1.2),
        contrast=rng.uniform(0.8, 1.15),
        blur=rng.uniform(0.0, 1.0) * (spec.width / 128),
        noise=rng.uniform(0.0, 8.0),
        shadow=rng.random() < 0.5,
        image_format="JPEG",
        quality=rng.randint(60, 85),
    )


def _image_cells(spec: ProductSpec, seed: int, salt: str = "") -> list[dict[str, Any]]:
    return [
        {"bytes": render_bytes(spec.appearance, catalog_view(spec, n, seed, salt)), "path": None}
        for n in range(spec.n_images)
    ]


# --- part builders (run in worker processes) ------------------------------------------------

_PLANS: dict[int, Plan] = {}


def _install_plan(plan: Plan) -> int:
    key = id(plan)
    _PLANS.clear()
    product_spec.cache_clear()
    _PLANS[key] = plan
    return key


PRODUCT_TRUTH_FIELDS = [
    pa.field("truth_is_noisy", pa.bool_(), nullable=False),
    pa.field("truth_noise_kind", pa.string(), nullable=False),
    pa.field("truth_source_id", pa.string()),
    pa.field("truth_category", pa.list_(pa.string())),
]
QUERY_TRUTH_FIELDS = [
    pa.field("truth_is_noisy", pa.bool_(), nullable=False),
    pa.field("truth_noise_kind", pa.string(), nullable=False),
    pa.field("truth_positive_id", pa.string(), nullable=False),
]
PRODUCTS_OUT_SCHEMA = pa.schema([*PRODUCTS.arrow_schema(), *PRODUCT_TRUTH_FIELDS])
QUERIES_OUT_SCHEMA = pa.schema([*QUERIES.arrow_schema(), *QUERY_TRUTH_FIELDS])


def build_product_row(plan_key: int, index: int) -> dict[str, Any]:
    plan = _PLANS[plan_key]
    seed = plan.config.seed
    kind_code = int(plan.noise_kind[index])
    kind = PRODUCT_NOISE_KINDS[kind_code] if kind_code >= 0 else CLEAN
    source = int(plan.noise_source[index])
    if kind == "near_duplicate":
        original = product_spec(plan_key, source)
        rng = _rng(seed, "duplicate", index)
        title = texts.perturb_title(rng, original.title) if original.title else ""
        if original.n_images and rng.random() < 0.5:  # the same photos, byte for byte
            images = _image_cells(original, seed)
        else:  # the same product photographed again
            images = _image_cells(original, seed, salt=f"dup{index}")
        description = original.description if rng.random() < 0.7 else None
        spec = original
    else:
        spec = product_spec(plan_key, index)
        title, description = spec.title, spec.description
        images = _image_cells(spec, seed) if spec.n_images else []
        if kind == "title_swap":
            title = product_spec(plan_key, source).title
        elif kind == "image_swap":
            images = _image_cells(product_spec(plan_key, source), seed)
    category = list(spec.leaf.path)
    if kind == "wrong_category":
        category = list(LEAVES[int(plan.wrong_leaf[index])].path)
    missing_category = (
        _rng(seed, "category", index).random() < plan.config.missing_category_fraction
    )
    return {
        "product_id": plan.product_id(index),
        "title": title,
        "description": description,
        "category": None if missing_category and kind != "wrong_category" else category,
        "attributes": spec.listed_attributes,
        "images": images if images else None,
        "truth_is_noisy": kind != CLEAN,
        "truth_noise_kind": kind,
        "truth_source_id": plan.product_id(source) if source >= 0 else None,
        "truth_category": list(spec.leaf.path),
    }


def _hard_negatives(plan: Plan, plan_key: int, positive: int, rng: random.Random) -> list[int]:
    want = plan.config.hard_negatives
    if want == 0:
        return []
    same_leaf = plan.by_leaf[int(plan.leaf[positive])]
    own = true_attributes(plan, positive)
    chosen: list[int] = []
    for _ in range(min(len(same_leaf), want * 6)):
        candidate = int(same_leaf[rng.randrange(len(same_leaf))])
        if candidate == positive or candidate in chosen:
            continue
        other = true_attributes(plan, candidate)
        if any(other[k] != own[k] for k in ("color", "pattern", "material")):
            chosen.append(candidate)
            if len(chosen) == want:
                break
    return chosen


def build_query_row(plan_key: int, index: int) -> dict[str, Any]:
    plan = _PLANS[plan_key]
    seed = plan.config.seed
    rng = _rng(seed, "query", index)
    positive = int(plan.query_positive[index])
    spec = product_spec(plan_key, positive)
    modality = int(plan.query_modality[index])
    department = DEPARTMENTS[spec.leaf.department]
    audience = rng.choice(department.audiences) if department.audiences else None
    text = image = None
    if modality in (Q_TEXT, Q_MULTIMODAL):
        text = texts.make_query_text(rng, spec.leaf, spec.attributes, audience)
    if modality in (Q_IMAGE, Q_MULTIMODAL):
        image = {
            "bytes": render_bytes(spec.appearance, query_view(spec, index, seed)),
            "path": None,
        }
    negatives = _hard_negatives(plan, plan_key, positive, rng)
    leaf = int(plan.leaf[positive])
    for _ in range(plan.config.random_negatives * 8):
        if len(negatives) >= plan.config.hard_negatives + plan.config.random_negatives:
            break
        candidate = rng.randrange(plan.n_base)
        if (
            candidate != positive
            and candidate not in negatives
            and int(plan.leaf[candidate]) != leaf
        ):
            negatives.append(candidate)
    wrong = int(plan.query_wrong_positive[index])
    logged_positive = wrong if wrong >= 0 else positive
    negative_ids = [plan.product_id(n) for n in negatives if n != logged_positive]
    return {
        "query_id": plan.query_id(index),
        "query_text": text,
        "query_image": image,
        "positive_id": plan.product_id(logged_positive),
        "negative_ids": negative_ids,
        "ts": datetime(2026, 1, 1) + timedelta(seconds=rng.randrange(300 * 86400)),
        "truth_is_noisy": wrong >= 0,
        "truth_noise_kind": WRONG_POSITIVE if wrong >= 0 else CLEAN,
        "truth_positive_id": plan.product_id(positive),
    }


def _build_part(task: tuple[str, int, Path]) -> tuple[str, int, int]:
    """Build and atomically write one part file; returns (table, part, rows)."""
    table_name, part, path = task
    plan_key = next(iter(_PLANS))
    plan = _PLANS[plan_key]
    size = plan.config.rows_per_part
    if table_name == "products":
        positions = range(part * size, min(plan.n_total, (part + 1) * size))
        rows = [build_product_row(plan_key, int(plan.order[p])) for p in positions]
        schema = PRODUCTS_OUT_SCHEMA
    else:
        indices = range(part * size, min(plan.n_queries, (part + 1) * size))
        rows = [build_query_row(plan_key, q) for q in indices]
        schema = QUERIES_OUT_SCHEMA
    table = pa.Table.from_pylist(rows, schema=schema)
    # images dominate the bytes: small row groups keep streaming readers' memory low
    write_table(table, path, row_group_rows=256)
    return table_name, part, len(rows)


def _worker_init(plan: Plan) -> None:
    _install_plan(plan)


# --- the command --------------------------------------------------------------------------

STATE_FILE = "_synth_state.json"
# what synth writes directly in OUT (--overwrite deletes these, and only in its own folder)
OUTPUTS = ("products", "queries", STATE_FILE, "synth_config.yaml", "manifest.json")


@dataclasses.dataclass
class SynthResult:
    out_dir: Path
    products: int
    queries: int
    parts_written: int
    parts_skipped: int
    seconds: float
    manifest: dict[str, Any]


def synth(
    config: SynthConfig, out_dir: str | os.PathLike[str], overwrite: bool = False
) -> SynthResult:
    """Generate ``out_dir/products/`` and ``out_dir/queries/`` (resumable, deterministic).

    ``overwrite`` replaces a catalog that moon2 synth generated there with another config
    (never a folder another command or a person wrote)."""
    started = time.perf_counter()
    digest = config.content_hash()
    legacy = ((STATE_FILE, "config_hash"),)  # a catalog from before output markers
    with claim_output(out_dir, "synth", outputs=OUTPUTS, legacy=legacy) as claim:
        out = claim.path
        state_path = out / STATE_FILE
        if state_path.exists():
            previous = json.loads(state_path.read_text())
            if previous.get("config_hash") != digest:
                if not overwrite:
                    raise ConfigError(
                        f"{out} holds a catalog generated with a different config; pass "
                        "--overwrite to replace it or choose another output directory"
                    )
                claim.reset()
        for name in ("products", "queries"):  # temporaries of a killed run
            remove_parts(out / name, keep_finished=True)
        state_path.write_text(json.dumps({"config_hash": digest}))
        config.to_yaml(out / "synth_config.yaml")
        return _generate(out, config, started)


def _generate(out: Path, config: SynthConfig, started: float) -> SynthResult:
    """Write the part files not written yet, then the manifest."""
    plan = make_plan(config)
    size = config.rows_per_part
    tasks = []
    skipped = 0
    for table_name, rows in (("products", plan.n_total), ("queries", plan.n_queries)):
        for part in range(math.ceil(rows / size)):
            path = out / table_name / PART_TEMPLATE.format(index=part)
            if path.exists():
                skipped += 1
            else:
                tasks.append((table_name, part, path))
    if skipped:
        progress.info(f"resuming: {skipped} part file(s) already written, {len(tasks)} to go")
    workers = config.workers or min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, len(tasks)))
    total_rows = sum(
        min(size, (plan.n_total if t == "products" else plan.n_queries) - p * size)
        for t, p, _ in tasks
    )
    with progress.task(
        f"synth: {plan.n_total:,} products, {plan.n_queries:,} queries", total_rows
    ) as bar:
        if workers == 1:
            _install_plan(plan)
            for task in tasks:
                bar.advance(_build_part(task)[2])
        else:
            context = multiprocessing.get_context("spawn")
            with futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=_worker_init, initargs=(plan,)
            ) as pool:
                for _, _, rows in pool.map(_build_part, tasks):
                    bar.advance(rows)
    seconds = time.perf_counter() - started
    manifest = _manifest(plan, seconds, workers)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return SynthResult(out, plan.n_total, plan.n_queries, len(tasks), skipped, seconds, manifest)


def _manifest(plan: Plan, seconds: float, workers: int) -> dict[str, Any]:
    kinds = {CLEAN: int((plan.noise_kind < 0).sum())}
    for code, name in enumerate(PRODUCT_NOISE_KINDS):
        count = int((plan.noise_kind == code).sum())
        if count:
            kinds[name] = count
    noisy_queries = int((plan.query_wrong_positive >= 0).sum())
    return {
        "generator": "moon2 synth",
        "config": plan.config.model_dump(mode="json"),
        "config_hash": plan.config.content_hash(),
        "products": plan.n_total,
        "base_products": plan.n_base,
        "queries": plan.n_queries,
        "leaf_categories": len(LEAVES),
        "product_noise": kinds,
        "product_noise_fraction": round(1 - kinds[CLEAN] / plan.n_total, 6),
        "query_noise": {CLEAN: plan.n_queries - noisy_queries, WRONG_POSITIVE: noisy_queries},
        "query_noise_fraction": round(noisy_queries / plan.n_queries, 6) if plan.n_queries else 0,
        "product_modality": {
            "text+image": int((plan.modality == TEXT_AND_IMAGE).sum()),
            "text-only": int((plan.modality == TEXT_ONLY).sum()),
            "image-only": int((plan.modality == IMAGE_ONLY).sum()),
        },
        "query_modality": {
            name: int((plan.query_modality == code).sum())
            for code, name in ((Q_TEXT, "text"), (Q_IMAGE, "image"), (Q_MULTIMODAL, "multimodal"))
        },
        "seconds": round(seconds, 2),
        "workers": workers,
    }
