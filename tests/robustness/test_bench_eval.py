"""Issue #27 (6, 10, 11): build-bench on null optional columns and small catalogs, eval on
benchmarks with no task, a missing task folder or a missing task file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from moon2.cli import app
from tests.factories import product_row, products_table, queries_table, query_row

MODEL = "open_clip:moon2-tiny-clip"


def _write_catalog(
    root: Path, products: list[dict], queries: list[dict], split: list[str] | None = None
) -> Path:
    """products/ and queries/ under ``root``; ``split`` adds an official_split column."""
    table = products_table(products)
    if split is not None:
        table = table.append_column("official_split", pa.array(split, pa.string()))
    (root / "products").mkdir(parents=True)
    (root / "queries").mkdir()
    pq.write_table(table, root / "products" / "p.parquet")
    pq.write_table(queries_table(queries), root / "queries" / "q.parquet")
    return root


def _config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def _rows(path: Path) -> int:
    return pq.read_table(path).num_rows if path.exists() else 0


def _assert_products_accounted(bench: Path, rows_in: int) -> None:
    out = sum(_rows(bench / side / "products") for side in ("train", "test"))
    assert out + _rows(bench / "_rejects" / "products") == rows_in


# --- item 6: null optional columns ----------------------------------------------------------


def _null_rows() -> list[dict]:
    """Rows whose optional columns are null or empty, as the data contract allows."""
    return [
        product_row("no-desc", title="plain listing without description", description=None),
        product_row("no-attrs", title="plain listing without attributes", attributes=None),
        product_row("no-cat", title="plain listing without category", category=None),
        product_row("empty-cat", title="plain listing with empty category", category=[]),
    ]


def test_null_category_level_is_rejected_and_the_rest_built(tmp_path: Path) -> None:
    products = [
        product_row(f"p{i}", title=f"listing number {i} here", category=["A", f"L{i % 3}"])
        for i in range(30)
    ]
    products += _null_rows()
    products.append(product_row("bad-cat", title="a listing with a hole", category=["A", None]))
    queries = [query_row(f"q{i}", p["product_id"]) for i, p in enumerate(products)]
    catalog = _write_catalog(tmp_path / "catalog", products, queries)
    bench = tmp_path / "out" / "bench"
    result = _run(["build-bench", str(catalog), str(bench)])
    assert result.exit_code == 0, result.output
    rejects = pq.read_table(bench / "_rejects" / "products").to_pylist()
    assert [(r["product_id"], r["reject_reason"]) for r in rejects] == [
        ("bad-cat", "p.parquet row 34: category level 1 is null or empty")
    ]
    _assert_products_accounted(bench, len(products))
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["rejected"]["products"] == 1 and manifest["tasks"]


def test_null_optional_columns_on_the_test_side_build_every_task(tmp_path: Path) -> None:
    colours = ["red", "blue"]
    products = [
        product_row(
            f"p{i}",
            title=f"listing number {i} here",
            category=["A", f"L{i % 2}"],
            attributes=[{"key": "color", "value": colours[i % 2]}],
        )
        for i in range(16)
    ]
    products += _null_rows()
    split = ["test" if i % 2 else "train" for i in range(16)] + ["test"] * 4
    queries = [query_row(f"q{i}", p["product_id"]) for i, p in enumerate(products)]
    catalog = _write_catalog(tmp_path / "catalog", products, queries, split)
    config = _config(
        tmp_path / "bench.yaml",
        {
            "split": {"column": "official_split"},
            "tasks": {
                "tasks": ["t2mm", "t2i", "title2image", "image2title", "cls", "attr"],
                "min_items": 2,
            },
        },
    )
    bench = tmp_path / "out" / "bench"
    result = _run(["build-bench", str(catalog), str(bench), "--config", str(config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bench / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"t2mm", "t2i", "title2image", "image2title", "cls", "attr"}
    test_ids = set(pq.read_table(bench / "test" / "products")["product_id"].to_pylist())
    assert {"no-desc", "no-attrs", "no-cat", "empty-cat"} <= test_ids
    labelled = set(pq.read_table(bench / "test" / "tasks" / "cls" / "labels.parquet")["product_id"])
    assert not {"no-cat", "empty-cat"} & {str(p) for p in labelled}
    _assert_products_accounted(bench, len(products))


# --- item 10: small catalogs ----------------------------------------------------------------


def test_leaves_too_small_fall_back_to_a_coarser_stratum(tmp_path: Path) -> None:
    # 40 products, each in a leaf of its own under 4 roots: by leaf, every product would go
    # to test by a 20% coin flip; by root, each root gives exactly 2 of its 10
    products = [
        product_row(f"{root}{i}", title=f"{root} item number {i}", category=[root, f"leaf{i}"])
        for root in "abcd"
        for i in range(10)
    ]
    queries = [query_row(f"q{i}", p["product_id"]) for i, p in enumerate(products)]
    catalog = _write_catalog(tmp_path / "catalog", products, queries)
    config = _config(tmp_path / "bench.yaml", {"tasks": {"min_items": 2}})
    bench = tmp_path / "out" / "bench"
    result = _run(["build-bench", str(catalog), str(bench), "--config", str(config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["stratified_by"] == "level 1"
    test_ids = pq.read_table(bench / "test" / "products")["product_id"].to_pylist()
    assert sorted(pid[0] for pid in test_ids) == ["a", "a", "b", "b", "c", "c", "d", "d"]


def _taskless_bench(tmp_path: Path) -> tuple[Path, object]:
    products = [product_row(f"p{i}", title=f"listing number {i} here") for i in range(4)]
    queries = [query_row(f"q{i}", f"p{i}") for i in range(4)]
    catalog = _write_catalog(tmp_path / "catalog", products, queries)
    bench = tmp_path / "out" / "bench"
    return bench, _run(["build-bench", str(catalog), str(bench)])


def test_build_bench_fails_clearly_when_no_task_can_be_built(tmp_path: Path) -> None:
    _, result = _taskless_bench(tmp_path)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith("lower tasks.min_items")
    assert errors[0].startswith("error: build-bench built no task from")


def test_eval_names_a_benchmark_without_tasks(tmp_path: Path) -> None:
    bench, _ = _taskless_bench(tmp_path)
    assert (bench / "manifest.json").exists()
    result = _run(["eval", MODEL, str(bench), str(tmp_path / "out" / "eval")])
    assert result.exit_code == 2, result.output
    assert "has no task built (too few products?)" in result.stderr
    assert "not a moon2 benchmark" not in result.stderr


def test_demo_refuses_too_few_products_at_start(tmp_path: Path) -> None:
    from moon2.errors import ConfigError
    from moon2.pipeline import DemoOptions

    with pytest.raises(ConfigError, match="too few for the demo"):
        DemoOptions(products=40)
    out = tmp_path / "out" / "demo"
    result = _run(["demo", str(out), "--products", "40", "--no-ray"])
    assert result.exit_code == 2, result.output
    assert "--products 40 is too few for the demo" in result.stderr
    assert not out.exists()


# --- item 11: eval on damaged benchmarks ----------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A benchmark with t2mm and cls built and i2mm skipped (no image queries)."""
    root = tmp_path_factory.mktemp("bench")
    products = [
        product_row(f"p{i}", title=f"listing number {i} here", category=["A", f"L{i % 4}"])
        for i in range(12)
    ]
    queries = [query_row(f"q{i}", f"p{i}", query_text=f"listing {i}") for i in range(12)]
    split = ["test" if i % 2 else "train" for i in range(12)]
    catalog = _write_catalog(root / "catalog", products, queries, split)
    config = _config(
        root / "bench.yaml",
        {
            "split": {"column": "official_split"},
            "tasks": {"tasks": ["t2mm", "i2mm", "cls"], "min_items": 2},
        },
    )
    result = _run(["build-bench", str(catalog), str(root / "bench"), "--config", str(config)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((root / "bench" / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"t2mm", "cls"} and "i2mm" in manifest["skipped_tasks"]
    return root / "bench"


def _copy(built: Path, tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    shutil.copytree(built, bench)
    return bench


def _eval(bench: Path, tmp_path: Path, tasks: str):
    return _run(["eval", MODEL, str(bench), str(tmp_path / "out" / "eval"), "--tasks", tasks])


@pytest.mark.parametrize("tasks", ["t2mm", "t2mm,cls"])
def test_a_listed_task_missing_on_disk_is_an_error(built: Path, tmp_path: Path, tasks: str) -> None:
    bench = _copy(built, tmp_path)
    shutil.rmtree(bench / "test" / "tasks" / "t2mm")
    result = _eval(bench, tmp_path, tasks)
    assert result.exit_code == 2, result.output
    assert str(bench / "test" / "tasks" / "t2mm") in result.stderr.replace("\n", "")
    assert "is missing" in result.stderr


@pytest.mark.parametrize(
    ("task", "name"),
    [("t2mm", "qrels.parquet"), ("t2mm", "candidates.parquet"), ("cls", "labels.parquet")],
)
def test_a_missing_task_file_is_one_sentence(
    built: Path, tmp_path: Path, task: str, name: str
) -> None:
    bench = _copy(built, tmp_path)
    (bench / "test" / "tasks" / task / name).unlink()
    result = _eval(bench, tmp_path, task)
    assert result.exit_code == 2, result.output
    assert f"{name} is missing" in result.stderr.replace("\n", "")


def test_a_task_skipped_at_build_is_a_warning_beside_others(built: Path, tmp_path: Path) -> None:
    result = _eval(built, tmp_path, "t2mm,i2mm")
    assert result.exit_code == 0, result.output
    assert "i2mm skipped: not in the benchmark: only 0 test image queries" in result.stderr
    data = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert "t2mm" in data and "i2mm" in data["skipped"]


def test_no_task_that_can_be_evaluated_is_an_error(built: Path, tmp_path: Path) -> None:
    result = _eval(built, tmp_path, "i2mm,attr")
    assert result.exit_code == 2, result.output
    assert "none of the tasks asked for can be evaluated" in result.stderr
    assert not (tmp_path / "out" / "eval" / "results.json").exists()
