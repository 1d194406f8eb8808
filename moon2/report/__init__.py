"""``moon2 report``: one self-contained HTML page with the plots and examples of a run.

``build_report(RUN_DIR)`` reads a ``moon2 demo`` folder (catalog/, bench/, aug/, cur/, run/,
eval/) or a ``moon2 train`` output alone and writes ``RUN_DIR/report/index.html`` plus its
PNG plots; see :mod:`moon2.report.build` for the sections.
"""

from moon2.report.build import ReportResult, build_report

__all__ = ["ReportResult", "build_report"]
