"""``filter_report.json`` / ``.md``: what ``moon2 filter`` removed and why, and, when the
input carries ``truth_*`` columns (synthetic catalogs), how right it was.

Evaluation only: the ``truth_*`` columns are read here, after every decision is made.

How the figures are counted:

- ``overall``: removed rows against ``truth_is_noisy`` (precision, recall, F1);
- ``per_kind[K]``: ``TP_K`` = removed rows of noise kind K, ``FP`` = removed clean rows (all of
  them, whatever the reason), precision ``TP_K / (TP_K + FP)``, recall ``TP_K / N_K``: the
  figures the filter would get on a catalog holding only noise kind K; ``title_image_swaps``
  is the same for title_swap and image_swap together;
- queries: removed queries against ``truth_is_noisy`` (wrong bought product), leaving out
  queries removed only because their product was;
- a duplicate pair counts once, whichever copy was listed first: when a clean row is
  removed as the copy of a noisy row that was copied from it (``truth_source_id``), the
  noisy row is counted as removed instead of the clean one.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from moon2 import progress
from moon2.errors import debug_enabled

SWAPS = ("title_swap", "image_swap")
DUPLICATE_REASONS = ("duplicate", "near_duplicate")
CLEAN_KIND = "clean"
UNKNOWN_KIND = "unknown"


def _null_truth_is_clean(frame: pl.DataFrame) -> pl.DataFrame:
    """Null truth means clean: another producer's ``truth_*`` columns are as valid as moon2
    synth's, and may leave a clean row's flag or kind null; a noisy row without a kind is
    of kind 'unknown'."""
    noisy = pl.col("is_noisy").fill_null(False)
    frame = frame.with_columns(is_noisy=noisy)
    if "kind" not in frame.columns:
        return frame
    return frame.with_columns(
        kind=pl.when(noisy)
        .then(pl.col("kind").fill_null(UNKNOWN_KIND))
        .otherwise(pl.col("kind").fill_null(CLEAN_KIND))
    )


def prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }


def _resolve_duplicate_pairs(frame: pl.DataFrame) -> pl.DataFrame:
    """``removed_eval``: ``removed``, with clean originals removed in place of their noisy
    copies counted as the copies' removal."""
    removed = frame["removed"].to_list()
    noisy = frame["is_noisy"].to_list()
    ids = frame["id"].to_list()
    row_of = {pid: i for i, pid in enumerate(ids)}
    sources = frame["source_id"].to_list()
    reasons = frame["reason"].to_list()
    partners = frame["duplicate_of"].to_list()
    for i in range(frame.height):
        if not removed[i] or noisy[i] or reasons[i] not in DUPLICATE_REASONS:
            continue
        j = row_of.get(partners[i]) if partners[i] is not None else None
        if j is not None and noisy[j] and not removed[j] and sources[j] == ids[i]:
            removed[i], removed[j] = False, True
    return frame.with_columns(removed_eval=pl.Series(removed, dtype=pl.Boolean))


def evaluate_products(frame: pl.DataFrame) -> dict[str, Any]:
    """``frame``: id, removed, reason, duplicate_of, is_noisy, kind, source_id (non-rejected
    rows)."""
    frame = _resolve_duplicate_pairs(_null_truth_is_clean(frame))
    clean_removed = frame.filter(pl.col("removed_eval") & ~pl.col("is_noisy")).height
    out: dict[str, Any] = {
        "overall": prf(
            frame.filter(pl.col("removed_eval") & pl.col("is_noisy")).height,
            clean_removed,
            frame.filter(~pl.col("removed_eval") & pl.col("is_noisy")).height,
        )
    }
    kinds = sorted(set(frame.filter(pl.col("is_noisy"))["kind"].to_list()))
    groups: dict[str, tuple[str, ...]] = {kind: (kind,) for kind in kinds}
    if all(kind in kinds for kind in SWAPS):
        groups["title_image_swaps"] = SWAPS
    out["per_kind"] = {}
    for name, members in groups.items():
        of_kind = frame.filter(pl.col("kind").is_in(list(members)))
        tp = of_kind.filter(pl.col("removed_eval")).height
        out["per_kind"][name] = {
            "rows": of_kind.height,
            **prf(tp, clean_removed, of_kind.height - tp),
        }
    confusion = (
        frame.filter(pl.col("removed")).group_by("reason", "kind").len().sort("reason", "kind")
    )
    table: dict[str, dict[str, int]] = {}
    for reason, kind, count in confusion.iter_rows():
        table.setdefault(reason, {})[kind] = count
    out["removed_by_reason_and_truth"] = table
    return out


def evaluate_queries(frame: pl.DataFrame) -> dict[str, Any]:
    """``frame``: removed (by the query's own checks), judged, reason, is_noisy (non-rejected
    query rows). Queries removed only because their product was are not judged: their own
    truth says nothing about that."""
    frame = _null_truth_is_clean(frame)
    own = frame.filter(pl.col("judged"))
    out = {
        "overall": prf(
            own.filter(pl.col("removed") & pl.col("is_noisy")).height,
            own.filter(pl.col("removed") & ~pl.col("is_noisy")).height,
            own.filter(~pl.col("removed") & pl.col("is_noisy")).height,
        ),
        "removed_by_reason_and_truth": {},
    }
    removed = frame.filter(pl.col("reason").is_not_null())
    for reason, noisy, count in (
        removed.group_by("reason", "is_noisy").len().sort("reason", "is_noisy").iter_rows()
    ):
        out["removed_by_reason_and_truth"].setdefault(reason, {})["noisy" if noisy else "clean"] = (
            count
        )
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable twin of ``filter_report.json``."""
    lines = ["# moon2 filter report", ""]
    header = (
        f"Input: `{report['input']}`; encoder: `{report['encoder']}`; text encoder: "
        f"`{report['text_encoder']}`"
    )
    if report.get("training_scores"):
        header += f"; training scores: `{report['training_scores']}`"
    lines.append(header + ".")
    lines += ["", "| table | in | kept | removed | rejected |", "|---|---|---|---|---|"]
    for table, counts in report["counts"].items():
        lines.append(
            f"| {table} | {counts['rows_in']} | {counts['kept']} | {counts['removed']} | "
            f"{counts['rejected']} |"
        )
    for table in report["counts"]:
        reasons = report["removed_by_reason"].get(table, {})
        flags = report["flagged_by_check"].get(table, {})
        if not flags:
            continue
        lines += [
            "",
            f"## {table}: checks",
            "",
            "| check | flagged | removed (first reason) | action | cut |",
            "|---|---|---|---|---|",
        ]
        for check, count in flags.items():
            cut = report["cuts"].get(table, {}).get(check)
            lines.append(
                f"| {check} | {count} | {reasons.get(check, 0)} | "
                f"{report['actions'][table].get(check, '')} | "
                f"{'' if cut is None else f'{cut:.4f}'} |"
            )
    evaluation = report.get("evaluation")
    if evaluation:
        try:
            lines += _evaluation_markdown(evaluation)
        except Exception as exc:  # evaluation only: it must never cost the user the run
            if debug_enabled():
                raise
            progress.warn(
                f"filter_report.md leaves out the figures against the truth_* columns: "
                f"rendering them failed ({type(exc).__name__}), a bug worth reporting"
            )
    lines.append("")
    return "\n".join(lines)


def _evaluation_markdown(evaluation: dict[str, Any]) -> list[str]:
    """The P/R/F1 section of ``filter_report.md``."""
    lines = ["", "## Against the injected noise (truth_* columns)", ""]
    lines += [
        "Per kind: precision counts every clean row removed (for any reason) against the "
        "kind, i.e. the figure on a catalog holding only that kind of noise. A clean "
        "listing removed as the copy of its own noisy duplicate counts as that duplicate. "
        "Queries: queries removed only because their product was are left out.",
        "",
        "| table | noise | rows | precision | recall | F1 |",
        "|---|---|---|---|---|---|",
    ]
    for table, result in evaluation.items():
        entries = [("all noise", result["overall"])]
        entries += list(result.get("per_kind", {}).items())
        for name, figures in entries:
            rows = figures.get("rows", figures["tp"] + figures["fn"])
            lines.append(
                f"| {table} | {name} | {rows} | {figures['precision']:.3f} | "
                f"{figures['recall']:.3f} | {figures['f1']:.3f} |"
            )
    for table, result in evaluation.items():
        confusion = result["removed_by_reason_and_truth"]
        if not confusion:
            continue
        columns = sorted({k for row in confusion.values() for k in row}, key=str)
        lines += ["", f"Removed {table} by reason (rows) and truth (columns):", ""]
        lines.append("| reason | " + " | ".join(str(c) for c in columns) + " |")
        lines.append("|---" * (len(columns) + 1) + "|")
        for reason, row in confusion.items():
            lines.append(f"| {reason} | " + " | ".join(str(row.get(c, 0)) for c in columns) + " |")
    return lines
