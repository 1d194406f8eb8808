"""``moon2 compare``: paired significance tests between ``moon2 eval`` folders of one benchmark.

The first folder (A) is the baseline; every later folder (B, C, ...) is compared with it, task
by task and metric by metric, on the per-query values in ``EVAL/per_query/<task>.parquet``
(one value per query, or per labelled item for cls / attr, whose ``correct`` column is the
per-item ``acc``). The folders must record the same benchmark (the sha256 of its
``manifest.json`` in ``results.json``) and hold the same query ids for a task.

For each (task, metric, later folder X), with ``d = X - A`` per query:

- ``diff``: the mean of ``d`` (equal to mean X - mean A);
- ``p``: a two-sided paired randomization test of ``mean(d) = 0``: under the null each query's
  two values are exchangeable, so the sign of each ``d_i`` is flipped at random and the
  statistic is ``|mean(d)|``. Zeros are unchanged by a flip, so only the ``m`` non-zero
  differences count: the test enumerates all ``2**m`` sign patterns when ``2**m <=
  resamples`` (exact, ``exact`` in the rows); otherwise it draws ``resamples`` random ones and
  ``p = (k + 1) / (resamples + 1)`` with ``k`` the patterns at least as extreme, so ``p`` is
  never 0 (``scipy.stats.permutation_test``, ``permutation_type="samples"``);
- ``ci_low``, ``ci_high``: a 95 % paired bootstrap confidence interval of ``mean(d)``: queries
  are resampled with replacement, pairs kept together, ``resamples`` times (percentile
  method; BCa's jackknife would cost ``n**2`` for ``n`` queries);
- ``p_holm``: Holm's step-down correction of ``p`` over the family of one comparison (X vs
  A) and one metric: every task compared on that metric. With the default headline metrics
  that is the retrieval tasks on R@10 and, separately, cls and attr on acc.

Every test uses the same ``seed`` (default 0, resamples default 10,000), so a re-run gives
the same numbers. :func:`paired_test` and :func:`holm` are pure and reusable (e.g. for
(query x seed) pairs). Writes ``OUT/compare.json`` (every number) and ``OUT/compare.md``.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl
from scipy import stats

from moon2 import progress
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS
from moon2.bench.evaluate import (
    CLASSIFICATION_METRICS,
    HEADLINE,
    PER_QUERY_COLUMN,
    RETRIEVAL_METRICS,
    per_query_ids,
)
from moon2.data.io import atomic_path, read_json_object
from moon2.data.outdir import check_output, claim_output
from moon2.errors import ConfigError, InputError

RESAMPLES = 10_000
CONFIDENCE = 0.95
ALPHA = 0.05  # p_holm below it is marked with * in compare.md
MIN_RESAMPLES = 100  # fewer cannot give a p-value below 0.01
OUTPUTS = ("compare.json", "compare.md")
# resamples x queries drawn per vectorised step: bounds memory (2**22 float64 = 32 MB)
_BATCH_CELLS = 1 << 22
# scipy 1.15 renamed random_state to rng; a Generator is accepted under either name
_RNG_ARG = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


class PairedTest(NamedTuple):
    """A paired comparison of two systems: p-value and confidence interval of mean(b - a)."""

    p: float
    ci_low: float
    ci_high: float


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(values, axis=axis)


def _abs_mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.abs(np.mean(values, axis=axis))


def _batch(n: int) -> int:
    return max(1, _BATCH_CELLS // max(n, 1))


def _differences(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    first = np.asarray(a, dtype=np.float64)
    second = np.asarray(b, dtype=np.float64)
    if first.ndim != 1 or first.shape != second.shape:
        raise ValueError(
            f"a and b must be 1-D and paired, got shapes {first.shape}, {second.shape}"
        )
    if first.size == 0:
        raise ValueError("no pairs to compare")
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        raise ValueError("a and b must be finite")
    return second - first


def sign_flip_pvalue(diff: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> float:
    """Two-sided paired randomization p-value of ``mean(diff) = 0`` (module docstring):
    exact over all sign patterns of the non-zero differences when ``2**nonzero <=
    resamples`` (:func:`is_exact`), else ``resamples`` random ones."""
    # a zero keeps its value under a sign flip: the pattern's |sum| over the non-zero
    # differences orders the patterns as |mean| over all does, at a fraction of the work
    nonzero = np.asarray(diff, dtype=np.float64)
    nonzero = nonzero[nonzero != 0]
    if nonzero.size < 2:  # every pattern is as extreme as the observed one (scipy needs two)
        return 1.0
    result = stats.permutation_test(
        (nonzero,),
        _abs_mean,
        permutation_type="samples",
        vectorized=True,
        n_resamples=resamples,
        batch=_batch(nonzero.size),
        alternative="greater",  # |mean| at least as large as observed: both tails
        **{_RNG_ARG: np.random.default_rng(seed)},
    )
    return float(min(1.0, result.pvalue))


def is_exact(diff: np.ndarray, resamples: int = RESAMPLES) -> bool:
    """Whether :func:`sign_flip_pvalue` enumerates every sign pattern (as scipy decides)."""
    nonzero = int(np.count_nonzero(diff))
    return nonzero < 2 or (nonzero < 64 and 2**nonzero <= resamples)


def bootstrap_ci(
    diff: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``mean(diff)`` (queries resampled)."""
    diff = np.asarray(diff, dtype=np.float64)
    if np.all(diff == diff[0]):  # every resample has this mean; scipy would warn
        return float(diff[0]), float(diff[0])
    result = stats.bootstrap(
        (diff,),
        _mean,
        vectorized=True,
        n_resamples=resamples,
        batch=_batch(len(diff)),
        confidence_level=confidence,
        method="percentile",
        **{_RNG_ARG: np.random.default_rng(seed)},
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_test(
    a: Sequence[float],
    b: Sequence[float],
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> PairedTest:
    """Compare paired per-query values ``a`` and ``b`` (same queries, same order): the
    sign-flip p-value of mean(b - a) = 0 and its bootstrap confidence interval."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    diff = _differences(a, b)
    low, high = bootstrap_ci(diff, resamples, seed, confidence)
    return PairedTest(sign_flip_pvalue(diff, resamples, seed), low, high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest of m (i from 1) is
    multiplied by m - i + 1, then made non-decreasing in that order and capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adjusted
    return out.tolist()


# --- eval folders -----------------------------------------------------------------------------


@dataclass
class EvalFolder:
    """One ``moon2 eval`` output as compare reads it."""

    path: Path
    label: str
    model: str
    bench: str
    manifest_sha256: str
    tasks: list[str]


@dataclass
class CompareResult:
    """What compare wrote: ``payload`` is compare.json, ``markdown`` compare.md."""

    out_dir: Path
    payload: dict[str, Any]
    markdown: str


def _label(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else f"E{index + 1}"


def _read_eval(path: Path, label: str) -> EvalFolder:
    """The folder's results.json facts and the tasks it has per-query results for."""
    results = path / "results.json"
    if not results.is_file():
        raise InputError(f"{path} is not a moon2 eval output (no results.json)")
    data = read_json_object(results)
    if data is None:
        raise InputError(f"{results} is not a moon2 eval results file; re-run moon2 eval")
    sha = data.get("bench_manifest_sha256")
    if not isinstance(sha, str) or not sha:
        raise InputError(
            f"{results} does not record which benchmark it was evaluated on; re-run moon2 eval"
        )
    folder = path / "per_query"
    if not folder.is_dir():
        raise InputError(
            f"{path} has no per_query/ results (written by an older moon2); re-run moon2 eval"
        )
    names = {
        file.stem for file in folder.glob("*.parquet") if isinstance(data.get(file.stem), dict)
    }
    tasks = [t for t in ALL_TASKS if t in names] + sorted(names - set(ALL_TASKS))
    return EvalFolder(
        path, label, str(data.get("model", "?")), str(data.get("bench", "?")), sha, tasks
    )


def _check_same_benchmark(folders: list[EvalFolder]) -> None:
    first = folders[0]
    for other in folders[1:]:
        if other.manifest_sha256 != first.manifest_sha256:
            raise InputError(
                f"{first.path} and {other.path} were evaluated on different benchmarks "
                f"({first.bench}, manifest sha256 {first.manifest_sha256[:12]}, and "
                f"{other.bench}, {other.manifest_sha256[:12]}); compare evaluations of one "
                "benchmark"
            )


def _aligned(folders: Sequence[Path], task: str) -> list[pl.DataFrame]:
    """Every eval folder's per-query table of ``task``, sorted by id; the ids must agree."""
    ids = list(per_query_ids(task))
    frames = []
    for folder in folders:
        path = folder / "per_query" / f"{task}.parquet"
        try:
            frame = pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError):
            raise InputError(f"{path} cannot be read as Parquet; re-run moon2 eval") from None
        missing = [name for name in ids if name not in frame.columns]
        if missing:
            raise InputError(f"{path} has no column {missing[0]}; re-run moon2 eval")
        frames.append(frame.sort(ids))
    for folder, frame in zip(folders[1:], frames[1:], strict=True):
        if not frame.select(ids).equals(frames[0].select(ids)):
            only = frame.select(ids).join(frames[0].select(ids), on=ids, how="anti")
            if only.is_empty():
                only = frames[0].select(ids).join(frame.select(ids), on=ids, how="anti")
            example = ", ".join(f"{k} {v}" for k, v in (only.row(0, named=True).items()))
            raise InputError(
                f"the {task} queries of {folder} differ from those of {folders[0]} "
                f"(e.g. {example} is in one only); evaluate both on the same tasks of one "
                "benchmark"
            )
    return frames


def paired_per_query(evals: Sequence[Path], task: str, metric: str) -> list[np.ndarray]:
    """The per-query values of ``metric`` on ``task`` in each eval folder, aligned by query
    id (the folders must hold the same queries): the pairs :func:`paired_test` takes."""
    folders = [Path(p) for p in evals]
    frames = _aligned(folders, task)
    column = _column(metric, frames[0].columns)
    if column is None:
        path = folders[0] / "per_query" / f"{task}.parquet"
        raise InputError(f"{path} has no per-query {metric}; re-run moon2 eval")
    return [frame[column].cast(pl.Float64).to_numpy() for frame in frames]


def _column(metric: str, columns: Sequence[str]) -> str | None:
    """The per-query column whose mean is ``metric``, if the table has one."""
    if metric in columns:
        return metric
    named = PER_QUERY_COLUMN.get(metric)
    return named if named in columns else None


KNOWN_METRICS = (*RETRIEVAL_METRICS, *CLASSIFICATION_METRICS)


def _task_metrics(task: str, columns: Sequence[str], wanted: str | Sequence[str]) -> list[str]:
    """The metrics compared on ``task``: those asked for that have per-query values."""
    available = [m for m in KNOWN_METRICS if _column(m, columns)]
    if wanted == "all":
        return available
    if wanted == "headline":
        default = "R@10" if task in RETRIEVAL_TASKS else "acc"
        return [m for m in [HEADLINE.get(task, default)] if m in available]
    return [m for m in wanted if m in available]


def _check_metrics(wanted: str | Sequence[str]) -> None:
    if isinstance(wanted, str):
        if wanted not in ("headline", "all"):
            raise ConfigError(f"metrics must be headline, all or a list of names, got {wanted!r}")
        return
    unknown = [m for m in wanted if m not in KNOWN_METRICS]
    if unknown or not wanted:
        raise ConfigError(
            f"unknown metric {unknown[0] if unknown else '(none given)'}; choose from "
            f"{', '.join(KNOWN_METRICS)} (per-query: every retrieval metric and acc)"
        )


# --- the comparison ---------------------------------------------------------------------------


def _rows(
    folders: list[EvalFolder], wanted: str | Sequence[str], resamples: int, seed: int
) -> list[dict[str, Any]]:
    """One row per (task, metric, later folder), with its p-value and interval."""
    tasks = [t for t in folders[0].tasks if all(t in f.tasks for f in folders[1:])]
    if extra := sorted({t for f in folders for t in f.tasks} - set(tasks)):
        progress.warn(f"not compared (not in every eval folder): {', '.join(extra)}")
    if not tasks:
        raise InputError(
            "the eval folders have no task in common with per-query results; re-run moon2 eval"
        )
    plan = []
    for task in tasks:
        frames = _aligned([f.path for f in folders], task)
        for metric in _task_metrics(task, frames[0].columns, wanted):
            plan.append((task, metric, frames))
    if not plan:
        raise InputError(
            f"none of the metrics asked for has per-query values in the common tasks "
            f"({', '.join(tasks)}); per-query metrics are {', '.join(RETRIEVAL_METRICS)} and acc"
        )
    rows = []
    with progress.task("paired tests", len(plan) * (len(folders) - 1)) as bar:
        for task, metric, frames in plan:
            column = _column(metric, frames[0].columns)
            values = [f[column].cast(pl.Float64).to_numpy() for f in frames]
            for folder, other in zip(folders[1:], values[1:], strict=True):
                rows.append(
                    _row(task, metric, folders[0], folder, values[0], other, resamples, seed)
                )
                bar.advance()
    return rows


def _row(
    task: str,
    metric: str,
    first: EvalFolder,
    folder: EvalFolder,
    a: np.ndarray,
    b: np.ndarray,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    test = paired_test(a, b, resamples, seed)
    return {
        "task": task,
        "metric": metric,
        "a": first.label,
        "b": folder.label,
        "queries": int(a.size),
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float((b - a).mean()),
        "ci_low": test.ci_low,
        "ci_high": test.ci_high,
        "p": test.p,
        "exact": is_exact(b - a, resamples),
    }


def _add_holm(rows: list[dict[str, Any]]) -> None:
    """p_holm over each family: one later folder, one metric, every task compared on it."""
    families: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        families.setdefault((row["b"], row["metric"]), []).append(row)
    for family in families.values():
        for row, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = adjusted
            row["significant"] = adjusted < ALPHA


def compare(
    evals: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    metrics: str | Sequence[str] = "headline",
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> CompareResult:
    """Compare eval folders on one benchmark (the first is the baseline) and write
    ``OUT/compare.json`` and ``OUT/compare.md``; ``metrics`` is ``"headline"`` (R@10 or acc
    per task), ``"all"`` or a list of metric names."""
    if len(evals) < 2:
        raise InputError("compare needs at least two eval folders")
    if resamples < MIN_RESAMPLES:
        raise ConfigError(f"--resamples must be at least {MIN_RESAMPLES}, got {resamples}")
    _check_metrics(metrics)
    folders = [_read_eval(Path(path), _label(i)) for i, path in enumerate(evals)]
    _check_same_benchmark(folders)
    check_output(out_dir, "compare", inputs=list(evals))  # refused before the tests run
    rows = _rows(folders, metrics, resamples, seed)
    _add_holm(rows)
    payload = _payload(folders, metrics, resamples, seed, rows)
    markdown = render_markdown(payload)
    claim = claim_output(out_dir, "compare", inputs=list(evals), outputs=OUTPUTS, resume=False)
    with claim as out:
        with atomic_path(out.path / "compare.json") as temp:
            temp.write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
        with atomic_path(out.path / "compare.md") as temp:
            temp.write_text(markdown, encoding="utf-8")
    return CompareResult(Path(out_dir), payload, markdown)


def _payload(
    folders: list[EvalFolder],
    metrics: str | Sequence[str],
    resamples: int,
    seed: int,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "evals": [{"label": f.label, "path": str(f.path), "model": f.model} for f in folders],
        "benchmark": {"path": folders[0].bench, "manifest_sha256": folders[0].manifest_sha256},
        "metrics": metrics if isinstance(metrics, str) else list(metrics),
        "resamples": resamples,
        "seed": seed,
        "confidence": CONFIDENCE,
        "alpha": ALPHA,
        "test": "two-sided paired sign-flip randomization test of the mean difference "
        "(exact when 2**(queries with a non-zero difference) <= resamples)",
        "interval": "paired percentile bootstrap of the mean difference",
        "holm_family": "per later folder and metric: every task compared on that metric",
        "rows": rows,
    }


# --- the table --------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def _points(value: float) -> str:
    return f"{100 * value:+.2f}"


def render_markdown(payload: dict[str, Any]) -> str:
    """One table per later folder against the first: means and differences in %."""
    bench = payload["benchmark"]
    lines = [
        "# moon2 compare",
        "",
        f"benchmark `{bench['path']}` (manifest sha256 {bench['manifest_sha256'][:12]})",
        "",
        *[f"- {e['label']}: `{e['path']}` ({e['model']})" for e in payload["evals"]],
        "",
    ]
    for label in [e["label"] for e in payload["evals"][1:]]:
        first = payload["evals"][0]["label"]
        lines += [
            f"## {label} - {first}",
            "",
            f"| task | metric | mean {first} | mean {label} | diff | 95% CI | p | p_holm | |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in payload["rows"] if r["b"] == label):
            interval = f"[{_points(row['ci_low'])}, {_points(row['ci_high'])}]"
            lines.append(
                f"| {row['task']} | {row['metric']} | {_pct(row['mean_a'])} | "
                f"{_pct(row['mean_b'])} | {_points(row['diff'])} | {interval} | "
                f"{row['p']:.4f} | {row['p_holm']:.4f} | {'*' if row['significant'] else ''} |"
            )
        lines.append("")
    lines += [
        f"Means, differences and intervals in %. p: {payload['test']}, {payload['resamples']:,} "
        f"resamples, seed {payload['seed']}; 95% CI: {payload['interval']}; p_holm: Holm "
        f"correction {payload['holm_family']}; * p_holm < {payload['alpha']}.",
        "",
    ]
    return "\n".join(lines)
