"""Issue #27, item 12 in general: the contract's optional columns (descriptions, attributes,
categories, truth_*) may be null in any row, and every stage takes such a catalog: validate,
build-bench, augment, filter, train, eval and report, with every row accounted for."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.cli import app
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row

runner = CliRunner()
ROOT = Path(__file__).parents[2]


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.rglob("*.parquet"))


def _ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def sparse_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 products in four leaves: every fourth has no description, attributes, category or
    truth, some have an empty category or attribute list; two text queries each."""
    root = tmp_path_factory.mktemp("sparse")
    leaves = [
        ["Home", "Kitchen", "Mugs"],
        ["Home", "Bath", "Towels"],
        ["Apparel", "Tops", "T-Shirts"],
        ["Apparel", "Shoes", "Sneakers"],
    ]
    products, queries = [], []
    for i in range(80):
        pid = f"p{i:03d}"
        leaf = leaves[i % 4]
        row = product_row(
            pid,
            title=f"{leaf[-1].lower()} number {i} in colour {i % 7}",
            category=leaf,
            images=[{"bytes": png_bytes((i * 3 % 256, i * 7 % 256, 90 + i % 5), 32), "path": None}],
        )
        if i % 4 == 1:
            row.update(description=None, attributes=None)
        elif i % 4 == 2:
            row.update(attributes=[], category=None)
        elif i % 4 == 3:
            row.update(description=None, category=[])
        products.append(row)
        for q in range(2):
            queries.append(query_row(f"q{i:03d}-{q}", pid, query_text=f"{leaf[-1]} {i} {q}"))
    table = products_table(products)
    truth = [None if i % 4 else (i % 8 == 0) for i in range(80)]
    kinds = [None if i % 8 else ("swap" if i % 16 == 0 else None) for i in range(80)]
    table = table.append_column("truth_is_noisy", pa.array(truth, pa.bool_()))
    table = table.append_column("truth_noise_kind", pa.array(kinds, pa.string()))
    (root / "products").mkdir()
    (root / "queries").mkdir()
    pq.write_table(table, root / "products" / "part-00000.parquet")
    pq.write_table(queries_table(queries), root / "queries" / "part-00000.parquet")
    return root


def test_every_stage_takes_null_optional_columns(sparse_catalog: Path, tiny_recipe: Path, tmp_path):
    cat = sparse_catalog
    result = runner.invoke(app, ["validate", str(cat)])
    assert result.exit_code in (0, 1) and "Traceback" not in result.output

    bench = tmp_path / "bench"
    _ok(runner.invoke(app, ["build-bench", str(cat), str(bench)]))
    built = _rows(bench / "train" / "products") + _rows(bench / "test" / "products")
    rejected = _rows(bench / "_rejects" / "products") if (bench / "_rejects").is_dir() else 0
    assert built + rejected == 80

    aug = tmp_path / "aug"
    config = ROOT / "configs" / "augment" / "demo.yaml"
    args = ["augment", str(bench / "train"), str(aug), "--no-ray", "--config", str(config)]
    _ok(runner.invoke(app, args))
    aug_rejected = _rows(aug / "_rejects") if (aug / "_rejects").is_dir() else 0
    assert _rows(aug / "products") + aug_rejected == _rows(bench / "train" / "products")

    cur = tmp_path / "cur"
    _ok(runner.invoke(app, ["filter", str(aug), str(cur)]))
    kept, removed = _rows(cur / "products"), _rows(cur / "_removed" / "products")
    cur_rejected = _rows(cur / "_rejects" / "products") if (cur / "_rejects").is_dir() else 0
    assert kept + removed + cur_rejected == _rows(aug / "products")

    run = tmp_path / "run"
    args = ["train", str(cur), str(run), "--config", str(tiny_recipe), "--max-steps", "2"]
    _ok(runner.invoke(app, args))
    _ok(runner.invoke(app, ["eval", str(run / "final"), str(bench), str(tmp_path / "eval")]))
    _ok(runner.invoke(app, ["report", str(run), "--eval", str(tmp_path / "eval")]))
    assert (run / "report" / "index.html").is_file()
