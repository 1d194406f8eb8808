"""Section 6 of the report: retrieval examples from an eval run file and its benchmark task.

For the tasks with queries from the query log (t2mm, i2mm, mm2mm, t2i, i2t): a few queries
(the first query ids in sorted order, a hit and a miss in turn), each with its top 5 (rank,
score, main image, title) and the correct products of the qrels marked; a miss also shows the
correct product and the rank the model gave it. A t2i candidate was embedded from its main
image only and an i2t candidate from its title only; the card shows both all the same. The
run file is streamed and only the shown queries and products are read from the benchmark.
title2image / image2title (a product against itself) have no examples.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import polars as pl

from moon2.bench.metrics import trec_id
from moon2.report import collect
from moon2.report.collect import Layout
from moon2.report.html import Html, Section, join, note, tag, thumb, unavailable

QUERY_TASKS = ("t2mm", "i2mm", "mm2mm", "t2i", "i2t")
# what a task's candidates were embedded from, where it is not the whole product
CANDIDATE_SEEN = {"t2i": "main image only", "i2t": "title only"}
TOP = 5
QUERY_POOL = 400
"""Sorted query ids a task's examples are chosen from: enough for hits and misses, few enough
that the run file is only scanned, never held."""


@dataclass
class Ranking:
    """One query's run: its top results (candidate id, rank, score), the rank of its first
    relevant candidate (None: not in the run) and how deep the run goes."""

    query_id: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    correct_rank: int | None = None
    correct_id: str | None = None
    depth: int = 0

    @property
    def hit(self) -> bool:
        return self.correct_rank is not None and self.correct_rank <= TOP


def read_rankings(
    run_lines: Iterable[str], relevant: dict[str, set[str]], top: int = TOP
) -> dict[str, Ranking]:
    """Join a TREC run (``qid Q0 docid rank score name`` lines, ids as ``trec_id`` wrote them)
    with the relevant candidates of the queries in ``relevant``; other queries are skipped, so
    the run is streamed, never held. Ids are percent-decoded back to the originals."""
    rankings: dict[str, Ranking] = {}
    for line in run_lines:
        parts = line.split()
        if len(parts) < 5:
            continue
        query = unquote(parts[0])
        if query not in relevant:
            continue
        candidate = unquote(parts[2])
        try:
            rank, score = int(parts[3]), float(parts[4])
        except ValueError:
            continue
        ranking = rankings.setdefault(query, Ranking(query))
        ranking.depth = max(ranking.depth, rank)
        if rank <= top:
            ranking.top.append((candidate, rank, score))
        if candidate in relevant[query] and (
            ranking.correct_rank is None or rank < ranking.correct_rank
        ):
            ranking.correct_rank, ranking.correct_id = rank, candidate
    for ranking in rankings.values():
        ranking.top.sort(key=lambda item: item[1])
    return rankings


def run_lines(run_file: Path, query_ids: Collection[str]) -> list[str]:
    """The lines of a TREC run file whose query is in ``query_ids``. Polars scans the file
    (a run of a large benchmark has queries x depth lines) and keeps only those; a file it
    cannot split on single spaces is read line by line instead."""
    wanted = {trec_id(q) for q in query_ids}
    try:
        frame = (
            pl.scan_csv(
                run_file,
                separator=" ",
                has_header=False,
                quote_char=None,
                infer_schema=False,
                truncate_ragged_lines=True,
            )
            .filter(pl.first().is_in(list(wanted)))
            .collect()
        )
        if frame.width >= 5:
            return [" ".join(v or "" for v in row) for row in frame.iter_rows()]
    except (pl.exceptions.PolarsError, OSError):
        pass
    with open(run_file, encoding="utf-8", errors="replace") as handle:
        return [line for line in handle if (line.split(maxsplit=1) or [""])[0] in wanted]


def choose_examples(rankings: dict[str, Ranking], count: int) -> list[Ranking]:
    """``count`` queries in sorted id order, alternating a hit (correct product in the top 5)
    and a miss while both last: the page shows what works and what does not."""
    ordered = [rankings[q] for q in sorted(rankings)]
    hits = [r for r in ordered if r.hit]
    misses = [r for r in ordered if not r.hit]
    chosen: list[Ranking] = []
    while len(chosen) < count and (hits or misses):
        source = hits if (len(chosen) % 2 == 0 and hits) or not misses else misses
        chosen.append(source.pop(0))
    return chosen


def _task_examples(
    layout: Layout,
    task: str,
    count: int,
    noisy: dict[str, bool],
) -> Html | str:
    """The examples of one task, or why there are none."""
    assert layout.bench is not None and layout.eval is not None
    task_dir = layout.bench / "test" / "tasks" / task
    run_file = layout.eval / "runs" / f"{task}.trec"
    if not run_file.is_file():
        return f"no run file {run_file}"
    if not (task_dir / "qrels.parquet").is_file():
        return f"no qrels in {task_dir}"
    query_files = collect.parquet_files(task_dir / "queries")
    ids = collect.read_columns(query_files, ["query_id"])
    if ids is None:
        return f"no queries in {task_dir / 'queries'}"
    pool = sorted(set(ids["query_id"].cast(pl.String).drop_nulls().to_list()))[:QUERY_POOL]
    qrels = pl.read_parquet(task_dir / "qrels.parquet").filter(
        pl.col("query_id").is_in(pool) & (pl.col("relevance") >= 1)
    )
    relevant: dict[str, set[str]] = {}
    for query_id, candidate_id in qrels.select("query_id", "candidate_id").iter_rows():
        relevant.setdefault(query_id, set()).add(candidate_id)
    rankings = read_rankings(run_lines(run_file, relevant), relevant)
    for query_id in relevant:  # a query without any line in the run still has its answer
        rankings.setdefault(query_id, Ranking(query_id))
    chosen = choose_examples(rankings, count)
    if not chosen:
        return f"no query of {task} has a relevant candidate"
    product_of: dict[str, str] = {}
    if (task_dir / "candidates.parquet").is_file():
        candidates = pl.read_parquet(
            task_dir / "candidates.parquet", columns=["candidate_id", "product_id"]
        )
        needed = {c for r in chosen for c, _, _ in r.top}
        needed |= {c for r in chosen for c in relevant.get(r.query_id, set())}
        product_of = dict(candidates.filter(pl.col("candidate_id").is_in(list(needed))).iter_rows())
    queries = collect.rows_by_id(
        query_files, "query_id", {r.query_id for r in chosen}, ["query_text", "query_image"]
    )
    wanted = set(product_of.values()) | {c for r in chosen for c, _, _ in r.top}
    products = collect.rows_by_id(
        collect.parquet_files(layout.bench / "test" / "products"),
        "product_id",
        wanted,
        ["title", "images"],
    )
    blocks = []
    for ranking in sorted(chosen, key=lambda r: r.query_id):
        blocks.append(
            _query_block(
                task,
                ranking,
                relevant.get(ranking.query_id, set()),
                queries.get(ranking.query_id),
                products,
                product_of,
                noisy.get(ranking.query_id),
            )
        )
    return join(blocks)


def _result_card(
    product: collect.Row | None,
    product_id: str,
    rank: int | None,
    score: float | None,
    correct: bool,
    label: str | None = None,
) -> Html:
    values = product.values if product else {}
    cells = (values.get("images") or []) if product else []
    first = next((c for c in cells if c is not None), None)
    head = label or f"#{rank}" + (f" · {score:.3f}" if score is not None else "")
    return tag(
        "div",
        join(
            [
                tag(
                    "div",
                    join(
                        [
                            tag("span", head, class_="rank"),
                            tag("span", " ✓ correct", class_="mark") if correct else "",
                        ]
                    ),
                ),
                thumb(first, product.base_dir if product else None, f"product {product_id}"),
                tag(
                    "div",
                    values.get("title") or ("(empty title)" if product else "(not found)"),
                    class_="ttl",
                ),
                tag("div", product_id, class_="meta"),
            ]
        ),
        class_="result correct" if correct else "result",
    )


def _query_block(
    task: str,
    ranking: Ranking,
    relevant: set[str],
    query: collect.Row | None,
    products: dict[str, collect.Row],
    product_of: dict[str, str],
    noisy: bool | None,
) -> Html:
    values = query.values if query else {}
    text = values.get("query_text")
    image = values.get("query_image")
    if ranking.hit:
        verdict = tag("span", f"✓ correct at rank {ranking.correct_rank}", class_="tag hit")
    elif ranking.correct_rank is not None:
        verdict = tag(
            "span", f"✗ correct product at rank {ranking.correct_rank}", class_="tag miss"
        )
    else:
        verdict = tag(
            "span", f"✗ correct product not in the top {ranking.depth or '?'}", class_="tag miss"
        )
    head = [
        tag("span", f"{task} · {ranking.query_id} ", class_="meta"),
        tag(
            "span", text if text else "(image query)" if image else "(empty query)", class_="qtext"
        ),
        verdict,
    ]
    if noisy:
        head.append(
            tag(
                "span",
                "logged purchase is injected noise (the qrels follow it)",
                class_="tag noise",
            )
        )
    query_side = [tag("div", join(head), class_="qhead")]
    if image is not None:
        query_side.append(thumb(image, query.base_dir if query else None, "query image"))
    cards = []
    for candidate, rank, score in ranking.top:
        product_id = product_of.get(candidate, candidate)
        cards.append(
            _result_card(products.get(product_id), product_id, rank, score, candidate in relevant)
        )
    if not ranking.hit:
        correct = ranking.correct_id or (min(relevant) if relevant else None)
        if correct is not None:
            product_id = product_of.get(correct, correct)
            where = f"rank {ranking.correct_rank}" if ranking.correct_rank else "not ranked"
            cards.append(
                _result_card(
                    products.get(product_id),
                    product_id,
                    None,
                    None,
                    True,
                    label=f"correct ({where})",
                )
            )
    return tag(
        "div", join([*query_side, tag("div", join(cards), class_="results")]), class_="query"
    )


def retrieval_section(layout: Layout, examples: int) -> Section:
    """Section 6: ``ceil(examples / 2)`` queries of each of t2mm, i2mm, mm2mm, t2i and i2t."""
    if layout.eval is None:
        return unavailable("no eval results found (no eval/ folder; pass eval_dir)")
    if layout.bench is None:
        return unavailable("no benchmark folder found (no bench/ folder; pass bench_dir)")
    if not (layout.eval / "runs").is_dir():
        return unavailable(f"{layout.eval / 'runs'} does not exist")
    if examples <= 0:
        return unavailable("examples=0 asked for no example queries")
    count = math.ceil(examples / 2)
    truth = collect.query_truth([layout.bench / "test" / "queries"])
    noisy = {} if truth is None else dict(truth.iter_rows())
    parts: list[Html] = [
        note(
            f"Up to {count} queries per task (first query ids in sorted order, a hit and a miss "
            "in turn), their top 5 with the model's score; green with ✓: a correct product "
            "(qrels)."
        )
    ]
    problems = []
    shown = 0
    for task in QUERY_TASKS:
        result = _task_examples(layout, task, count, noisy)
        if not isinstance(result, Html):  # a plain str: why the task has no examples
            problems.append(f"{task}: {result}")
            continue
        parts.append(tag("h3", task))
        if task in CANDIDATE_SEEN:
            parts.append(note(f"The model saw each candidate's {CANDIDATE_SEEN[task]}."))
        parts.append(result)
        shown += 1
    if problems:
        parts.append(note("Not shown: " + "; ".join(problems)))
    if not shown:
        return unavailable(
            f"no {' / '.join(QUERY_TASKS)} run with its benchmark task: " + "; ".join(problems)
        )
    return Section(join(parts))
