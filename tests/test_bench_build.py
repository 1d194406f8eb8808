"""`moon2 build-bench`: leakage-free, stratified, deterministic splits and every task."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon2.bench.build import build_bench, normalise_title
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS, BenchConfig
from moon2.errors import InputError
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row


@pytest.fixture(scope="module")
def bench(small_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    config = BenchConfig.model_validate({"seed": 1, "tasks": {"min_items": 3}})
    build_bench(small_catalog, out, config)
    return out


def _ids(path: Path, column: str) -> list[str]:
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "bench_config.yaml"
    }


def test_every_task_is_built(bench: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["skipped_tasks"] == {}
    assert set(manifest["tasks"]) == set(ALL_TASKS)
    for task in ALL_TASKS:
        assert (bench / "test" / "tasks" / task / "task.json").exists()
    for task in RETRIEVAL_TASKS:
        task_dir = bench / "test" / "tasks" / task
        queries = pq.read_table(task_dir / "queries")
        qrels = pq.read_table(task_dir / "qrels.parquet")
        candidates = pq.read_table(task_dir / "candidates.parquet")
        assert set(qrels["query_id"].to_pylist()) == set(queries["query_id"].to_pylist())
        assert set(qrels["candidate_id"].to_pylist()) <= set(candidates["candidate_id"].to_pylist())
        assert candidates["position"].to_pylist() == list(range(candidates.num_rows))
        trec = (task_dir / "qrels.trec").read_text().splitlines()
        assert len(trec) == qrels.num_rows and trec[0].split()[1] == "0"
    t2mm = pq.read_table(bench / "test" / "tasks" / "t2mm" / "queries")
    assert t2mm["query_image"].null_count == t2mm.num_rows
    i2mm = pq.read_table(bench / "test" / "tasks" / "i2mm" / "queries")
    assert i2mm["query_text"].null_count == i2mm.num_rows
    mm2mm = pq.read_table(bench / "test" / "tasks" / "mm2mm" / "queries")
    assert mm2mm["query_text"].null_count == 0 and mm2mm["query_image"].null_count == 0


def test_split_is_by_product_without_leakage(bench: Path, small_catalog: Path) -> None:
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["leakage"]["ok"], manifest["leakage"]
    train = set(_ids(bench / "train" / "products", "product_id"))
    test = set(_ids(bench / "test" / "products", "product_id"))
    assert not train & test
    assert len(train) + len(test) == 160
    assert 0.1 < len(test) / 160 < 0.3
    for split, own in (("train", train), ("test", test)):
        queries = pq.read_table(bench / split / "queries").to_pylist()
        for query in queries:
            assert query["positive_id"] in own
            assert set(query["negative_ids"] or []) <= own
    catalog_queries = pq.read_table(small_catalog / "queries").num_rows
    assert manifest["splits"]["train"]["queries"] + manifest["splits"]["test"]["queries"] == (
        catalog_queries
    )


def test_near_duplicates_stay_on_one_side(bench: Path, small_catalog: Path) -> None:
    products = pq.read_table(small_catalog / "products").to_pylist()
    side = {pid: "train" for pid in _ids(bench / "train" / "products", "product_id")}
    side.update({pid: "test" for pid in _ids(bench / "test" / "products", "product_id")})
    by_title: dict[str, set[str]] = {}
    by_image: dict[bytes, set[str]] = {}
    for row in products:
        key = normalise_title(row["title"])
        if len(key.split()) >= 3:
            by_title.setdefault(key, set()).add(side[row["product_id"]])
        for cell in row["images"] or []:
            by_image.setdefault(cell["bytes"], set()).add(side[row["product_id"]])
    assert all(len(sides) == 1 for sides in by_title.values())
    assert all(len(sides) == 1 for sides in by_image.values())
    duplicates = [r for r in products if r["truth_noise_kind"] == "near_duplicate"]
    assert duplicates
    for row in duplicates:
        assert side[row["product_id"]] == side[row["truth_source_id"]] or (
            normalise_title(row["title"])
            != normalise_title(
                next(p for p in products if p["product_id"] == row["truth_source_id"])["title"]
            )
        )


def test_qrels_count_every_member_of_a_duplicate_group(tmp_path: Path) -> None:
    image = png_bytes((10, 200, 10))
    rows = [
        product_row(
            f"p{i}",
            title=f"unique listing number {i}",
            category=["A", f"L{i % 2}"],
            images=[{"bytes": png_bytes((i * 20, 0, 0)), "path": None}],
        )
        for i in range(10)
    ]
    rows.append(
        product_row(
            "copy", title="another seller copy", category=["A", "L0"], images=rows[0]["images"]
        )
    )
    rows[1]["images"] = [{"bytes": image, "path": None}]
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    pq.write_table(products_table(rows), catalog / "products" / "part-00000.parquet")
    queries = [query_row(f"q{i}", f"p{i % 10}", query_text=f"listing {i}") for i in range(30)]
    pq.write_table(queries_table(queries), catalog / "queries" / "part-00000.parquet")
    config = BenchConfig.model_validate(
        {"split": {"test_fraction": 0.5}, "tasks": {"min_items": 1}, "seed": 3}
    )
    build_bench(catalog, tmp_path / "bench", config)
    test_ids = set(_ids(tmp_path / "bench" / "test" / "products", "product_id"))
    assert ("p0" in test_ids) == ("copy" in test_ids)
    if "p0" in test_ids:
        qrels = pq.read_table(tmp_path / "bench" / "test" / "tasks" / "t2mm" / "qrels.parquet")
        relevant = {
            c
            for q, c in zip(
                qrels["query_id"].to_pylist(), qrels["candidate_id"].to_pylist(), strict=True
            )
            if q == "q0"
        }
        assert relevant == {"p0", "copy"}


def test_stratified_by_leaf(tmp_path: Path) -> None:
    rows = [
        product_row(f"{leaf}{i}", title=f"{leaf} product {i} words", category=["Root", leaf])
        for leaf in ("a", "b", "c", "d")
        for i in range(40)
    ]
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    pq.write_table(products_table(rows), catalog / "products" / "p.parquet")
    pq.write_table(queries_table([query_row("q", "a0")]), catalog / "queries" / "q.parquet")
    config = BenchConfig.model_validate(
        {"split": {"test_fraction": 0.25}, "tasks": {"min_items": 1}}
    )
    build_bench(catalog, tmp_path / "bench", config)
    test_ids = _ids(tmp_path / "bench" / "test" / "products", "product_id")
    per_leaf = Counter(pid[0] for pid in test_ids)
    assert set(per_leaf) == {"a", "b", "c", "d"}
    assert all(8 <= n <= 12 for n in per_leaf.values()), per_leaf


def test_deterministic_and_seeded(small_catalog: Path, tmp_path: Path) -> None:
    config = BenchConfig(seed=5)
    build_bench(small_catalog, tmp_path / "a", config)
    build_bench(small_catalog, tmp_path / "b", config)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    build_bench(small_catalog, tmp_path / "c", BenchConfig(seed=6))
    assert set(_ids(tmp_path / "c" / "test" / "products", "product_id")) != set(
        _ids(tmp_path / "a" / "test" / "products", "product_id")
    )


def test_augmented_columns_stay_in_train_only(tmp_path: Path) -> None:
    rows = [
        product_row(f"p{i}", title=f"listing number {i} here", category=["A", "B"])
        for i in range(20)
    ]
    table = products_table(rows)
    table = table.append_column("aug_title", pa.array([f"rich {i}" for i in range(20)]))
    table = table.append_column("seller", pa.array(["s"] * 20))
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    pq.write_table(table, catalog / "products" / "p.parquet")
    queries = queries_table([query_row(f"q{i}", f"p{i}") for i in range(20)])
    queries = queries.append_column("aug_query", pa.array(["x"] * 20))
    pq.write_table(queries, catalog / "queries" / "q.parquet")
    build_bench(
        catalog,
        tmp_path / "bench",
        BenchConfig.model_validate({"split": {"test_fraction": 0.5}, "tasks": {"min_items": 1}}),
    )
    train = pq.read_schema(next((tmp_path / "bench" / "train" / "products").glob("*.parquet")))
    test = pq.read_schema(next((tmp_path / "bench" / "test" / "products").glob("*.parquet")))
    assert "aug_title" in train.names and "aug_title" not in test.names
    assert "seller" in train.names and "seller" in test.names
    test_q = pq.read_schema(next((tmp_path / "bench" / "test" / "queries").glob("*.parquet")))
    assert "aug_query" not in test_q.names


def test_bad_rows_are_rejected_with_reasons(tmp_path: Path) -> None:
    rows = [product_row(f"p{i}", title=f"listing number {i} here") for i in range(12)]
    rows += [product_row("empty", title="", images=None), product_row("p0", title="again")]
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    pq.write_table(products_table(rows), catalog / "products" / "p.parquet")
    queries = [
        query_row("q1", "p1"),
        query_row("q2", "ghost"),
        query_row("q3", "empty"),
        query_row("q1", "p2"),
        query_row("q4", "p3", query_text=None),
    ]
    pq.write_table(queries_table(queries), catalog / "queries" / "q.parquet")
    manifest = build_bench(
        catalog, tmp_path / "bench", BenchConfig.model_validate({"tasks": {"min_items": 1}})
    ).manifest
    assert manifest["rejected"] == {"products": 2, "queries": 4}
    rejected = pq.read_table(tmp_path / "bench" / "_rejects" / "products")
    assert sorted(rejected["reject_reason"].to_pylist()) == [
        "p.parquet row 12: no title and no image",
        "repeated product_id p0",
    ]
    reasons = sorted(
        pq.read_table(tmp_path / "bench" / "_rejects" / "queries")["reject_reason"].to_pylist()
    )
    assert reasons == [
        "q.parquet row 1: positive_id 'ghost' is not a usable product",
        "q.parquet row 2: positive_id 'empty' is not a usable product",
        "q.parquet row 3: repeated query_id q1",
        "q.parquet row 4: no query_text and no query_image",
    ]


def test_catalog_without_images_skips_image_tasks(tmp_path: Path) -> None:
    rows = [
        product_row(
            f"p{i}", title=f"listing number {i} here", images=None, category=["A", f"L{i % 3}"]
        )
        for i in range(30)
    ]
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    pq.write_table(products_table(rows), catalog / "products" / "p.parquet")
    queries = [query_row(f"q{i}", f"p{i}") for i in range(30)]
    pq.write_table(queries_table(queries), catalog / "queries" / "q.parquet")
    result = build_bench(
        catalog,
        tmp_path / "bench",
        BenchConfig.model_validate({"split": {"test_fraction": 0.5}, "tasks": {"min_items": 2}}),
    )
    assert {"i2mm", "mm2mm", "t2i", "i2t", "title2image", "image2title"} <= set(result.skipped)
    assert "test image queries" in result.skipped["i2mm"]
    assert "test image queries" in result.skipped["i2t"]
    # text queries there are, but no product with an image to be their candidate
    assert "have a relevant product with an image" in result.skipped["t2i"]
    assert "both a title and an image" in result.skipped["title2image"]
    assert {"t2mm", "cls"} <= set(result.manifest["tasks"])
    assert "no attribute key qualifies" in result.skipped["attr"]  # one colour for all


def test_relative_image_paths_are_rebased(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    (catalog / "products" / "imgs").mkdir(parents=True)
    (catalog / "queries").mkdir()
    (catalog / "products" / "imgs" / "a.png").write_bytes(png_bytes())
    rows = [
        product_row(
            f"p{i}",
            title=f"listing number {i} here",
            images=[{"bytes": None, "path": "imgs/a.png"}],
        )
        for i in range(6)
    ]
    pq.write_table(products_table(rows), catalog / "products" / "p.parquet")
    pq.write_table(queries_table([query_row("q", "p0")]), catalog / "queries" / "q.parquet")
    config = BenchConfig.model_validate(
        {"split": {"dedupe_images": False}, "tasks": {"min_items": 1}}
    )
    build_bench(catalog, tmp_path / "bench", config)
    paths = {
        c["path"]
        for split in ("train", "test")
        for cells in pq.read_table(tmp_path / "bench" / split / "products")["images"].to_pylist()
        for c in cells
    }
    assert paths == {str((catalog / "products" / "imgs" / "a.png").resolve())}


def test_missing_tables_and_bad_split_column(tmp_path: Path) -> None:
    (tmp_path / "catalog" / "products").mkdir(parents=True)
    pq.write_table(
        products_table([product_row("a")]), tmp_path / "catalog" / "products" / "p.parquet"
    )
    with pytest.raises(InputError, match="has no queries/ table"):
        build_bench(tmp_path / "catalog", tmp_path / "bench", BenchConfig())
    (tmp_path / "catalog" / "queries").mkdir()
    pq.write_table(
        queries_table([query_row("q", "a")]), tmp_path / "catalog" / "queries" / "q.parquet"
    )
    config = BenchConfig.model_validate({"split": {"column": "official_split"}})
    with pytest.raises(InputError, match=r"split\.column 'official_split' is not a column"):
        build_bench(tmp_path / "catalog", tmp_path / "bench", config)


def test_cls_and_attr_labels(bench: Path) -> None:
    cls = json.loads((bench / "test" / "tasks" / "cls" / "task.json").read_text())
    labels = pq.read_table(bench / "test" / "tasks" / "cls" / "labels.parquet").to_pylist()
    assert set(cls["labels"]) == {row["label"] for row in labels}
    assert all(row["label"].endswith(row["label_text"]) for row in labels)
    attr = json.loads((bench / "test" / "tasks" / "attr" / "task.json").read_text())
    assert {"color", "material", "pattern"} <= set(attr["keys"])
    pairs = pq.read_table(bench / "test" / "tasks" / "attr" / "labels.parquet").to_pylist()
    assert all(p["value"] in attr["keys"][p["key"]] for p in pairs)


def test_cli_build_bench(small_catalog: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moon2.cli import app

    result = CliRunner().invoke(
        app, ["build-bench", str(small_catalog), str(tmp_path / "b"), "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "leakage checks: passed" in result.stdout
    assert "t2mm: queries" in result.stdout
    missing = CliRunner().invoke(app, ["build-bench", str(tmp_path / "nope"), str(tmp_path / "x")])
    assert missing.exit_code == 2 and "has no products/ table" in missing.stderr
