"""`moon2 synth`: contents rich enough to learn from, known noise, determinism, resume."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from moon2.data.io import resolve_files
from moon2.data.synth import taxonomy
from moon2.data.synth.generator import (
    PRODUCT_NOISE_KINDS,
    SynthConfig,
    make_plan,
    synth,
    true_attributes,
)
from moon2.data.synth.shapes import SHAPE_NAMES
from moon2.errors import ConfigError


def _digests(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


def tiny(**overrides) -> SynthConfig:
    values = dict(
        products=90,
        queries_per_product=1.0,
        noise=0.2,
        seed=3,
        image_size=24,
        rows_per_part=40,
        workers=1,
    )
    values.update(overrides)
    return SynthConfig(**values)


def test_taxonomy_is_rich_and_consistent():
    taxonomy.check_taxonomy()
    assert len(taxonomy.LEAVES) >= 24
    assert min(len(leaf.path) for leaf in taxonomy.LEAVES) >= 3
    assert max(len(leaf.path) for leaf in taxonomy.LEAVES) >= 4
    assert len({leaf.department for leaf in taxonomy.LEAVES}) >= 5
    assert {leaf.shape for leaf in taxonomy.LEAVES} <= set(SHAPE_NAMES)
    for leaf in taxonomy.LEAVES:
        vocab = taxonomy.leaf_attribute_vocab(leaf)
        assert {"color", "pattern", "material", "style", "size"} <= set(vocab)
        assert all(len(values) >= 2 for values in vocab.values())


def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path):
    synth(tiny(workers=1), tmp_path / "a")
    synth(tiny(workers=2), tmp_path / "b")
    first, second = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert first == second and len(first) == 6  # 90 products and 90 queries, 40 per part
    synth(tiny(seed=4), tmp_path / "c")
    assert _digests(tmp_path / "c") != first


def test_noise_fractions_within_one_point(tmp_path):
    config = tiny(
        products=400, queries_per_product=1.5, noise=0.2, image_size=16, rows_per_part=400
    )
    result = synth(config, tmp_path)
    products = pq.read_table(tmp_path / "products")
    queries = pq.read_table(tmp_path / "queries")
    assert products.num_rows == 400 and queries.num_rows == 600
    product_fraction = np.mean(products.column("truth_is_noisy").to_numpy(zero_copy_only=False))
    query_fraction = np.mean(queries.column("truth_is_noisy").to_numpy(zero_copy_only=False))
    assert abs(product_fraction - 0.2) <= 0.01
    assert abs(query_fraction - 0.2) <= 0.01
    kinds = Counter(products.column("truth_noise_kind").to_pylist())
    assert set(kinds) == {"clean", *PRODUCT_NOISE_KINDS}
    assert all(kinds[k] == 20 for k in PRODUCT_NOISE_KINDS)
    assert result.manifest["product_noise_fraction"] == pytest.approx(0.2)


def test_noise_is_what_it_claims(small_catalog):
    rows = pq.read_table(small_catalog / "products").to_pylist()
    by_id = {r["product_id"]: r for r in rows}
    seen_kinds = set()
    for row in rows:
        kind = row["truth_noise_kind"]
        seen_kinds.add(kind)
        source = by_id.get(row["truth_source_id"]) if row["truth_source_id"] else None
        if kind == "clean":
            assert not row["truth_is_noisy"] and source is None
            if row["category"] is not None:
                assert row["category"] == row["truth_category"]
        elif kind == "title_swap":
            assert row["title"] == source["title"] and row["title"]
            assert source["truth_category"] != row["truth_category"]
        elif kind == "image_swap":
            assert row["images"] == source["images"]
            assert source["truth_category"] != row["truth_category"]
        elif kind == "wrong_category":
            assert row["category"] != row["truth_category"]
        elif kind == "near_duplicate":
            assert row["truth_category"] == source["truth_category"]
            assert row["attributes"] == source["attributes"]
            assert row["product_id"] != source["product_id"]
    assert seen_kinds == {"clean", *PRODUCT_NOISE_KINDS}
    queries = pq.read_table(small_catalog / "queries").to_pylist()
    noisy = [q for q in queries if q["truth_is_noisy"]]
    assert noisy and all(q["positive_id"] != q["truth_positive_id"] for q in noisy)
    assert all(q["truth_noise_kind"] == "wrong_positive" for q in noisy)
    clean = [q for q in queries if not q["truth_is_noisy"]]
    assert all(q["positive_id"] == q["truth_positive_id"] for q in clean)


def test_modality_mix_and_missing_fields_vary(tmp_path):
    synth(tiny(products=300, image_size=16, rows_per_part=300), tmp_path)
    rows = pq.read_table(tmp_path / "products").to_pylist()
    counts = Counter(
        ("title" if r["title"] else "") + ("+image" if r["images"] else "") for r in rows
    )
    assert counts["title+image"] > 200 and counts["title"] > 0 and counts["+image"] > 0
    assert any(r["description"] in (None, "") and r["images"] for r in rows)
    assert any(r["attributes"] is None for r in rows)
    image_counts = Counter(len(r["images"] or []) for r in rows)
    assert max(image_counts) >= 4 and image_counts[1] > 0
    sizes = Counter(
        Image.open(io.BytesIO(r["images"][0]["bytes"])).size for r in rows if r["images"]
    )
    assert (16, 16) in sizes and len(sizes) >= 2  # square and portrait/landscape photos
    formats = Counter(
        Image.open(io.BytesIO(c["bytes"])).format for r in rows for c in (r["images"] or [])
    )
    assert {"JPEG", "PNG", "WEBP"} <= set(formats)
    assert any(not title.isascii() for title in (r["title"] for r in rows))


def test_queries_have_modalities_hard_negatives_and_fresh_images(small_catalog):
    products = {r["product_id"]: r for r in pq.read_table(small_catalog / "products").to_pylist()}
    queries = pq.read_table(small_catalog / "queries").to_pylist()
    kinds = Counter(
        "mm" if q["query_text"] and q["query_image"] else "t" if q["query_text"] else "i"
        for q in queries
    )
    assert set(kinds) == {"t", "i", "mm"}
    for q in queries:
        positive = products[q["truth_positive_id"]]
        assert q["negative_ids"] and positive["product_id"] not in q["negative_ids"]
        assert all(n in products for n in q["negative_ids"])
        same_leaf = [
            products[n]
            for n in q["negative_ids"]
            if products[n]["truth_category"] == positive["truth_category"]
        ]
        assert len(same_leaf) <= 3
        if q["query_image"] is not None:
            catalog_images = {c["bytes"] for c in positive["images"] or []}
            assert q["query_image"]["bytes"] not in catalog_images
        if q["query_text"]:
            assert len(q["query_text"].split()) <= 12
    assert any(
        products[n]["truth_category"] == products[q["truth_positive_id"]]["truth_category"]
        for q in queries
        for n in q["negative_ids"]
    )


def test_hard_negatives_differ_in_attributes():
    config = tiny(products=600)
    plan = make_plan(config)
    from moon2.data.synth import generator

    key = generator._install_plan(plan)
    import random

    for positive in range(0, plan.n_base, 37):
        rng = random.Random(positive)
        own = true_attributes(plan, positive)
        for negative in generator._hard_negatives(plan, key, positive, rng):
            assert plan.leaf[negative] == plan.leaf[positive]
            other = true_attributes(plan, negative)
            assert any(other[k] != own[k] for k in ("color", "pattern", "material"))


def test_resume_rewrites_only_missing_parts(tmp_path):
    config = tiny()
    synth(config, tmp_path)
    before = _digests(tmp_path)
    victim = tmp_path / "products" / "part-00001.parquet"
    victim.unlink()
    (tmp_path / "products" / ".part-00002.parquet.tmp-999-dead").write_bytes(b"half")
    result = synth(config, tmp_path)
    assert result.parts_written == 1 and result.parts_skipped == 5
    assert _digests(tmp_path) == before
    assert len(resolve_files(tmp_path / "products")) == 3
    assert not list((tmp_path / "products").glob(".part-*"))


def test_other_config_in_same_directory_needs_overwrite(tmp_path):
    synth(tiny(), tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        synth(tiny(seed=99), tmp_path)
    result = synth(tiny(seed=99), tmp_path, overwrite=True)
    assert result.parts_written == 6
    assert (tmp_path / "synth_config.yaml").read_text().count("seed: 99") == 1


def test_config_validation():
    with pytest.raises(ValueError):
        SynthConfig(products=0)
    with pytest.raises(ValueError):
        SynthConfig(no_image_fraction=0.7, image_only_fraction=0.5)
    with pytest.raises(ValueError):
        SynthConfig(unknown_field=1)


def test_cli_synth_then_validate(tmp_path):
    from typer.testing import CliRunner

    from moon2.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "synth",
            str(tmp_path),
            "--products",
            "40",
            "--queries-per-product",
            "1",
            "--noise",
            "0.1",
            "--seed",
            "1",
            "--image-size",
            "20",
            "--workers",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "wrote 40 products and 40 queries" in result.stdout
    result = runner.invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 0, result.output
