"""``moon2 filter``: scan, score, decide, write, report.

Output (``OUT/``):

- ``products/`` and ``queries/``: the kept rows, every input column unchanged plus the
  ``cur_*`` score columns (OUT is a catalog ``moon2 train`` takes as it is);
- ``_removed/products/``, ``_removed/queries/``: removed rows with every score, ``cur_flags``
  and ``cur_reason``;
- ``_rejects/products/``, ``_rejects/queries/``: rows that break the data contract, unchanged,
  with ``reject_stage`` and ``reject_reason`` (file, row, column);
- ``filter_report.json`` / ``filter_report.md``: counts per reason and check, the cuts used,
  and precision / recall / F1 against ``truth_*`` columns when the input has them;
- ``config.yaml``: the resolved config; ``_work/``: the scan of every part (resume).

For every table, rows in = kept + removed + rejected, checked before the report is written.

Scale: the pass over the rows (decoding images, the encoders) streams one part at a time and
runs on Ray when asked; the decision then holds per-row light data: the ids and keys, one or
two vector views at a time (n x dim float32 each, read column by column from the scan), the
kNN graph (n x k) and a few scores.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from moon2 import progress
from moon2.curate import scorers
from moon2.curate.config import CurateConfig
from moon2.curate.decide import PRODUCT_CHECKS, QUERY_CHECKS, actions, decide
from moon2.curate.report import evaluate_products, evaluate_queries, render_markdown
from moon2.curate.scan import (
    Encoders,
    encoder_spec,
    load_curate_encoders,
    scan_products,
    scan_queries,
    text_encoder_spec,
)
from moon2.data.io import atomic_path, resolve_files, write_table
from moon2.data.outdir import claim_output
from moon2.data.parts import (
    PartSpec,
    check_plan,
    fingerprint,
    from_ipc,
    init_ray,
    plan_parts,
    read_slice,
    to_ipc,
)
from moon2.data.schema import PRODUCTS, QUERIES, rejects_schema
from moon2.errors import InputError, debug_enabled

STAGE = "filter"
TABLES = ("products", "queries")
PRODUCT_SCORE_FIELDS = [
    pa.field("cur_dup_of", pa.string()),
    pa.field("cur_align_image_text", pa.float32()),
    pa.field("cur_align_title_context", pa.float32()),
    pa.field("cur_cl_outlier_score", pa.float32()),
    pa.field("cur_cl_near_duplicate_score", pa.float32()),
    pa.field("cur_cl_near_duplicate_of", pa.string()),
    pa.field("cur_cl_label_score", pa.float32()),
    pa.field("cur_cl_predicted_category", pa.string()),
    pa.field("cur_dyn_product_margin", pa.float32()),
    pa.field("cur_dyn_product_queries", pa.int32()),
    pa.field("cur_flags", pa.list_(pa.string())),
    pa.field("cur_reason", pa.string()),
]
QUERY_SCORE_FIELDS = [
    pa.field("cur_align_query_margin", pa.float32()),
    pa.field("cur_dyn_loss", pa.float32()),
    pa.field("cur_dyn_margin", pa.float32()),
    pa.field("cur_dyn_negative_share", pa.float32()),
    pa.field("cur_negatives_dropped", pa.list_(pa.string())),
    pa.field("cur_flags", pa.list_(pa.string())),
    pa.field("cur_reason", pa.string()),
]


@dataclass
class FilterResult:
    out_dir: Path
    counts: dict[str, dict[str, int]]
    report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Part:
    table: str
    spec: PartSpec
    first_row: int


# --- the scan ------------------------------------------------------------------------------


def _scan_part(part: _Part, config: CurateConfig, encoders: Encoders | None) -> pa.Table:
    if part.table == "products":
        return scan_products(part.spec, config, encoders, part.first_row)
    return scan_queries(part.spec, encoders, part.first_row, config.embed.batch_size)


def _needs_encoder(config: CurateConfig) -> bool:
    return config.alignment.enabled or config.cleanlab.enabled


class _ScanActor:
    """A Ray actor holding the encoder for its lifetime."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = CurateConfig.model_validate(config)
        self.encoders = load_curate_encoders(self.config) if _needs_encoder(self.config) else None

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        part = _Part(row["table"], PartSpec(**row["spec"]), row["first_row"])
        return {
            "table": part.table,
            "key": part.spec.key,
            "ipc": to_ipc(_scan_part(part, self.config, self.encoders)),
        }


def _scan_local(todo: list[_Part], config: CurateConfig) -> Iterator[tuple[_Part, pa.Table]]:
    encoders = load_curate_encoders(config) if _needs_encoder(config) and todo else None
    for part in todo:
        yield part, _scan_part(part, config, encoders)


def _scan_ray(
    todo: list[_Part], config: CurateConfig, address: str | None
) -> Iterator[tuple[_Part, pa.Table]]:
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray(address)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False
    by_key = {(p.table, p.spec.key): p for p in todo}
    items = [{"table": p.table, "spec": asdict(p.spec), "first_row": p.first_row} for p in todo]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map(
        _ScanActor,
        fn_constructor_kwargs={"config": config.model_dump(mode="json")},
        compute=ActorPoolStrategy(size=config.ray.workers),
        num_cpus=config.ray.num_cpus,
        num_gpus=config.ray.num_gpus or None,
    )
    for row in dataset.iter_rows():
        yield by_key[(row["table"], row["key"])], from_ipc(row["ipc"])


def _scan_path(out: Path, part: _Part) -> Path:
    return out / "_work" / part.table / f"{part.spec.key}.parquet"


def _run_scan(
    out: Path, parts: list[_Part], config: CurateConfig, address: str | None, use_ray: bool
) -> int:
    todo = [p for p in parts if not _scan_path(out, p).exists()]
    total = sum(p.spec.length for p in parts)
    if len(todo) < len(parts):
        progress.info(f"resuming: {len(parts) - len(todo)} of {len(parts)} parts already scanned")
    runner = _scan_ray(todo, config, address) if use_ray else _scan_local(todo, config)
    with progress.task("filter: scanning rows", total, unit="rows") as bar:
        bar.advance(total - sum(p.spec.length for p in todo))
        for part, table in runner if todo else ():
            write_table(table, _scan_path(out, part))
            bar.advance(part.spec.length)
    return len(parts) - len(todo)


class _Scan:
    """The scan of one table, read from its part files a column at a time: the decision
    holds the light columns and at most a couple of vector views at once."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.column_names = pq.read_schema(files[0]).names if files else []

    def select(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in self.files])

    def matrix(self, column: str) -> np.ndarray | None:
        """[n, dim] float32 with NaN rows where the vector is null; None without it."""
        if column not in self.column_names:
            return None
        blocks = []
        for file in self.files:
            array = pq.read_table(file, columns=[column]).column(column).combine_chunks()
            values = array.values.to_numpy(zero_copy_only=False).astype(np.float32)
            block = values.reshape(len(array), array.type.list_size).copy()
            block[array.is_null().to_numpy(zero_copy_only=False)] = np.nan
            blocks.append(block)
        return np.concatenate(blocks)


def _load_scan(out: Path, parts: list[_Part], table: str) -> _Scan | None:
    files = [_scan_path(out, p) for p in parts if p.table == table]
    return _Scan(files) if files else None


# --- scoring and deciding ----------------------------------------------------------------


@dataclass
class _Decisions:
    products: pl.DataFrame
    queries: pl.DataFrame | None
    cuts: dict[str, dict[str, float | None]]


def _duplicate_ids(frame: pl.DataFrame, id_column: str) -> pl.DataFrame:
    """Reject every row whose id an earlier (valid) row already has."""
    seen = frame.with_columns(
        first_row=pl.when(pl.col("reject").is_null()).then(pl.col("row")).min().over(id_column)
    )
    return seen.with_columns(
        reject=pl.when(pl.col("reject").is_null() & (pl.col("row") != pl.col("first_row")))
        .then(
            pl.format(
                "{}, column {}: duplicate id, first at global row {}",
                pl.col("where"),
                pl.lit(id_column),
                pl.col("first_row"),
            )
        )
        .otherwise(pl.col("reject"))
    ).drop("first_row")


def _score_products(
    scan: _Scan,
    config: CurateConfig,
    cuts: dict[str, float | None],
    queries: pl.DataFrame | None,
    dynamics: pl.DataFrame | None,
) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """Scores and flags of every product. The duplicate checks come last: a copy is only
    removed in favour of a row that stays, so a group whose first row goes for another
    reason keeps its next one."""
    frame = pl.from_arrow(
        scan.select(["row", "where", "product_id", "reject", "title_key", "images_key", "label"])
    )
    frame = _duplicate_ids(frame, "product_id")
    n = frame.height
    eligible = frame["reject"].is_null().to_numpy()
    flags: dict[str, np.ndarray] = {}
    nan = np.full(n, np.nan)
    columns: dict[str, Any] = {
        "cur_dup_of": [None] * n,
        "cur_align_image_text": nan,
        "cur_align_title_context": nan,
        "cur_cl_outlier_score": nan,
        "cur_cl_near_duplicate_score": nan,
        "cur_cl_near_duplicate_of": [None] * n,
        "cur_cl_label_score": nan,
        "cur_cl_predicted_category": [None] * n,
    }

    def vectors(name: str) -> np.ndarray | None:
        matrix = scan.matrix(name)
        if matrix is not None:
            matrix[~eligible] = np.nan
        return matrix

    if config.alignment.enabled and "title_vec" in scan.column_names:
        for check, (a, b), threshold in (
            ("image_text", ("title_vec", "image_vec"), config.alignment.image_text),
            (
                "title_context",
                ("text_title_vec", "text_context_vec"),
                config.alignment.title_context,
            ),
        ):
            score = scorers.cross_consistency(vectors(a), vectors(b), config.alignment.hub_k)
            flags[check], cuts[check] = scorers.threshold_flags(score, threshold)
            columns[f"cur_align_{check}"] = score
    near_sets: list[list[int]] | None = None
    product = vectors("text_title_vec" if config.cleanlab.vectors == "text" else "product_vec")
    if config.cleanlab.enabled and product is not None:
        usable = np.flatnonzero(~np.isnan(product[:, 0]))
        labels = frame["label"].to_list()
        result = scorers.cleanlab_issues(
            product[usable], [labels[i] for i in usable], config.cleanlab
        )
        for name, values in (
            ("cur_cl_outlier_score", result.outlier_score),
            ("cur_cl_near_duplicate_score", result.near_duplicate_score),
            ("cur_cl_label_score", result.label_score),
        ):
            full = np.full(n, np.nan)
            full[usable] = values
            columns[name] = full
        for check, values in (
            ("outlier", result.is_outlier),
            ("label_issue", result.is_label_issue),
            ("near_duplicate", result.is_near_duplicate),
        ):
            flags[check] = np.zeros(n, bool)
            flags[check][usable] = values
        predicted: list[str | None] = [None] * n
        near_sets = [[] for _ in range(n)]
        for local, row in enumerate(usable):
            predicted[row] = result.predicted_label[local]
            near_sets[row] = [int(usable[m]) for m in result.near_duplicate_sets[local]]
        columns["cur_cl_predicted_category"] = predicted
    dynamics_score, dynamics_count = _product_dynamics(frame, queries, dynamics)
    if dynamics_score is not None:
        flags["dynamics"], cuts["dynamics"] = scorers.threshold_flags(
            np.where(eligible, dynamics_score, np.nan), config.dynamics.product_margin
        )
    columns["cur_dyn_product_margin"] = nan if dynamics_score is None else dynamics_score
    columns["cur_dyn_product_queries"] = dynamics_count
    action = actions(config, "products")
    goes = np.zeros(n, bool)
    for check, values in flags.items():
        if check != "near_duplicate" and action[check] == "remove":
            goes |= values & eligible
    _duplicate_flags(frame, config, action, near_sets, eligible, goes, flags, columns)
    for name, flag in flags.items():
        flags[name] = flag & eligible
    scored = frame.select("row", "where", "product_id", "reject").with_columns(
        **{name: _series(name, values) for name, values in columns.items()}
    )
    return scored, flags


def _duplicate_flags(
    frame: pl.DataFrame,
    config: CurateConfig,
    action: dict[str, str],
    near_sets: list[list[int]] | None,
    eligible: np.ndarray,
    goes: np.ndarray,
    flags: dict[str, np.ndarray],
    columns: dict[str, Any],
) -> None:
    """The duplicate and near_duplicate flags, decided last and by group: a group of copies
    (exact keys and, when they remove, near-duplicate sets, taken transitively) keeps its
    earliest row that no other check removes; every other member points at that row."""
    n = frame.height
    ids = frame["product_id"].to_list()
    none: list[list[str]] = [[] for _ in range(n)]
    exact_keys = None
    if config.duplicates.enabled:
        exact_keys = scorers.duplicate_keys(
            frame["title_key"].to_list(), frame["images_key"].to_list(), config.duplicates.keys
        )
    exact_removes = exact_keys is not None and action["duplicate"] == "remove"
    near_removes = near_sets is not None and action["near_duplicate"] == "remove"
    removing = scorers.duplicate_groups(
        exact_keys if exact_removes else none,
        near_sets if near_removes else None,
        eligible,
        ~goes,
    )
    if exact_keys is not None:
        exact = (
            removing
            if exact_removes
            else scorers.duplicate_groups(exact_keys, None, eligible, ~goes)
        )
        flags["duplicate"] = (exact.kept_copy >= 0) & exact.exact
        columns["cur_dup_of"] = [
            ids[j] if flag else None
            for j, flag in zip(exact.kept_copy, flags["duplicate"], strict=True)
        ]
    if near_sets is not None:
        near = (
            removing if near_removes else scorers.duplicate_groups(none, near_sets, eligible, ~goes)
        )
        flags["near_duplicate"] = (near.kept_copy >= 0) & ~near.exact
        columns["cur_cl_near_duplicate_of"] = [
            ids[j] if flag else None
            for j, flag in zip(near.kept_copy, flags["near_duplicate"], strict=True)
        ]


def _product_dynamics(
    products: pl.DataFrame, queries: pl.DataFrame | None, dynamics: pl.DataFrame | None
) -> tuple[np.ndarray | None, list[int | None]]:
    """Per product: the mean training margin of the queries that bought it, and how many."""
    if queries is None or dynamics is None:
        return None, [None] * products.height
    per_product = (
        queries.filter(pl.col("reject").is_null())
        .select("query_id", "positive_id")
        .join(dynamics.rename({"sample_id": "query_id"}), on="query_id", how="inner")
        .group_by("positive_id")
        .agg(margin=pl.col("cur_dyn_margin").mean(), count=pl.len())
        .rename({"positive_id": "product_id"})
    )
    joined = products.select("product_id").join(
        per_product, on="product_id", how="left", maintain_order="left"
    )
    return (
        joined["margin"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        joined["count"].to_list(),
    )


def _series(name: str, values: Any) -> pl.Series:
    """A score column; NaN (no score) becomes null."""
    series = pl.Series(name, values, dtype=_polars_type(name))
    return series.fill_nan(None) if series.dtype.is_float() else series


def _polars_type(name: str) -> pl.DataType:
    field_ = next(f for f in [*PRODUCT_SCORE_FIELDS, *QUERY_SCORE_FIELDS] if f.name == name)
    if pa.types.is_string(field_.type):
        return pl.String()
    if pa.types.is_integer(field_.type):
        return pl.Int32()
    return pl.Float32()


def _score_queries(
    frame: pl.DataFrame,
    scan: _Scan,
    products_scan: _Scan,
    products: pl.DataFrame,
    dynamics: pl.DataFrame | None,
    config: CurateConfig,
    cuts: dict[str, float | None],
) -> tuple[pl.DataFrame, dict[str, np.ndarray]]:
    """``frame``: the light query columns with duplicate ids already rejected."""
    valid_products = products.filter(pl.col("reject").is_null())
    row_of = dict(
        zip(valid_products["product_id"].to_list(), valid_products["row"].to_list(), strict=True)
    )
    # a query bought a product that is not in the catalog (or was rejected): it cannot be
    # trained on, and OUT would not pass moon2 validate
    frame = frame.with_columns(
        reject=pl.when(pl.col("reject").is_null() & ~pl.col("positive_id").is_in(list(row_of)))
        .then(
            pl.format(
                "{}, column positive_id: {} is not a valid product (missing or rejected)",
                pl.col("where"),
                pl.col("positive_id"),
            )
        )
        .otherwise(pl.col("reject"))
    )
    n = frame.height
    eligible = frame["reject"].is_null().to_numpy()
    removed = set(products.filter(pl.col("cur_removed"))["product_id"].to_list())
    positives = frame["positive_id"].to_list()
    flags: dict[str, np.ndarray] = {
        "positive_removed": eligible & np.array([p in removed for p in positives], bool)
    }
    margin = np.full(n, np.nan)
    query_vectors = scan.matrix("query_vec")
    product_vectors = products_scan.matrix("product_vec")
    if config.alignment.enabled and query_vectors is not None and product_vectors is not None:
        query_vectors[~eligible] = np.nan
        positive_rows = np.array([row_of.get(p, -1) for p in positives])
        negative_rows = [
            [row_of.get(x, -1) for x in negatives or []]
            for negatives in frame["negative_ids"].to_list()
        ]
        margin = scorers.query_margins(query_vectors, product_vectors, positive_rows, negative_rows)
        flags["query_margin"], cuts["query_margin"] = scorers.threshold_flags(
            margin, config.alignment.query_margin
        )
    kept_products = set(
        products.filter(pl.col("reject").is_null() & ~pl.col("cur_removed"))["product_id"]
    )
    dropped = [
        [x for x in negatives or [] if x not in kept_products]
        for negatives in frame["negative_ids"].to_list()
    ]
    scored = frame.select("row", "where", "query_id", "reject").with_columns(
        cur_align_query_margin=_series("cur_align_query_margin", margin),
        cur_negatives_dropped=pl.Series(dropped, dtype=pl.List(pl.String)),
    )
    if dynamics is not None:
        scored = scored.join(
            dynamics.rename({"sample_id": "query_id"}).select(
                "query_id", "cur_dyn_loss", "cur_dyn_margin", "cur_dyn_negative_share", "dyn_flag"
            ),
            on="query_id",
            how="left",
            maintain_order="left",
        )
        flags["dynamics"] = scored["dyn_flag"].fill_null(False).to_numpy() & eligible
        scored = scored.drop("dyn_flag")
    else:
        scored = scored.with_columns(
            cur_dyn_loss=pl.lit(None, pl.Float32),
            cur_dyn_margin=pl.lit(None, pl.Float32),
            cur_dyn_negative_share=pl.lit(None, pl.Float32),
        )
    return scored, flags


def _decide_all(
    out: Path, parts: list[_Part], config: CurateConfig, training_scores: Path | None
) -> _Decisions:
    products_scan = _load_scan(out, parts, "products")
    queries_scan = _load_scan(out, parts, "queries")
    if products_scan is None:
        raise InputError("the catalog has no product rows")
    cuts: dict[str, dict[str, float | None]] = {"products": {}, "queries": {}}
    dynamics = None
    if training_scores is not None and config.dynamics.enabled:
        dynamics, cuts["queries"]["dynamics"] = scorers.training_dynamics(
            scorers.read_training_scores(training_scores), config.dynamics
        )
    queries_frame = (
        None
        if queries_scan is None
        else _duplicate_ids(
            pl.from_arrow(
                queries_scan.select(
                    ["row", "where", "query_id", "reject", "positive_id", "negative_ids"]
                )
            ),
            "query_id",
        )
    )
    products, flags = _score_products(
        products_scan, config, cuts["products"], queries_frame, dynamics
    )
    products = pl.concat(
        [products, decide(flags, PRODUCT_CHECKS, actions(config, "products"), products.height)],
        how="horizontal",
    )
    queries = None
    if queries_scan is not None:
        queries, query_flags = _score_queries(
            queries_frame, queries_scan, products_scan, products, dynamics, config, cuts["queries"]
        )
        queries = pl.concat(
            [
                queries,
                decide(query_flags, QUERY_CHECKS, actions(config, "queries"), queries.height),
            ],
            how="horizontal",
        )
    return _Decisions(products, queries, cuts)


# --- writing ------------------------------------------------------------------------------


def _score_table(decisions: pl.DataFrame, fields: list[pa.Field]) -> pa.Table:
    frame = decisions.select([f.name for f in fields])
    return frame.to_arrow().cast(pa.schema(fields))


def _without_dropped_negatives(table: pa.Table) -> pa.Table:
    """negative_ids without the products that are not kept (they are listed in
    cur_negatives_dropped), so OUT is a consistent catalog."""
    if "negative_ids" not in table.column_names:
        return table
    index = table.column_names.index("negative_ids")
    kept = []
    for negatives, dropped in zip(
        table.column("negative_ids").to_pylist(),
        table.column("cur_negatives_dropped").to_pylist(),
        strict=True,
    ):
        gone = set(dropped or [])
        # ids compare as text: the contract accepts integer ids, the scan holds strings
        kept.append(None if negatives is None else [x for x in negatives if str(x) not in gone])
    return table.set_column(
        index, table.schema.field(index), pa.array(kept, table.schema.field(index).type)
    )


def _write_part(
    out: Path, part: _Part, decisions: pl.DataFrame, fields: list[pa.Field]
) -> Counter[str]:
    """Write one part's kept, removed and rejected rows; returns the rows each file got."""
    raw = read_slice(part.spec.file, part.spec.offset, part.spec.length)
    raw = raw.drop_columns([n for n in raw.column_names if n.startswith("cur_")])
    rows = decisions.slice(part.first_row, part.spec.length)
    scores = _score_table(rows, fields)
    table = raw
    for field_ in fields:
        table = table.append_column(field_, scores.column(field_.name))
    if "cur_negatives_dropped" in scores.column_names:
        table = _without_dropped_negatives(table)
    rejected = rows["reject"].is_not_null().to_numpy()
    removed = rows["cur_removed"].to_numpy() & ~rejected
    kept = ~rejected & ~removed
    name = f"{part.spec.key}.parquet"
    written: Counter[str] = Counter(rows_in=raw.num_rows)
    targets = (
        ("kept", out / part.table / name, table.filter(pa.array(kept))),
        ("removed", out / "_removed" / part.table / name, table.filter(pa.array(removed))),
        ("rejected", out / "_rejects" / part.table / name, _rejects(raw, rows, rejected)),
    )
    for what, path, rows_out in targets:
        if rows_out.num_rows:
            write_table(rows_out, path)
        else:
            path.unlink(missing_ok=True)
        written[what] += rows_out.num_rows
    return written


def _rejects(raw: pa.Table, rows: pl.DataFrame, rejected: np.ndarray) -> pa.Table:
    """The rejected input rows, unchanged, plus reject_stage and reject_reason."""
    original = raw.filter(pa.array(rejected))
    reasons = rows.filter(pl.col("reject").is_not_null())["reject"].to_list()
    columns = {n: original.column(n) for n in original.column_names}
    columns["reject_stage"] = pa.array([STAGE] * len(reasons), pa.string())
    columns["reject_reason"] = pa.array(reasons, pa.string())
    return pa.table(columns, schema=rejects_schema(original.schema))


# --- evaluation and report ---------------------------------------------------------------


def _truth(parts: list[_Part], table: str, columns: list[str]) -> pl.DataFrame | None:
    """The ``truth_*`` columns of a table in row order, when every file has them."""
    frames = []
    for part in parts:
        if part.table != table:
            continue
        if not set(columns) <= set(pq.read_schema(part.spec.file).names):
            return None
        raw = read_slice(part.spec.file, part.spec.offset, part.spec.length, columns)
        frames.append(pl.from_arrow(raw))
    return pl.concat(frames) if frames else None


def _evaluate_or_warn(
    parts: list[_Part], decisions: _Decisions, query_actions: dict[str, str]
) -> dict[str, Any]:
    """``_evaluate``, or nothing and a warning when it fails: the figures against the
    ``truth_*`` columns are evaluation only and must never cost the user the run."""
    try:
        return _evaluate(parts, decisions, query_actions)
    except Exception as exc:  # the rows are written by now; only the figures are lost
        if debug_enabled():
            raise
        progress.warn(
            "filter: the report leaves out precision / recall against the truth_* columns: "
            f"evaluating them failed ({type(exc).__name__}), a bug worth reporting"
        )
        return {}


def _evaluate(
    parts: list[_Part], decisions: _Decisions, query_actions: dict[str, str]
) -> dict[str, Any]:
    evaluation: dict[str, Any] = {}
    truth = _truth(parts, "products", ["truth_is_noisy", "truth_noise_kind", "truth_source_id"])
    if truth is not None:
        frame = pl.concat([decisions.products, truth], how="horizontal").filter(
            pl.col("reject").is_null()
        )
        evaluation["products"] = evaluate_products(
            frame.select(
                id=pl.col("product_id"),
                removed=pl.col("cur_removed"),
                reason=pl.col("cur_reason"),
                duplicate_of=pl.when(pl.col("cur_reason") == "duplicate")
                .then(pl.col("cur_dup_of"))
                .otherwise(pl.col("cur_cl_near_duplicate_of")),
                is_noisy=pl.col("truth_is_noisy"),
                kind=pl.col("truth_noise_kind"),
                source_id=pl.col("truth_source_id"),
            )
        )
    query_truth = _truth(parts, "queries", ["truth_is_noisy"])
    if query_truth is not None and decisions.queries is not None:
        frame = pl.concat([decisions.queries, query_truth], how="horizontal").filter(
            pl.col("reject").is_null()
        )
        own = [c for c, a in query_actions.items() if a == "remove" and c != "positive_removed"]
        by_own_check = pl.col("cur_flags").list.eval(pl.element().is_in(own)).list.any()
        evaluation["queries"] = evaluate_queries(
            frame.select(
                removed=by_own_check.fill_null(False),
                judged=~pl.col("cur_removed") | by_own_check.fill_null(False),
                reason=pl.col("cur_reason"),
                is_noisy=pl.col("truth_is_noisy"),
            )
        )
    return evaluation


def _counts(frame: pl.DataFrame) -> dict[str, int]:
    rejected = frame.filter(pl.col("reject").is_not_null()).height
    removed = frame.filter(pl.col("reject").is_null() & pl.col("cur_removed")).height
    return {
        "rows_in": frame.height,
        "kept": frame.height - rejected - removed,
        "removed": removed,
        "rejected": rejected,
    }


def _flag_counts(frame: pl.DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    valid = frame.filter(pl.col("reject").is_null())
    flagged = valid.select(pl.col("cur_flags").explode()).drop_nulls()
    by_flag = dict(flagged.group_by("cur_flags").len().sort("cur_flags").iter_rows())
    by_reason = dict(
        valid.filter(pl.col("cur_removed"))
        .group_by("cur_reason")
        .len()
        .sort("cur_reason")
        .iter_rows()
    )
    return by_flag, by_reason


def _inputs(catalog: Path) -> dict[str, Path]:
    if (catalog / "products").is_dir():
        found = {"products": catalog / "products"}
        if (catalog / "queries").is_dir():
            found["queries"] = catalog / "queries"
        return found
    if not catalog.exists():
        raise InputError(f"{catalog} does not exist")
    return {"products": catalog}


def _model_files(spec: str) -> list[list[Any]]:
    """Size and time of a local model's files, so a model retrained in place is noticed."""
    path = Path(
        spec.removeprefix("hf:").split(":")[-1]
        if spec.startswith("open_clip:")
        else spec.removeprefix("hf:")
    )
    if path.is_file():
        return fingerprint([path])
    if path.is_dir():
        return fingerprint(sorted(f for f in path.iterdir() if f.is_file()))
    return []


# what filter writes directly in OUT (--no-resume deletes these, and only in its own folder)
OUTPUTS = (
    *TABLES,
    "_removed",
    "_rejects",
    "_parts",
    "_work",
    "config.yaml",
    "filter_report.json",
    "filter_report.md",
)


def filter_catalog(
    catalog: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: CurateConfig | None = None,
    model: str | None = None,
    training_scores: str | os.PathLike[str] | None = None,
    address: str | None = None,
    use_ray: bool | None = None,
    resume: bool = True,
) -> FilterResult:
    """Score and filter ``catalog`` (a folder with ``products/`` and optionally ``queries/``,
    or a products dataset) into ``out_dir``.

    ``model`` overrides ``config.embed.model``; ``training_scores`` is a ``moon2 train``
    output (its ``scores/epoch-*.parquet`` feed the training-dynamics scorer); ``address``
    runs the scan on that Ray cluster (``use_ray=True`` without it starts a local one).
    """
    config = (config or CurateConfig()).model_copy(deep=True)
    if model is not None:
        config.embed.model = model
    source, out = Path(catalog), Path(out_dir)
    inputs = _inputs(source)
    scores_path = Path(training_scores) if training_scores is not None else None
    if scores_path is not None:
        scorers.read_training_scores(scores_path)  # fail now, not after the scan
    parts: list[_Part] = []
    fingerprints: dict[str, Any] = {}
    for table, path in inputs.items():
        files = resolve_files(path)
        fingerprints[table] = fingerprint(files)
        first_row = 0
        spec = PRODUCTS if table == "products" else QUERIES
        for part_spec in plan_parts(files, config.rows_per_part, None, spec):
            parts.append(_Part(table, part_spec, first_row))
            first_row += part_spec.length
    plan = {
        "scan": {
            "embed": config.embed.model_dump(mode="json"),
            "label_level": config.cleanlab.label_level,
            "needs_encoder": _needs_encoder(config),
            "rows_per_part": config.rows_per_part,
            "encoder": encoder_spec(config) if _needs_encoder(config) else None,
            "text_encoder": text_encoder_spec(config) if _needs_encoder(config) else None,
            "model_files": [
                _model_files(encoder_spec(config)),
                _model_files(text_encoder_spec(config)),
            ]
            if _needs_encoder(config)
            else [],
        },
        "inputs": fingerprints,
    }
    files = [Path(f[0]) for table in fingerprints.values() for f in table]
    with claim_output(
        out,
        STAGE,
        inputs=[source, scores_path, *files],
        outputs=OUTPUTS,
        resume=resume,
        legacy=(("config.yaml", "moon2 filter"), ("_parts/plan.json", "inputs")),
    ) as claim:
        check_plan(claim.path, plan, resume, STAGE)
        ray = use_ray if use_ray is not None else address is not None
        return _filter(claim.path, source, inputs, parts, config, scores_path, address, ray)


def _filter(
    out: Path,
    source: Path,
    inputs: dict[str, Path],
    parts: list[_Part],
    config: CurateConfig,
    scores_path: Path | None,
    address: str | None,
    ray: bool,
) -> FilterResult:
    """Scan, decide and write the kept / removed / rejected rows and the report."""
    started = time.perf_counter()
    config.to_yaml(out / "config.yaml", "moon2 filter: the resolved config of this run")
    skipped = _run_scan(out, parts, config, address, ray)
    progress.info("filter: scoring and deciding")
    decisions = _decide_all(out, parts, config, scores_path)
    written = {table: Counter() for table in inputs}
    with progress.task("filter: writing", len(parts), unit="parts") as bar:
        for part in parts:
            frame = decisions.products if part.table == "products" else decisions.queries
            fields = PRODUCT_SCORE_FIELDS if part.table == "products" else QUERY_SCORE_FIELDS
            written[part.table] += _write_part(out, part, frame, fields)
            bar.advance()
    counts = {"products": _counts(decisions.products)}
    if decisions.queries is not None:
        counts["queries"] = _counts(decisions.queries)
    for table, figures in counts.items():
        rows_in = sum(p.spec.length for p in parts if p.table == table)
        files = {k: written[table][k] for k in ("rows_in", "kept", "removed", "rejected")}
        if (
            files != figures
            or figures["kept"] + figures["removed"] + figures["rejected"] != rows_in
        ):
            raise InputError(
                f"accounting failed for {table}: {rows_in} rows in the input, decided "
                f"{figures}, written {files}"
            )
    flagged, removed = {}, {}
    for table in counts:
        frame = decisions.products if table == "products" else decisions.queries
        flagged[table], removed[table] = _flag_counts(frame)
    report: dict[str, Any] = {
        "stage": STAGE,
        "input": str(source),
        "encoder": encoder_spec(config) if _needs_encoder(config) else None,
        "text_encoder": text_encoder_spec(config) if _needs_encoder(config) else None,
        "training_scores": str(scores_path) if scores_path else None,
        "runner": "ray" if ray else "local",
        "ray_address": address,
        "counts": counts,
        "removed_by_reason": removed,
        "flagged_by_check": flagged,
        "actions": {t: actions(config, t) for t in counts},
        "cuts": decisions.cuts,
        "parts": len(parts),
        "parts_resumed": skipped,
        "seconds": round(time.perf_counter() - started, 2),
        "config": config.model_dump(mode="json"),
    }
    evaluation = _evaluate_or_warn(parts, decisions, actions(config, "queries"))
    if evaluation:
        report["evaluation"] = evaluation
    for name, text in (
        ("filter_report.json", json.dumps(report, indent=2, ensure_ascii=False)),
        ("filter_report.md", render_markdown(report)),
    ):
        with atomic_path(out / name) as temp:
            temp.write_text(text, encoding="utf-8")
    return FilterResult(out, counts, report, report["seconds"])
