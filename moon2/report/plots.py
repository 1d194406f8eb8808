"""The report's figures as PNG bytes, drawn with matplotlib's object API on the Agg canvas.

No pyplot: pyplot keeps global state (current figure, backend) that a library must not touch
in its caller's process, and the Agg canvas needs no display, so a report builds on a server
and in a thread alike.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
CLEAN_COLOR = "#4C72B0"
NOISY_COLOR = "#DD4444"
UNKNOWN_COLOR = "#999999"
MAX_POINTS = 2000
"""Longer series are averaged into this many points: a curve of a long run stays legible
and the PNG stays small."""


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _thin(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over consecutive windows when there are more than MAX_POINTS points; an all-NaN
    window stays NaN (a gap in the line), without numpy's warning about it."""
    if len(steps) <= MAX_POINTS:
        return steps, values
    window = math.ceil(len(steps) / MAX_POINTS)
    usable = len(steps) // window * window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        thinned = np.nanmean(values[:usable].reshape(-1, window), axis=1)
    return steps[:usable].reshape(-1, window)[:, -1], thinned


def curves(
    steps: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    ylabel: str,
    epoch_starts: Sequence[float] = (),
    emphasize: str | None = None,
    height: float = 4.0,
) -> bytes:
    """Line plot of several series against the training step; ``emphasize`` is drawn thicker
    (the total loss among its parts); dotted lines mark where epochs begin."""
    figure = _figure(9, height)
    axes = figure.add_subplot()
    x = np.asarray(steps, dtype=float)
    for name, raw in series.items():
        y = np.array([np.nan if v is None else float(v) for v in raw], dtype=float)
        xs, ys = _thin(x, y)
        bold = name == emphasize
        axes.plot(
            xs,
            ys,
            label=name,
            linewidth=2.4 if bold else 1.4,
            color="black" if bold else None,
            zorder=3 if bold else 2,
        )
    for start in epoch_starts:
        axes.axvline(start, color="#999999", linestyle=":", linewidth=1)
    axes.set_title(title)
    axes.set_xlabel("step (optimizer update)")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    if len(series) > 1:
        axes.legend(loc="best", fontsize=8, ncols=2 if len(series) > 5 else 1)
    return _png(figure)


def usage_heatmap(matrix: Sequence[Sequence[float]], modalities: Sequence[str]) -> bytes:
    """Modality x expert share of top-1 routing, each cell annotated with its value."""
    values = np.asarray(matrix, dtype=float)
    experts = values.shape[1]
    figure = _figure(max(6.5, 1.6 + 0.9 * experts), 1.6 + 0.6 * len(modalities))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(values.max())))
    axes.set_xticks(range(experts), [f"E{z}" for z in range(experts)])
    axes.set_yticks(range(len(modalities)), list(modalities))
    axes.set_xlabel("expert")
    axes.set_title("top-1 routing share per expert", fontsize=11)
    peak = float(values.max()) if values.size else 0.0
    for row in range(values.shape[0]):
        for column in range(experts):
            value = values[row, column]
            axes.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=9,
                color="black" if value > 0.6 * peak else "white",
            )
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _png(figure)


@dataclass
class Histogram:
    """One panel: a score's values, which rows are injected noise (None: unknown) and the
    filter's cut (None: not recorded)."""

    title: str
    values: np.ndarray
    noisy: np.ndarray | None = None
    """1 = injected noise, 0 = clean, NaN = no ground truth for that row."""
    cut: float | None = None
    cut_note: str = "cut"
    xlabel: str = ""


def histograms(panels: Sequence[Histogram], columns: int = 3) -> bytes:
    """A grid of histograms; where the noise is known, clean and noisy rows are two overlaid
    histograms on the same bins, so the reader sees how far the score separates them."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure = _figure(4.2 * columns, 3.2 * rows)
    grid = figure.subplots(rows, columns, squeeze=False)
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_visible(False)
            continue
        panel = panels[index]
        values = np.asarray(panel.values, dtype=float)
        finite = np.isfinite(values)
        shown = values[finite]
        if shown.size == 0:
            axes.text(0.5, 0.5, "no values", ha="center", va="center", transform=axes.transAxes)
            axes.set_title(panel.title, fontsize=10)
            continue
        bins = np.histogram_bin_edges(shown, bins=int(np.clip(np.sqrt(shown.size), 10, 40)))
        if panel.noisy is not None:
            truth = np.asarray(panel.noisy, dtype=float)[finite]
            unknown = np.isnan(truth)
            clean_values, noisy_values = shown[truth == 0], shown[truth == 1]
            if unknown.any():
                axes.hist(
                    shown[unknown],
                    bins=bins,
                    color=UNKNOWN_COLOR,
                    alpha=0.45,
                    label=f"truth unknown (n={int(unknown.sum())})",
                )
            axes.hist(
                clean_values,
                bins=bins,
                color=CLEAN_COLOR,
                alpha=0.55,
                label=f"clean (n={clean_values.size})",
            )
            axes.hist(
                noisy_values,
                bins=bins,
                color=NOISY_COLOR,
                alpha=0.65,
                edgecolor="#991111",
                linewidth=0.6,
                label=f"injected noise (n={noisy_values.size})",
            )
        else:
            axes.hist(shown, bins=bins, color=CLEAN_COLOR, alpha=0.8, label=f"n={shown.size}")
        if panel.cut is not None and math.isfinite(panel.cut):
            axes.axvline(panel.cut, color="black", linestyle="--", linewidth=1.5)
            axes.plot([], [], color="black", linestyle="--", label=f"{panel.cut_note}")
        axes.set_title(panel.title, fontsize=10)
        axes.set_xlabel(panel.xlabel, fontsize=8)
        axes.set_ylabel("rows", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    return _png(figure)
