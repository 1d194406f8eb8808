"""``moon2 ablate``: the paper's ablation grid (full model and four ablations) on your data.

Every variant trains with the same recipe, budget (epochs / updates) and seeds, and is
evaluated with ``moon2 eval`` on the same benchmark. Layout of OUT::

    <variant>/seed-<s>/run/     a moon2 train output (train_config.yaml is the resolved recipe)
    <variant>/seed-<s>/eval/    a moon2 eval output (results.json, results.md)
    ablation.json               every run's headline metrics, mean and std per variant
    ablation.md                 the table in the layout of the paper's ablation table
    _parts/plan.json            the data, benchmark and recipe every run must share

A run whose eval finished is skipped on a re-run; an interrupted training resumes from its
newest checkpoint, so killing and re-running gives the same table. The table covers every
finished run in OUT: seeds and variants can be added by later calls.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from moon2 import progress
from moon2.data.io import atomic_path, count_rows, read_schema, resolve_files
from moon2.data.outdir import claim_output
from moon2.data.parts import check_plan, fingerprint
from moon2.errors import ConfigError, InputError


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: dict[str, dict[str, Any]]
    paper: tuple[float, ...]
    """The paper's MBE2.0 numbers (R@10 / accuracy, %) in PAPER_TASKS order (its t2i / i2t are
    moon2's query-based t2i / i2t; title2image / image2title have no paper number)."""


VARIANTS: tuple[Variant, ...] = (
    Variant("full", "MOON2.0", {}, (63.09, 91.08, 94.21, 73.12, 64.91, 68.08, 84.29)),
    Variant(
        "no_moe",
        "w/o MoE",
        {"moe": {"enabled": False}},
        (51.29, 74.59, 78.45, 62.16, 56.21, 62.55, 75.62),
    ),
    Variant(
        "no_dual",
        "w/o dual-level alignment",
        {"loss": {"intra": False}},
        (37.99, 65.72, 67.45, 31.45, 23.35, 57.12, 67.24),
    ),
    Variant(
        "no_coaug",
        "w/o co-augmentation",
        {"data": {"use_augmented": False}},
        (59.69, 78.17, 80.62, 64.79, 58.68, 66.21, 77.77),
    ),
    Variant(
        "no_filter",
        "w/o dynamic filtering",
        {"filter": {"enabled": False}},
        (60.63, 83.40, 80.00, 70.40, 63.21, 67.99, 84.04),
    ),
)
VARIANT_NAMES: tuple[str, ...] = tuple(v.name for v in VARIANTS)

MECHANISM_OF: dict[str, tuple[str, str]] = {
    "no_moe": ("moe", "MoE routing"),
    "no_dual": ("intra_loss", "the intra-product loss"),
    "no_coaug": ("co_augmentation", "co-augmentation (aug_* inputs)"),
    "no_filter": ("dynamic_filter", "the dynamic filter"),
}
"""Each ablation's switched-off mechanism: its key in train_summary.json ``mechanisms`` and
its name in messages."""


@dataclass
class AblationResult:
    out_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, dict[str, dict[str, float | int | None]]] = field(default_factory=dict)
    markdown: str = ""
    seconds: float = 0.0


# a demo stage's folder and the file it writes last
DEMO_TRAIN_DATA = {"aug": "manifest.json", "cur": "filter_report.json"}


def resolve_inputs(
    data: Path, bench: Path | None, train_data: str | None = None
) -> tuple[Path, Path]:
    """DATA may be a ``moon2 demo`` folder: its bench/ evaluates and, by ``train_data``, its
    aug/ (augmented, not pre-filtered, as the paper trained; the default), its cur/ (after
    moon2 filter) or any catalog PATH trains, once those stages have finished."""
    if bench is None:
        return _demo_inputs(data, train_data or "aug")
    if train_data is not None:
        raise InputError(
            "--data picks the training data of a moon2 demo folder; with --bench, DATA itself "
            "is what trains"
        )
    _check_catalog(data)
    if not (bench / "manifest.json").exists():
        raise InputError(f"{bench} is not a moon2 build-bench output (no manifest.json)")
    return data, bench


def _demo_inputs(demo: Path, train_data: str) -> tuple[Path, Path]:
    stage = train_data if train_data in DEMO_TRAIN_DATA else None
    train = demo / stage if stage else Path(train_data)
    if not (demo / "bench").is_dir() or (stage and not train.is_dir()):
        raise InputError(
            f"{demo} is not a moon2 demo folder (no {stage or 'bench'}/ and bench/); pass the "
            "benchmark to evaluate on with --bench"
        )
    needed = [demo / "bench" / "manifest.json"]
    if stage:
        needed.insert(0, train / DEMO_TRAIN_DATA[stage])
    for path in needed:
        if not path.exists():
            raise InputError(
                f"{path} is missing: the demo in {demo} has not finished that stage yet; "
                "re-run moon2 demo first"
            )
    _check_catalog(train)
    return train, demo / "bench"


def _check_catalog(data: Path) -> None:
    if not (data / "products").is_dir() or not (data / "queries").is_dir():
        raise InputError(f"{data} has no products/ and queries/ folders to train on")


def variant_config(base: Any, variant: Variant, seed: int) -> Any:
    """``base`` (a TrainConfig) with the variant's switches and the seed applied."""
    from moon2.train.config import TrainConfig

    dumped = base.model_dump()
    for section, values in variant.overrides.items():
        dumped[section] = {**dumped[section], **values}
    dumped["seed"] = seed
    return TrainConfig.model_validate(dumped)


def check_switches(base: Any, chosen: Sequence[Variant], data: Path) -> None:
    """Refuse a recipe or budget under which an ablation's switch changes nothing (no_coaug
    on data without aug_* columns is refused by the caller)."""
    names = {v.name for v in chosen}
    off = {
        "no_moe": (not base.moe.enabled, "moe.enabled is false"),
        "no_dual": (not base.loss.intra, "loss.intra is false"),
        "no_coaug": (not base.data.use_augmented, "data.use_augmented is false"),
        "no_filter": (
            not base.filter.enabled or base.filter.policy == "none",
            "the dynamic filter is off (filter.enabled / filter.policy)",
        ),
    }
    for name, (is_off, why) in off.items():
        if name in names and is_off:
            raise ConfigError(
                f"{why} in the recipe, so '{_label(name)}' would train the same model as the "
                f"full one; switch it on in the recipe, or leave {name} out of --variants"
            )
    if "no_filter" in names:
        _check_filter_budget(base, data)


def _check_filter_budget(base: Any, data: Path) -> None:
    """The filter's warm-up must end before the run does (counting every query row as
    usable; a run with rejected queries is shorter, which the post-run check catches)."""
    updates = base.optim.planned_updates(count_rows(data / "queries"))
    if base.filter.first_update(updates) >= updates:
        raise ConfigError(
            f"the dynamic filter's warm-up (filter.warmup {base.filter.warmup}) covers all "
            f"{updates} updates of this budget, so 'w/o dynamic filtering' would train the same "
            "model as the full one; lower filter.warmup or train longer (--epochs, --max-steps)"
        )


def _label(name: str) -> str:
    return next(v.label for v in VARIANTS if v.name == name)


def check_mechanisms(
    variant: Variant, seed: int, summary: dict[str, Any], chosen: Sequence[Variant]
) -> None:
    """After a run: the full model must have run the mechanism of every chosen ablation, an
    ablation must not have run its own (from train_summary.json's ``mechanisms``; runs trained
    before it recorded them are not checked)."""
    mechanisms = summary.get("mechanisms")
    if mechanisms is None:
        return
    if variant.name == "full":
        expected = [(MECHANISM_OF[v.name], True) for v in chosen if v.name in MECHANISM_OF]
    else:
        expected = [(MECHANISM_OF[variant.name], False)]
    wrong = [
        f"{text} {'never acted' if should else 'still acted'}"
        for (key, text), should in expected
        if _acted(mechanisms[key]) != should
    ]
    if wrong:
        raise ConfigError(
            f"{variant.name}/seed-{seed}: {', '.join(wrong)} (train_summary.json 'mechanisms'), "
            "so the grid would not measure what it claims; change the recipe or budget and "
            "re-run with --no-resume"
        )


def _acted(mechanism: dict[str, Any]) -> bool:
    return bool(mechanism.get("acted", mechanism.get("ran")))


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """variant -> task -> {mean, std, n} over the seeds (sample std; None with one seed)."""
    from moon2.bench.config import ALL_TASKS

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        of_variant = [run for run in runs if run["variant"] == variant]
        out[variant] = {}
        for task in ALL_TASKS:
            values = [r["metrics"][task] for r in of_variant if r["metrics"].get(task) is not None]
            if not values:
                out[variant][task] = {"mean": None, "std": None, "n": 0}
                continue
            mean = sum(values) / len(values)
            std = (
                math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else None
            )
            out[variant][task] = {"mean": mean, "std": std, "n": len(values)}
    return out


def render_markdown(
    summary: dict[str, dict[str, dict[str, Any]]],
    about: dict[str, Any],
    tests: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The paper's layout: one row per model, R@10 for retrieval and accuracy for cls/attr,
    mean ± std over seeds in %, and each ablation's change from the full model, marked ``*``
    where its paired test (``tests``, from :func:`significance`) has p < 0.05 after Holm."""
    tests = tests or {}
    from moon2.bench.compare import ALPHA
    from moon2.bench.config import ALL_TASKS, PAPER_TASKS

    by_name = {v.name: v for v in VARIANTS}
    tasks = [t for t in ALL_TASKS if any(summary[v][t]["n"] for v in summary)]
    full = summary.get("full")
    lines = [
        "# moon2 ablate",
        "",
        f"Trained on `{about['data']}`, evaluated on `{about['bench']}`; recipe "
        f"`{about['recipe']}`, {about['budget']}. R@10 (retrieval) and accuracy (cls, attr) in "
        "%, mean ± sample std over the seeds (the `seeds` column); in brackets the change from "
        "the full model.",
        "",
        "| model | seeds | " + " | ".join(tasks) + " |",
        "|---|---|" + "---:|" * len(tasks),
    ]
    for name, tasks_summary in summary.items():
        cells = []
        for task in tasks:
            cell = tasks_summary[task]
            if cell["mean"] is None:
                cells.append("-")
                continue
            text = f"{100 * cell['mean']:.1f}"
            if cell["std"] is not None:
                text += f" ± {100 * cell['std']:.1f}"
            if full is not None and name != "full" and full[task]["mean"] is not None:
                text += f" ({100 * (cell['mean'] - full[task]['mean']):+.1f})"
                test = tests.get(name, {}).get(task)
                if test is not None and test["p_holm"] < ALPHA:
                    text += " *"
            cells.append(text)
        counts = sorted({tasks_summary[t]["n"] for t in tasks if tasks_summary[t]["n"]})
        seeds = "/".join(map(str, counts)) or "0"
        lines.append(f"| {by_name[name].label} | {seeds} | " + " | ".join(cells) + " |")
    if tests:
        lines += [
            "",
            f"`*`: the change from the full model is significant (p < {ALPHA} after Holm "
            "over the tasks of that row): a two-sided paired sign-flip test over (query x "
            "seed) pairs of the seeds both models have, as in `moon2 compare`. p-values and "
            "95 % confidence intervals are in `ablation.json` (`significance`); no `*` means "
            "not significant, not no effect.",
        ]
    lines += [
        "",
        "The paper's table on MBE2.0 (5.75 M training triplets), same columns "
        "(-: not a task of the paper):",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for variant in VARIANTS:
        if variant.name in summary:
            paper = dict(zip(PAPER_TASKS, variant.paper, strict=True))
            cells = [f"{paper[t]:.2f}" if t in paper else "-" for t in tasks]
            lines.append(f"| {variant.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significance(out: Path, runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant -> task -> the paired test of the ablation against the full model on the
    headline metric, pooled over (query x seed) pairs of the seeds both have: ``pairs``,
    ``diff`` (ablation - full), ``ci_low`` / ``ci_high`` (95 % bootstrap), ``p`` (sign-flip)
    and ``p_holm`` (Holm over the tasks of that variant). moon2 compare's statistics; runs
    evaluated before per-query results existed are left out."""
    from moon2.bench.compare import holm, paired_test
    from moon2.bench.config import ALL_TASKS
    from moon2.bench.evaluate import HEADLINE

    seeds: dict[str, set[int]] = {}
    for run in runs:
        seeds.setdefault(run["variant"], set()).add(run["seed"])
    result: dict[str, dict[str, Any]] = {}
    for variant in [v.name for v in VARIANTS if v.name in seeds and v.name != "full"]:
        shared = sorted(seeds[variant] & seeds.get("full", set()))
        tests = {}
        for task in ALL_TASKS:
            pairs = [_pairs(out, variant, seed, task, HEADLINE[task]) for seed in shared]
            if not pairs or any(pair is None for pair in pairs):
                continue
            full = np.concatenate([pair[0] for pair in pairs])
            ablated = np.concatenate([pair[1] for pair in pairs])
            test = paired_test(full, ablated)
            tests[task] = {
                "metric": HEADLINE[task],
                "seeds": shared,
                "pairs": int(full.size),
                "diff": float((ablated - full).mean()),
                "ci_low": test.ci_low,
                "ci_high": test.ci_high,
                "p": test.p,
            }
        adjusted = holm([t["p"] for t in tests.values()])
        for test, p_holm in zip(tests.values(), adjusted, strict=True):
            test["p_holm"] = p_holm
        if tests:
            result[variant] = tests
    return result


def _pairs(
    out: Path, variant: str, seed: int, task: str, metric: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """The full model's and the ablation's per-query values of one seed, aligned; None when
    either eval has no per-query results for the task."""
    from moon2.bench.compare import paired_per_query

    evals = [out / name / f"seed-{seed}" / "eval" for name in ("full", variant)]
    if not all((e / "per_query" / f"{task}.parquet").is_file() for e in evals):
        return None
    full, ablated = paired_per_query(evals, task, metric)
    return full, ablated


def collect_runs(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out`` (all seeds of every variant, in table order): the
    table covers what is on disk, not only what this call trained."""
    from moon2.pipeline import headline_metrics

    runs = []
    for variant in VARIANTS:
        seeds = []
        for where in (out / variant.name).glob("seed-*"):
            suffix = where.name.removeprefix("seed-")
            if suffix.isdigit() and (where / "eval" / "results.json").exists():
                seeds.append((int(suffix), where))
        for seed, where in sorted(seeds):
            summary_path = where / "run" / "train_summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            runs.append(
                {
                    "variant": variant.name,
                    "seed": seed,
                    "metrics": headline_metrics(where / "eval" / "results.json"),
                    "train_seconds": summary.get("seconds"),
                    "updates": summary.get("updates"),
                }
            )
    return runs


# what ablate writes directly in OUT (--no-resume deletes these, and only in its own folder)
OUTPUTS = (*VARIANT_NAMES, "_parts", "ablation.json", "ablation.md")


def run_ablation(
    data_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    bench_dir: str | os.PathLike[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    variants: Sequence[str] = VARIANT_NAMES,
    config: str | os.PathLike[str] | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    resume: bool = True,
    train_data: str | None = None,
) -> AblationResult:
    """Train and evaluate every (variant, seed); finished runs are kept and skipped.

    ``train_data`` (a demo folder only): 'aug' (default), 'cur' or a catalog path, see
    :func:`resolve_inputs`."""
    from moon2.bench.evaluate import manifest_hash
    from moon2.train.recipes import load_recipe

    started = time.perf_counter()
    unknown = [v for v in variants if v not in VARIANT_NAMES]
    if unknown or not variants:
        raise InputError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(VARIANT_NAMES)}"
        )
    seeds = list(dict.fromkeys(seeds))
    if not seeds:
        raise InputError("no seeds to run: give at least one")
    data, bench = resolve_inputs(
        Path(data_dir), Path(bench_dir) if bench_dir else None, train_data
    )
    data, bench = data.resolve(), bench.resolve()
    chosen = [v for v in VARIANTS if v.name in variants]
    columns = set(read_schema(data / "products").names)
    if not {"aug_title", "aug_images"} & columns:
        if any(v.name == "no_coaug" for v in chosen):
            raise InputError(
                f"{data / 'products'} has no aug_title or aug_images column, so 'w/o "
                "co-augmentation' would train the same model as the full one; run moon2 "
                "augment first, or leave no_coaug out of --variants"
            )
        progress.warn(f"{data / 'products'} has no aug_* columns: 'MOON2.0' trains without them")
    base = load_recipe(config, epochs=epochs, max_steps=max_steps)
    check_switches(base, chosen, data)
    files = [*resolve_files(data / "products"), *resolve_files(data / "queries")]
    out = Path(out_dir)
    # seeds and variants are left out: more of either can join the same table later
    plan = {
        "data": fingerprint(files),
        "bench": manifest_hash(bench),
        "config": base.model_dump(mode="json"),
    }
    legacy = (("_parts/plan.json", '"bench"'),)  # a grid from before output markers
    with claim_output(
        out, "ablate", inputs=[data, bench], outputs=OUTPUTS, resume=resume, legacy=legacy
    ):
        check_plan(out, plan, resume, "ablation")
        _run_grid(out, data, bench, base, chosen, seeds)
        return _finish(out, data, bench, base, config, started)


def _run_grid(
    out: Path, data: Path, bench: Path, base: Any, chosen: list[Variant], seeds: list[int]
) -> None:
    """Train and evaluate each (seed, variant) not finished yet."""
    from moon2.bench.config import EvalConfig
    from moon2.bench.evaluate import evaluate
    from moon2.train.trainer import train

    total = len(chosen) * len(seeds)
    number = 0
    for seed in seeds:
        for variant in chosen:
            number += 1
            where = out / variant.name / f"seed-{seed}"
            heading = f"[bold]{number}/{total} {escape(variant.label)}, seed {seed}[/bold]"
            if (where / "eval" / "results.json").exists():
                progress.info(f"{heading}: done earlier", markup=True)
                continue
            progress.info(f"{heading} -> {escape(str(where))}", markup=True)
            summary = where / "run" / "train_summary.json"
            if not summary.exists():
                train(data, where / "run", variant_config(base, variant, seed), resume=True)
            check_mechanisms(variant, seed, json.loads(summary.read_text()), chosen)
            evaluate(str(where / "run" / "final"), bench, where / "eval", EvalConfig())


def _finish(
    out: Path,
    data: Path,
    bench: Path,
    base: Any,
    config: str | os.PathLike[str] | None,
    started: float,
) -> AblationResult:
    """The table over every finished run in OUT, written as ablation.json and .md."""
    result = AblationResult(out, runs=collect_runs(out))
    result.summary = summarise(result.runs)
    budget = f"{base.optim.epochs} epochs" + (
        f", at most {base.optim.max_steps} updates" if base.optim.max_steps else ""
    )
    about = {
        "data": str(data),
        "bench": str(bench),
        "recipe": str(config) if config else "tiny-cpu",
        "budget": budget,
    }
    tests = significance(out, result.runs)
    result.markdown = render_markdown(result.summary, about, tests)
    result.seconds = time.perf_counter() - started
    document = {
        "about": about,
        "runs": result.runs,
        "summary": result.summary,
        "significance": tests,
    }
    for name, text in (
        ("ablation.json", json.dumps(document, indent=2)),
        ("ablation.md", result.markdown),
    ):
        with atomic_path(out / name) as temp:
            temp.write_text(text, encoding="utf-8")
    return result
