"""moon2 demo (every stage, resume) and moon2 ablate (the grid, its table, resume)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.ablate import VARIANTS, render_markdown, run_ablation, summarise, variant_config
from moon2.cli import app
from moon2.data.outdir import MARKER
from moon2.errors import ConfigError, InputError
from moon2.pipeline import STAGES, DemoOptions, run_demo
from moon2.train.config import TrainConfig

runner = CliRunner()


def test_demo_writes_every_stage(demo_dir: Path):
    summary = json.loads((demo_dir / "demo.json").read_text())
    assert [s["name"] for s in summary["stages"]] == list(STAGES)
    assert (demo_dir / "catalog" / "products").is_dir()
    assert (demo_dir / "bench" / "manifest.json").exists()
    aug_file = next((demo_dir / "aug" / "products").glob("*.parquet"))
    aug_columns = set(pq.read_schema(aug_file).names)
    assert {"aug_title", "aug_images"} <= aug_columns
    assert (demo_dir / "cur" / "filter_report.json").exists()
    assert (demo_dir / "run" / "final").is_dir()
    assert (demo_dir / "run" / "scores").is_dir()
    results = json.loads((demo_dir / "eval" / "results.json").read_text())
    assert summary["metrics"]["t2mm"] == results["t2mm"]["R@10"]
    assert (demo_dir / "report" / "index.html").exists()
    train = summary["stages"][STAGES.index("train")]["summary"]
    assert train["filter_policy"] == "margin_weighting"
    # the filter's kept rows are what training used
    kept = summary["stages"][STAGES.index("filter")]["summary"]["counts"]["queries"]["kept"]
    assert train["queries_used"] <= kept


def test_demo_resumes_the_interrupted_stage(demo_dir: Path, tiny_recipe: Path, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(demo_dir, out)
    options = DemoOptions(
        products=60, noise=0.2, train_config=str(tiny_recipe), epochs=1, ray=False
    )
    eval_before = json.loads((out / "eval" / "results.json").read_text())
    # as if killed during eval: its marker missing, a half-written folder left behind
    (out / "_stages" / "eval.json").unlink()
    (out / "_stages" / "report.json").unlink()
    (out / "eval" / "results.json").write_text("{ half")
    result = run_demo(out, options)
    skipped = {s.name for s in result.stages if s.skipped}
    assert skipped == set(STAGES) - {"eval", "report"}
    eval_after = json.loads((out / "eval" / "results.json").read_text())
    assert eval_after["t2mm"] == eval_before["t2mm"]
    assert result.metrics == json.loads((demo_dir / "demo.json").read_text())["metrics"]


def test_demo_resumes_training_from_its_checkpoint(demo_dir: Path, tiny_recipe: Path, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(demo_dir, out)
    checkpoints = sorted((out / "run" / "checkpoints").iterdir())
    assert checkpoints, "the tiny recipe checkpoints every 5 updates"
    # as if killed after the last checkpoint: no final model, no summary, no later stages
    for stage in ("train", "eval", "report"):
        (out / "_stages" / f"{stage}.json").unlink()
    shutil.rmtree(out / "run" / "final")
    (out / "run" / "train_summary.json").unlink()
    options = DemoOptions(
        products=60, noise=0.2, train_config=str(tiny_recipe), epochs=1, ray=False
    )
    logged = (out / "run" / "metrics.jsonl").read_text().splitlines()
    result = run_demo(out, options)
    assert not any(s.skipped for s in result.stages if s.name in ("train", "eval", "report"))
    # resumed at the newest checkpoint: the records up to it are the first run's (with its
    # throughput figures), the steps after it are logged again, once
    resumed_at = int(checkpoints[-1].name.split("-")[1])
    lines = (out / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == [json.loads(line)["step"] for line in logged]
    assert lines[:resumed_at] == logged[:resumed_at] and resumed_at < steps[-1]
    before = json.loads((demo_dir / "eval" / "results.json").read_text())
    after = json.loads((out / "eval" / "results.json").read_text())
    for task in ("t2mm", "t2i", "i2t", "cls"):
        if task in before:
            assert after[task] == pytest.approx(before[task], abs=1e-6), task


def test_demo_refuses_other_options_and_foreign_folders(
    demo_dir: Path, tiny_recipe: Path, tmp_path
):
    out = tmp_path / "demo"
    shutil.copytree(demo_dir / "_parts", out / "_parts")
    shutil.copy(demo_dir / MARKER, out / MARKER)  # a demo's own folder
    with pytest.raises(ConfigError, match="different products"):
        run_demo(out, DemoOptions(products=80, noise=0.2, train_config=str(tiny_recipe)))
    # a folder with someone else's files is never written into (nor cleaned by --no-resume)
    (tmp_path / "mine" / "run").mkdir(parents=True)
    for resume in (True, False):
        with pytest.raises(InputError, match="not empty and was not written by moon2 demo"):
            run_demo(tmp_path / "mine", DemoOptions(products=60), resume=resume)
    assert (tmp_path / "mine" / "run").is_dir()


def test_demo_cli_prints_the_final_tables(demo_dir: Path, tiny_recipe: Path, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(demo_dir, out)
    args = ["demo", str(out), "--products", "60", "--noise", "0.2", "--no-ray", "--epochs", "1"]
    result = runner.invoke(app, [*args, "--train-config", str(tiny_recipe)])
    assert result.exit_code == 0, result.output
    assert "done earlier" in result.stderr
    for text in ("moon2 demo", "synth", "train", "t2mm", "report:"):
        assert text in result.output


def test_variant_configs_switch_one_thing_each():
    base = TrainConfig()
    by_name = {v.name: variant_config(base, v, seed=3) for v in VARIANTS}
    assert all(c.seed == 3 for c in by_name.values())
    assert by_name["full"].model_dump() == base.model_copy(update={"seed": 3}).model_dump()
    assert not by_name["no_moe"].moe.enabled and by_name["no_moe"].loss.intra
    assert not by_name["no_dual"].loss.intra and by_name["no_dual"].moe.enabled
    assert not by_name["no_coaug"].data.use_augmented
    assert not by_name["no_filter"].filter.enabled
    for name, config in by_name.items():
        differing = [
            k for k, v in config.model_dump().items() if v != by_name["full"].model_dump()[k]
        ]
        assert len(differing) == (0 if name == "full" else 1), (name, differing)


def test_summary_mean_and_sample_std_by_hand():
    runs = [
        {"variant": "full", "seed": 0, "metrics": {"t2mm": 0.5, "cls": None}},
        {"variant": "full", "seed": 1, "metrics": {"t2mm": 0.7, "cls": None}},
        {"variant": "no_moe", "seed": 0, "metrics": {"t2mm": 0.4, "cls": 0.2}},
    ]
    summary = summarise(runs)
    assert summary["full"]["t2mm"]["mean"] == pytest.approx(0.6)
    assert summary["full"]["t2mm"]["std"] == pytest.approx(math.sqrt(0.02))
    assert summary["full"]["cls"] == {"mean": None, "std": None, "n": 0}
    assert summary["no_moe"]["t2mm"] == {"mean": 0.4, "std": None, "n": 1}
    plan = {"data": "d", "bench": "b", "recipe": "r", "budget": "1 epochs"}
    table = render_markdown(summary, plan)
    assert "| MOON2.0 | 2 | 60.0 ± 14.1 | - |" in table
    assert "| w/o MoE | 1 | 40.0 (-20.0) | 20.0 |" in table  # one seed: no spread to show
    assert "| w/o MoE | 51.29 | 62.55 |" in table  # the paper's row, the same two columns


def _check_significance(out: Path, tests: dict, markdown: str) -> None:
    """The ablation's paired tests, recomputed from the per-query files by hand: (query x
    seed) pairs of both seeds, the sign-flip p and Holm over the tasks."""
    from moon2.bench.compare import paired_test
    from moon2.bench.evaluate import HEADLINE, PER_QUERY_COLUMN, per_query_ids

    assert set(tests) == {"no_dual"}
    row = tests["no_dual"]
    for task, test in row.items():
        full, ablated = [], []
        column = PER_QUERY_COLUMN.get(HEADLINE[task], HEADLINE[task])
        for seed in (0, 1):
            runs = [out / name / f"seed-{seed}" / "eval" for name in ("full", "no_dual")]
            frames = [pl.read_parquet(run / "per_query" / f"{task}.parquet") for run in runs]
            ids = list(per_query_ids(task))
            a, b = (f.sort(ids)[column].cast(pl.Float64).to_numpy() for f in frames)
            full.append(a)
            ablated.append(b)
        a, b = np.concatenate(full), np.concatenate(ablated)
        expected = paired_test(a, b)
        assert test["pairs"] == a.size and test["seeds"] == [0, 1]
        assert test["diff"] == pytest.approx((b - a).mean())
        assert test["p"] == pytest.approx(expected.p)
        assert test["ci_low"] <= test["diff"] <= test["ci_high"]
    ordered = sorted(row.values(), key=lambda t: t["p"])
    m = len(ordered)
    running = 0.0
    for i, test in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * test["p"]))
        assert test["p_holm"] == pytest.approx(running)
    assert "significant (p < 0.05 after Holm" in markdown


def test_ablate_grid_table_and_resume(demo_dir: Path, tiny_recipe: Path, tmp_path):
    out = tmp_path / "ablate"
    kwargs = {
        "seeds": (0, 1),
        "variants": ("full", "no_dual"),
        "config": tiny_recipe,
        "max_steps": 2,
    }
    result = run_ablation(demo_dir, out, **kwargs)
    assert [(r["variant"], r["seed"]) for r in result.runs] == [
        ("full", 0),
        ("full", 1),
        ("no_dual", 0),
        ("no_dual", 1),
    ]
    for run in result.runs:
        where = out / run["variant"] / f"seed-{run['seed']}"
        assert run["updates"] == 2
        config = (where / "run" / "train_config.yaml").read_text()
        assert f"seed: {run['seed']}" in config
        assert ("intra: false" in config) == (run["variant"] == "no_dual")
        results = json.loads((where / "eval" / "results.json").read_text())
        assert run["metrics"]["t2mm"] == results["t2mm"]["R@10"]
    values = [r["metrics"]["t2mm"] for r in result.runs if r["variant"] == "full"]
    assert result.summary["full"]["t2mm"]["mean"] == pytest.approx(sum(values) / 2)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(result.summary))
    assert (out / "ablation.md").read_text() == result.markdown
    _check_significance(out, saved["significance"], result.markdown)

    # a re-run trains nothing and writes the same table
    def stamp(variant: str, seed: int) -> int:
        return (out / variant / f"seed-{seed}" / "run" / "train_summary.json").stat().st_mtime_ns

    before = stamp("full", 0)
    again = run_ablation(demo_dir, out, **kwargs)
    assert again.markdown == result.markdown and stamp("full", 0) == before
    # a third seed of one variant trains only that run; the table keeps every run on disk
    more = run_ablation(demo_dir, out, **{**kwargs, "seeds": (2,), "variants": ("full",)})
    assert [(r["variant"], r["seed"]) for r in more.runs] == [
        ("full", 0),
        ("full", 1),
        ("full", 2),
        ("no_dual", 0),
        ("no_dual", 1),
    ]
    assert not (out / "no_dual" / "seed-2").exists() and stamp("full", 0) == before
    assert more.summary["full"]["t2mm"]["n"] == 3 and more.summary["no_dual"]["t2mm"]["n"] == 2
    assert (
        "| MOON2.0 | 3 |" in more.markdown and "| w/o dual-level alignment | 2 |" in more.markdown
    )
    with pytest.raises(ConfigError, match="different config"):
        run_ablation(demo_dir, out, **{**kwargs, "max_steps": 3})


def test_ablate_errors_name_the_problem(demo_dir: Path, tmp_path):
    with pytest.raises(InputError, match="not a moon2 demo folder"):
        run_ablation(demo_dir / "catalog", tmp_path / "a")
    # a demo killed during filter: cur/ has parts but no report yet (--data cur)
    half = tmp_path / "half"
    shutil.copytree(demo_dir / "cur", half / "cur")
    shutil.copytree(demo_dir / "bench", half / "bench")
    (half / "cur" / "filter_report.json").unlink()
    with pytest.raises(InputError, match="has not finished"):
        run_ablation(half, tmp_path / "a", train_data="cur")
    with pytest.raises(InputError, match=r"not a moon2 demo folder \(no aug/"):
        run_ablation(half, tmp_path / "a")  # the default trains on aug/, which is missing
    # ... and killed during augment: aug/ without its manifest
    shutil.copytree(demo_dir / "aug", half / "aug")
    (half / "aug" / "manifest.json").unlink()
    with pytest.raises(InputError, match=r"aug/manifest\.json is missing"):
        run_ablation(half, tmp_path / "a")
    with pytest.raises(InputError, match="--data picks the training data of a moon2 demo"):
        run_ablation(demo_dir / "aug", tmp_path / "a", demo_dir / "bench", train_data="cur")
    with pytest.raises(InputError, match="unknown variant"):
        run_ablation(demo_dir, tmp_path / "a", variants=("full", "no_such"))
    # the bench's own train split was never augmented: the no_coaug variant would be a no-op
    with pytest.raises(InputError, match="no aug_title or aug_images"):
        run_ablation(demo_dir / "bench" / "train", tmp_path / "a", bench_dir=demo_dir / "bench")


def test_ablate_cli(demo_dir: Path, tiny_recipe: Path, tmp_path):
    args = ["ablate", str(demo_dir), str(tmp_path / "a"), "--seeds", "1", "--variants"]
    result = runner.invoke(app, [*args, "no_moe", "--config", str(tiny_recipe), "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "| w/o MoE |" in result.stdout
    assert (tmp_path / "a" / "no_moe" / "seed-0" / "eval" / "results.json").exists()


def _recipe(tiny_recipe: Path, where: Path, **sections: dict) -> Path:
    import yaml

    config = yaml.safe_load(tiny_recipe.read_text())
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    where.write_text(yaml.safe_dump(config))
    return where


def test_ablate_refuses_a_budget_where_a_switch_changes_nothing(
    demo_dir: Path, tiny_recipe: Path, tmp_path
):
    late = _recipe(tiny_recipe, tmp_path / "late.yaml", filter={"warmup": 1.0})
    args = ["ablate", str(demo_dir), str(tmp_path / "a"), "--seeds", "1", "--config", str(late)]
    result = runner.invoke(app, [*args, "--variants", "full,no_filter"])
    assert result.exit_code == 2, result.output
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "warm-up (filter.warmup 1.0) covers all" in message and "lower filter.warmup" in message
    assert not (tmp_path / "a" / "full").exists()  # refused before any training
    # the same recipe is fine when the filter is not what the grid compares
    from moon2.ablate import VARIANTS, check_switches
    from moon2.train.recipes import load_recipe

    by_name = {v.name: v for v in VARIANTS}
    check_switches(load_recipe(late), [by_name["full"], by_name["no_moe"]], demo_dir / "aug")
    switches = (("moe", "enabled", "no_moe"), ("loss", "intra", "no_dual"))
    for section, key, name in (*switches, ("data", "use_augmented", "no_coaug")):
        recipe = _recipe(tiny_recipe, tmp_path / f"{name}.yaml", **{section: {key: False}})
        off = load_recipe(recipe)
        with pytest.raises(ConfigError, match=rf"{section}\.{key} is false in the recipe"):
            check_switches(off, [by_name["full"], by_name[name]], demo_dir / "aug")


def test_ablate_trains_on_aug_and_checks_each_run_did_what_it_claims(
    demo_dir: Path, tiny_recipe: Path, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "a"
    args = ["ablate", str(demo_dir), str(out), "--seeds", "1", "--epochs", "1"]
    more = ["--variants", "full,no_filter", "--config", str(tiny_recipe), "--max-steps", "3"]
    result = runner.invoke(app, [*args, *more])
    assert result.exit_code == 0, result.output
    about = json.loads((out / "ablation.json").read_text())["about"]
    assert Path(about["data"]) == (demo_dir / "aug").resolve()  # not pre-filtered
    runs = {
        name: json.loads((out / name / "seed-0" / "run" / "train_summary.json").read_text())
        for name in ("full", "no_filter")
    }
    full, plain = runs["full"]["mechanisms"], runs["no_filter"]["mechanisms"]
    assert full["dynamic_filter"]["acted"] and full["dynamic_filter"]["samples"] > 0
    assert not plain["dynamic_filter"]["acted"] and plain["dynamic_filter"]["samples"] == 0
    assert full["co_augmentation"]["ran"] and full["co_augmentation"]["with_aug_title"] > 0
    assert full["co_augmentation"]["with_aug_images"] > 0
    # --data cur keeps training on the filtered split
    once = {"seeds": (0,), "config": tiny_recipe, "epochs": 1}
    cur = run_ablation(
        demo_dir, tmp_path / "c", variants=("no_moe",), max_steps=1, train_data="cur", **once
    )
    about = json.loads((tmp_path / "c" / "ablation.json").read_text())["about"]
    assert cur.runs and Path(about["data"]) == (demo_dir / "cur").resolve()
    # a full run whose filter never acted (simulated) is caught before its evaluation
    import torch

    from moon2.curate.dynamic import FilterPolicy

    def never(self, margins, progress, losses=None):
        phi = torch.sigmoid(margins)
        return phi, torch.ones_like(phi)

    monkeypatch.setattr(FilterPolicy, "weights", never)
    with pytest.raises(ConfigError, match=r"^full/seed-0: the dynamic filter never acted"):
        run_ablation(demo_dir, tmp_path / "b", variants=("full", "no_filter"), max_steps=3, **once)
    assert not (tmp_path / "b" / "full" / "seed-0" / "eval").exists()
    assert not (tmp_path / "b" / "no_filter").exists()


def test_resume_keeps_the_metrics_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    from moon2.train.trainer import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    records = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (10, 20, 30)]
    path.write_text("\n".join([*records, '{"step": 40, "lo']))  # killed mid-write
    _truncate_metrics(path, 20)
    assert path.read_text().splitlines() == records[:2]
    _truncate_metrics(path, 0)  # a fresh run starts a fresh log
    assert not path.exists()
