"""``moon2 filter``'s output always passes ``moon2 validate`` (issue #27, item 9): rows that
validate would reject go to filter's _rejects/ before scoring."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from moon2.cli import app
from moon2.data.validate import validate
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the chunk's CRC
    return bytes(data)


def _cell(data: bytes) -> list[dict[str, object]]:
    return [{"bytes": data, "path": None}]


def _rows(path: Path) -> int:
    files = sorted(path.glob("*.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


def test_filter_output_passes_validate(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    (catalog / "queries").mkdir()
    products = [product_row(f"p{i}", title=f"red cotton tee number {i}") for i in range(10)]
    products.append(product_row("corrupt", images=_cell(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)))
    products.append(product_row("bomb", images=_cell(bomb_png())))
    pq.write_table(products_table(products), catalog / "products" / "part-0.parquet")
    queries = [query_row(f"q{i}", f"p{i}", negative_ids=[f"p{i + 5}"]) for i in range(4)]
    queries.append(query_row("q-self", "p6", negative_ids=["p6"]))
    queries.append(query_row("q-bomb", "bomb"))
    queries.append(query_row("q-neg", "p7", negative_ids=["corrupt", "p8"]))
    pq.write_table(queries_table(queries), catalog / "queries" / "part-0.parquet")
    config = tmp_path / "cheap.yaml"  # no encoder: only the checks that need none
    config.write_text(
        yaml.safe_dump({"alignment": {"enabled": False}, "cleanlab": {"enabled": False}})
    )
    out = tmp_path / "run" / "out"

    result = CliRunner().invoke(
        app, ["-q", "filter", str(catalog), str(out), "--config", str(config)]
    )

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    report = validate(out)
    assert report.ok, [p.reason for table in report.tables for p in table.examples]
    assert sum(table.invalid_rows for table in report.tables) == 0
    counts = json.loads((out / "filter_report.json").read_text())["counts"]
    for table, rows_in in (("products", len(products)), ("queries", len(queries))):
        kept, removed = _rows(out / table), _rows(out / "_removed" / table)
        rejected = _rows(out / "_rejects" / table)
        assert rows_in == kept + removed + rejected == counts[table]["rows_in"]
    rejects = pq.read_table(out / "_rejects" / "products").to_pylist()
    reasons = {r["product_id"]: r["reject_reason"] for r in rejects}
    assert set(reasons) == {"corrupt", "bomb"}
    assert "image 0: image bytes are corrupt" in reasons["corrupt"]
    assert "image 0: image is too large to decode safely" in reasons["bomb"]
    query_rejects = pq.read_table(out / "_rejects" / "queries").to_pylist()
    reasons = {r["query_id"]: r["reject_reason"] for r in query_rejects}
    assert set(reasons) == {"q-self", "q-bomb"}
    assert "negative_ids contains the positive_id" in reasons["q-self"]
    kept = {r["query_id"]: r for r in pq.read_table(out / "queries").to_pylist()}
    assert kept["q-neg"]["negative_ids"] == ["p8"]
    assert kept["q-neg"]["cur_negatives_dropped"] == ["corrupt"]


@pytest.mark.parametrize("side", [10_000, 20_000])  # Pillow: a warning, then an error
def test_training_refuses_a_decompression_bomb_query_image(side: int) -> None:
    """moon2 train's header check of query images goes through the same strict guard."""
    from moon2.train.data import _unreadable_images

    table = queries_table(
        [
            query_row("bomb", "p1", query_image={"bytes": bomb_png(side, side), "path": None}),
            query_row("fine", "p1", query_image={"bytes": png_bytes(), "path": None}),
        ]
    )
    bad = _unreadable_images(table.column("query_image"))
    assert list(bad) == [0]
    assert "too large to decode safely" in bad[0]
