"""The scorers of ``moon2 filter``: each takes arrays of the scanned rows and returns score
columns (``cur_*``, low = suspicious unless said otherwise) plus boolean flags.

- :func:`exact_duplicates`: identical image bytes and/or normalised titles;
- :func:`cross_consistency`: how well two views of the same product agree (title vs images,
  title vs the rest of the listing), corrected for hubness;
- :func:`query_margins`: s(query, bought) - max s(query, shown negative);
- :func:`cleanlab_issues`: cleanlab Datalab outliers, near duplicates and category label
  issues on the product vectors, from a precomputed kNN graph;
- :func:`training_dynamics`: a training run's per-sample losses and margins across epochs;
- :func:`threshold_flags`: robust / percentile / value thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix

from moon2.bench.retrieval import topk_search
from moon2.curate.config import CleanlabConfig, DynamicsConfig, Threshold
from moon2.errors import InputError

MAD_TO_SIGMA = 1.4826


def threshold_flags(scores: np.ndarray, threshold: Threshold) -> tuple[np.ndarray, float | None]:
    """Flags (score below the cut; NaN never flags) and the cut itself."""
    valid = ~np.isnan(scores)
    if not valid.any():
        return np.zeros(len(scores), bool), None
    values = scores[valid]
    if threshold.mode == "value":
        cut = threshold.value
    elif threshold.mode == "percentile":
        cut = float(np.percentile(values, threshold.value)) if threshold.value > 0 else -np.inf
        # the lowest value percent, ties at the cut included only when they are below it
        flags = np.zeros(len(scores), bool)
        count = int(np.floor(len(values) * threshold.value / 100))
        order = np.argsort(values, kind="stable")[:count]
        flags[np.flatnonzero(valid)[order]] = True
        return flags, None if not np.isfinite(cut) else float(cut)
    else:
        median = float(np.median(values))
        mad = float(np.median(np.abs(values - median))) * MAD_TO_SIGMA
        cut = median - threshold.value * mad
    flags = np.zeros(len(scores), bool)
    flags[valid] = values < cut
    return flags, float(cut)


# --- exact duplicates ---------------------------------------------------------------------


def exact_duplicates(
    title_keys: Sequence[str | None],
    image_keys: Sequence[str | None],
    keys: Sequence[str],
    eligible: np.ndarray,
    representative: np.ndarray | None = None,
) -> np.ndarray:
    """For each eligible row, the earliest row it duplicates (-1 when none) under ``keys``
    (``images``, ``title``, ``title_and_images``). Only ``representative`` rows (default: the
    eligible ones) can be the copy that is kept, so a group whose first row goes for another
    reason keeps its next one."""
    n = len(title_keys)
    representative = eligible if representative is None else representative & eligible
    frame = pl.DataFrame(
        {
            "row": np.arange(n, dtype=np.int64),
            "title": pl.Series(list(title_keys), dtype=pl.String),
            "images": pl.Series(list(image_keys), dtype=pl.String),
            "eligible": eligible,
            "candidate": pl.Series(np.where(representative, np.arange(n), n), dtype=pl.Int64),
        }
    ).with_columns(
        pl.when(pl.col("title").is_not_null() & pl.col("images").is_not_null())
        .then(pl.col("title") + "\x1f" + pl.col("images"))
        .when(pl.col("title").is_not_null())
        .then(pl.col("title") + "\x1f")
        .alias("title_and_images")
    )
    first = np.full(n, n, np.int64)
    for key in keys:
        firsts = (
            frame.filter(pl.col("eligible") & pl.col(key).is_not_null())
            .with_columns(first=pl.col("candidate").min().over(key))
            .select("row", "first")
        )
        rows = firsts["row"].to_numpy()
        first[rows] = np.minimum(first[rows], firsts["first"].to_numpy())
    return np.where(first < np.arange(n), first, -1)


def near_duplicate_partner(
    sets: Sequence[Sequence[int]], flagged: np.ndarray, representative: np.ndarray
) -> np.ndarray:
    """For each flagged row, the earliest representative row of its near-duplicate set when
    that row comes before it (-1 otherwise): the first kept copy stays."""
    partner = np.full(len(sets), -1, np.int64)
    for row in np.flatnonzero(flagged):
        members = [int(m) for m in sets[row] if representative[int(m)]]
        if members and min(members) < row:
            partner[row] = min(members)
    return partner


# --- embedding consistency ----------------------------------------------------------------


def _neighbour_mean(
    queries: np.ndarray,
    candidates: np.ndarray,
    query_rows: np.ndarray,
    cand_rows: np.ndarray,
    k: int,
) -> np.ndarray:
    """Mean cosine of each query to its ``k`` nearest candidates other than its own row."""
    want = min(k + 1, len(cand_rows))
    scores, indices = topk_search(queries, candidates, want)
    own = cand_rows[indices] == query_rows[:, None]
    # drop the row's own candidate where it is among the top, else the last (k+1-th) one
    keep = ~own
    no_self = ~own.any(1)
    keep[no_self, want - 1] = want - 1 < k
    counts = keep.sum(1)
    return np.where(counts > 0, (scores * keep).sum(1) / np.maximum(counts, 1), 0.0)


def cross_consistency(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """How well view ``a`` of each row agrees with view ``b`` of the same row.

    ``cos(a_i, b_i) - (r_b(a_i) + r_a(b_i)) / 2`` where ``r_b(a_i)`` is the mean cosine of
    ``a_i`` to its ``k`` nearest ``b`` of other rows (CSLS, Conneau et al. 2018): a generic
    title close to every image is not taken for a match, nor a specific one for a mismatch.
    Rows without both views get NaN. ``a``, ``b``: [n, dim] L2-normalised, NaN rows absent.
    """
    n = len(a)
    out = np.full(n, np.nan)
    both = np.flatnonzero(~np.isnan(a[:, 0]) & ~np.isnan(b[:, 0]))
    if len(both) < 2:
        return out
    a_rows, b_rows = a[both], b[both]
    raw = np.einsum("ij,ij->i", a_rows, b_rows)
    r_b = _neighbour_mean(a_rows, b_rows, both, both, k)
    r_a = _neighbour_mean(b_rows, a_rows, both, both, k)
    out[both] = raw - 0.5 * (r_a + r_b)
    return out


def query_margins(
    queries: np.ndarray,
    products: np.ndarray,
    positive_rows: np.ndarray,
    negative_rows: Sequence[Sequence[int]],
) -> np.ndarray:
    """``s(q, p) - max_n s(q, n)`` per query; NaN without a vector or a shown negative."""
    out = np.full(len(queries), np.nan)
    for i, (positive, negatives) in enumerate(zip(positive_rows, negative_rows, strict=True)):
        if positive < 0 or np.isnan(queries[i, 0]) or np.isnan(products[positive, 0]):
            continue
        usable = [n for n in negatives if n >= 0 and not np.isnan(products[n, 0])]
        if not usable:
            continue
        q = queries[i]
        out[i] = float(products[positive] @ q) - float(np.max(products[usable] @ q))
    return out


# --- cleanlab -------------------------------------------------------------------------------


@dataclass
class CleanlabResult:
    outlier_score: np.ndarray
    is_outlier: np.ndarray
    near_duplicate_score: np.ndarray
    is_near_duplicate: np.ndarray
    near_duplicate_sets: list[list[int]]
    """the other rows within cleanlab's radius of each row"""
    label_score: np.ndarray
    is_label_issue: np.ndarray
    predicted_label: list[str | None]


def knn_graph(vectors: np.ndarray, k: int) -> csr_matrix:
    """Exact cosine kNN graph (self excluded) in cleanlab's format: CSR, distances sorted."""
    n = len(vectors)
    k = min(k, n - 1)
    scores, indices = topk_search(vectors, vectors, k + 1)
    rows = np.arange(n)[:, None]
    own = indices == rows
    keep = ~own
    keep[~own.any(1), k] = False
    scores = scores[keep].reshape(n, k)
    indices = indices[keep].reshape(n, k)
    distances = np.clip(1.0 - scores, 0.0, 2.0).astype(np.float64)
    order = np.argsort(distances, 1, kind="stable")
    distances = np.take_along_axis(distances, order, 1)
    indices = np.take_along_axis(indices, order, 1)
    return csr_matrix(
        (distances.ravel(), indices.ravel(), np.arange(0, n * k + 1, k)), shape=(n, n)
    )


def _pred_probs(
    vectors: np.ndarray, labels: np.ndarray, graph: csr_matrix, config: CleanlabConfig, seed: int
) -> np.ndarray:
    classes = int(labels.max()) + 1
    if config.classifier == "knn":
        n, k = graph.shape[0], graph.indptr[1] - graph.indptr[0]
        neighbours = graph.indices.reshape(n, k)
        votes = np.zeros((n, classes))
        np.add.at(votes, (np.repeat(np.arange(n), k), labels[neighbours].ravel()), 1.0)
        votes += 1.0 / classes  # a little smoothing: no class is impossible
        return votes / votes.sum(1, keepdims=True)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=seed)
    model = LogisticRegression(max_iter=500, C=10.0)
    return cross_val_predict(model, vectors, labels, cv=folds, method="predict_proba")


def cleanlab_issues(
    vectors: np.ndarray, labels: Sequence[str | None], config: CleanlabConfig, seed: int = 0
) -> CleanlabResult:
    """Outliers and near duplicates on all rows; label issues on rows whose category has at
    least ``min_class_size`` products. ``vectors``: [n, dim] L2-normalised, no NaN."""
    from cleanlab import Datalab

    n = len(vectors)
    result = CleanlabResult(
        outlier_score=np.full(n, np.nan),
        is_outlier=np.zeros(n, bool),
        near_duplicate_score=np.full(n, np.nan),
        is_near_duplicate=np.zeros(n, bool),
        near_duplicate_sets=[[] for _ in range(n)],
        label_score=np.full(n, np.nan),
        is_label_issue=np.zeros(n, bool),
        predicted_label=[None] * n,
    )
    if n <= config.k:
        return result
    graph = knn_graph(vectors, config.k)
    with _quiet_cleanlab():
        lab = Datalab(data={"row": np.arange(n)}, verbosity=0)
        lab.find_issues(
            knn_graph=graph,
            issue_types={
                "outlier": {"k": config.k},
                "near_duplicate": {"k": config.k, "threshold": config.near_duplicate_threshold},
            },
        )
    outliers = lab.get_issues("outlier")
    result.outlier_score = outliers["outlier_score"].to_numpy(float)
    result.is_outlier = outliers["is_outlier_issue"].to_numpy(bool)
    near = lab.get_issues("near_duplicate")
    result.near_duplicate_score = near["near_duplicate_score"].to_numpy(float)
    result.is_near_duplicate = near["is_near_duplicate_issue"].to_numpy(bool)
    result.near_duplicate_sets = [
        [int(m) for m in members] for members in near["near_duplicate_sets"]
    ]
    _label_issues(vectors, labels, config, seed, result)
    return result


def _label_issues(
    vectors: np.ndarray,
    labels: Sequence[str | None],
    config: CleanlabConfig,
    seed: int,
    result: CleanlabResult,
) -> None:
    from cleanlab import Datalab

    frame = pl.DataFrame({"label": pl.Series(list(labels), dtype=pl.String)}).with_row_index()
    counts = frame.group_by("label").len()
    big = counts.filter(pl.col("label").is_not_null() & (pl.col("len") >= config.min_class_size))
    if big.height < 2:
        return
    names = sorted(big["label"].to_list())
    rows = frame.filter(pl.col("label").is_in(names))["index"].to_numpy()
    code = {name: i for i, name in enumerate(names)}
    encoded = np.array([code[labels[r]] for r in rows])
    subset = vectors[rows]
    graph = knn_graph(subset, min(config.k, len(rows) - 1))
    folds = min(config.folds, int(np.bincount(encoded).min()))
    probs = _pred_probs(subset, encoded, graph, config.model_copy(update={"folds": folds}), seed)
    with _quiet_cleanlab():
        lab = Datalab(data={"label": encoded}, label_name="label", verbosity=0)
        lab.find_issues(pred_probs=probs, issue_types={"label": {}})
    issues = lab.get_issues("label")
    result.label_score[rows] = issues["label_score"].to_numpy(float)
    result.is_label_issue[rows] = issues["is_label_issue"].to_numpy(bool)
    predicted = issues["predicted_label"].to_numpy()
    for row, label in zip(rows, predicted, strict=True):
        result.predicted_label[row] = names[int(label)]


class _quiet_cleanlab:
    """cleanlab logs and warns on every call; keep the console for moon2's own messages."""

    def __enter__(self) -> None:
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger("cleanlab").level
        logging.getLogger("cleanlab").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("cleanlab").setLevel(self._level)
        self._warnings.__exit__(*exc)


# --- training dynamics ----------------------------------------------------------------------


def read_training_scores(run: str | Path) -> pl.DataFrame:
    """Every epoch's per-sample scores of a training run (``RUN/scores/epoch-*.parquet`` or
    a folder holding them)."""
    path = Path(run)
    folder = path / "scores" if (path / "scores").is_dir() else path
    files = sorted(folder.glob("epoch-*.parquet"))
    if not files:
        raise InputError(f"{path}: no scores/epoch-*.parquet (give a moon2 train output)")
    frames = []
    for file in files:
        frame = pl.read_parquet(file)
        missing = {"sample_id", "epoch", "loss", "margin"} - set(frame.columns)
        if missing:
            raise InputError(f"{file}: missing column(s) {', '.join(sorted(missing))}")
        frames.append(frame.select("sample_id", "epoch", "loss", "margin"))
    return pl.concat(frames)


def training_dynamics(
    scores: pl.DataFrame, config: DynamicsConfig
) -> tuple[pl.DataFrame, float | None]:
    """Per sample (query): mean loss and margin over the epochs read, the share of them with
    a negative margin, and ``dyn_flag`` (loss stays high, or margin stays negative); also the
    loss cut."""
    epochs = sorted(scores["epoch"].unique().to_list())
    used = epochs[config.skip_epochs :] or epochs[-1:]
    per_sample = (
        scores.filter(pl.col("epoch").is_in(used))
        .group_by("sample_id", maintain_order=True)
        .agg(
            cur_dyn_loss=pl.col("loss").mean(),
            cur_dyn_margin=pl.col("margin").mean(),
            cur_dyn_negative_share=(pl.col("margin") < 0).mean(),
            cur_dyn_epochs=pl.len(),
        )
        .sort("sample_id")
    )
    high_loss, cut = threshold_flags(-per_sample["cur_dyn_loss"].to_numpy(), config.loss)
    flag = high_loss | (per_sample["cur_dyn_negative_share"].to_numpy() >= config.negative_share)
    return per_sample.with_columns(dyn_flag=pl.Series(flag)), None if cut is None else -cut
