"""``moon2 demo``: the whole pipeline on the embedded synthetic catalog, one stage at a time.

Layout of OUT (each stage reads the one before it)::

    catalog/   moon2 synth            products/, queries/ (truth_* columns: the injected noise)
    bench/     moon2 build-bench      train/, test/tasks/<task>/, manifest.json
    aug/       moon2 augment          bench/train with aug_title, aug_images, ... (+ queries/)
    cur/       moon2 filter           aug/ without the rows found noisy; _removed/, report
    run/       moon2 train            metrics.jsonl, scores/, final/ (dynamic filtering on)
    eval/      moon2 eval             results.json, results.md, runs/<task>.trec
    report/    moon2 report           index.html and the PNG plots
    _stages/   one JSON per finished stage (its time and summary): what a re-run skips
    _parts/plan.json  the options; a re-run with others is refused (--no-resume: start over)
    demo.json  the options, every stage's time and summary, the metric table

A stage that was interrupted resumes from its own parts (synth, augment and filter keep
finished parts, training its newest checkpoint) or, for the quick ones (build-bench, eval,
report), starts again from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape

from moon2 import progress
from moon2.data.io import atomic_path
from moon2.data.outdir import claim_output
from moon2.data.parts import check_plan
from moon2.errors import ConfigError, Moon2Error

STAGES: tuple[str, ...] = ("synth", "build-bench", "augment", "filter", "train", "eval", "report")
STAGE_DIRS: dict[str, str] = {
    "synth": "catalog",
    "build-bench": "bench",
    "augment": "aug",
    "filter": "cur",
    "train": "run",
    "eval": "eval",
    "report": "report",
}
# stages that keep their finished parts when killed; the others restart from an empty folder
RESUMABLE: frozenset[str] = frozenset({"synth", "augment", "filter", "train"})
# Candidates with their aug_title and an expanded image cost the tiny-cpu step about twice
# what plain ones do (~20 vs ~49 samples/s here), so the recipe's 9 epochs would take ~21
# minutes on the demo's split; 4 keep the whole demo near 12.
DEMO_EPOCHS = 4
# The smallest synthetic catalog whose 20% test split builds at least one task for every
# seed tried (60 seeds at noise 0.2, 0.7 and 0.9); at 40 or 50 products with noise 0.9, 1
# seed in 25 still left every task too small.
DEMO_MIN_PRODUCTS = 60

# what the demo writes directly in OUT (--no-resume deletes these, and only in its own folder)
OUTPUTS: tuple[str, ...] = (*STAGE_DIRS.values(), "_stages", "_parts", "demo.json")


@dataclass
class DemoOptions:
    """What a demo run depends on; a re-run with other options refuses to mix the two."""

    products: int = 2000
    noise: float = 0.1
    seed: int = 0
    train_config: str | None = None
    augment_config: str | None = None
    filter_config: str | None = None
    epochs: int | None = DEMO_EPOCHS
    max_steps: int | None = None
    ray: bool = True

    def __post_init__(self) -> None:
        # checked before anything is written: a smaller catalog fails only at build-bench
        if self.products < DEMO_MIN_PRODUCTS:
            raise ConfigError(
                f"--products {self.products} is too few for the demo: below "
                f"{DEMO_MIN_PRODUCTS} products the test split can be too small for any "
                "benchmark task"
            )


@dataclass
class StageRecord:
    name: str
    seconds: float
    summary: dict[str, Any]
    skipped: bool = False


@dataclass
class DemoResult:
    out_dir: Path
    stages: list[StageRecord] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)
    report: Path | None = None

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)


def run_demo(
    out_dir: str | os.PathLike[str],
    options: DemoOptions | None = None,
    resume: bool = True,
) -> DemoResult:
    """Run (or finish) every stage of the demo in ``out_dir``; finished stages are skipped."""
    options = options or DemoOptions()
    # ``ray`` may differ on a re-run: it changes how augment runs, not what it writes
    plan = {k: v for k, v in asdict(options).items() if k != "ray"}
    legacy = (("_parts/plan.json", "augment_config"),)  # a demo from before output markers
    with claim_output(out_dir, "demo", outputs=OUTPUTS, resume=resume, legacy=legacy) as claim:
        check_plan(claim.path, plan, resume, "demo")
        return _run_stages(claim.path, options)


def _run_stages(out: Path, options: DemoOptions) -> DemoResult:
    """Each stage not finished yet, in order; then demo.json."""
    (out / "_stages").mkdir(exist_ok=True)

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "synth": lambda: _synth(out, options),
        "build-bench": lambda: _build_bench(out, options),
        "augment": lambda: _augment(out, options),
        "filter": lambda: _filter(out, options),
        "train": lambda: _train(out, options),
        "eval": lambda: _eval(out),
        "report": lambda: _report(out),
    }
    result = DemoResult(out)
    for number, name in enumerate(STAGES, start=1):
        marker = out / "_stages" / f"{name}.json"
        target = out / STAGE_DIRS[name]
        heading = f"[bold]{number}/{len(STAGES)} {name}[/bold] -> {escape(str(target))}"
        if marker.exists():
            record = json.loads(marker.read_text())
            progress.info(f"{heading}: done earlier ({record['seconds']:.0f} s)", markup=True)
            result.stages.append(StageRecord(name, record["seconds"], record["summary"], True))
            continue
        progress.info(heading, markup=True)
        if name not in RESUMABLE and target.exists():
            shutil.rmtree(target)
        started = time.perf_counter()
        summary = runners[name]()
        seconds = round(time.perf_counter() - started, 1)
        with atomic_path(marker) as temp:
            temp.write_text(json.dumps({"seconds": seconds, "summary": summary}, indent=2))
        result.stages.append(StageRecord(name, seconds, summary))
    result.metrics = headline_metrics(out / "eval" / "results.json")
    result.report = out / "report" / "index.html"
    with atomic_path(out / "demo.json") as temp:
        temp.write_text(
            json.dumps(
                {
                    "options": asdict(options),
                    "seconds": round(result.seconds, 1),
                    "stages": [asdict(stage) for stage in result.stages],
                    "metrics": result.metrics,
                    "report": str(result.report),
                },
                indent=2,
            )
        )
    return result


def headline_metrics(results_path: Path) -> dict[str, float | None]:
    """Task -> the paper's headline number (R@10 for retrieval, accuracy for cls/attr)."""
    from moon2.bench.config import ALL_TASKS
    from moon2.bench.evaluate import HEADLINE

    results = json.loads(results_path.read_text())
    return {
        task: results[task].get(HEADLINE[task]) if task in results else None for task in ALL_TASKS
    }


# --- the stages: each calls the same function as its command ---------------------------------


def _synth(out: Path, options: DemoOptions) -> dict[str, Any]:
    from moon2.data.synth.generator import SynthConfig, synth

    config = SynthConfig(products=options.products, noise=options.noise, seed=options.seed)
    made = synth(config, out / "catalog")
    return {"products": made.products, "queries": made.queries}


def _build_bench(out: Path, options: DemoOptions) -> dict[str, Any]:
    from moon2.bench.build import build_bench
    from moon2.bench.config import BenchConfig

    manifest = build_bench(out / "catalog", out / "bench", BenchConfig(seed=options.seed)).manifest
    splits = manifest["splits"]
    if not manifest["leakage"]["ok"]:
        progress.warn(f"build-bench leakage checks failed: {manifest['leakage']}")
    for task, reason in manifest["skipped_tasks"].items():
        progress.warn(f"task {task} skipped: {reason}")
    return {
        "train_products": splits["train"]["products"],
        "train_queries": splits["train"]["queries"],
        "test_products": splits["test"]["products"],
        "tasks": list(manifest["tasks"]),
        "skipped_tasks": manifest["skipped_tasks"],
        "leakage_ok": manifest["leakage"]["ok"],
    }


def _augment(out: Path, options: DemoOptions) -> dict[str, Any]:
    from moon2.augment.config import AugmentConfig, demo_recipe
    from moon2.augment.pipeline import augment

    config = (
        AugmentConfig.from_yaml(options.augment_config) if options.augment_config else demo_recipe()
    )
    try:
        manifest = augment(
            out / "bench" / "train", out / "aug", config, use_ray=options.ray
        ).manifest
    finally:
        if options.ray:
            import ray

            # the later stages run in this process; idle Ray workers would keep ~1 GB
            ray.shutdown()
    return {
        key: manifest[key]
        for key in ("rows_in", "rows_out", "rows_rejected", "title_sources")
        if key in manifest
    }


def _filter(out: Path, options: DemoOptions) -> dict[str, Any]:
    from moon2.curate.config import CurateConfig
    from moon2.curate.pipeline import filter_catalog

    config = CurateConfig.from_yaml(options.filter_config)
    report = filter_catalog(out / "aug", out / "cur", config).report
    summary: dict[str, Any] = {"counts": report["counts"]}
    evaluation = report.get("evaluation", {}).get("products", {}).get("overall")
    if evaluation:
        summary["products_f1"] = evaluation.get("f1")
    return summary


def _train(out: Path, options: DemoOptions) -> dict[str, Any]:
    from moon2.train.recipes import load_recipe
    from moon2.train.trainer import train

    config = load_recipe(
        options.train_config,
        seed=options.seed,
        epochs=options.epochs,
        max_steps=options.max_steps,
    )
    summary = train(out / "cur", out / "run", config, resume=True).summary
    return {
        key: summary.get(key) for key in ("updates", "seconds", "queries_used", "filter_policy")
    }


def _eval(out: Path) -> dict[str, Any]:
    from moon2.bench.config import EvalConfig
    from moon2.bench.evaluate import evaluate

    evaluate(str(out / "run" / "final"), out / "bench", out / "eval", EvalConfig())
    return {"metrics": headline_metrics(out / "eval" / "results.json")}


def _report(out: Path) -> dict[str, Any]:
    from moon2.report import build_report

    report = build_report(out, out / "report")
    missing = {name: state for name, state in report.sections.items() if state != "ok"}
    broken = {name: state for name, state in missing.items() if state.startswith("could not")}
    if broken:
        # every input of every section exists in a demo: a section that failed is a bug or a
        # damaged file, and the stage stays unfinished so that a re-run tries again
        listing = "; ".join(f"{name}: {state}" for name, state in broken.items())
        raise Moon2Error(f"the report of {out} is incomplete ({listing}); see {report.html}")
    return {"html": str(report.html), "plots": len(report.plots), "missing": missing}
