"""`moon2 compare` and `moon2 eval`'s per-query files: the statistics against hand
computations, and the command on eval folders of oracle encoders of different noise."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from moon2.bench.build import build_bench
from moon2.bench.compare import (
    bootstrap_ci,
    compare,
    holm,
    is_exact,
    paired_test,
    sign_flip_pvalue,
)
from moon2.bench.config import ALL_TASKS, RETRIEVAL_TASKS, BenchConfig, EvalConfig
from moon2.bench.evaluate import HEADLINE, PER_QUERY_COLUMN, evaluate, per_query_ids
from moon2.cli import app
from moon2.models.base import EncodeItem
from tests.test_evaluate import OracleEncoder

runner = CliRunner()


# --- the statistics ---------------------------------------------------------------------------


def _exact_pvalue(diff: np.ndarray) -> float:
    """Share of all 2**n sign patterns whose |mean| is at least the observed one."""
    observed = abs(diff.mean())
    patterns = list(itertools.product((1, -1), repeat=diff.size))
    extreme = sum(abs(np.dot(signs, diff)) / diff.size >= observed - 1e-12 for signs in patterns)
    return extreme / len(patterns)


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
def test_pvalue_is_the_exact_sign_flip_enumeration(n: int) -> None:
    rng = np.random.default_rng(n)
    a = rng.integers(0, 2, n).astype(float)  # per-query hits, as R@10 is
    b = rng.integers(0, 2, n) + rng.integers(0, 3, n) / 4  # with ties between patterns
    diff = b - a
    test = paired_test(a, b)  # 2**12 <= 10,000 resamples: exact
    assert test.p == pytest.approx(_exact_pvalue(diff), abs=1e-12)


def test_pvalue_of_an_obvious_difference_is_small_and_of_none_is_one() -> None:
    diff = np.array([1.0, 2.0, 1.0, 3.0, 2.0, 1.0, 2.0, 1.0])  # all positive: 2 of 256
    assert sign_flip_pvalue(diff) == pytest.approx(2 / 256)
    # queries without a difference flip to themselves: the same 256 patterns, still exact
    assert sign_flip_pvalue(np.r_[diff, np.zeros(50)]) == pytest.approx(2 / 256)
    assert is_exact(np.r_[diff, np.zeros(50)]) and not is_exact(np.ones(14))
    assert paired_test(np.ones(8), np.ones(8)) == (1.0, 0.0, 0.0)
    # randomized (2**30 patterns > resamples): only the observed pattern counts, p = 1/(R+1)
    assert sign_flip_pvalue(np.ones(30), resamples=500) == pytest.approx(1 / 501)


def test_randomized_pvalue_is_close_to_the_exact_one() -> None:
    rng = np.random.default_rng(3)
    diff = rng.normal(0.6, 1.0, 16)
    signs = 1 - 2 * ((np.arange(2**16)[:, None] >> np.arange(16)) & 1)  # all 2**16 patterns
    exact = np.mean(np.abs(signs @ diff) / 16 >= abs(diff.mean()) - 1e-12)
    randomized = sign_flip_pvalue(diff, resamples=4000, seed=1)
    assert 0.01 < exact < 0.5
    assert randomized == pytest.approx(exact, abs=0.03)  # 4 standard errors
    assert randomized == sign_flip_pvalue(diff, resamples=4000, seed=1)  # seeded


def test_bootstrap_interval_is_the_percentile_bootstrap_by_hand() -> None:
    rng = np.random.default_rng(5)
    diff = rng.normal(0.3, 1.0, 40)
    low, high = bootstrap_ci(diff, resamples=2000, seed=7)
    # the same draws by hand: 2000 resamples of the 40 queries, the 2.5 and 97.5 percentiles
    draws = np.random.default_rng(7).integers(0, diff.size, (2000, diff.size))
    expected = np.percentile(diff[draws].mean(axis=1), [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(expected), abs=1e-12)


def test_bootstrap_interval_covers_the_true_difference() -> None:
    rng = np.random.default_rng(11)
    a = rng.normal(0.5, 1.0, 400)
    b = a + rng.normal(0.2, 0.5, 400)  # true mean difference 0.2, standard error 0.025
    test = paired_test(a, b, resamples=2000, seed=0)
    assert test.ci_low < 0.2 < test.ci_high
    width = test.ci_high - test.ci_low
    assert width == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(400), rel=0.2)
    assert test.p < 0.001
    assert bootstrap_ci(np.full(5, 0.25)) == (0.25, 0.25)  # no spread: no warning, no nan


def test_holm_by_hand() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone:
    # 0.02, 0.03, 0.06, 0.06; back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # 0.5 x 2 = 1, capped
    assert holm([0.2]) == [0.2]
    assert holm([]) == []


def test_paired_test_refuses_unpaired_input() -> None:
    with pytest.raises(ValueError, match="paired"):
        paired_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no pairs"):
        paired_test([], [])


# --- eval folders -----------------------------------------------------------------------------


class NoisyOracle(OracleEncoder):
    """The oracle with seeded Gaussian noise on every embedding: worse, and differently so
    for every seed."""

    def __init__(self, bench: Path, noise: float, seed: int) -> None:
        super().__init__(bench)
        self.name = f"oracle-noise-{noise}-seed-{seed}"
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    def encode(self, items: Sequence[EncodeItem]) -> np.ndarray:
        out = super().encode(items)
        return out + self.noise * self.rng.normal(size=out.shape).astype(np.float32)


@pytest.fixture(scope="module")
def bench(small_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("comparebench")
    build_bench(small_catalog, out, BenchConfig.model_validate({"tasks": {"min_items": 3}}))
    return out


@pytest.fixture(scope="module")
def evals(bench: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Eval folders of the oracle (A), of a very noisy oracle (B, near chance) and of a
    slightly noisy one (C), every task."""
    root = tmp_path_factory.mktemp("evals")
    config = EvalConfig(device="cpu", batch_size=64, max_images=1)
    encoders = [OracleEncoder(bench), NoisyOracle(bench, 2.0, 1), NoisyOracle(bench, 0.3, 2)]
    folders = []
    for i, encoder in enumerate(encoders):
        evaluate(encoder, bench, root / f"eval{i}", config)
        folders.append(root / f"eval{i}")
    return folders


def test_per_query_means_are_the_results(evals: list[Path]) -> None:
    for folder in evals:
        results = json.loads((folder / "results.json").read_text())
        tasks = sorted(p.stem for p in (folder / "per_query").glob("*.parquet"))
        assert tasks == sorted(t for t in ALL_TASKS if t in results)
        for task in tasks:
            table = pl.read_parquet(folder / "per_query" / f"{task}.parquet")
            ids = list(per_query_ids(task))
            assert table.select(ids).is_unique().all(), task
            compared = 0
            for metric, mean in results[task].items():
                column = metric if metric in table.columns else PER_QUERY_COLUMN.get(metric)
                if column in table.columns:
                    assert table[column].cast(pl.Float64).mean() == pytest.approx(mean, abs=1e-6)
                    compared += 1
            assert compared == (6 if task in RETRIEVAL_TASKS else 1), task
            if task in RETRIEVAL_TASKS:
                _check_ranks(table)
            else:
                assert (table["correct"] == (table["gold"] == table["predicted"])).all()
                assert table.height == results["details"][task].get(
                    "products", results["details"][task].get("pairs")
                )


def _check_ranks(table: pl.DataFrame) -> None:
    """rank (first relevant, 1-based, null beyond the depth) agrees with R@k and MRR@10."""
    rank = table["rank"].to_numpy().astype(float)  # nulls -> nan
    for k in (1, 5, 10):
        assert np.array_equal(table[f"R@{k}"].to_numpy(), (rank <= k).astype(float))
    reciprocal = np.where(rank <= 10, 1 / np.nan_to_num(rank, nan=1.0), 0.0)
    assert np.allclose(table["MRR@10"].to_numpy(), reciprocal)
    assert table["rank"].null_count() < table.height


def test_compare_two_folders(evals: list[Path], tmp_path: Path) -> None:
    result = compare(evals[:2], tmp_path / "cmp", resamples=1000)
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert data == json.loads(json.dumps(result.payload))
    results_a = json.loads((evals[0] / "results.json").read_text())
    results_b = json.loads((evals[1] / "results.json").read_text())
    rows = data["rows"]
    assert {r["task"] for r in rows} == {t for t in HEADLINE if t in results_a}
    assert data["benchmark"]["manifest_sha256"] == results_a["bench_manifest_sha256"]
    for row in rows:
        assert row["metric"] == HEADLINE[row["task"]] and row["b"] == "B"
        assert row["mean_a"] == pytest.approx(results_a[row["task"]][row["metric"]], abs=1e-6)
        assert row["mean_b"] == pytest.approx(results_b[row["task"]][row["metric"]], abs=1e-6)
        assert row["diff"] == pytest.approx(row["mean_b"] - row["mean_a"])
        assert row["ci_low"] <= row["ci_high"] and 0 < row["p"] <= row["p_holm"] <= 1
        assert row["significant"] == (row["p_holm"] < 0.05)
    # on the oracle's best task (a product's own title and image) its noisy copy is worse
    best = max((r for r in rows if r["metric"] == "R@10"), key=lambda r: r["mean_a"])
    assert best["mean_a"] > 0.9
    assert best["diff"] < 0 and best["ci_high"] < 0 and best["p"] < 0.01
    # p recomputed from the per-query files, Holm over the R@10 family by hand
    a, b = (_per_query(folder, best["task"])["R@10"].to_numpy() for folder in evals[:2])
    assert paired_test(a, b, 1000, 0) == pytest.approx((best["p"], best["ci_low"], best["ci_high"]))
    family = [r for r in rows if r["metric"] == "R@10"]
    assert [r["p_holm"] for r in family] == pytest.approx(holm([r["p"] for r in family]))
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| task | metric | mean A | mean B | diff | 95% CI | p | p_holm | |" in markdown
    assert markdown.count(f"\n| {best['task']} | R@10 |") == 1


def _per_query(folder: Path, task: str) -> pl.DataFrame:
    return pl.read_parquet(folder / "per_query" / f"{task}.parquet").sort("query_id")


def test_cli_compares_three_folders_with_every_metric(evals: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "cmp3"
    args = ["compare", *map(str, evals), "--out", str(out), "--metrics", "all"]
    result = runner.invoke(app, [*args, "--resamples", "500", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "## B - A" in result.stdout and "## C - A" in result.stdout
    data = json.loads((out / "compare.json").read_text())
    assert data["seed"] == 3 and data["resamples"] == 500
    tasks = {r["task"] for r in data["rows"]}
    expected = sum(6 if t in RETRIEVAL_TASKS else 1 for t in tasks) * 2
    assert len(data["rows"]) == expected
    assert {r["b"] for r in data["rows"]} == {"B", "C"}
    # a re-run into its own folder replaces it; the same seed gives the same numbers
    again = runner.invoke(app, [*args, "--resamples", "500", "--seed", "3"])
    assert again.exit_code == 0 and json.loads((out / "compare.json").read_text()) == data
    picked = runner.invoke(
        app,
        [
            "compare",
            *map(str, evals[:2]),
            "--out",
            str(tmp_path / "m"),
            "--metrics",
            "nDCG@10,acc",
            "--resamples",
            "200",
        ],
    )
    assert picked.exit_code == 0, picked.output
    rows = json.loads((tmp_path / "m" / "compare.json").read_text())["rows"]
    assert {r["metric"] for r in rows} == {"nDCG@10", "acc"}


def _refusal(args: list[str]) -> str:
    result = runner.invoke(app, ["compare", *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    return result.stderr


def _copy(folder: Path, where: Path) -> Path:
    shutil.copytree(folder, where)
    return where


def test_refuses_folders_of_different_benchmarks(evals: list[Path], tmp_path: Path) -> None:
    other = _copy(evals[1], tmp_path / "other")
    results = json.loads((other / "results.json").read_text())
    results["bench_manifest_sha256"] = "0" * 64
    (other / "results.json").write_text(json.dumps(results))
    message = _refusal([str(evals[0]), str(other), "--out", str(tmp_path / "out")])
    assert "were evaluated on different benchmarks" in message
    assert not (tmp_path / "out").exists()


def test_refuses_old_eval_folders_and_different_queries(evals: list[Path], tmp_path: Path) -> None:
    old = _copy(evals[1], tmp_path / "old")
    shutil.rmtree(old / "per_query")
    message = _refusal([str(evals[0]), str(old), "--out", str(tmp_path / "o1")])
    assert "re-run moon2 eval" in message
    unnamed = _copy(evals[1], tmp_path / "unnamed")
    results = json.loads((unnamed / "results.json").read_text())
    del results["bench_manifest_sha256"]
    (unnamed / "results.json").write_text(json.dumps(results))
    message = _refusal([str(evals[0]), str(unnamed), "--out", str(tmp_path / "o2")])
    assert "does not record which benchmark" in message and "re-run moon2 eval" in message
    fewer = _copy(evals[1], tmp_path / "fewer")
    task = next(t for t in RETRIEVAL_TASKS if (fewer / "per_query" / f"{t}.parquet").exists())
    table = _per_query(fewer, task)
    table.slice(1).write_parquet(fewer / "per_query" / f"{task}.parquet")
    message = _refusal([str(evals[0]), str(fewer), "--out", str(tmp_path / "o3")])
    assert f"the {task} queries of" in message and table["query_id"][0] in message
    message = _refusal([str(evals[0]), "--out", str(tmp_path / "o4")])
    assert "at least two eval folders" in message
    message = _refusal(
        [str(evals[0]), str(evals[1]), "--out", str(tmp_path / "o5"), "--metrics", "F1"]
    )
    assert "unknown metric F1" in message
