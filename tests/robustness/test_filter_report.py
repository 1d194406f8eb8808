"""Issue #27 (12): another producer's truth_* columns (null = clean) never cost a filter run."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from moon2 import progress
from moon2.cli import app
from moon2.curate.report import evaluate_products, evaluate_queries, render_markdown
from tests.factories import product_row, products_table

# no encoder is loaded: only the exact-duplicate check runs
NO_ENCODER = {"alignment": {"enabled": False}, "cleanlab": {"enabled": False}}


def _catalog(root: Path) -> Path:
    """Ten products: a clean repeated listing and a noisy near-duplicate, whose truth comes
    as another producer writes it: null kind (and one null flag) for the clean rows."""
    rows = [product_row(f"p{i}", title=f"cotton tee number {i} in stock") for i in range(8)]
    rows.append(product_row("again", title=rows[1]["title"], images=rows[1]["images"]))
    rows.append(product_row("dup", title=rows[0]["title"], images=rows[0]["images"]))
    noisy = [False] * 8 + [None, True]
    kinds = [None] * 9 + ["near_duplicate"]
    sources = [None] * 9 + ["p0"]
    table = (
        products_table(rows)
        .append_column("truth_is_noisy", pa.array(noisy, pa.bool_()))
        .append_column("truth_noise_kind", pa.array(kinds, pa.string()))
        .append_column("truth_source_id", pa.array(sources, pa.string()))
    )
    (root / "products").mkdir(parents=True)
    pq.write_table(table, root / "products" / "part-0.parquet")
    return root


def _filter(tmp_path: Path):
    catalog = _catalog(tmp_path / "catalog")
    config = tmp_path / "filter.yaml"
    config.write_text(yaml.safe_dump(NO_ENCODER))
    out = tmp_path / "out" / "cur"
    result = CliRunner().invoke(app, ["filter", str(catalog), str(out), "--config", str(config)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 0, result.output
    report = json.loads((out / "filter_report.json").read_text())
    counts = report["counts"]["products"]
    assert counts["rows_in"] == 10
    assert counts["kept"] + counts["removed"] + counts["rejected"] == counts["rows_in"]
    assert pq.read_table(out / "products").num_rows == counts["kept"]
    return out, report, result


def test_null_truth_of_clean_rows_is_clean(tmp_path: Path) -> None:
    out, report, result = _filter(tmp_path)
    assert report["counts"]["products"]["removed"] == 2  # "again" (clean) and "dup" (noisy)
    evaluation = report["evaluation"]["products"]
    assert evaluation["overall"] == {
        "tp": 1,
        "fp": 1,
        "fn": 0,
        "precision": 0.5,
        "recall": 1.0,
        "f1": 0.6667,
    }
    assert set(evaluation["per_kind"]) == {"near_duplicate"}
    assert evaluation["removed_by_reason_and_truth"] == {
        "duplicate": {"clean": 1, "near_duplicate": 1}
    }
    markdown = (out / "filter_report.md").read_text()
    assert "| products | all noise | 1 | 0.500 | 1.000 | 0.667 |" in markdown
    assert "| reason | clean | near_duplicate |" in markdown
    assert "products vs truth_*: all noise P 0.50 R 1.00 F1 0.67" in result.stdout


def test_a_failing_truth_evaluation_is_a_warning_not_a_lost_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moon2.curate.pipeline as pipeline

    def broken(*args: object) -> dict:
        raise RuntimeError("an unexpected flaw")

    warnings: list[str] = []
    monkeypatch.setattr(pipeline, "_evaluate", broken)
    monkeypatch.setattr(progress, "warn", warnings.append)
    out, report, _ = _filter(tmp_path)
    assert "evaluation" not in report
    assert "Against the injected noise" not in (out / "filter_report.md").read_text()
    assert any("leaves out precision / recall" in w for w in warnings)
    assert not any("an unexpected flaw" in w for w in warnings)


def test_null_truth_in_the_evaluation_functions() -> None:
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "removed": [True, True, False, True],
            "reason": ["image_text", "image_text", None, "label_issue"],
            "duplicate_of": [None, None, None, None],
            "is_noisy": [None, True, True, False],
            "kind": [None, None, "title_swap", None],
            "source_id": [None, None, None, None],
        },
        schema_overrides={"duplicate_of": pl.String, "source_id": pl.String},
    )
    result = evaluate_products(frame)
    assert result["overall"] == {**result["overall"], "tp": 1, "fp": 2, "fn": 1}
    assert set(result["per_kind"]) == {"title_swap", "unknown"}
    assert result["removed_by_reason_and_truth"] == {
        "image_text": {"clean": 1, "unknown": 1},
        "label_issue": {"clean": 1},
    }
    queries = pl.DataFrame(
        {
            "removed": [True, False, True],
            "judged": [True, True, True],
            "reason": ["query_margin", None, "query_margin"],
            "is_noisy": [None, True, True],
        }
    )
    result = evaluate_queries(queries)
    assert result["overall"] == {**result["overall"], "tp": 1, "fp": 1, "fn": 1}
    assert result["removed_by_reason_and_truth"] == {"query_margin": {"clean": 1, "noisy": 1}}


def test_markdown_survives_an_evaluation_it_cannot_render(monkeypatch: pytest.MonkeyPatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(progress, "warn", warnings.append)
    report = {
        "input": "in",
        "encoder": None,
        "text_encoder": None,
        "counts": {"products": {"rows_in": 2, "kept": 1, "removed": 1, "rejected": 0}},
        "removed_by_reason": {},
        "flagged_by_check": {},
        "evaluation": {"products": {"overall": {"precision": None}}},
    }
    text = render_markdown(report)
    assert "| products | 2 | 1 | 1 | 0 |" in text
    assert "Against the injected noise" not in text
    assert len(warnings) == 1 and "leaves out the figures" in warnings[0]
