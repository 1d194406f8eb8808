"""Which products are the same item: build-bench's duplicate rule, shared with training.

Two products are duplicates when they share a key: the same normalised title (of at least
``min_title_tokens`` words), or an image with the same bytes or the same path. Duplicates of
duplicates are duplicates too (connected components). A key shared by more than
``max_group`` products is a placeholder (a "no image available" photo, a generic title) and
links nothing. build-bench keeps a group on one side of its split; training never uses a
group's members as each other's negatives.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import numpy as np
import polars as pl
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

RULE_VERSION = 1
"""Changes whenever the rule below does, so that cached groupings are recomputed."""

_PUNCTUATION = re.compile(r"[^\w\s]+", re.UNICODE)
TITLE_PREFIX = "t:"
"""Prefix of a title key among the image keys (which start with ``sha1:`` or ``path:``)."""


def normalise_title(title: str | None) -> str:
    """Bag-of-words key of a title: NFKC, case-folded, punctuation dropped, words sorted.

    Sorting the words makes re-ordered copies of a listing collide, which is how sellers
    duplicate listings.
    """
    if not title:
        return ""
    text = unicodedata.normalize("NFKC", title).casefold()
    words = _PUNCTUATION.sub(" ", text).split()
    return " ".join(sorted(words))


def title_key(title: str | None, min_title_tokens: int) -> str | None:
    """The normalised title, or None when it has fewer than ``min_title_tokens`` words (too
    generic to mark a duplicate)."""
    key = normalise_title(title)
    return key if key and len(key.split()) >= min_title_tokens else None


def image_key(cell: dict[str, Any] | None) -> str | None:
    """``sha1:<digest>`` of an image cell's bytes, else ``path:<path>``, else None."""
    if not cell:
        return None
    data = cell.get("bytes")
    if data is not None:
        return "sha1:" + hashlib.sha1(data, usedforsecurity=False).hexdigest()
    path = cell.get("path")
    return f"path:{path}" if path else None


def product_keys(
    title: str | None, images: list[dict[str, Any] | None] | None, min_title_tokens: int
) -> list[str]:
    """Every duplicate key of one product: its title key (prefixed) and its image keys."""
    keys = []
    title_part = title_key(title, min_title_tokens)
    if title_part is not None:
        keys.append(TITLE_PREFIX + title_part)
    keys += sorted({k for k in map(image_key, images or []) if k})
    return keys


def duplicate_labels(
    keyed: pl.DataFrame, rows: int, max_group: int
) -> tuple[np.ndarray, dict[str, int]]:
    """One group label per row in ``range(rows)``: connected components of 'shares a key'.

    ``keyed`` has one row per (``idx``: a row number, ``key``: one of its keys). A key held by
    more than ``max_group`` rows is a placeholder and joins nothing. Also returns counts:
    ``shared_keys`` (keys that joined rows) and ``keys_too_common`` (placeholders).
    """
    groups = keyed.group_by("key").agg(pl.col("idx").unique().sort())
    sizes = groups.select(pl.col("idx").list.len()).to_series()
    too_common = int((sizes > max_group).sum())
    groups = groups.filter((sizes >= 2) & (sizes <= max_group))
    edges = groups.select(first=pl.col("idx").list.first(), member=pl.col("idx")).explode("member")
    first = edges["first"].to_numpy().astype(np.int64)
    member = edges["member"].to_numpy().astype(np.int64)
    graph = coo_matrix((np.ones(len(first), np.int8), (first, member)), shape=(rows, rows))
    _, labels = connected_components(graph, directed=False)
    return labels, {"shared_keys": groups.height, "keys_too_common": too_common}
