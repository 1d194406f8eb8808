"""MBE2.0's t2i / i2t (queries of one modality against candidates of the other), the
title2image / image2title pairing of a product with itself, and benchmarks built before them."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon2.bench.build import build_bench
from moon2.bench.config import ALL_TASKS, BenchConfig, EvalConfig
from moon2.bench.evaluate import evaluate
from moon2.data.images import decode_image
from moon2.models.base import EncodeItem, Encoder
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row

TEST_IDS = [f"t{i}" for i in range(12)]
NO_IMAGE, NO_TITLE = "t10", "t11"


def _title(product_id: str) -> str:
    if product_id == NO_TITLE:
        return ""
    if product_id == "t5":  # t0's words re-ordered: one duplicate group with t0
        return "large ceramic mug blue"
    if product_id == "t0":
        return "blue ceramic mug large"
    return f"listing number {product_id} here"


def _product(product_id: str, side: str, index: int) -> dict:
    images = None if product_id == NO_IMAGE else [{"bytes": png_bytes((index * 9, 40, 90))}]
    return product_row(
        product_id,
        title=_title(product_id),
        images=images,
        category=["A", f"L{index % 2}"],
        attributes=[{"key": "color", "value": ["red", "blue"][index % 2]}],
    ) | {"side": side}


def _queries(product_id: str, index: int) -> list[dict]:
    """A text, an image and a multimodal query bought the product."""
    pic = {"bytes": png_bytes((90, index * 9, 40)), "path": None}
    return [
        query_row(f"qt-{product_id}", product_id, query_text=f"shopper words {product_id}"),
        query_row(f"qi-{product_id}", product_id, query_text=None, query_image=pic),
        query_row(f"qm-{product_id}", product_id, query_text=f"both {product_id}", query_image=pic),
    ]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 test products (t10 without an image, t11 without a title; t0 and t5 duplicates),
    12 train products, three queries (text, image, both) per product."""
    root = tmp_path_factory.mktemp("tasks")
    products, queries = [], []
    for index, product_id in enumerate(TEST_IDS):
        products.append(_product(product_id, "test", index))
        queries += _queries(product_id, index)
    for index in range(12):
        products.append(_product(f"r{index}", "train", index + 12))
        queries += _queries(f"r{index}", index + 12)
    table = products_table([{k: v for k, v in p.items() if k != "side"} for p in products])
    table = table.append_column("side", pa.array([p["side"] for p in products], pa.string()))
    (root / "catalog" / "products").mkdir(parents=True)
    (root / "catalog" / "queries").mkdir()
    pq.write_table(table, root / "catalog" / "products" / "p.parquet")
    pq.write_table(queries_table(queries), root / "catalog" / "queries" / "q.parquet")
    config = BenchConfig.model_validate({"split": {"column": "side"}, "tasks": {"min_items": 2}})
    build_bench(root / "catalog", root / "bench", config)
    return root / "bench"


def _task(bench: Path, task: str) -> tuple[dict, list[dict], set[str], dict[str, set[str]]]:
    """task.json, the query rows, the candidate ids and the qrels (query -> relevant ids)."""
    task_dir = bench / "test" / "tasks" / task
    spec = json.loads((task_dir / "task.json").read_text())
    queries = pq.read_table(task_dir / "queries").to_pylist()
    candidates = set(pq.read_table(task_dir / "candidates.parquet")["product_id"].to_pylist())
    qrels: dict[str, set[str]] = {}
    for row in pq.read_table(task_dir / "qrels.parquet").to_pylist():
        qrels.setdefault(row["query_id"], set()).add(row["candidate_id"])
    return spec, queries, candidates, qrels


def test_t2i_text_queries_against_image_only_candidates(bench: Path) -> None:
    spec, queries, candidates, qrels = _task(bench, "t2i")
    assert (spec["query_modality"], spec["candidate_modality"]) == ("text", "image")
    assert spec["candidate_input"] == "main image" and spec["query_source"] == "test queries"
    # the query log's text queries; qt-t10 is left out: its product has no image to be found
    assert {q["query_id"] for q in queries} == {f"qt-{p}" for p in TEST_IDS if p != NO_IMAGE}
    assert all(q["query_text"].startswith("shopper words") for q in queries)
    assert all(q["query_image"] is None for q in queries)
    assert candidates == set(TEST_IDS) - {NO_IMAGE}
    assert (spec["products_left_out"], spec["queries_left_out"]) == (1, 1)
    assert qrels["qt-t3"] == {"t3"} and qrels["qt-t11"] == {NO_TITLE}
    assert qrels["qt-t0"] == qrels["qt-t5"] == {"t0", "t5"}  # the duplicate counts too
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["tasks"]["t2i"] == {
        "queries": 11,
        "candidates": 11,
        "qrels": 13,  # 11 positives, and t0 / t5 for each other
        "products_left_out": 1,
        "queries_left_out": 1,
    }


def test_i2t_image_queries_against_title_only_candidates(bench: Path) -> None:
    spec, queries, candidates, qrels = _task(bench, "i2t")
    assert (spec["query_modality"], spec["candidate_modality"]) == ("image", "text")
    assert spec["candidate_input"] == "title"
    assert {q["query_id"] for q in queries} == {f"qi-{p}" for p in TEST_IDS if p != NO_TITLE}
    assert all(q["query_text"] is None and q["query_image"] for q in queries)
    assert candidates == set(TEST_IDS) - {NO_TITLE}
    assert (spec["products_left_out"], spec["queries_left_out"]) == (1, 1)
    assert qrels["qi-t4"] == {"t4"} and qrels["qi-t0"] == {"t0", "t5"}
    # the multimodal queries stay in mm2mm; query_views: all lends their views to t2i and i2t
    assert not any(q["query_id"].startswith("qm-") for q in queries)


def test_title2image_and_image2title_pair_a_product_with_itself(bench: Path) -> None:
    products = {r["product_id"]: r for r in pq.read_table(bench / "test" / "products").to_pylist()}
    both = set(TEST_IDS) - {NO_IMAGE, NO_TITLE}
    spec, queries, candidates, qrels = _task(bench, "title2image")
    assert (spec["query_modality"], spec["candidate_modality"]) == ("text", "image")
    assert {q["query_id"] for q in queries} == both
    assert all(q["query_text"] == products[q["query_id"]]["title"] for q in queries)
    assert candidates == set(TEST_IDS) - {NO_IMAGE}
    assert qrels["t3"] == {"t3"} and qrels["t0"] == {"t0", "t5"}
    spec, queries, candidates, qrels = _task(bench, "image2title")
    assert (spec["query_modality"], spec["candidate_modality"]) == ("image", "text")
    for query in queries:
        main = products[query["query_id"]]["images"][0]
        assert query["query_text"] is None and query["query_image"]["bytes"] == main["bytes"]
    assert candidates == set(TEST_IDS) - {NO_TITLE}
    assert set(qrels) == both


def _key(item: EncodeItem) -> str | None:
    """What a single-modality item shows: its text, or its one image's pixels."""
    if item.text and not item.images:
        return "text:" + item.text
    if item.images and not item.text and len(item.images) == 1:
        pixels = item.images[0].convert("RGB").tobytes()
        return "image:" + hashlib.sha1(pixels, usedforsecurity=False).hexdigest()
    return None


class SingleModalityOracle(Encoder):
    """One vector per test product for its title, its main image and the query texts and
    images that bought it; an item with text and images gets an unrelated vector. t2i, i2t,
    title2image and image2title are then perfect only if their queries and candidates are
    single-modality, and the multimodal tasks are at chance."""

    name = "single-modality-oracle"

    def __init__(self, bench: Path) -> None:
        rng = np.random.default_rng(0)
        products = pq.read_table(bench / "test" / "products").to_pylist()
        vectors = {p["product_id"]: rng.normal(size=16).astype(np.float32) for p in products}
        self.vectors: dict[str, np.ndarray] = {}
        for product in products:
            items = [EncodeItem(text=product["title"] or None)]
            if product["images"]:
                items.append(EncodeItem(images=[decode_image(product["images"][0])]))
            for query in pq.read_table(bench / "test" / "queries").to_pylist():
                if query["positive_id"] == product["product_id"]:
                    items.append(EncodeItem(text=query["query_text"]))
                    if query["query_image"]:
                        items.append(EncodeItem(images=[decode_image(query["query_image"])]))
            for item in items:
                if (key := _key(item)) is not None:
                    self.vectors[key] = vectors[product["product_id"]]
        self.rng = np.random.default_rng(1)

    @property
    def dim(self) -> int:
        return 16

    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = self.rng.normal(size=(len(items), 16)).astype(np.float32)
        for i, item in enumerate(items):
            if (key := _key(item)) in self.vectors:
                out[i] = self.vectors[key]
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_eval_runs_all_nine_tasks(bench: Path, tmp_path: Path) -> None:
    config = EvalConfig(device="cpu", batch_size=8, max_images=1)
    result = evaluate(SingleModalityOracle(bench), bench, tmp_path, config)
    assert result.skipped == {}
    assert [t for t in ALL_TASKS if t in result.results] == list(ALL_TASKS) and len(ALL_TASKS) == 9
    details = result.results["details"]
    for task in ("t2i", "i2t", "title2image", "image2title"):
        assert result.results[task]["R@1"] == 1.0, task
        assert "note" not in details[task]
    assert (details["t2i"]["candidate_modality"], details["i2t"]["candidate_modality"]) == (
        "image",
        "text",
    )
    assert details["t2i"]["queries"] == 11 and details["title2image"]["queries"] == 10
    # the multimodal candidates are unrelated vectors to this model: no task there is perfect
    assert result.results["mm2mm"]["R@1"] < 1.0
    markdown = (tmp_path / "results.md").read_text()
    header = "| model | " + " | ".join(
        f"{t} {'acc' if t in ('cls', 'attr') else 'R@10'}" for t in ALL_TASKS
    )
    assert header + " |" in markdown
    assert "title2image / image2title: a product's own title" in markdown


def _as_built_before(bench: Path, old: Path) -> None:
    """``old``: ``bench`` as build-bench wrote it before t2i / i2t used the query log: t2i and
    i2t hold what title2image and image2title hold now, and those two do not exist."""
    shutil.copytree(bench, old)
    tasks = old / "test" / "tasks"
    for new, before in (("title2image", "t2i"), ("image2title", "i2t")):
        shutil.rmtree(tasks / before)
        (tasks / new).rename(tasks / before)
        spec = json.loads((tasks / before / "task.json").read_text())
        for key in ("query_source", "candidate_input"):
            del spec[key]
        (tasks / before / "task.json").write_text(json.dumps({**spec, "task": before}))
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["tasks"]["t2i"] = manifest["tasks"].pop("title2image")
    manifest["tasks"]["i2t"] = manifest["tasks"].pop("image2title")
    manifest["task_order"] = [t for t in manifest["task_order"] if t in manifest["tasks"]]
    (old / "manifest.json").write_text(json.dumps(manifest))


def test_a_benchmark_built_before_still_evaluates(bench: Path, tmp_path: Path) -> None:
    old = tmp_path / "old-bench"
    _as_built_before(bench, old)
    result = evaluate(
        SingleModalityOracle(old), old, tmp_path / "eval", EvalConfig(device="cpu", batch_size=8)
    )
    assert set(result.skipped) == {"title2image", "image2title"}
    assert result.skipped["title2image"].startswith("not in the benchmark")
    details = result.results["details"]
    for task in ("t2i", "i2t"):  # reported under the name the benchmark has, with a note
        assert result.results[task]["R@1"] == 1.0
        assert "title2image / image2title measure now" in details[task]["note"]
        assert details[task]["queries"] == 10  # product ids: the old pairing
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert "Note on t2i: this benchmark was built before" in markdown
    assert "| title2image R@10 | image2title R@10 |" in markdown


def test_ablation_table_has_no_paper_number_for_the_extra_tasks() -> None:
    from moon2.ablate import render_markdown

    cell = {"mean": 0.5, "std": None, "n": 1}
    summary = {"full": {t: cell for t in ALL_TASKS}}
    about = {"data": "d", "bench": "b", "recipe": "r", "budget": "1 epochs"}
    paper_row = render_markdown(summary, about).splitlines()[-1]
    # t2mm i2mm mm2mm t2i i2t cls attr from the paper, then title2image and image2title
    paper = "63.09 | 91.08 | 94.21 | 73.12 | 64.91 | 68.08 | 84.29"
    assert paper_row == f"| MOON2.0 | {paper} | - | - |"
