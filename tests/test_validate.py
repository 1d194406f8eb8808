"""`moon2 validate`: exit codes, messages naming file/row/id/reason, rejects."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.cli import app
from moon2.data.validate import validate
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, ["validate", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def write_products(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(products_table(rows), path)
    return path


def test_valid_products_exit_0(tmp_path):
    path = write_products(tmp_path / "p.parquet", [product_row("a"), product_row("b")])
    code, out, _ = run(path)
    assert code == 0
    assert "products:" in out and "2 rows - OK" in out
    assert "invalid rows: 0" in out
    assert "images decoded: 2" in out


def test_corrupt_image_bytes(tmp_path):
    broken = png_bytes()[:40]
    rows = [product_row("a"), product_row("b", images=[{"bytes": broken, "path": None}])]
    path = write_products(tmp_path / "p.parquet", rows)
    code, out, _ = run(path)
    assert code == 1
    assert (
        f"{path} row 1 id='b': image 0: image bytes are corrupt or truncated (PNG header, 40 bytes)"
        in out
    )
    assert "image_corrupt 1" in out


def test_missing_title_and_image(tmp_path):
    rows = [product_row("a", title="  ", images=[]), product_row("b", title=None, images=None)]
    code, out, _ = run(write_products(tmp_path / "p.parquet", rows))
    assert code == 1
    assert "row 0 id='a': no title and no image" in out
    assert "row 1 id='b': no title and no image" in out


def test_image_only_and_title_only_products_are_valid(tmp_path):
    rows = [product_row("a", title=""), product_row("b", images=None)]
    code, out, _ = run(write_products(tmp_path / "p.parquet", rows))
    assert code == 0
    assert "image-only 1" in out and "text-only 1" in out


def test_duplicate_ids_across_files(tmp_path):
    write_products(tmp_path / "d" / "part-00000.parquet", [product_row("a"), product_row("b")])
    write_products(tmp_path / "d" / "part-00001.parquet", [product_row("c"), product_row("a")])
    code, out, _ = run(tmp_path / "d")
    assert code == 1
    assert (
        "part-00001.parquet row 1 id='a': duplicate product_id (first at part-00000.parquet row 0)"
        in out
    )
    assert "invalid rows: 1" in out


def test_null_id_and_bad_attributes_and_category(tmp_path):
    rows = [
        product_row(None),
        product_row(
            "b",
            category=["Apparel", ""],
            attributes=[{"key": "color", "value": "red"}, {"key": "color", "value": "blue"}],
        ),
    ]
    code, out, _ = run(write_products(tmp_path / "p.parquet", rows))
    assert code == 1
    assert "row 0 id=None: product_id is null or empty" in out
    assert "category level 1 is null or empty" in out
    assert "attribute key 'color' appears twice" in out


def test_wrong_column_type_exit_2(tmp_path):
    table = pa.table({"product_id": ["a"], "title": pa.array([3], pa.int64())})
    pq.write_table(table, tmp_path / "p.parquet")
    code, out, err = run(tmp_path / "p.parquet")
    assert code == 2
    assert out == ""
    assert "column 'title' has type int64, expected string" in err
    assert "Traceback" not in err


def test_missing_column_exit_2(tmp_path):
    pq.write_table(pa.table({"product_id": ["a"], "name": ["x"]}), tmp_path / "p.parquet")
    code, _, err = run(tmp_path / "p.parquet", "--kind", "products")
    assert code == 2
    assert "is missing required products column(s) title" in err


def test_not_parquet_exit_2(tmp_path):
    (tmp_path / "p.parquet").write_text("id,title\n1,shirt\n" * 10)
    code, _, err = run(tmp_path / "p.parquet")
    assert code == 2
    assert f"{tmp_path / 'p.parquet'} is not a readable Parquet file" in err
    assert "Traceback" not in err


def test_empty_directory_and_missing_path_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run(tmp_path / "empty")
    assert code == 2
    assert "no Parquet files found in directory" in err
    code, _, err = run(tmp_path / "missing")
    assert code == 2
    assert "does not exist" in err


def test_unknown_table_kind_exit_2(tmp_path):
    pq.write_table(pa.table({"sku": ["a"]}), tmp_path / "x.parquet")
    code, _, err = run(tmp_path / "x.parquet")
    assert code == 2
    assert "neither a product_id nor a query_id column" in err


def test_examples_are_capped_then_counted(tmp_path):
    rows = [product_row(f"p{i}", title="", images=None) for i in range(7)]
    code, out, _ = run(write_products(tmp_path / "p.parquet", rows), "--max-examples", "3")
    assert code == 1
    assert out.count("no title and no image") == 3
    assert "... and 4 more invalid row(s)" in out


def test_rejects_dataset(tmp_path):
    rows = [product_row("a"), product_row("b", title="", images=[]), product_row("a")]
    path = write_products(tmp_path / "p.parquet", rows)
    code, _, _ = run(path, "--rejects", tmp_path / "rej", "--json", tmp_path / "r.json")
    assert code == 1
    rejects = pq.read_table(tmp_path / "rej")
    assert rejects.column("product_id").to_pylist() == ["b", "a"]
    assert rejects.column("reject_stage").to_pylist() == ["validate", "validate"]
    assert rejects.column("reject_reason").to_pylist()[0] == "no title and no image"
    assert rejects.column("title").to_pylist() == ["", "red cotton t-shirt a"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tables"][0]["invalid_rows"] == 2 and report["ok"] is False


def test_image_paths_relative_missing_and_remote(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    rows = [
        product_row("a", images=[{"bytes": None, "path": "imgs/a.png"}]),
        product_row("b", images=[{"bytes": None, "path": "https://cdn.example.com/b.jpg"}]),
        product_row("c", images=[{"bytes": None, "path": "imgs/missing.png"}]),
        product_row("d", images=[{"bytes": None, "path": None}]),
    ]
    report = validate(write_products(tmp_path / "p.parquet", rows))
    table = report.tables[0]
    assert table.images_decoded == 1 and table.images_remote == 1
    reasons = {p.record_id: p.reason for p in table.examples}
    assert reasons["c"] == f"image 0: image file {tmp_path / 'imgs' / 'missing.png'} does not exist"
    assert reasons["d"] == "image 0 has neither bytes nor path"
    assert set(reasons) == {"c", "d"}


def test_queries_rules(tmp_path):
    rows = [
        query_row("q1", "a"),
        query_row("q2", "a", query_text=None, query_image=None),
        query_row("q3", None),
        query_row("q4", "a", negative_ids=["a", ""]),
        query_row("q5", "a", query_image={"bytes": b"junk", "path": None}),
    ]
    pq.write_table(queries_table(rows), tmp_path / "q.parquet")
    code, out, _ = run(tmp_path / "q.parquet")
    assert code == 1
    assert "id='q2': no query_text and no query_image" in out
    assert "id='q3': positive_id is null or empty" in out
    assert "negative_ids contains the positive_id" in out
    assert "negative_ids holds a null or empty id" in out
    assert "id='q5': query_image: image bytes are not a recognised image format" in out
    assert "invalid rows: 4" in out


def test_catalog_directory_checks_references(tmp_path):
    write_products(
        tmp_path / "cat" / "products" / "part-00000.parquet", [product_row("a"), product_row("b")]
    )
    (tmp_path / "cat" / "queries").mkdir()
    rows = [
        query_row("q1", "a", negative_ids=["b"]),
        query_row("q2", "zz"),
        query_row("q3", "a", negative_ids=["b", "nope"]),
    ]
    pq.write_table(queries_table(rows), tmp_path / "cat" / "queries" / "part-00000.parquet")
    code, out, _ = run(tmp_path / "cat", "--rejects", tmp_path / "rej")
    assert code == 1
    assert "products: " in out and "queries: " in out
    assert "id='q2': positive_id 'zz' is not in products" in out
    assert "id='q3': negative id 'nope' is not in products" in out
    assert pq.read_table(tmp_path / "rej" / "queries").num_rows == 2
    assert not (tmp_path / "rej" / "products").exists()
    code, out, _ = run(tmp_path / "cat", "--kind", "products")
    assert code == 0 and "queries:" not in out


def test_synthetic_catalog_is_valid(small_catalog):
    report = validate(small_catalog)
    assert report.ok, [p.reason for t in report.tables for p in t.examples]
    products, queries = report.tables
    assert products.rows == 160 and queries.rows == 240
    assert products.images_decoded > 160


@pytest.mark.parametrize("check_images", [True, False])
def test_check_images_switch(tmp_path, check_images):
    rows = [product_row("a", images=[{"bytes": b"garbage", "path": None}])]
    report = validate(write_products(tmp_path / "p.parquet", rows), check_images=check_images)
    assert report.ok is (not check_images)
