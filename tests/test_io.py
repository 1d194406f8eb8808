"""Dataset resolution, streaming reads and atomic part writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon2.data.io import PartWriter, count_rows, iter_batches, resolve_files, write_table
from moon2.data.schema import PRODUCTS
from moon2.errors import InputError
from tests.factories import product_row, products_table


def _write(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(products_table([product_row(i) for i in ids]), path)


def test_resolve_file_directory_and_glob(tmp_path):
    _write(tmp_path / "d" / "part-00001.parquet", ["b"])
    _write(tmp_path / "d" / "part-00000.parquet", ["a"])
    _write(tmp_path / "d" / "sub" / "x.parquet", ["c"])
    _write(tmp_path / "d" / "_rejects" / "part-00000.parquet", ["r"])
    _write(tmp_path / "d" / ".part-00002.parquet.tmp-1-abc", ["t"])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    names = [p.relative_to(tmp_path / "d").as_posix() for p in resolve_files(tmp_path / "d")]
    assert names == ["part-00000.parquet", "part-00001.parquet", "sub/x.parquet"]
    assert resolve_files(tmp_path / "d" / "part-00000.parquet") == [
        tmp_path / "d" / "part-00000.parquet"
    ]
    globbed = resolve_files(str(tmp_path / "d" / "part-*.parquet"))
    assert [p.name for p in globbed] == ["part-00000.parquet", "part-00001.parquet"]


def test_resolve_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_files(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no Parquet files found in directory"):
        resolve_files(tmp_path / "empty")
    with pytest.raises(InputError, match="no files match"):
        resolve_files(str(tmp_path / "*.parquet"))


def test_iter_batches_streams_with_file_offsets(tmp_path):
    _write(tmp_path / "p" / "part-00000.parquet", [f"a{i}" for i in range(5)])
    _write(tmp_path / "p" / "part-00001.parquet", [f"b{i}" for i in range(3)])
    batches = list(iter_batches(tmp_path / "p", PRODUCTS, batch_rows=2))
    assert [(b.file.name, b.offset, b.num_rows) for b in batches] == [
        ("part-00000.parquet", 0, 2),
        ("part-00000.parquet", 2, 2),
        ("part-00000.parquet", 4, 1),
        ("part-00001.parquet", 0, 2),
        ("part-00001.parquet", 2, 1),
    ]
    assert count_rows(tmp_path / "p") == 8
    ids = [pid for b in batches for pid in b.table.column("product_id").to_pylist()]
    assert ids == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(3)]


def test_iter_batches_checks_every_file_before_yielding(tmp_path):
    _write(tmp_path / "p" / "part-00000.parquet", ["a"])
    pq.write_table(pa.table({"product_id": ["b"]}), tmp_path / "p" / "part-00001.parquet")
    with pytest.raises(InputError, match=r"part-00001\.parquet is missing required"):
        next(iter_batches(tmp_path / "p", PRODUCTS))


def test_part_writer_rolls_parts_and_replaces_old_output(tmp_path):
    schema = PRODUCTS.arrow_schema(strict=False)
    out = tmp_path / "out"
    _write(out / "part-00007.parquet", ["stale"])
    with PartWriter(out, schema, rows_per_part=3) as writer:
        writer.write(products_table([product_row(str(i)) for i in range(4)]))
        writer.write(products_table([product_row(str(i)) for i in range(4, 7)]))
    assert [p.name for p in sorted(out.iterdir())] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [pq.read_metadata(p).num_rows for p in sorted(out.iterdir())] == [3, 3, 1]
    assert writer.rows_written == 7


def test_part_writer_exception_leaves_no_partial_file(tmp_path):
    schema = PRODUCTS.arrow_schema(strict=False)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), PartWriter(out, schema, rows_per_part=10) as writer:
        writer.write(products_table([product_row("a"), product_row("b")]))
        raise RuntimeError("crash in the middle of a part")
    assert not out.exists() or list(out.iterdir()) == []


def test_write_table_exception_leaves_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "t.parquet"
    write_table(products_table([product_row("old")]), target)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        write_table(products_table([product_row("new")]), target)
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]
    assert pq.read_table(target).column("product_id").to_pylist() == ["old"]


def test_killed_writer_leaves_only_a_hidden_temp_file(tmp_path):
    """SIGKILL in the middle of a part: readers never see a half-written file."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from moon2.data.io import PartWriter
        from moon2.data.schema import PRODUCTS
        from tests.factories import product_row, products_table
        writer = PartWriter({str(out)!r}, PRODUCTS.arrow_schema(strict=False), rows_per_part=100)
        writer.write(products_table([product_row(str(i)) for i in range(10)]))
        print("written", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    leftovers = [p.name for p in out.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".part-00000.parquet.tmp-")
    with pytest.raises(InputError, match="no Parquet files found"):
        resolve_files(out)
    # the next run clears the stale temporary file
    with PartWriter(out, PRODUCTS.arrow_schema(strict=False)) as writer:
        writer.write(products_table([product_row("a")]))
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
