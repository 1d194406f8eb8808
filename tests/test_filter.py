"""moon2 filter: each scorer by hand, the decision rule, the evaluation arithmetic, and the
whole command on small catalogs (accounting, rejects, no images / no text, resume, Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moon2.bench.build import normalise_title
from moon2.curate import scorers
from moon2.curate.config import CleanlabConfig, CurateConfig, DynamicsConfig, Threshold
from moon2.curate.decide import PRODUCT_CHECKS, decide
from moon2.curate.pipeline import filter_catalog
from moon2.curate.report import evaluate_products, evaluate_queries, prf
from moon2.curate.scan import context_text, images_key
from moon2.data.validate import validate
from moon2.errors import ConfigError, InputError
from tests.factories import png_bytes, product_row, products_table, queries_table, query_row


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


# --- scorers ---------------------------------------------------------------------------------


def test_thresholds_by_hand() -> None:
    scores = np.array([0.0, 1.0, 1.1, 0.9, 1.0, -5.0, np.nan])
    flags, cut = scorers.threshold_flags(scores, Threshold(mode="robust", value=3.0))
    # median 0.95, MAD 0.1 -> cut 0.95 - 3 * 1.4826 * 0.1
    assert cut == pytest.approx(0.95 - 3 * 1.4826 * 0.1)
    assert flags.tolist() == [True, False, False, False, False, True, False]
    flags, cut = scorers.threshold_flags(scores, Threshold(mode="value", value=0.95))
    assert flags.tolist() == [True, False, False, True, False, True, False] and cut == 0.95
    flags, _ = scorers.threshold_flags(scores, Threshold(mode="percentile", value=34))
    assert flags.tolist() == [True, False, False, False, False, True, False]  # 2 of 6
    flags, cut = scorers.threshold_flags(np.full(3, np.nan), Threshold())
    assert not flags.any() and cut is None
    # ties share one fate; with no spread (MAD 0) the standard deviation stands in
    flags, _ = scorers.threshold_flags(np.ones(4), Threshold(mode="percentile", value=50))
    assert not flags.any()
    almost = np.array([0.5] * 6 + [0.49])
    assert not scorers.threshold_flags(almost, Threshold())[0].any()
    assert scorers.threshold_flags(np.array([0.5] * 20 + [0.1]), Threshold())[0][-1]
    assert scorers.threshold_flags(np.full(5, 0.5), Threshold())[1] is None
    with pytest.raises(ValueError):
        Threshold(mode="percentile", value=120)


def test_duplicate_groups_keep_one_staying_row_per_group() -> None:
    titles = [
        normalise_title(t) or None
        for t in ["Red mug", "mug, red", "blue mug", None, "red MUG", "tee"]
    ]
    images = ["a", "b", "b", "c", None, "c"]
    eligible = np.ones(6, bool)
    stays = np.ones(6, bool)

    def copies(keys: list[str], **kwargs: object) -> list[int]:
        groups = scorers.duplicate_groups(
            scorers.duplicate_keys(titles, images, keys),
            kwargs.get("near"),
            kwargs.get("eligible", eligible),
            kwargs.get("stays", stays),
        )
        return groups.kept_copy.tolist()

    assert copies(["images"]) == [-1, -1, 1, -1, -1, 3]
    assert copies(["title"]) == [-1, 0, -1, -1, 0, -1]
    assert copies(["title_and_images"]) == [-1] * 6  # no row repeats title and images
    # transitively: 0 ~ 1 by title, 1 ~ 2 by images -> one group kept at row 0
    assert copies(["images", "title"]) == [-1, 0, 0, -1, 0, 3]
    # row 0 goes for another reason: the group keeps row 1, nobody points at row 0's copy
    gone = np.array([False, True, True, True, True, True])
    assert copies(["images", "title"], stays=gone) == [1, -1, 1, -1, 1, 3]
    # a rejected row is nobody's copy and nobody's original
    valid = np.array([True, True, True, False, True, True])
    assert copies(["images"], eligible=valid) == [-1, -1, 1, -1, -1, -1]
    # near-duplicate sets join groups too: 2 ~ 5 puts rows 1, 2, 3, 5 in one group
    near = [[], [], [5], [], [], [2]]
    assert copies(["images"], near=near) == [-1, -1, 1, 1, -1, 1]
    groups = scorers.duplicate_groups(
        scorers.duplicate_keys(titles, images, ["images"]), near, eligible, stays
    )
    assert groups.exact.tolist() == [False, True, True, True, False, True]


def test_cross_consistency_finds_the_swapped_row() -> None:
    rng = np.random.default_rng(0)
    topics = _unit(rng.normal(size=(12, 16)))
    titles = _unit(topics + 0.1 * rng.normal(size=topics.shape))
    images = _unit(topics + 0.1 * rng.normal(size=topics.shape))
    images[4] = images[9]  # row 4 shows row 9's product
    titles[7] = np.nan  # no title: no score
    score = scorers.cross_consistency(titles, images, k=3)
    assert np.isnan(score[7])
    assert int(np.nanargmin(score)) == 4
    assert np.nanmin(np.delete(score, [4, 7])) > score[4] + 0.3
    assert np.isnan(scorers.cross_consistency(titles[:1], images[:1], k=3)).all()


def test_query_margins_by_hand() -> None:
    products = _unit(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [np.nan, np.nan]]))
    queries = _unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    margins = scorers.query_margins(queries, products, np.array([0, 1, 1]), [[1, 2], [0], [3, -1]])
    assert margins[0] == pytest.approx(1.0 - np.sqrt(0.5))
    assert margins[1] == pytest.approx(-1.0)
    assert np.isnan(margins[2])  # no usable negative


def test_knn_graph_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    vectors = _unit(rng.normal(size=(30, 8)))
    vectors[5] = vectors[6]  # an exact tie at distance 0
    graph = scorers.knn_graph(vectors, 4)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    for row in range(30):
        start, stop = graph.indptr[row], graph.indptr[row + 1]
        assert row not in graph.indices[start:stop]
        distances = graph.data[start:stop]
        assert np.all(np.diff(distances) >= 0)
        expected = np.sort(1 - np.sort(similarity[row])[-4:])
        assert np.allclose(distances, np.clip(expected, 0, 2), atol=1e-5)


def _clusters(rng: np.random.Generator, per: int = 25) -> tuple[np.ndarray, list[str]]:
    centres = _unit(rng.normal(size=(3, 16))) * 4
    vectors = np.concatenate([c + rng.normal(size=(per, 16)) for c in centres])
    labels = [name for name in ("mugs", "tees", "lamps") for _ in range(per)]
    return vectors, labels


def test_cleanlab_finds_label_issues_near_duplicates_and_outliers() -> None:
    rng = np.random.default_rng(2)
    vectors, labels = _clusters(rng)
    labels[3] = "lamps"  # a mug listed as a lamp
    config = CleanlabConfig(k=5, min_class_size=5, folds=3)
    result = scorers.cleanlab_issues(_unit(vectors), labels, config)
    assert np.flatnonzero(result.is_label_issue).tolist() == [3]
    assert result.predicted_label[3] == "mugs" and np.nanargmin(result.label_score) == 3
    knn = scorers.cleanlab_issues(
        _unit(vectors), labels, config.model_copy(update={"classifier": "knn"})
    )
    assert knn.is_label_issue[3]
    # a copy of row 10 and a far-away product with no category
    vectors = np.concatenate([vectors, vectors[10:11] + 1e-4, 40 * _unit(rng.normal(size=(1, 16)))])
    result = scorers.cleanlab_issues(_unit(vectors), [*labels, "mugs", None], config)
    assert np.flatnonzero(result.is_near_duplicate).tolist() == [10, 75]
    assert result.near_duplicate_sets[75] == [10] and result.near_duplicate_sets[10] == [75]
    kept = scorers.duplicate_groups(
        [[] for _ in range(77)], result.near_duplicate_sets, np.ones(77, bool), np.ones(77, bool)
    ).kept_copy
    assert kept[75] == 10 and (kept >= 0).sum() == 1  # the first copy stays
    assert result.predicted_label[76] is None and np.isnan(result.label_score[76])
    assert np.argmin(result.outlier_score) == 76 and result.is_outlier[76]


def test_training_dynamics_flags_persistently_negative_margins() -> None:
    scores = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c"] * 4,
            "epoch": [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3,
            "loss": [9.0, 9.0, 9.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
            "margin": [-1.0, -1.0, -1.0, 0.5, -0.1, -0.2, 0.4, 0.2, -0.3, 0.6, -0.1, -0.4],
        }
    )
    config = DynamicsConfig(
        skip_epochs=1, negative_share=0.6, loss=Threshold(mode="value", value=-2.5)
    )
    result, cut = scorers.training_dynamics(scores, config)
    rows = {r["sample_id"]: r for r in result.to_dicts()}
    assert cut == 2.5  # flagged above a mean loss of 2.5
    assert rows["a"]["cur_dyn_negative_share"] == 0 and not rows["a"]["dyn_flag"]
    assert rows["b"]["cur_dyn_negative_share"] == pytest.approx(2 / 3) and rows["b"]["dyn_flag"]
    assert rows["c"]["dyn_flag"] and rows["c"]["cur_dyn_loss"] == pytest.approx(3.0)
    assert rows["a"]["cur_dyn_epochs"] == 3
    config.negative_share = 1.0
    result, _ = scorers.training_dynamics(scores, config)
    assert result["dyn_flag"].to_list() == [False, False, True]  # only c's loss is high


def test_context_text_and_image_keys(tmp_path: Path) -> None:
    assert context_text(None, None, None) is None
    text = context_text(" soft ", ["Home", "Mugs"], [{"key": "color", "value": "red"}])
    assert text == "Home > Mugs. color: red. soft"
    (tmp_path / "a.png").write_bytes(png_bytes((1, 2, 3)))
    by_path = images_key([{"bytes": None, "path": "a.png"}], tmp_path)
    by_bytes = images_key([{"bytes": png_bytes((1, 2, 3)), "path": None}], tmp_path)
    assert by_path == by_bytes and images_key([], tmp_path) is None
    assert images_key([{"bytes": png_bytes((9, 9, 9)), "path": None}], tmp_path) != by_bytes


# --- decision and evaluation ---------------------------------------------------------------


def test_decision_rule_takes_the_first_removing_check() -> None:
    flags = {
        "outlier": np.array([True, True, False, False]),
        "image_text": np.array([False, True, False, True]),
        "duplicate": np.array([False, False, False, True]),
    }
    action = {"outlier": "flag", "image_text": "remove", "duplicate": "remove"}
    frame = decide(flags, PRODUCT_CHECKS, action, 4)
    assert frame["cur_reason"].to_list() == [None, "image_text", None, "duplicate"]
    assert frame["cur_removed"].to_list() == [False, True, False, True]
    assert frame["cur_flags"].to_list() == [
        ["outlier"],
        ["image_text", "outlier"],
        [],
        ["duplicate", "image_text"],
    ]


def test_precision_recall_by_hand_and_duplicate_pairs() -> None:
    assert prf(3, 1, 2) == {
        "tp": 3,
        "fp": 1,
        "fn": 2,
        "precision": 0.75,
        "recall": 0.6,
        "f1": 0.6667,
    }
    assert prf(0, 0, 0)["f1"] == 0.0
    frame = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f"],
            "removed": [True, False, True, True, False, True],
            "reason": ["duplicate", None, "image_text", "image_text", None, "label_issue"],
            # a: the clean original, removed as the copy of b (listed first), b's source is a
            "duplicate_of": ["b", None, None, None, None, None],
            "is_noisy": [False, True, True, False, True, False],
            "kind": ["clean", "near_duplicate", "image_swap", "clean", "title_swap", "clean"],
            "source_id": [None, "a", "x", None, "y", None],
        }
    )
    result = evaluate_products(frame)
    # after the pair is resolved: removed b (TP), c (TP), d (FP), f (FP); e missed
    assert result["overall"] == prf(2, 2, 1)
    assert result["per_kind"]["near_duplicate"] == {"rows": 1, **prf(1, 2, 0)}
    assert result["per_kind"]["title_image_swaps"] == {"rows": 2, **prf(1, 2, 1)}
    assert result["removed_by_reason_and_truth"]["duplicate"] == {"clean": 1}
    queries = pl.DataFrame(
        {
            # the first query went only because its product did: not judged
            "removed": [False, True, False, True, True],
            "judged": [False, True, True, True, True],
            "reason": [
                "positive_removed",
                "query_margin",
                None,
                "query_margin",
                "positive_removed",
            ],
            "is_noisy": [True, True, True, False, True],
        }
    )
    result = evaluate_queries(queries)
    assert result["overall"] == prf(2, 1, 1)
    assert result["removed_by_reason_and_truth"] == {
        "positive_removed": {"noisy": 2},
        "query_margin": {"clean": 1, "noisy": 1},
    }


# --- the command ----------------------------------------------------------------------------


def _read(path: Path) -> pa.Table | None:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else None


def _rows(path: Path) -> int:
    table = _read(path)
    return 0 if table is None else table.num_rows


def _check_accounting(out: Path, catalog: Path) -> dict:
    report = json.loads((out / "filter_report.json").read_text())
    for table, counts in report["counts"].items():
        assert counts["rows_in"] == _rows(catalog / table)
        assert _rows(out / table) == counts["kept"]
        assert _rows(out / "_removed" / table) == counts["removed"]
        assert _rows(out / "_rejects" / table) == counts["rejected"]
        assert counts["kept"] + counts["removed"] + counts["rejected"] == counts["rows_in"]
    return report


def test_filter_with_a_checkpoint_and_training_scores(
    small_catalog: Path, trained: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = filter_catalog(
        small_catalog, out, model=str(trained / "final"), training_scores=trained
    )
    report = _check_accounting(out, small_catalog)
    assert report == result.report
    removed = _read(out / "_removed" / "products")
    kept = _read(out / "products")
    for table in (removed, kept):
        assert all(c in table.column_names for c in ("cur_align_image_text", "cur_flags"))
        assert "truth_noise_kind" in table.column_names  # every input column passes through
    assert all(removed.column("cur_reason").to_pylist())
    assert not any(kept.column("cur_reason").to_pylist())
    assert report["encoder"] == str(trained / "final")
    flagged = report["flagged_by_check"]["products"]
    assert {"image_text", "title_context"} <= set(flagged)
    assert report["cuts"]["queries"]["dynamics"] > 0  # a mean loss
    assert "dynamics" in report["flagged_by_check"]["queries"]
    queries = _read(out / "_removed" / "queries")
    assert queries.column("cur_dyn_loss").null_count == 0
    evaluation = report["evaluation"]
    assert set(evaluation) == {"products", "queries"}
    assert evaluation["products"]["overall"]["recall"] > 0.3
    swaps = evaluation["products"]["per_kind"]["title_image_swaps"]
    assert swaps["recall"] > 0.5 and swaps["precision"] > 0.3
    text = (out / "filter_report.md").read_text()
    assert "title_image_swaps" in text and "| products |" in text
    # every removed query is explained, and none is kept whose product was removed
    removed_ids = set(removed.column("product_id").to_pylist())
    kept_queries = _read(out / "queries")
    assert not removed_ids & set(kept_queries.column("positive_id").to_pylist())
    # negatives that were removed are listed apart, so OUT is a consistent catalog
    kept_ids = set(kept.column("product_id").to_pylist())
    dropped = 0
    for row in kept_queries.select(["negative_ids", "cur_negatives_dropped"]).to_pylist():
        assert set(row["negative_ids"]) <= kept_ids
        assert set(row["cur_negatives_dropped"]) <= removed_ids
        dropped += len(row["cur_negatives_dropped"])
    assert dropped > 0
    assert validate(out, check_images=False).ok


def test_filter_rejects_bad_rows_and_accounts_for_all(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog"
    rows = [product_row(f"p{i}", title=f"red cotton tee number {i}") for i in range(8)]
    rows.append(product_row("p3", title="another listing with a taken id"))
    rows.append(product_row("bad", title=None, images=None))
    (catalog / "products").mkdir(parents=True)
    pq.write_table(products_table(rows), catalog / "products" / "part-0.parquet")
    (catalog / "queries").mkdir()
    queries = [query_row(f"q{i}", f"p{i}", query_text=f"red tee {i}") for i in range(4)]
    queries.append(query_row("q-empty", "p1", query_text=None, query_image=None))
    queries.append(query_row("q-unknown", "p404", query_text="blue mug"))
    queries.append(query_row("q-bad", "bad", query_text="an empty listing"))
    pq.write_table(queries_table(queries), catalog / "queries" / "part-0.parquet")
    out = tmp_path / "out"
    config = CurateConfig()
    config.cleanlab.enabled = False
    result = filter_catalog(catalog, out, config)
    report = _check_accounting(out, catalog)
    assert result.counts["products"]["rejected"] == 2
    rejects = _read(out / "_rejects" / "products").to_pylist()
    reasons = {r["product_id"]: r["reject_reason"] for r in rejects}
    assert "row 8, column product_id: duplicate id" in reasons["p3"]
    assert "part-0.parquet row 9" in reasons["bad"] and "no title and no image" in reasons["bad"]
    assert all(r["reject_stage"] == "filter" for r in rejects)
    query_rejects = _read(out / "_rejects" / "queries").to_pylist()
    assert [r["query_id"] for r in query_rejects] == ["q-empty", "q-unknown", "q-bad"]
    assert "column positive_id: p404 is not a valid product" in query_rejects[1]["reject_reason"]
    assert validate(out, check_images=False).ok
    assert "evaluation" not in report  # no truth_* columns


def test_filter_catalog_without_images_and_without_text(tmp_path: Path) -> None:
    text_only = tmp_path / "text"
    (text_only / "products").mkdir(parents=True)
    titles = ["red cotton tee", "blue ceramic mug", "oak side table", "red cotton tee"] * 4
    rows = [
        product_row(f"t{i}", title=title, images=None, category=["Home", f"c{i % 2}"])
        for i, title in enumerate(titles)
    ]
    pq.write_table(products_table(rows), text_only / "products" / "part-0.parquet")
    result = filter_catalog(text_only, tmp_path / "out-text")
    _check_accounting(tmp_path / "out-text", text_only)
    assert result.report["removed_by_reason"]["products"].get("duplicate") == 13
    image_only = tmp_path / "images"
    (image_only / "products").mkdir(parents=True)
    rows = [
        product_row(
            f"i{i}", title=None, images=[{"bytes": png_bytes((i * 10, 0, 0)), "path": None}]
        )
        for i in range(12)
    ]
    pq.write_table(products_table(rows), image_only / "products" / "part-0.parquet")
    result = filter_catalog(image_only, tmp_path / "out-images")
    _check_accounting(tmp_path / "out-images", image_only)
    assert result.counts["products"] == {"rows_in": 12, "kept": 12, "removed": 0, "rejected": 0}
    scores = _read(tmp_path / "out-images" / "products")
    assert scores.column("cur_align_image_text").null_count == 12


def test_rerun_resumes_and_gives_the_same_output(small_catalog: Path, tmp_path: Path) -> None:
    config = CurateConfig(rows_per_part=50)
    out = tmp_path / "out"
    first = filter_catalog(small_catalog, out, config)
    before = {p: _read(out / p) for p in ("products", "queries", "_removed/products")}
    work = sorted((out / "_work" / "products").glob("*.parquet"))
    work[1].unlink()  # as if killed while scanning that part
    for folder in ("products", "_removed/products"):
        for file in (out / folder).glob("*.parquet"):
            file.unlink()
    second = filter_catalog(small_catalog, out, config)
    assert second.report["parts_resumed"] == first.report["parts"] - 1
    for path, table in before.items():
        assert _read(out / path).equals(table)
    changed = CurateConfig(rows_per_part=40)
    with pytest.raises(ConfigError, match="different scan"):
        filter_catalog(small_catalog, out, changed)
    fresh = filter_catalog(small_catalog, out, changed, resume=False)
    assert fresh.report["parts_resumed"] == 0


def test_filter_on_ray_equals_the_local_run(small_catalog: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    config = CurateConfig(rows_per_part=80)
    config.ray.workers = 1
    try:
        on_ray = filter_catalog(small_catalog, tmp_path / "ray", config, use_ray=True)
    finally:
        ray.shutdown()
    local = filter_catalog(small_catalog, tmp_path / "local", config)
    assert on_ray.report["runner"] == "ray"
    assert on_ray.counts == local.counts
    for table in ("products", "_removed/products", "queries"):
        _assert_same(_read(tmp_path / "ray" / table), _read(tmp_path / "local" / table))


def _assert_same(a: pa.Table, b: pa.Table) -> None:
    """Equal tables, scores up to float rounding (other processes, other thread counts)."""
    assert a.column_names == b.column_names
    for name in a.column_names:
        if pa.types.is_floating(a.schema.field(name).type):
            x = np.array(a.column(name).to_pylist(), dtype=float)
            y = np.array(b.column(name).to_pylist(), dtype=float)
            assert np.allclose(x, y, atol=1e-5, equal_nan=True), name
        else:
            assert a.column(name).equals(b.column(name)), name


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        filter_catalog(tmp_path / "nothing", tmp_path / "out")
    run = tmp_path / "run"
    run.mkdir()
    catalog = tmp_path / "catalog"
    (catalog / "products").mkdir(parents=True)
    pq.write_table(products_table([product_row("p1")]), catalog / "products" / "p.parquet")
    with pytest.raises(InputError, match="no scores/epoch"):
        filter_catalog(catalog, tmp_path / "out", training_scores=run)


def test_cli_dynamics_only_recipe(small_catalog: Path, trained: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from moon2.cli import app

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    args = [
        "filter",
        str(small_catalog),
        str(out),
        "--config",
        str(root / "configs" / "curate" / "dynamics-only.yaml"),
        "--scores",
        str(trained),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "products vs truth_*" in result.stdout and "filter_report.md" in result.stdout
    report = _check_accounting(out, small_catalog)
    assert report["encoder"] is None  # no encoder is loaded when no scorer needs one
    assert set(report["flagged_by_check"]["products"]) <= {"dynamics"}
    assert report["actions"]["products"]["dynamics"] == "remove"
    bad = CliRunner().invoke(
        app, ["filter", str(small_catalog), str(out), "--scores", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "no scores/epoch" in bad.output


def test_open_clip_model_with_percentile_thresholds(small_catalog: Path, tmp_path: Path) -> None:
    """The CLIP-score path: a (random, offline) open_clip model and DataComp-style cuts."""
    config = CurateConfig()
    config.embed.model = "open_clip:moon2-tiny-clip"
    config.embed.text_model = "same"
    config.embed.product_view = "mean"
    config.alignment.image_text = Threshold(mode="percentile", value=10)
    config.cleanlab.enabled = False
    result = filter_catalog(small_catalog, tmp_path / "out", config)
    report = _check_accounting(tmp_path / "out", small_catalog)
    both = _read(small_catalog / "products").to_pylist()
    scored = sum(1 for row in both if (row["title"] or "").strip() and row["images"])
    # the lowest 10 % of the products with a title and a photo
    assert report["flagged_by_check"]["products"]["image_text"] == int(scored * 10 / 100)
    assert result.report["text_encoder"] == "open_clip:moon2-tiny-clip"
