"""``build_report``: one HTML page (and its PNG plots) that shows what a run did.

Six sections, each built from the files of one or two stages and each replaced by a visible
"not available: <reason>" when those files are missing, so a report of a half-finished demo
or of a train run alone still builds and says what it could not show:

1. ``metrics``: eval/results.json (every task's metrics) and the run's train_summary.json;
2. ``curves``: loss parts, objective weights omega and learning rate from metrics.jsonl;
3. ``experts``: MoE routing usage per modality (``usage_*``), averaged over the last epoch;
4. ``filter``: histograms of every ``cur_*`` score of ``moon2 filter`` (kept and removed rows)
   with the injected noise overlaid and the cut marked, and the training-time margins of the
   last epoch (run/scores) with the noisy queries overlaid;
5. ``augmentation``: original vs augmented titles and images of a few products;
6. ``retrieval``: a few t2mm / i2mm / mm2mm / t2i / i2t queries with their top 5, the correct
   product marked, chosen deterministically (sorted query ids, hits and misses alternating).
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from moon2 import progress
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS, TASK_NOTE
from moon2.data.io import atomic_path
from moon2.data.outdir import check_no_overlap, claim_output
from moon2.report import collect, plots
from moon2.report.collect import Layout
from moon2.report.html import (
    Html,
    Section,
    data_uri,
    join,
    missing,
    note,
    page,
    plot,
    table,
    tag,
    thumb,
    unavailable,
)
from moon2.report.retrieval import retrieval_section

SECTIONS: tuple[tuple[str, str], ...] = (
    ("metrics", "1. Evaluation metrics"),
    ("curves", "2. Training curves"),
    ("experts", "3. Expert usage per modality"),
    ("filter", "4. Filter scores and injected noise"),
    ("augmentation", "5. Augmentation: before and after"),
    ("retrieval", "6. Retrieval examples"),
)
PLOT_FILES: tuple[str, ...] = (
    "loss.png",
    "omega.png",
    "lr.png",
    "experts.png",
    "filter_scores.png",
    "train_margins.png",
)
"""Every plot file a report may write."""
# what a report writes in OUT; a new report deletes the old ones first, so its PNGs never mix
# two runs
OUTPUTS: tuple[str, ...] = ("index.html", *PLOT_FILES)
LEGACY = (("index.html", "moon2 report"),)  # a report from before output markers

CUT_COLUMNS: dict[tuple[str, str], tuple[str, str]] = {
    ("products", "image_text"): ("cur_align_image_text", "below"),
    ("products", "title_context"): ("cur_align_title_context", "below"),
    ("products", "dynamics"): ("cur_dyn_product_margin", "below"),
    ("queries", "query_margin"): ("cur_align_query_margin", "below"),
    ("queries", "dynamics"): ("cur_dyn_loss", "above"),
}
"""filter_report.json ``cuts[table][check]`` -> the score column it applies to and which side
of the cut is flagged (moon2/curate/pipeline.py, scorers.training_dynamics)."""

MODALITY_ORDER = ("text", "image", "multimodal")
MAX_THUMBS = 4
SCAN_AUG_ROWS = 20_000
MAX_HISTOGRAM_ROWS = 1_000_000
"""Score rows read per table for a histogram; a larger table is sampled (every k-th row),
which keeps its shape and bounds the memory a report needs."""


@dataclass
class ReportResult:
    """What :func:`build_report` wrote."""

    out_dir: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)
    """Section name -> "ok", or why it is missing (the same text the page shows)."""
    problems: list[str] = field(default_factory=list)
    """Inputs that could not be read and were left out (listed on the page too)."""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.2f}"


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


# --- 1. metrics ----------------------------------------------------------------------------


def _train_facts(layout: Layout) -> Html:
    if layout.run is None:
        return Html("")
    summary = collect.read_json(layout.run / "train_summary.json")
    if not summary:
        return note(f"{layout.run / 'train_summary.json'} not found: the run has not finished.")
    keys = (
        ("updates", "optimizer updates"),
        ("epochs_completed", "epochs completed"),
        ("seconds", "training seconds"),
        ("queries_used", "queries used"),
        ("queries_rejected", "queries rejected"),
        ("samples_seen_per_process", "samples seen (per process)"),
        ("world_size", "processes"),
        ("filter_policy", "dynamic filter policy"),
    )
    rows = [(label, _num(summary[key])) for key, label in keys if key in summary]
    return join([tag("h3", "Training run"), table(["", "value"], rows)])


def _retrieval_notes(tasks: list[str], details: dict[str, Any]) -> list[str]:
    """What the cross-modal tasks are (when shown), and eval's note on any task (e.g. a t2i of
    a benchmark built before t2i used the query log)."""
    cross_modal = ("t2i", "i2t", "title2image", "image2title")
    notes = [TASK_NOTE] if any(t in cross_modal for t in tasks) else []
    for task in tasks:
        info = details.get(task)
        if isinstance(info, dict) and info.get("note"):
            notes.append(f"{task}: {info['note']}.")
    return notes


def _metrics_section(layout: Layout) -> Section:
    facts = _train_facts(layout)
    if layout.eval is None:
        return unavailable("no eval results found (no eval/ folder; pass eval_dir)", facts)
    results = collect.read_json(layout.eval / "results.json")
    tasks = [t for t in ALL_TASKS if isinstance(results.get(t), dict)]
    if not tasks:
        return unavailable(f"no eval results found in {layout.eval / 'results.json'}", facts)
    details = results.get("details", {}) if isinstance(results.get("details"), dict) else {}
    parts: list[Html] = [
        note(
            f"model {results.get('model', '?')} on benchmark {results.get('bench', '?')}; "
            f"{results.get('time', '')}, {results.get('seconds', '?')} s. Values in %."
        )
    ]
    for kind, chosen, chance_key, count_key in (
        ("Retrieval", [t for t in tasks if t in RETRIEVAL_TASKS], "chance_R@10", "queries"),
        (
            "Classification and attributes",
            [t for t in tasks if t not in RETRIEVAL_TASKS],
            "chance_acc",
            None,
        ),
    ):
        if not chosen:
            continue
        names: dict[str, None] = {}
        for task in chosen:
            names.update(dict.fromkeys(results[task]))
        header = ["task", *names, f"chance {chance_key.removeprefix('chance_')}"]
        if count_key:
            header.append(count_key)
        rows = []
        for task in chosen:
            info = details.get(task, {}) if isinstance(details.get(task), dict) else {}
            row = [task, *[_pct(results[task].get(n)) for n in names], _pct(info.get(chance_key))]
            if count_key:
                row.append(_num(info.get(count_key)))
            rows.append(row)
        parts += [tag("h3", kind), table(header, rows)]
        if kind == "Retrieval":
            parts += [note(text) for text in _retrieval_notes(chosen, details)]
    skipped = results.get("skipped")
    if isinstance(skipped, dict) and skipped:
        parts.append(tag("h3", "Skipped tasks"))
        parts.append(tag("ul", join(tag("li", f"{t}: {r}") for t, r in skipped.items())))
    if results.get("images_unreadable"):
        parts.append(note(f"{results['images_unreadable']} images could not be read in eval."))
    parts.append(facts)
    return Section(join(parts))


# --- 2. training curves --------------------------------------------------------------------


def _records(layout: Layout) -> tuple[list[dict[str, Any]], str | None]:
    if layout.run is None:
        return [], "no train run found (no run/ folder with metrics.jsonl)"
    records = collect.read_metrics(layout.run / "metrics.jsonl")
    if not records:
        return [], f"{layout.run / 'metrics.jsonl'} is missing or has no records"
    return records, None


def _keys(records: list[dict[str, Any]], accept: Callable[[str, Any], bool]) -> list[str]:
    names: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if accept(key, value):
                names[key] = None
    return list(names)


def _epoch_starts(records: list[dict[str, Any]]) -> list[float]:
    starts = []
    for before, after in itertools.pairwise(records):
        if after.get("epoch") != before.get("epoch"):
            starts.append(float(after["step"]))
    return starts


def _curves_section(layout: Layout) -> Section:
    records, reason = _records(layout)
    if reason:
        return unavailable(reason)
    steps = [float(r["step"]) for r in records]
    starts = _epoch_starts(records)

    def numeric(prefix: str) -> Callable[[str, Any], bool]:
        return lambda k, v: k.startswith(prefix) and isinstance(v, (int, float))

    def column(key: str) -> list[float | None]:
        values = [r.get(key) for r in records]
        return [float(v) if isinstance(v, (int, float)) else None for v in values]

    section = Section(Html(""))
    parts: list[Html] = []
    loss_keys = _keys(records, numeric("loss"))
    if loss_keys:
        section.plots["loss.png"] = plots.curves(
            steps,
            {k: column(k) for k in loss_keys},
            "loss and its parts",
            "loss",
            starts,
            emphasize="loss" if "loss" in loss_keys else None,
        )
    omega_keys = _keys(records, numeric("omega_"))
    if omega_keys:
        section.plots["omega.png"] = plots.curves(
            steps,
            {k.removeprefix("omega_"): column(k) for k in omega_keys},
            "objective weights omega_m (modality-driven MoE)",
            "omega",
            starts,
        )
    if any(isinstance(r.get("lr"), (int, float)) for r in records):
        section.plots["lr.png"] = plots.curves(
            steps, {"lr": column("lr")}, "learning rate", "lr", starts, height=3.0
        )
    for name, alt in (
        ("loss.png", "loss parts vs step"),
        ("omega.png", "omega per objective vs step"),
        ("lr.png", "learning rate vs step"),
    ):
        if name in section.plots:
            parts.append(plot(data_uri(section.plots[name], "image/png"), alt))
    if not omega_keys:
        parts.append(note("No omega_* keys: objective weighting was off in this run."))
    watched = [*loss_keys, *omega_keys, "lr", "phi_mean", "downweighted", "samples_per_s"]
    rows = [
        (key, _num(records[0].get(key)), _num(records[-1].get(key)))
        for key in watched
        if key in records[0] or key in records[-1]
    ]
    parts.append(
        note(
            f"{_plural(len(records), 'logged step')}, {_plural(len(starts) + 1, 'epoch')}; "
            "dotted lines mark where an epoch begins."
        )
    )
    parts.append(
        table(
            ["", f"first (step {records[0]['step']})", f"last (step {records[-1]['step']})"], rows
        )
    )
    section.body = join(parts)
    return section


# --- 3. expert usage -----------------------------------------------------------------------


def expert_usage(records: list[dict[str, Any]]) -> tuple[dict[str, list[float]], int, int]:
    """Modality -> mean routing share per expert over the records of the last epoch that has
    ``usage_*`` keys; with that epoch and how many records were averaged."""
    with_usage = [
        r
        for r in records
        if any(k.startswith("usage_") and isinstance(v, list) for k, v in r.items())
    ]
    if not with_usage:
        return {}, -1, 0
    last = max(int(r.get("epoch", 0) or 0) for r in with_usage)
    chosen = [r for r in with_usage if int(r.get("epoch", 0) or 0) == last]
    usage: dict[str, list[float]] = {}
    for key in _keys(chosen, lambda k, v: k.startswith("usage_") and isinstance(v, list)):
        rows = [r[key] for r in chosen if isinstance(r.get(key), list)]
        width = max(len(row) for row in rows)
        matrix = np.full((len(rows), width), np.nan)
        for i, row in enumerate(rows):
            matrix[i, : len(row)] = [np.nan if v is None else float(v) for v in row]
        if width:
            with warnings.catch_warnings():  # an expert no record reports: 0, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                means = np.nan_to_num(np.nanmean(matrix, axis=0))
            usage[key.removeprefix("usage_")] = [float(v) for v in means]
    return usage, last, len(chosen)


def _experts_section(layout: Layout) -> Section:
    records, reason = _records(layout)
    if reason:
        return unavailable(reason)
    usage, epoch, count = expert_usage(records)
    if not usage:
        return unavailable("the run had MoE disabled (metrics.jsonl has no usage_* keys)")
    modalities = [m for m in MODALITY_ORDER if m in usage] + sorted(
        m for m in usage if m not in MODALITY_ORDER
    )
    width = max(len(usage[m]) for m in modalities)
    matrix = [usage[m] + [0.0] * (width - len(usage[m])) for m in modalities]
    png = plots.usage_heatmap(matrix, modalities)
    rows = [[m, *[f"{v:.3f}" for v in row]] for m, row in zip(modalities, matrix, strict=True)]
    body = join(
        [
            note(
                "Share of real tokens whose top-1 expert is E_z, per input modality, averaged "
                f"over the {_plural(count, 'logged step')} of epoch {epoch} (the last). A "
                "modality-driven MoE routes text, image and multimodal inputs to different "
                "experts."
            ),
            plot(data_uri(png, "image/png"), "expert usage per modality"),
            table(["modality", *[f"E{z}" for z in range(width)]], rows),
        ]
    )
    return Section(body, plots={"experts.png": png})


# --- 4. filter scores ------------------------------------------------------------------------


def _float_columns(files: list[Path], prefix: str) -> list[str]:
    """Floating-point columns named ``prefix*`` in any of ``files`` (scores, not ids or
    counts)."""
    names: dict[str, None] = {}
    for file in files:
        schema = collect.schema_of(file)
        for field_ in schema or ():
            if field_.name.startswith(prefix) and pa.types.is_floating(field_.type):
                names[field_.name] = None
    return list(names)


def _score_panels(layout: Layout, report: dict[str, Any]) -> list[plots.Histogram]:
    assert layout.filter is not None
    cuts = report.get("cuts", {}) if isinstance(report.get("cuts"), dict) else {}
    panels = []
    for table_name in ("products", "queries"):
        files = collect.parquet_files(layout.filter / table_name) + collect.parquet_files(
            layout.filter / "_removed" / table_name
        )
        scores = _float_columns(files, "cur_")
        if not scores:
            continue
        step = collect.sample_step(files, MAX_HISTOGRAM_ROWS)
        frame = collect.read_columns(
            files, [*scores, "positive_id", "truth_is_noisy", "truth_positive_id"], step
        )
        if frame is None:
            continue
        labels = (
            collect.product_noise_labels(frame)
            if table_name == "products"
            else collect.query_noise_labels(frame)
        )
        noisy = None if labels is None else labels.cast(pl.Float64).fill_null(np.nan).to_numpy()
        table_cuts = cuts.get(table_name, {}) if isinstance(cuts.get(table_name), dict) else {}
        for column in scores:
            values = frame[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
            if not np.isfinite(values).any():
                continue
            cut, side = None, "below"
            for (t, check), (name, flagged) in CUT_COLUMNS.items():
                value = table_cuts.get(check)
                if t == table_name and name == column and isinstance(value, (int, float)):
                    cut, side = float(value), flagged
            panels.append(
                plots.Histogram(
                    title=f"{table_name}: {column}" + (f" (1 row in {step})" if step > 1 else ""),
                    values=values,
                    noisy=noisy,
                    cut=cut,
                    cut_note=f"cut {cut:.3g} (flags {side})" if cut is not None else "cut",
                    xlabel="score",
                )
            )
    return panels


def _filter_tables(report: dict[str, Any]) -> Html:
    parts: list[Html] = []
    counts = report.get("counts")
    if isinstance(counts, dict) and counts:
        rows = [
            [t, *[_num(c.get(k)) for k in ("rows_in", "kept", "removed", "rejected")]]
            for t, c in counts.items()
            if isinstance(c, dict)
        ]
        parts += [
            tag("h3", "Rows"),
            table(["table", "rows in", "kept", "removed", "rejected"], rows),
        ]
    reasons = report.get("removed_by_reason")
    flagged = report.get("flagged_by_check")
    if isinstance(reasons, dict) and isinstance(flagged, dict):
        rows = []
        for t in sorted(set(reasons) | set(flagged)):
            checks = sorted(set(reasons.get(t, {})) | set(flagged.get(t, {})))
            for check in checks:
                rows.append(
                    [
                        t,
                        check,
                        _num(flagged.get(t, {}).get(check, 0)),
                        _num(reasons.get(t, {}).get(check, 0)),
                    ]
                )
        if rows:
            parts += [
                tag("h3", "Checks"),
                table(
                    ["table", "check", "flagged", "removed (first reason)"], rows, numeric_from=2
                ),
            ]
    evaluation = report.get("evaluation")
    if isinstance(evaluation, dict) and evaluation:
        rows = []
        for t, figures in evaluation.items():
            overall = figures.get("overall", {}) if isinstance(figures, dict) else {}
            rows.append(
                [
                    t,
                    *[
                        _num(overall.get(k))
                        for k in ("precision", "recall", "f1", "tp", "fp", "fn")
                    ],
                ]
            )
            per_kind = figures.get("per_kind", {}) if isinstance(figures, dict) else {}
            for kind, values in per_kind.items():
                rows.append(
                    [
                        f"{t}: {kind}",
                        *[
                            _num(values.get(k))
                            for k in ("precision", "recall", "f1", "tp", "fp", "fn")
                        ],
                    ]
                )
        parts += [
            tag("h3", "Removed rows against the injected noise"),
            table(["", "precision", "recall", "F1", "TP", "FP", "FN"], rows),
        ]
    return join(parts)


def _train_margins(layout: Layout) -> tuple[Html, dict[str, bytes]]:
    scores_file = collect.last_scores_file(layout.run)
    if scores_file is None:
        reason = (
            "no train run found"
            if layout.run is None
            else f"{layout.run / 'scores'} has no epoch-NNN.parquet"
        )
        return join([tag("h3", "Training-time dynamic filter"), missing(reason)]), {}
    step = collect.sample_step([scores_file], MAX_HISTOGRAM_ROWS)
    frame = collect.read_columns(
        [scores_file], ["sample_id", "margin", "loss", "phi", "weight"], step
    )
    if frame is None or "margin" not in frame.columns:
        return join(
            [
                tag("h3", "Training-time dynamic filter"),
                missing(f"{scores_file} has no margin column"),
            ]
        ), {}
    truth = collect.query_truth(
        [
            layout.filter / "queries" if layout.filter else None,
            layout.filter / "_removed" / "queries" if layout.filter else None,
            layout.augment / "queries" if layout.augment else None,
            layout.bench / "train" / "queries" if layout.bench else None,
            layout.catalog / "queries" if layout.catalog else None,
        ],
        extra=[collect.cached_queries(layout.run)],
    )
    noisy = None
    if truth is not None and "sample_id" in frame.columns:
        joined = frame.select(pl.col("sample_id").cast(pl.String)).join(
            truth.rename({"query_id": "sample_id"}),
            on="sample_id",
            how="left",
            maintain_order="left",
        )
        if joined["is_noisy"].null_count() < joined.height:
            noisy = joined["is_noisy"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    epoch = scores_file.stem.removeprefix("epoch-")
    panels = [
        plots.Histogram(
            title=f"epoch {epoch}: {name}" + (f" (1 row in {step})" if step > 1 else ""),
            values=frame[name].cast(pl.Float64).fill_null(np.nan).to_numpy(),
            noisy=noisy,
            xlabel=label,
        )
        for name, label in (
            ("margin", "s(q, positive) - s(q, hardest negative)"),
            ("loss", "per-sample InfoNCE loss"),
            ("phi", "phi (filter weight before normalisation)"),
        )
        if name in frame.columns
    ]
    png = plots.histograms(panels)
    parts = [
        tag("h3", "Training-time dynamic filter"),
        note(
            f"{scores_file.name}: the last epoch's per-query scores of moon2 train ({frame.height} "
            "queries). "
            + (
                "Red: queries whose logged purchase is injected noise."
                if noisy is not None
                else "No ground truth found for these queries (no truth_* columns)."
            )
        ),
        plot(data_uri(png, "image/png"), "training margins"),
    ]
    summary = collect.read_json(layout.run / "filter_report.json") if layout.run else {}
    epochs = summary.get("epochs") if isinstance(summary.get("epochs"), dict) else None
    if epochs:
        keys = (
            "flagged",
            "noisy",
            "precision",
            "recall",
            "f1",
            "mean_margin_noisy",
            "mean_margin_clean",
        )
        rows = [
            [e, *[_num(v.get(k)) for k in keys]] for e, v in epochs.items() if isinstance(v, dict)
        ]
        parts.append(table(["epoch", *keys], rows))
        parts.append(note(f"flagged = {summary.get('flagged_means', 'down-weighted or dropped')}"))
    return join(parts), {"train_margins.png": png}


def _filter_section(layout: Layout) -> Section:
    margins, margin_plots = _train_margins(layout)
    if layout.filter is None:
        section = unavailable(
            "no moon2 filter output found (no cur/ folder; pass filter_dir)", margins
        )
        section.plots.update(margin_plots)
        return section
    report = collect.read_json(layout.filter / "filter_report.json")
    panels = _score_panels(layout, report)
    parts: list[Html] = [tag("h3", "moon2 filter scores")]
    section = Section(Html(""))
    if panels:
        png = plots.histograms(panels)
        section.plots["filter_scores.png"] = png
        parts += [
            note(
                "Every scored row (kept and removed). Blue: clean rows, red: injected noise "
                "(truth_* columns), dashed: the cut filter_report.json records."
            ),
            plot(data_uri(png, "image/png"), "filter score histograms"),
        ]
    else:
        section.status = f"{layout.filter} has no cur_* score columns with values"
        parts.append(missing(section.status))
    if not report:
        parts.append(note(f"{layout.filter / 'filter_report.json'} not found: no counts."))
    parts += [_filter_tables(report), margins]
    section.plots.update(margin_plots)
    section.body = join(parts)
    return section


# --- 5. augmentation -------------------------------------------------------------------------


def _pick_augmented(files: list[Path], examples: int) -> list[collect.Row]:
    """The first ``examples`` rows whose title or images were augmented (file order), else
    the first rows: deterministic, and a huge table is read only until they are found."""
    columns = [
        "product_id",
        "title",
        "category",
        "images",
        "aug_title",
        "aug_title_source",
        "aug_title_gate",
        "aug_images",
        "aug_image_ops",
        "aug_image_scores",
    ]
    chosen: list[collect.Row] = []
    plain: list[collect.Row] = []
    for number, row in enumerate(collect.iter_rows(files, columns)):
        values = row.values
        changed = bool(values.get("aug_images")) or (
            bool(values.get("aug_title")) and values.get("aug_title") != values.get("title")
        )
        if changed:
            chosen.append(row)
        elif len(plain) < examples:
            plain.append(row)
        if len(chosen) >= examples or number >= SCAN_AUG_ROWS:
            break
    return (chosen + plain)[:examples]


def _thumbs(
    cells: list[Any] | None,
    base: Path,
    label: str,
    captions: list[str] | None = None,
) -> Html:
    cells = [c for c in (cells or []) if c is not None]
    if not cells:
        return tag("div", "no image", class_="noimg")
    shown = [
        thumb(
            cell,
            base,
            f"{label} {i + 1}",
            caption=(captions[i] if captions and i < len(captions) else None),
        )
        for i, cell in enumerate(cells[:MAX_THUMBS])
    ]
    if len(cells) > MAX_THUMBS:
        shown.append(tag("span", f"+{len(cells) - MAX_THUMBS} more", class_="meta"))
    return tag("div", join(shown), class_="row")


def _augmentation_section(layout: Layout, examples: int) -> Section:
    if layout.augment is None:
        return unavailable("no moon2 augment output found (no aug/ folder; pass augment_dir)")
    files = collect.parquet_files(layout.augment / "products")
    if not files:
        return unavailable(f"{layout.augment / 'products'} has no Parquet files")
    names = collect.column_names(files)
    if "aug_title" not in names and "aug_images" not in names:
        return unavailable(f"{layout.augment / 'products'} has no aug_title / aug_images columns")
    if examples <= 0:
        return unavailable("examples=0 asked for no example rows")
    parts: list[Html] = []
    manifest = collect.read_json(layout.augment / "manifest.json")
    if manifest:
        facts = [
            (k, _num(manifest[k]))
            for k in ("rows_in", "rows_out", "rows_rejected")
            if k in manifest
        ]
        sources = manifest.get("title_sources")
        if isinstance(sources, dict):
            facts += [(f"titles from {k}", _num(v)) for k, v in sources.items()]
        parts.append(table(["", "value"], facts))
    rows = _pick_augmented(files, examples)
    parts.append(
        note(f"The first {len(rows)} augmented products of {layout.augment / 'products'}.")
    )
    for row in rows:
        v = row.values
        category = " > ".join(str(c) for c in (v.get("category") or []) if c is not None)
        ops = [str(op) for op in (v.get("aug_image_ops") or [])]
        scores = v.get("aug_image_scores") or []
        captions = [  # a break opportunity after each "+" of matte+white_background+...
            op.replace("+", "+\u200b")
            + (f" ({scores[i]:.2f})" if i < len(scores) and scores[i] is not None else "")
            for i, op in enumerate(ops)
        ]
        source = v.get("aug_title_source")
        gate = v.get("aug_title_gate")
        before = tag(
            "div",
            join(
                [
                    tag("h4", "original"),
                    tag("div", v.get("title") or "(empty title)", class_="title"),
                    _thumbs(v.get("images"), row.base_dir, "original image"),
                ]
            ),
            class_="side",
        )
        after = tag(
            "div",
            join(
                [
                    tag("h4", "augmented" + (f" (title: {source})" if source else "")),
                    tag("div", v.get("aug_title") or "(no augmented title)", class_="title"),
                    tag("div", f"gate: {gate}", class_="meta") if gate else Html(""),
                    _thumbs(v.get("aug_images"), row.base_dir, "augmented image", captions),
                ]
            ),
            class_="side",
        )
        parts.append(
            tag("div", f"{v.get('product_id')} · {category or 'no category'}", class_="meta")
        )
        parts.append(tag("div", join([before, after]), class_="aug"))
    return Section(join(parts))


# --- the page --------------------------------------------------------------------------------


def build_report(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    examples: int = 6,
    eval_dir: str | os.PathLike[str] | None = None,
    bench_dir: str | os.PathLike[str] | None = None,
    filter_dir: str | os.PathLike[str] | None = None,
    augment_dir: str | os.PathLike[str] | None = None,
) -> ReportResult:
    """Write ``index.html`` and its PNG plots for ``run_dir`` (a ``moon2 demo`` folder or a
    ``moon2 train`` output) into ``out_dir`` (default ``RUN_DIR/report``).

    ``examples``: augmented products shown (and half as many queries per retrieval task).
    ``eval_dir`` / ``bench_dir`` / ``filter_dir`` / ``augment_dir`` point at stage outputs
    that are not in a demo layout; they win over what is found in ``run_dir``.

    Raises:
        InputError: ``run_dir`` or an explicit folder does not exist, or ``run_dir`` holds
            none of the stages.
    """
    if examples < 0:
        raise ValueError("examples must be >= 0")
    layout = collect.find_layout(run_dir, eval_dir, bench_dir, filter_dir, augment_dir)
    out = Path(out_dir) if out_dir is not None else layout.root / "report"
    # the default OUT, RUN_DIR/report, lies inside the run it reads: allowed (a folder of the
    # report's own that no stage reads), but never inside the other stages' folders
    home = {layout.root, layout.run}
    check_no_overlap(out, home, nested=True)
    others = [getattr(layout, s) for s in collect.STAGE_NAMES if getattr(layout, s) not in home]
    # a re-run replaces the report's earlier files
    with claim_output(
        out, "report", inputs=others, outputs=OUTPUTS, resume=False, legacy=LEGACY
    ):
        return _build(layout, out, examples)


def _build(layout: Layout, out: Path, examples: int) -> ReportResult:
    """Build every section (one that fails is shown as not built), then write the page."""
    builders: dict[str, Callable[[], Section]] = {
        "metrics": lambda: _metrics_section(layout),
        "curves": lambda: _curves_section(layout),
        "experts": lambda: _experts_section(layout),
        "filter": lambda: _filter_section(layout),
        "augmentation": lambda: _augmentation_section(layout, examples),
        "retrieval": lambda: retrieval_section(layout, examples),
    }
    built: dict[str, Section] = {}
    collect.reset_problems()
    with progress.task("report: building sections", len(SECTIONS)) as bar:
        for name, _ in SECTIONS:
            try:
                built[name] = builders[name]()
            except Exception as exc:  # one unreadable input costs one section, not the page
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                built[name] = unavailable(f"could not be built ({type(exc).__name__}: {first})")
            bar.advance()
    written: list[Path] = []
    for name, _ in SECTIONS:
        for file, data in built[name].plots.items():
            with atomic_path(out / file) as temp:
                temp.write_bytes(data)
            written.append(out / file)
    found = [
        f"{stage} {getattr(layout, stage)}"
        for stage in collect.STAGE_NAMES
        if getattr(layout, stage) is not None
    ]
    sections = [
        (name, heading, built[name].body, built[name].status == "ok") for name, heading in SECTIONS
    ]
    problems = list(collect.PROBLEMS)
    if problems:
        listing = tag("ul", join(tag("li", problem) for problem in problems))
        sections.append(("problems", "Inputs left out", listing, False))
    document = page(
        f"moon2 report: {layout.root.resolve().name}",
        " · ".join(found),
        sections,
        f"moon2 report of {layout.root} · {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
    )
    html_path = out / "index.html"
    with atomic_path(html_path) as temp:
        temp.write_text(document, encoding="utf-8")
    statuses = {n: built[n].status for n, _ in SECTIONS}
    return ReportResult(out, html_path, written, statuses, problems)
