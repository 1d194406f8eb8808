"""Image paths are read with limits (issue #27, item 5): only regular files, at most the size
cap, inside the image roots when they are set, and no message ever quotes a file's bytes."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.cli import app
from moon2.data import images
from moon2.data.adapters.mbe import convert_mbe
from moon2.data.images import IMAGE_ROOTS_ENV, decode_image, read_image_bytes
from moon2.data.validate import validate
from moon2.errors import ImageDecodeError
from tests.factories import png_bytes, product_row, products_table

SECRET = "SECRET-CONTENT"


def _within(seconds: float, work: Callable[[], Any]) -> Any:
    """``work()``'s result, failing (not hanging) when it takes longer than ``seconds``."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _path_error(path: str | Path, base_dir: Path | None = None, **kwargs: Any) -> str:
    def read() -> str:
        with pytest.raises(ImageDecodeError) as excinfo:
            read_image_bytes({"bytes": None, "path": str(path)}, base_dir, **kwargs)
        return str(excinfo.value)

    return _within(10, read)


@pytest.fixture
def fifo(tmp_path: Path) -> Any:
    """A FIFO nobody writes to; afterwards a writer is opened once so a reader stuck on it
    (before the fix) is released."""
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    yield path
    with contextlib.suppress(OSError):  # ENXIO: no reader is waiting
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_is_rejected_at_once() -> None:
    started = time.perf_counter()
    message = _path_error("/dev/zero")
    assert message == "image path /dev/zero is not a regular file (a device)"
    assert time.perf_counter() - started < 5


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_rejected_without_hanging(fifo: Path) -> None:
    assert _path_error(fifo) == f"image path {fifo} is not a regular file (a FIFO)"


def test_oversized_file_is_rejected_by_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(size=64))
    assert big.stat().st_size > 100
    message = _path_error(big, max_bytes=100)
    assert message == f"image file {big} is larger than the 100-byte image cap"
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100)  # the module default
    assert "larger than the 100-byte image cap" in _path_error(big)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 64 * 1024 * 1024)
    assert read_image_bytes({"bytes": None, "path": str(big)}) == big.read_bytes()
    assert images._size_text(images.MAX_IMAGE_BYTES) == "64 MB"  # "the 64 MB image cap"


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, on the fake TIFF
def test_no_message_quotes_file_contents(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(f"{SECRET} root:x:0:0\n" * 4)
    base = tmp_path / "a" / "b" / "c" / "products"
    base.mkdir(parents=True)
    with pytest.raises(ImageDecodeError) as excinfo:
        decode_image({"bytes": None, "path": "../../../../secret.txt"}, base_dir=base)
    size = secret.stat().st_size
    assert str(excinfo.value) == f"image bytes are not a recognised image format ({size} bytes)"
    for data in (SECRET.encode() * 3, b"II*\x00" + SECRET.encode(), b"BM" + SECRET.encode() * 4):
        with pytest.raises(ImageDecodeError) as excinfo:
            decode_image({"bytes": data, "path": None})
        assert "SECRET" not in str(excinfo.value)


def test_image_roots_allow_inside_and_reject_outside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    roots = tmp_path / "imgs"
    (roots / "sub").mkdir(parents=True)
    inside = roots / "sub" / "a.png"
    inside.write_bytes(png_bytes())
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    (roots / "link.png").symlink_to(outside)
    cell = {"bytes": None, "path": "sub/a.png"}
    assert read_image_bytes(cell, roots, image_roots=[roots]) == inside.read_bytes()
    for path in ("../secret.png", "link.png", str(outside), f"file://{outside}"):
        message = _path_error(path, roots, image_roots=[roots])
        assert message.endswith("is outside the allowed image roots"), message
    # MOON2_IMAGE_ROOTS does the same for every reader; unset, nothing is limited
    assert read_image_bytes({"bytes": None, "path": str(outside)}) == outside.read_bytes()
    monkeypatch.setenv(IMAGE_ROOTS_ENV, os.pathsep.join([str(tmp_path / "x"), str(roots)]))
    assert "outside the allowed image roots" in _path_error(outside)
    assert read_image_bytes(cell, roots) == inside.read_bytes()


def _catalog_with_bad_paths(root: Path, fifo: Path) -> Path:
    """products/ with a good image file, /dev/zero, a FIFO and a ``..`` path to a secret."""
    (root / "secret.txt").write_text(SECRET * 10)
    products = root / "shop" / "catalog" / "products"
    (products / "imgs").mkdir(parents=True)
    (products / "imgs" / "ok.png").write_bytes(png_bytes())

    def cell(path: str) -> list[dict[str, Any]]:
        return [{"bytes": None, "path": path}]

    rows = [
        product_row("ok", images=cell("imgs/ok.png")),
        product_row("zero", images=cell("/dev/zero")),
        product_row("fifo", images=cell(str(fifo))),
        product_row("secret", images=cell("../../../secret.txt")),
    ]
    pq.write_table(products_table(rows), products / "part-0.parquet")
    return products


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero and FIFOs")
def test_validate_cli_rejects_special_paths_quickly_and_quietly(tmp_path: Path, fifo: Path) -> None:
    products = _catalog_with_bad_paths(tmp_path, fifo)
    rejects = tmp_path / "out" / "rejects"
    report = tmp_path / "out" / "report.json"
    args = ["-q", "validate", str(products), "--rejects", str(rejects), "--json", str(report)]
    result = _within(60, lambda: CliRunner().invoke(app, args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "SECRET" not in result.output
    assert "not a regular file (a device)" in result.output
    assert "not a regular file (a FIFO)" in result.output
    assert "not a recognised image format (140 bytes)" in result.output
    rejected = pq.read_table(rejects).to_pylist()
    assert sorted(r["product_id"] for r in rejected) == ["fifo", "secret", "zero"]
    assert "SECRET" not in str(rejected) and "SECRET" not in report.read_text()
    assert json.loads(report.read_text())["tables"][0]["valid_rows"] == 1
    # with --image-root, the path out of the catalog is not even read
    args = ["-q", "validate", str(products), "--image-root", str(products / "imgs")]
    result = _within(60, lambda: CliRunner().invoke(app, args))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("is outside the allowed image roots") == 3
    assert "image_not_allowed 3" in result.output


def test_validate_api_takes_image_roots(tmp_path: Path, fifo: Path) -> None:
    products = _catalog_with_bad_paths(tmp_path, fifo)
    report = validate(products, image_roots=[tmp_path])
    assert report.tables[0].invalid_rows == 3
    # /dev/zero is outside; the FIFO and the secret are inside, and still refused
    assert report.tables[0].reason_counts == {"image_not_allowed": 1, "image_corrupt": 2}


def _jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_convert_mbe_rejects_relative_paths_out_of_the_source(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text(SECRET)
    source = tmp_path / "mbe"
    (source / "imgs").mkdir(parents=True)
    (source / "imgs" / "a.png").write_bytes(png_bytes())

    def record(record_id: str, image: str, **extra: str) -> dict[str, Any]:
        return {"id": record_id, "doc_title": f"tee {record_id}", "doc_image": image, **extra}

    _jsonl(
        source / "data" / "train.jsonl",
        [
            record("inside", "../imgs/a.png"),  # another folder of SRC: fine
            record("escape", "../../secret.txt"),
            record("query-escape", "../imgs/a.png", query="tee", query_image="../../secret.txt"),
        ],
    )
    out = tmp_path / "out"
    result = convert_mbe(source, out)
    assert result.rows_in == result.products + result.rejected
    products = {r["product_id"]: r for r in pq.read_table(out / "products").to_pylist()}
    assert set(products) == {"inside", "query-escape"}
    assert products["inside"]["images"][0]["path"] == str((source / "imgs" / "a.png").resolve())
    rejects = pq.read_table(out / "_rejects" / "products").to_pylist()
    assert [r["product_id"] for r in rejects] == ["escape"]
    assert "leads outside the source folder" in rejects[0]["reject_reason"]
    assert rejects[0]["images"][0]["path"] == "../../secret.txt"  # as written, not resolved
    query_rejects = pq.read_table(out / "_rejects" / "queries").to_pylist()
    assert "query_image path leads outside" in query_rejects[0]["reject_reason"]
    assert query_rejects[0]["query_image"]["path"] == "../../secret.txt"
    assert validate(out / "products").ok


def test_convert_mbe_cli_escape_is_a_reject_not_an_error(tmp_path: Path) -> None:
    source = _jsonl(
        tmp_path / "src" / "a.jsonl",
        [{"id": "1", "doc_title": "tee", "doc_image": "../../../../etc/passwd"}],
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["-q", "convert", "mbe", str(source), str(out)])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "0 products" in result.output and "1 rejected" in result.output
    rejected = pq.read_table(out / "_rejects" / "products").to_pylist()
    assert rejected[0]["images"][0]["path"] == "../../../../etc/passwd"
