"""The MBE v1 adapter: ``moon2 convert mbe`` from .json / .jsonl / .parquet into products/."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.cli import app
from moon2.data.adapters.mbe import STAGE, convert_mbe, parse_attributes, parse_images
from moon2.data.validate import validate
from moon2.errors import InputError
from tests.factories import png_bytes

PNG = png_bytes(size=8)


def _record(record_id: Any, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": record_id,
        "doc_title": f"title {record_id}",
        "doc_image": f"https://img.example.com/{record_id}.jpg",
        "doc_industry_name": "服饰",
        "doc_cate1_name": "女装",
        "doc_cate2_name": "上衣",
        "doc_cate3_name": "",
        "doc_cate4_name": None,
        "doc_attributes": "颜色:红色",
    }
    record.update(fields)
    return record


# Every attribute form and image form the adapter accepts, one record each.
RECORDS: list[dict[str, Any]] = [
    _record(
        1001,
        doc_title="红色纯棉T恤 女",
        doc_attributes="颜色:红色!!!蓝色,,材质:棉,,颜色:白色!!!红色,,尺码：XL,,加厚",
        doc_price=59.9,
        doc_tags=["新品", "热卖"],
        doc_meta={"shop": "A店", "score": 4.5},
    ),
    _record(
        "1002",
        doc_title="",
        doc_image="https://img.example.com/2a.jpg, https://img.example.com/2b.jpg",
        doc_attributes='{"品牌": "Acme", "颜色": ["黑", "白"]}',
    ),
    _record(
        1003,
        doc_image=None,
        doc_industry_name="",
        doc_cate1_name="",
        doc_cate2_name="  ",
        doc_attributes={"风格": "简约!!!百搭", "季节": ""},
    ),
    _record(
        1004,
        doc_image={"bytes": base64.b64encode(PNG).decode(), "path": None},
        doc_cate3_name="T恤",
        doc_cate4_name="短袖",
        doc_attributes=[{"key": "产地", "value": "浙江"}, ["季节", "夏季"]],
    ),
    _record(1005, doc_attributes='[{"key": "领型", "value": "圆领"}]'),
    _record(1006, doc_attributes=None),
]


def _write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_parquet(path: Path, records: list[dict[str, Any]], schema: pa.Schema) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=schema), path)
    return path


def _products(out: Path) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(out / "products").to_pylist()
    by_id = {row["product_id"]: row for row in rows}
    assert len(by_id) == len(rows)
    return by_id


def _rejects(out: Path) -> list[dict[str, Any]]:
    parts = sorted((out / "_rejects" / "products").glob("part-*.parquet"))
    return [row for part in parts for row in pq.read_table(part).to_pylist()]


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _url(path: str) -> dict[str, Any]:
    return {"bytes": None, "path": path}


# --- field mapping ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_field_mapping_from_json_and_jsonl(tmp_path: Path, suffix: str) -> None:
    write = _write_json if suffix == ".json" else _write_jsonl
    src = write(tmp_path / f"mbe{suffix}", RECORDS)
    out = tmp_path / "out"

    result = convert_mbe(src, out)

    assert (result.rows_in, result.products, result.rejected) == (6, 6, 0)
    products = _products(out)
    assert sorted(products) == ["1001", "1002", "1003", "1004", "1005", "1006"]

    first = products["1001"]
    assert first["title"] == "红色纯棉T恤 女"
    assert first["description"] is None
    assert first["category"] == ["女装", "上衣"]  # "" and null levels dropped
    assert first["attributes"] == [
        {"key": "颜色", "value": "红色|蓝色|白色"},  # repeated key merged, "!!!" -> "|"
        {"key": "材质", "value": "棉"},
        {"key": "尺码", "value": "XL"},  # full-width colon
        {"key": "加厚", "value": ""},  # an item without a colon
    ]
    assert first["images"] == [_url("https://img.example.com/1001.jpg")]
    assert first["mbe_industry_name"] == "服饰"
    assert first["mbe_doc_price"] == "59.9"
    assert json.loads(first["mbe_doc_tags"]) == ["新品", "热卖"]
    assert first["mbe_doc_meta"] == '{"shop": "A店", "score": 4.5}'  # JSON text, not escaped

    second = products["1002"]
    assert second["title"] == ""
    assert second["images"] == [
        _url("https://img.example.com/2a.jpg"),
        _url("https://img.example.com/2b.jpg"),
    ]
    assert second["attributes"] == [
        {"key": "品牌", "value": "Acme"},
        {"key": "颜色", "value": "黑|白"},
    ]
    assert second["mbe_doc_price"] is None  # an extra column missing from a record is null

    third = products["1003"]
    assert third["images"] is None
    assert third["category"] is None  # every level empty
    assert third["mbe_industry_name"] is None
    assert third["attributes"] == [
        {"key": "风格", "value": "简约|百搭"},
        {"key": "季节", "value": ""},
    ]

    fourth = products["1004"]
    assert fourth["images"] == [{"bytes": PNG, "path": None}]  # base64 in JSON -> bytes
    assert fourth["category"] == ["女装", "上衣", "T恤", "短袖"]
    assert fourth["attributes"] == [
        {"key": "产地", "value": "浙江"},
        {"key": "季节", "value": "夏季"},
    ]
    assert products["1005"]["attributes"] == [{"key": "领型", "value": "圆领"}]
    assert products["1006"]["attributes"] is None

    schema = pq.read_schema(next((out / "products").glob("part-*.parquet")))
    assert schema.names[:6] == [
        "product_id",
        "title",
        "description",
        "category",
        "attributes",
        "images",
    ]
    assert set(schema.names[6:]) == {
        "mbe_industry_name",
        "mbe_split",
        "mbe_doc_price",
        "mbe_doc_tags",
        "mbe_doc_meta",
    }
    assert all(schema.field(n).type == pa.string() for n in schema.names[6:])


def test_industry_as_root(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "mbe.jsonl", RECORDS)

    convert_mbe(src, tmp_path / "out", industry_as_root=True)

    products = _products(tmp_path / "out")
    assert products["1001"]["category"] == ["服饰", "女装", "上衣"]
    assert products["1004"]["category"] == ["服饰", "女装", "上衣", "T恤", "短袖"]
    assert products["1003"]["category"] is None  # no industry and no levels
    assert products["1001"]["mbe_industry_name"] == "服饰"
    assert _manifest(tmp_path / "out")["industry_as_root"] is True


def test_parquet_input_with_typed_columns(tmp_path: Path) -> None:
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("doc_title", pa.string()),
            ("doc_image", pa.string()),
            ("doc_industry_name", pa.string()),
            ("doc_cate1_name", pa.string()),
            ("doc_cate2_name", pa.string()),
            ("doc_cate3_name", pa.string()),
            ("doc_cate4_name", pa.string()),
            ("doc_attributes", pa.string()),
            ("doc_sales", pa.int32()),
            ("doc_shop", pa.struct([("name", pa.string()), ("level", pa.int8())])),
            ("doc_ids", pa.list_(pa.int64())),
        ]
    )
    records = [
        _record(
            7,
            doc_image="https://img.example.com/a.jpg;https://img.example.com/b.jpg",
            doc_attributes="颜色:红色!!!蓝色,,颜色:蓝色,,材质：棉",
            doc_sales=12,
            doc_shop={"name": "旗舰店", "level": 3},
            doc_ids=[1, 2],
        ),
        _record(
            8,
            doc_title=None,
            doc_attributes='{"品牌": "Acme"}',
            doc_sales=None,
            doc_shop=None,
            doc_ids=None,
        ),
    ]
    src = _write_parquet(tmp_path / "mbe.parquet", records, schema)

    result = convert_mbe(src, tmp_path / "out")

    assert (result.rows_in, result.products, result.rejected) == (2, 2, 0)
    products = _products(tmp_path / "out")
    assert sorted(products) == ["7", "8"]  # integer ids become strings
    seven = products["7"]
    assert seven["images"] == [
        _url("https://img.example.com/a.jpg"),
        _url("https://img.example.com/b.jpg"),
    ]
    assert seven["attributes"] == [
        {"key": "颜色", "value": "红色|蓝色"},
        {"key": "材质", "value": "棉"},
    ]
    assert seven["category"] == ["女装", "上衣"]
    assert seven["mbe_doc_sales"] == "12"
    assert json.loads(seven["mbe_doc_shop"]) == {"name": "旗舰店", "level": 3}
    assert seven["mbe_doc_ids"] == "[1, 2]"
    eight = products["8"]
    assert eight["title"] == ""  # a null title with an image is an image-only product
    assert eight["attributes"] == [{"key": "品牌", "value": "Acme"}]
    assert (eight["mbe_doc_sales"], eight["mbe_doc_shop"], eight["mbe_doc_ids"]) == (
        None,
        None,
        None,
    )
    assert result.extra_columns == ["mbe_doc_sales", "mbe_doc_shop", "mbe_doc_ids"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("颜色:红色!!!蓝色,,材质:棉", [("颜色", "红色|蓝色"), ("材质", "棉")]),
        ("颜色:红色,,颜色:蓝色,,颜色:红色", [("颜色", "红色|蓝色")]),
        ("颜色:红色!!!红色", [("颜色", "红色")]),
        ("尺码：XL；颜色：黑", [("尺码", "XL"), ("颜色", "黑")]),
        ("a:1;b:2", [("a", "1"), ("b", "2")]),
        ("a:1\nb:2", [("a", "1"), ("b", "2")]),
        ("网址:http://x.com/a", [("网址", "http://x.com/a")]),  # only the first colon splits
        ("加厚,,防水", [("加厚", ""), ("防水", "")]),
        (":无键,,颜色:红", [("颜色", "红")]),  # an empty key is dropped
        ("[限量] 款", [("[限量] 款", "")]),  # starts with a bracket but is not JSON
        ('{"a": "1", "b": ["x", "y"]}', [("a", "1"), ("b", "x|y")]),
        ('[["a", "1"], {"key": "b", "value": "2"}]', [("a", "1"), ("b", "2")]),
        ({"a": 1, "b": None}, [("a", "1"), ("b", "")]),
        ([{"key": "a", "value": "x!!!y"}, ("b", 2), "c:3"], [("a", "x|y"), ("b", "2"), ("c", "3")]),
        ([{"a": "1"}, {"a": "2"}], [("a", "1|2")]),
    ],
)
def test_parse_attributes_forms(value: Any, expected: list[tuple[str, str]]) -> None:
    assert parse_attributes(value) == [{"key": k, "value": v} for k, v in expected]


@pytest.mark.parametrize("value", [None, "", "   ", "[]", "{}", [], {}, ",,", ":x"])
def test_parse_attributes_empty_is_none(value: Any) -> None:
    assert parse_attributes(value) is None


@pytest.mark.parametrize(
    ("value", "paths"),
    [
        ("https://a.com/1.jpg", ["https://a.com/1.jpg"]),
        ("  https://a.com/1.jpg  ", ["https://a.com/1.jpg"]),
        ("https://a.com/1.jpg,https://a.com/2.jpg", ["https://a.com/1.jpg", "https://a.com/2.jpg"]),
        ("https://a.com/1.jpg ; s3://b/2.jpg", ["https://a.com/1.jpg", "s3://b/2.jpg"]),
        # a comma inside one URL (image-processing parameters) does not split it
        (
            "https://a.com/1.jpg?x-oss-process=image/resize,w_800",
            ["https://a.com/1.jpg?x-oss-process=image/resize,w_800"],
        ),
        (
            '["https://a.com/1.jpg", "https://a.com/2.jpg"]',
            ["https://a.com/1.jpg", "https://a.com/2.jpg"],
        ),
        (["https://a.com/1.jpg", "", None, "imgs/2.jpg"], ["https://a.com/1.jpg", "imgs/2.jpg"]),
        ("imgs/1.jpg", ["imgs/1.jpg"]),
    ],
)
def test_parse_images_paths(value: Any, paths: list[str]) -> None:
    assert parse_images(value) == [_url(p) for p in paths]


def test_parse_images_bytes_and_empty() -> None:
    assert parse_images(PNG) == [{"bytes": PNG, "path": None}]
    assert parse_images({"bytes": PNG, "path": "a.png"}) == [{"bytes": PNG, "path": "a.png"}]
    encoded = base64.b64encode(PNG).decode()
    assert parse_images([{"bytes": encoded, "path": ""}]) == [{"bytes": PNG, "path": None}]
    for empty in (None, "", "  ", [], {"bytes": None, "path": None}, [None, ""]):
        assert parse_images(empty) is None


# --- inputs -------------------------------------------------------------------------------


def test_directory_of_mixed_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _write_json(src / "a.json", [_record(1), _record(2)])
    _write_jsonl(src / "b.jsonl", [_record(3), _record(1, doc_title="again")])
    parquet_schema = pa.schema(
        [
            ("id", pa.string()),
            ("doc_title", pa.string()),
            ("doc_image", pa.string()),
            ("doc_origin", pa.string()),
        ]
    )
    _write_parquet(
        src / "sub" / "c.parquet",
        [{"id": "4", "doc_title": "four", "doc_image": None, "doc_origin": "p"}],
        parquet_schema,
    )
    (src / "notes.txt").write_text("not data")
    # files and directories named "_*" or ".*" are not data, as everywhere in moon2
    _write_jsonl(src / "_rejects" / "x.jsonl", [_record(90)])
    _write_jsonl(src / ".cache" / "y.jsonl", [_record(91)])
    _write_jsonl(src / ".hidden.jsonl", [_record(92)])
    out = tmp_path / "out"

    result = convert_mbe(src, out)

    assert (result.rows_in, result.products, result.rejected) == (5, 4, 1)
    assert sorted(_products(out)) == ["1", "2", "3", "4"]
    assert _products(out)["4"]["mbe_doc_origin"] == "p"
    assert _products(out)["1"]["mbe_doc_origin"] is None
    rejects = _rejects(out)
    assert [r["reject_reason"] for r in rejects] == [
        "b.jsonl row 1: repeated id (first at a.json row 0)"
    ]
    assert rejects[0]["title"] == "again"  # the rejected row keeps its data
    manifest = _manifest(out)
    assert manifest["source"] == [
        str(src / "a.json"),
        str(src / "b.jsonl"),
        str(src / "sub" / "c.parquet"),
    ]


def test_glob_source(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "p1.jsonl", [_record(1)])
    _write_jsonl(tmp_path / "p2.jsonl", [_record(2)])
    _write_json(tmp_path / "other.json", [_record(3)])

    result = convert_mbe(str(tmp_path / "p*.jsonl"), tmp_path / "out")

    assert result.products == 2
    assert sorted(_products(tmp_path / "out")) == ["1", "2"]


def test_json_with_byte_order_mark(tmp_path: Path) -> None:
    src = tmp_path / "bom.json"
    src.write_text("\ufeff" + json.dumps([_record(1), _record(2)], indent=1), encoding="utf-8")

    result = convert_mbe(src, tmp_path / "out")

    assert (result.rows_in, result.products, result.rejected) == (2, 2, 0)


def test_empty_source_file_writes_manifest(tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_text("\n\n", encoding="utf-8")

    result = convert_mbe(src, tmp_path / "out")

    assert (result.rows_in, result.products, result.rejected) == (0, 0, 0)
    manifest = _manifest(tmp_path / "out")
    assert (manifest["rows_in"], manifest["products"], manifest["rejected"]) == (0, 0, 0)


def test_json_array_element_that_is_not_an_object(tmp_path: Path) -> None:
    src = _write_json(tmp_path / "mbe.json", [_record(1), 5, "x"])

    result = convert_mbe(src, tmp_path / "out")

    assert (result.rows_in, result.products, result.rejected) == (3, 1, 2)
    assert [r["reject_reason"] for r in _rejects(tmp_path / "out")] == [
        "mbe.json row 1: element is a int, not an object",
        "mbe.json row 2: element is a str, not an object",
    ]


def test_invalid_json_array_is_input_error(tmp_path: Path) -> None:
    src = tmp_path / "broken.json"
    src.write_text('[{"id": 1}, {"id": ', encoding="utf-8")

    with pytest.raises(InputError, match=r"broken\.json is not valid JSON"):
        convert_mbe(src, tmp_path / "out")


def test_missing_path_and_empty_directory_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        convert_mbe(tmp_path / "nope.jsonl", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no data here")
    _write_jsonl(empty / "_skip" / "a.jsonl", [_record(1)])
    with pytest.raises(InputError, match=r"no \.json, \.jsonl or \.parquet files found"):
        convert_mbe(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- rejects, accounting, manifest, validation --------------------------------------------


@pytest.fixture()
def messy_jsonl(tmp_path: Path) -> Path:
    return _write_jsonl(
        tmp_path / "src.jsonl",
        [
            _record(1),  # row 0
            {"doc_title": "no id", "doc_image": "https://img.example.com/x.jpg"},  # row 1
            _record("  "),  # row 2: a blank id is a missing id
            _record(2, doc_title="", doc_image=""),  # row 3: neither title nor image
            _record(1, doc_title="dup"),  # row 4
            '{"id": 3, "doc_title": ',  # row 5: malformed line
            "",  # row 6: blank line, skipped and not counted
            "[1, 2]",  # row 7: not an object
            _record(3, doc_image=None),  # row 8: text-only, fine
            _record(4, doc_title=None),  # row 9: image-only, fine
        ],
    )


def test_rejects_reasons_and_accounting(messy_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = convert_mbe(messy_jsonl, out)

    assert result.rows_in == 9
    assert (result.products, result.rejected) == (3, 6)
    assert result.rows_in == result.products + result.rejected
    assert sorted(_products(out)) == ["1", "3", "4"]
    assert _products(out)["1"]["title"] == "title 1"  # the first of a repeated id wins
    assert result.reasons == {
        "missing id": 2,
        "no doc_title and no doc_image": 1,
        "repeated id": 1,
        "line is not valid JSON": 1,
        "line holds a list, not an object": 1,
    }
    rejects = _rejects(out)
    assert {r["reject_stage"] for r in rejects} == {STAGE} == {"convert-mbe"}
    reasons = [r["reject_reason"] for r in rejects]
    assert reasons[:4] == [
        "src.jsonl row 1: missing id",
        "src.jsonl row 2: missing id",
        "src.jsonl row 3: no doc_title and no doc_image",
        "src.jsonl row 4: repeated id (first at src.jsonl row 0)",
    ]
    assert reasons[4].startswith("src.jsonl row 5: line is not valid JSON (")
    assert reasons[5] == "src.jsonl row 7: line holds a list, not an object"
    by_reason = dict(zip(reasons, rejects, strict=True))
    assert by_reason["src.jsonl row 1: missing id"]["title"] == "no id"
    assert by_reason["src.jsonl row 1: missing id"]["product_id"] is None
    assert by_reason["src.jsonl row 4: repeated id (first at src.jsonl row 0)"]["title"] == "dup"
    malformed = rejects[4]
    assert malformed["product_id"] is None
    assert malformed["mbe_parse_error"].startswith("line is not valid JSON")
    assert rejects[0]["mbe_parse_error"] is None


def test_manifest_contents(messy_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_mbe(messy_jsonl, out)

    assert _manifest(out) == {
        "stage": "convert-mbe",
        "source": [str(messy_jsonl)],
        "industry_as_root": False,
        "split": "inferred from file names",
        "rows_in": 9,
        "products": 3,
        "merged_repeats": 0,
        "rejected": 6,
        "reject_reasons": {
            "missing id": 2,
            "no doc_title and no doc_image": 1,
            "repeated id": 1,
            "line is not valid JSON": 1,
            "line holds a list, not an object": 1,
        },
        "queries": 0,
        "queries_rejected": 0,
        "query_columns": {"text": None, "image": None, "query_id": None, "negatives": None},
        "extra_columns": [],
    }


def test_output_validates_cleanly(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "mbe.jsonl", RECORDS)
    out = tmp_path / "out"
    convert_mbe(src, out)

    report = validate(out / "products")

    assert report.ok
    (table,) = report.tables
    assert (table.kind, table.rows, table.invalid_rows) == ("products", 6, 0)
    # 1001, 1002 (two URLs), 1005, 1006 are URLs: remote, not invalid; 1004 is embedded bytes
    assert (table.images_remote, table.images_decoded) == (5, 1)
    assert dict(table.modality) == {"text+image": 4, "image-only": 1, "text-only": 1}
    # as a catalog directory: products/ is found, _rejects/ is not data
    assert [t.rows for t in validate(out).tables] == [6]


def test_rerun_replaces_output(messy_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert_mbe(messy_jsonl, out)
    convert_mbe(messy_jsonl, out)
    assert len(pq.read_table(out / "products")) == 3
    assert len(_rejects(out)) == 6

    clean = _write_jsonl(tmp_path / "clean.jsonl", [_record(50), _record(51)])
    result = convert_mbe(clean, out, rows_per_part=1)

    assert (result.products, result.rejected) == (2, 0)
    assert sorted(_products(out)) == ["50", "51"]
    assert sorted(p.name for p in (out / "products").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
    ]
    assert _rejects(out) == []
    assert _manifest(out)["source"] == [str(clean)]


# --- CLI ----------------------------------------------------------------------------------


def test_cli_convert_mbe(messy_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    result = CliRunner().invoke(app, ["-q", "convert", "mbe", str(messy_jsonl), str(out)])

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"9 records -> 3 products in {out}/products, 6 rejected (missing id: 2, "
        "no doc_title and no doc_image: 1, repeated id: 1, line is not valid JSON: 1, "
        "line holds a list, not an object: 1)"
    )
    assert sorted(_products(out)) == ["1", "3", "4"]


def test_cli_convert_mbe_industry_as_root(tmp_path: Path) -> None:
    src = _write_json(tmp_path / "mbe.json", [_record(1)])
    out = tmp_path / "out"

    result = CliRunner().invoke(
        app, ["-q", "convert", "mbe", str(src), str(out), "--industry-as-root"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"1 records -> 1 products in {out}/products, 0 rejected"
    assert _products(out)["1"]["category"] == ["服饰", "女装", "上衣"]


def test_cli_input_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "missing"
    result = runner.invoke(app, ["-q", "convert", "mbe", str(missing), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert f"{missing} does not exist" in result.output

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["-q", "convert", "mbe", str(empty), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no .json, .jsonl or .parquet files found" in result.output
    assert "Traceback" not in result.output


def test_relative_local_images_become_absolute_and_validate(tmp_path: Path) -> None:
    source = tmp_path / "mbe"
    (source / "imgs").mkdir(parents=True)
    (source / "imgs" / "a.png").write_bytes(PNG)
    _write_jsonl(source / "part.jsonl", [_record("a", doc_image="imgs/a.png")])
    out = tmp_path / "out"
    convert_mbe(source / "part.jsonl", out)
    images = _products(out)["a"]["images"]
    assert images == [_url(str((source / "imgs" / "a.png").resolve()))]
    report = validate(out / "products")
    assert report.ok and report.tables[0].images_decoded == 1


def test_integral_float_ids_nan_extras_and_reserved_names(tmp_path: Path) -> None:
    records = [
        _record(1.0, doc_score=float("nan"), industry_name="dup"),
        _record(2.5, doc_score=3.0, industry_name="x"),
    ]
    out = tmp_path / "out"
    convert_mbe(_write_jsonl(tmp_path / "f.jsonl", records), out)
    products = _products(out)
    assert set(products) == {"1", "2.5"}
    assert products["1"]["mbe_doc_score"] is None
    assert products["2.5"]["mbe_doc_score"] == "3.0"
    assert products["1"]["mbe_src_industry_name"] == "dup"
    assert products["1"]["mbe_industry_name"] == "服饰"


def test_unsupported_file_type_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,doc_title\n1,x\n")
    with pytest.raises(InputError, match=r"data\.csv is not a \.json, \.jsonl"):
        convert_mbe(path, tmp_path / "out")


def test_query_document_pairs_become_queries_and_merge_repeated_products(tmp_path: Path) -> None:
    records = [
        _record("d1", query="red tee", query_id="q1", neg_ids="d2,d3"),
        _record("d1", query="cotton t-shirt", query_id="q2"),  # the same product, bought again
        _record("d2", query=None, query_image="https://img.example.com/q3.jpg", query_id="q3"),
        _record("d2", doc_title="other title", query="x", query_id="q4"),  # conflicting repeat
        _record("d3"),  # product only
        _record("d4", query="mug", query_id="q1"),  # repeated query id
    ]
    src = _write_jsonl(tmp_path / "mbe_train.jsonl", records)
    out = tmp_path / "out"
    result = convert_mbe(src, out)
    assert (result.products, result.merged_repeats, result.rejected) == (4, 1, 1)
    assert (result.queries, result.queries_rejected) == (3, 2)
    products = _products(out)
    assert set(products) == {"d1", "d2", "d3", "d4"}
    assert {p["mbe_split"] for p in products.values()} == {"train"}
    queries = {q["query_id"]: q for q in pq.read_table(out / "queries").to_pylist()}
    assert set(queries) == {"q1", "q2", "q3"}
    assert queries["q1"]["negative_ids"] == ["d2", "d3"]
    assert queries["q1"]["positive_id"] == "d1" and queries["q1"]["query_text"] == "red tee"
    assert queries["q3"]["query_image"] == _url("https://img.example.com/q3.jpg")
    assert queries["q3"]["query_text"] is None
    rejected = pq.read_table(out / "_rejects" / "queries").to_pylist()
    assert sorted(r["reject_reason"] for r in rejected) == [
        "mbe_train.jsonl row 3: its product was rejected (repeated id (first at "
        "mbe_train.jsonl row 2))",
        "mbe_train.jsonl row 5: repeated query id q1",
    ]
    assert _manifest(out)["query_columns"] == {
        "text": "query",
        "image": "query_image",
        "query_id": "query_id",
        "negatives": "neg_ids",
    }


def test_split_column_drives_build_bench(tmp_path: Path) -> None:
    from moon2.bench.build import build_bench
    from moon2.bench.config import BenchConfig

    source = tmp_path / "mbe"
    train = [
        _record(
            f"t{i}",
            doc_title=f"train product number {i}",
            query=f"query {i}",
            query_id=f"tq{i}",
            doc_cate3_name=f"leaf{i % 2}",
        )
        for i in range(12)
    ]
    test = [
        _record(
            f"e{i}",
            doc_title=f"test product number {i}",
            query=f"query {i}",
            query_id=f"eq{i}",
            doc_cate3_name=f"leaf{i % 2}",
        )
        for i in range(8)
    ]
    _write_jsonl(source / "train.jsonl", train)
    _write_jsonl(source / "test.jsonl", test)
    catalog = tmp_path / "catalog"
    convert_mbe(source, catalog)
    config = BenchConfig.model_validate(
        {"split": {"column": "mbe_split"}, "tasks": {"min_items": 2}}
    )
    manifest = build_bench(catalog, tmp_path / "bench", config).manifest
    assert manifest["splits"]["train"] == {"products": 12, "queries": 12}
    assert manifest["splits"]["test"] == {"products": 8, "queries": 8}
    test_ids = set(
        pq.read_table(tmp_path / "bench" / "test" / "products")["product_id"].to_pylist()
    )
    assert test_ids == {f"e{i}" for i in range(8)}
    assert manifest["tasks"]["t2mm"]["queries"] == 8
    assert manifest["leakage"]["ok"]
    assert "i2mm" in manifest["skipped_tasks"]  # no image queries in this source


def test_explicit_split_and_bad_split(tmp_path: Path) -> None:
    src = _write_jsonl(tmp_path / "data.jsonl", [_record("a")])
    convert_mbe(src, tmp_path / "out", split="test")
    assert _products(tmp_path / "out")["a"]["mbe_split"] == "test"
    with pytest.raises(InputError, match="split must be"):
        convert_mbe(src, tmp_path / "out2", split="holdout")
