"""The decision rule of ``moon2 filter``: flags in, one reason per removed row out.

Each check raises a boolean flag per row; a row is removed when a flag whose action is
``remove`` is raised, and its reason is the first such flag in :data:`PRODUCT_CHECKS` /
:data:`QUERY_CHECKS` order (the most certain evidence first: a byte-identical copy before a
model's opinion). Flags whose action is ``flag`` are recorded in ``cur_flags`` only.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import polars as pl

from moon2.curate.config import CurateConfig

PRODUCT_CHECKS = (
    "duplicate",
    "near_duplicate",
    "image_text",
    "title_context",
    "label_issue",
    "dynamics",
    "outlier",
)
QUERY_CHECKS = ("positive_removed", "query_margin", "dynamics")


def actions(config: CurateConfig, table: str) -> dict[str, str]:
    """check -> "remove" or "flag" for the checks of ``table`` (products or queries)."""
    if table == "products":
        return {
            "duplicate": config.duplicates.action,
            "near_duplicate": config.cleanlab.near_duplicates,
            "image_text": config.alignment.action,
            "title_context": config.alignment.action,
            "label_issue": config.cleanlab.label_issues,
            "dynamics": config.dynamics.product_action,
            "outlier": config.cleanlab.outliers,
        }
    return {
        "positive_removed": "remove",
        "query_margin": config.alignment.action,
        "dynamics": config.dynamics.action,
    }


def decide(
    flags: Mapping[str, np.ndarray], order: tuple[str, ...], action: Mapping[str, str], n: int
) -> pl.DataFrame:
    """``cur_flags`` (every flag raised, in check order), ``cur_reason`` (the first removing
    flag, null when the row is kept) and ``cur_removed`` for ``n`` rows."""
    raised: list[list[str]] = [[] for _ in range(n)]
    reason: list[str | None] = [None] * n
    for check in order:
        values = flags.get(check)
        if values is None:
            continue
        for row in np.flatnonzero(values):
            raised[row].append(check)
            if reason[row] is None and action.get(check) == "remove":
                reason[row] = check
    return pl.DataFrame(
        {
            "cur_flags": pl.Series(raised, dtype=pl.List(pl.String)),
            "cur_reason": pl.Series(reason, dtype=pl.String),
        }
    ).with_columns(cur_removed=pl.col("cur_reason").is_not_null())
