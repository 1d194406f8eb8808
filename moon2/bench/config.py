"""Configuration of ``moon2 build-bench`` and ``moon2 eval``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moon2.config import Config

# The paper's seven MBE2.0 tasks first, in the order of its tables (t2i / i2t: text queries
# against product images, image queries against product titles), then two extra tasks of
# moon2: title2image / image2title, a product's own title against its own main image and back.
TaskName = Literal[
    "t2mm", "i2mm", "mm2mm", "t2i", "i2t", "cls", "attr", "title2image", "image2title"
]
PAPER_TASKS: tuple[str, ...] = ("t2mm", "i2mm", "mm2mm", "t2i", "i2t", "cls", "attr")
ALL_TASKS: tuple[str, ...] = (*PAPER_TASKS, "title2image", "image2title")
RETRIEVAL_TASKS: tuple[str, ...] = (*PAPER_TASKS[:5], "title2image", "image2title")
TASK_NOTE = (
    "t2i / i2t: text / image queries against the products' main images / titles (MBE2.0); "
    "title2image / image2title: a product's own title against its own main image and back "
    "(not in the paper)."
)
"""What the cross-modal tasks are, for the tables that show them (results.md, the report)."""


class SplitConfig(Config):
    """How products are divided between train and test."""

    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of products (by duplicate group) that go to test."
    )
    test_products: int | None = Field(
        None, ge=1, description="Absolute test size in products; overrides test_fraction."
    )
    stratify_level: int = Field(
        -1,
        description="Category level the split is stratified by: 1 = root, 2 = second level, "
        "...; -1 = leaf (the last level of each path).",
    )
    column: str | None = Field(
        None,
        description="Use a split already in the catalog: this products column holds 'train' or "
        "'test' (e.g. mbe_split from moon2 convert mbe). Leakage is then reported, not fixed.",
    )
    dedupe_titles: bool = Field(
        True, description="Products with the same normalised title stay on one side."
    )
    dedupe_images: bool = Field(
        True, description="Products sharing an image (same bytes or same path) stay on one side."
    )
    min_title_tokens: int = Field(
        3, ge=1, description="Shorter normalised titles are too generic to mark duplicates."
    )
    max_duplicate_group: int = Field(
        50,
        ge=2,
        description="A title or image shared by more products than this is treated as a "
        "placeholder (e.g. 'no image available'), not as a duplicate marker.",
    )


class TaskConfig(Config):
    """Which zero-shot tasks are built from the test split, and how."""

    tasks: list[TaskName] = Field(
        default_factory=lambda: list(ALL_TASKS),
        description="Tasks to build. t2mm / i2mm / mm2mm: test queries against the test "
        "products (title and images); t2i: text queries against the products' main images "
        "only; i2t: image queries against the products' titles only; title2image / "
        "image2title: a product's own title against its own main image and back; cls, attr.",
    )
    query_views: Literal["native", "all"] = Field(
        "native",
        description="native: t2mm and t2i use text-only queries, i2mm and i2t image-only, "
        "mm2mm queries with both. all: also the text and image parts of multimodal queries "
        "for t2mm / t2i and i2mm / i2t.",
    )
    cls_level: int = Field(
        -1, description="Category level of the classification labels (1 = root, -1 = leaf)."
    )
    attr_keys: list[str] | None = Field(
        None, description="Attribute keys to predict; None = chosen automatically."
    )
    attr_min_coverage: float = Field(
        0.2, ge=0, le=1, description="Automatic keys: present on at least this share of products."
    )
    attr_max_values: int = Field(
        60, ge=2, description="Automatic keys: at most this many distinct values."
    )
    attr_min_value_count: int = Field(
        2, ge=1, description="Values seen on fewer test products are not used as labels."
    )
    min_items: int = Field(
        5, ge=1, description="A task with fewer queries (or labelled products) is skipped."
    )


class BenchConfig(Config):
    """``moon2 build-bench``: split a catalog and build MBE2.0-style test tasks."""

    seed: int = Field(0, ge=0, description="Seed of the split and of the candidate pool order.")
    split: SplitConfig = Field(default_factory=SplitConfig)
    tasks: TaskConfig = Field(default_factory=TaskConfig)


class EvalConfig(Config):
    """``moon2 eval``: how a model is run on a benchmark."""

    tasks: list[TaskName] = Field(
        default_factory=lambda: list(ALL_TASKS), description="Tasks to evaluate (if built)."
    )
    batch_size: int = Field(32, ge=1, description="Items per encoder forward pass.")
    device: str = Field("auto", description="auto (cuda when available, else cpu), cpu, cuda:N.")
    depth: int = Field(
        100, ge=10, description="Ranked list length kept per query (mAP and TREC runs use it)."
    )
    max_images: int | None = Field(
        None,
        ge=1,
        description="Images per product given to the encoder (main image first). null: as "
        "many as a moon2 checkpoint trained with (its moon2_model.json records it), else 4.",
    )
    label_template: str = Field(
        "{label}", description="Text embedded for a class label in zero-shot classification."
    )
    attr_template: str = Field(
        "{key}: {value}", description="Text embedded for an attribute value (zero-shot)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub (hf: models); off unless you trust it."
    )

    @model_validator(mode="after")
    def _check_templates(self) -> EvalConfig:
        if "{label}" not in self.label_template:
            raise ValueError("label_template must contain {label}")
        if "{value}" not in self.attr_template:
            raise ValueError("attr_template must contain {value}")
        return self
