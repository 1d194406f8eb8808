"""moon2 augment end to end: accounting, rejects, resume (with a real kill), Ray vs loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from moon2.augment.config import AugmentConfig
from moon2.augment.pipeline import augment
from moon2.augment.stages import AUG_NAMES
from moon2.errors import ConfigError
from tests.factories import product_row, products_table


def fast_config(**changes: object) -> AugmentConfig:
    """No language model (titles by the rule rewrite), classic images, small parts."""
    config = AugmentConfig(rows_per_part=8)
    config.text.engine = "none"
    config.images.variants = 2
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def read(path: Path) -> pa.Table:
    files = sorted(str(p) for p in path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def test_output_keeps_inputs_and_adds_aug_columns(small_catalog: Path, tmp_path: Path) -> None:
    source = small_catalog / "products"
    result = augment(source, tmp_path / "out", fast_config(), limit=20, use_ray=False)
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (20, 20, 0)
    out = read(tmp_path / "out" / "products")
    original = ds.dataset(source).to_table().slice(0, 20)
    for name in original.column_names:  # every input column unchanged, in order
        assert out.column(name).equals(original.column(name)), name
    assert out.column_names[len(original.column_names) :] == AUG_NAMES
    rows = out.to_pylist()
    for row in rows:
        assert row["aug_title"] and row["aug_title_source"] == "rule"
        assert len(row["aug_images"]) == 3  # the clean image + 2 views
        assert len(row["aug_image_scores"]) == len(row["aug_image_ops"]) == 3
        assert min(row["aug_image_scores"]) >= 0.55
        assert json.loads(row["aug_engine"]) == {
            "consistency": "histogram",
            "image": "classic",
            "text": None,
        }
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows_in"] == 20 and manifest["parts"] == 3
    assert manifest["title_sources"] == {"rule": 20}
    assert (tmp_path / "out" / "config.yaml").exists()


def test_bad_rows_are_rejected_with_file_row_and_column(tmp_path: Path) -> None:
    rows = [product_row(f"P{i}") for i in range(6)]
    rows[1]["images"] = [{"bytes": b"not an image", "path": None}]
    rows[3]["product_id"] = " "
    rows[4].update(title=None, images=None)
    rows[5].update(images=None)  # text-only is valid: no images to expand
    path = tmp_path / "in.parquet"
    pq.write_table(products_table(rows), path)
    result = augment(path, tmp_path / "out", fast_config(), use_ray=False)
    assert (result.rows_in, result.rows_out, result.rows_rejected) == (6, 3, 3)
    rejects = read(tmp_path / "out" / "_rejects").to_pylist()
    reasons = {r["product_id"]: r["reject_reason"] for r in rejects}
    assert f"{path} row 1 column images[0]" in reasons["P1"]
    assert "row 3 column product_id" in reasons[" "]
    assert "row 4 column title: no title and no image" in reasons["P4"]
    assert {r["reject_stage"] for r in rejects} == {"augment"}
    assert not any(name in rejects[0] for name in AUG_NAMES)
    kept = {r["product_id"]: r for r in read(tmp_path / "out" / "products").to_pylist()}
    assert kept["P5"]["aug_images"] == [] and kept["P5"]["aug_title"]
    assert sum(result.manifest["reject_reasons"].values()) == 3


def test_resume_skips_finished_parts_and_refuses_another_job(
    small_catalog: Path, tmp_path: Path
) -> None:
    source = small_catalog / "products"
    out = tmp_path / "out"
    first = augment(source, out, fast_config(), limit=24, use_ray=False)
    reference = read(out / "products")
    # lose the last part, as a killed run would
    (out / "_parts" / "part-00000-000000000016.json").unlink()
    (out / "products" / "part-00000-000000000016.parquet").unlink()
    finished: list[int] = []
    second = augment(
        source,
        out,
        fast_config(),
        limit=24,
        use_ray=False,
        on_part=lambda stats: finished.append(stats.rows_in),
    )
    assert finished == [8] and second.parts_skipped == 2
    assert read(out / "products").equals(reference)
    assert second.manifest["rows_in"] == first.manifest["rows_in"] == 24
    with pytest.raises(ConfigError, match="different config"):
        augment(source, out, fast_config(seed=5), limit=24, use_ray=False)
    fresh = augment(source, out, fast_config(seed=5), limit=24, use_ray=False, resume=False)
    assert fresh.parts_skipped == 0


def _augment_cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "moon2.cli", "augment", *args]


def test_killed_run_resumes_to_the_same_result(small_catalog: Path, tmp_path: Path) -> None:
    """A real SIGKILL in the middle of the job, then the same command again."""
    config = tmp_path / "augment.yaml"
    fast_config().to_yaml(config)
    source = str(small_catalog / "products")
    common = ["--config", str(config), "--limit", "160", "--no-ray"]
    subprocess.run(
        _augment_cli([source, str(tmp_path / "whole"), *common]), check=True, capture_output=True
    )
    job = subprocess.Popen(
        _augment_cli([source, str(tmp_path / "killed"), *common]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = tmp_path / "killed" / "_parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.json"))) < 2:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    done = len(list(parts.glob("part-*.json")))
    assert 2 <= done < 20, "the kill should land in the middle of the job"
    subprocess.run(
        _augment_cli([source, str(tmp_path / "killed"), *common]), check=True, capture_output=True
    )
    for name in ("products", "_rejects"):
        whole, resumed = read(tmp_path / "whole" / name), read(tmp_path / "killed" / name)
        assert (whole is None and resumed is None) or whole.equals(resumed)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["parts_skipped"] == done and manifest["rows_in"] == 160
    assert not list((tmp_path / "killed").rglob(".*tmp-*"))


def test_ray_pipeline_equals_the_plain_loop(
    small_catalog: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """Both Ray graphs: one fused CPU task per part (rule titles, classic images) and the
    staged one (reading task -> text model actor pool -> image tasks)."""
    ray = pytest.importorskip("ray")
    source = small_catalog / "products"
    with_model = fast_config()
    with_model.text.engine = "transformers"
    with_model.text.model = str(tiny_llama)
    with_model.text.max_new_tokens = 6
    with_model.text.batch_size = 4
    cases = {"fused": (fast_config(), 50), "staged": (with_model, 12)}
    try:
        for name, (config, rows) in cases.items():
            loop = augment(source, tmp_path / f"{name}-loop", config, limit=rows, use_ray=False)
            on_ray = augment(source, tmp_path / f"{name}-ray", config, limit=rows)
            assert (on_ray.rows_in, on_ray.rows_out) == (loop.rows_in, loop.rows_out)
            assert on_ray.rows_out == rows
            assert read(tmp_path / f"{name}-ray" / "products").equals(
                read(tmp_path / f"{name}-loop" / "products")
            )
            assert on_ray.manifest["runner"] == "ray"
    finally:
        ray.shutdown()
    staged = read(tmp_path / "staged-ray" / "products")
    assert set(staged.column("aug_title_source").to_pylist()) <= {"llm", "fallback"}


@pytest.mark.slow
def test_killed_ray_run_resumes_to_the_same_result(small_catalog: Path, tmp_path: Path) -> None:
    """The same real kill, on the Ray runner (a local Ray instance per command)."""
    config = tmp_path / "augment.yaml"
    fast_config().to_yaml(config)
    source = str(small_catalog / "products")
    common = ["--config", str(config), "--limit", "160"]
    augment(source, tmp_path / "loop", fast_config(), limit=160, use_ray=False)
    job = subprocess.Popen(
        _augment_cli([source, str(tmp_path / "killed"), *common]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    parts = tmp_path / "killed" / "_parts"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("part-*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its Ray processes
    job.wait()
    done = len(list(parts.glob("part-*.json")))
    assert 2 <= done < 20
    subprocess.run(
        _augment_cli([source, str(tmp_path / "killed"), *common]), check=True, capture_output=True
    )
    assert read(tmp_path / "killed" / "products").equals(read(tmp_path / "loop" / "products"))


def test_a_catalog_directory_becomes_a_trainable_catalog(
    small_catalog: Path, tmp_path: Path
) -> None:
    result = augment(small_catalog, tmp_path / "out", fast_config(), limit=8, use_ray=False)
    assert result.manifest["queries_files_copied"] >= 1
    for original in sorted((small_catalog / "queries").glob("*.parquet")):
        copy = tmp_path / "out" / "queries" / original.name
        assert copy.read_bytes() == original.read_bytes()
    assert read(tmp_path / "out" / "products").num_rows == 8
    again = augment(small_catalog, tmp_path / "out", fast_config(), limit=8, use_ray=False)
    assert again.parts_skipped == again.parts
