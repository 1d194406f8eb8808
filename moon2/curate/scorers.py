"""The scorers of ``moon2 filter``: each takes arrays of the scanned rows and returns score
columns (``cur_*``, low = suspicious unless said otherwise) plus boolean flags.

- :func:`duplicate_groups`: copies (identical image bytes and/or normalised titles, and
  near-duplicate sets), one kept per group;
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
    """Flags (score strictly below the cut; NaN never flags) and the cut itself.

    percentile p: the cut is the score at rank floor(p % of the scored rows), so p % of
    distinct scores are flagged and tied rows share one fate. robust: when more than half
    the scores are equal (MAD 0) the standard deviation stands in; with no spread at all
    nothing is flagged.
    """
    valid = ~np.isnan(scores)
    flags = np.zeros(len(scores), bool)
    if not valid.any():
        return flags, None
    values = scores[valid]
    if threshold.mode == "value":
        cut = threshold.value
    elif threshold.mode == "percentile":
        count = int(np.floor(len(values) * threshold.value / 100))
        if count == 0:
            return flags, None
        cut = float(np.sort(values)[min(count, len(values) - 1)])
        if count >= len(values):
            cut = float(np.inf)
    else:
        median = float(np.median(values))
        spread = float(np.median(np.abs(values - median))) * MAD_TO_SIGMA
        if spread == 0:
            spread = float(np.std(values))
        if spread == 0:
            return flags, None
        cut = median - threshold.value * spread
    flags[valid] = values < cut
    return flags, float(cut)


# --- exact duplicates ---------------------------------------------------------------------


def duplicate_keys(
    title_keys: Sequence[str | None], image_keys: Sequence[str | None], keys: Sequence[str]
) -> list[list[str]]:
    """Each row's exact-duplicate keys under ``keys`` (``images``: all image bytes in order;
    ``title``: the normalised title; ``title_and_images``: both, for rows with a title)."""
    out: list[list[str]] = []
    for title, images in zip(title_keys, image_keys, strict=True):
        row = []
        if "images" in keys and images is not None:
            row.append("i\x1f" + images)
        if "title" in keys and title is not None:
            row.append("t\x1f" + title)
        if "title_and_images" in keys and title is not None:
            row.append("ti\x1f" + title + "\x1f" + (images or ""))
        out.append(row)
    return out


class _Components:
    """Union-find over row numbers; a component's root is its smallest row."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, row: int) -> int:
        while self.parent[row] != row:
            self.parent[row] = self.parent[self.parent[row]]
            row = self.parent[row]
        return row

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclass
class DuplicateGroups:
    kept_copy: np.ndarray
    """for every row in a duplicate group that is not the group's kept row: that row; -1"""
    exact: np.ndarray
    """the row shares an exact key with another row of the catalog"""


def duplicate_groups(
    keys: Sequence[Sequence[str]],
    near_sets: Sequence[Sequence[int]] | None,
    eligible: np.ndarray,
    stays: np.ndarray,
) -> DuplicateGroups:
    """Group rows that share an exact key or (with ``near_sets``) sit in one near-duplicate
    set, transitively, and keep one row per group: its earliest row that ``stays`` (is not
    removed for another reason). Every other member is a copy of that row, so nothing is
    removed in favour of a row that goes too. A group with no staying row keeps none."""
    n = len(keys)
    groups = _Components(n)
    first_with: dict[str, int] = {}
    exact = np.zeros(n, bool)
    for row in np.flatnonzero(eligible):
        for key in keys[row]:
            if key in first_with:
                groups.union(first_with[key], int(row))
                exact[row] = exact[first_with[key]] = True
            else:
                first_with[key] = int(row)
    for row, members in enumerate(near_sets or []):
        if eligible[row]:
            for member in members:
                if eligible[member]:
                    groups.union(row, int(member))
    kept = {}
    for row in np.flatnonzero(eligible & stays):
        kept.setdefault(groups.find(int(row)), int(row))
    kept_copy = np.full(n, -1, np.int64)
    for row in np.flatnonzero(eligible):
        keeper = kept.get(groups.find(int(row)), -1)
        if keeper >= 0 and keeper != row:
            kept_copy[row] = keeper
    return DuplicateGroups(kept_copy, exact)


# --- embedding consistency ----------------------------------------------------------------


def nearest_others(
    queries: np.ndarray, candidates: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and indices ``[n, min(k, n - 1)]`` of each row's nearest candidates other than
    itself (row i of ``queries`` and of ``candidates`` is the same item), best first. Among
    exact ties the row itself may fall outside the top k + 1; the (k+1)-th is dropped then."""
    n = len(queries)
    k = min(k, n - 1)
    scores, indices = topk_search(queries, candidates, k + 1)
    own = indices == np.arange(n)[:, None]
    keep = ~own
    keep[~own.any(1), k] = False
    return scores[keep].reshape(n, k), indices[keep].reshape(n, k)


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
    r_b = nearest_others(a_rows, b_rows, k)[0].mean(1)
    r_a = nearest_others(b_rows, a_rows, k)[0].mean(1)
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
    scores, indices = nearest_others(vectors, vectors, k)
    k = scores.shape[1]
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
        .group_by("sample_id")
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
