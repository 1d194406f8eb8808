"""The ``moon2`` command line: thin Typer commands, each calling one library function."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from moon2 import __version__, progress
from moon2.errors import DEBUG_ENV, Moon2Error, debug_enabled, os_error_reason

app = typer.Typer(
    name="moon2",
    help=(
        "moon2: multimodal product representation learning for e-commerce catalogs "
        "(MOON2.0). Data flows through Parquet folders: synth/your catalog -> validate -> "
        "build-bench -> augment -> filter -> train -> eval."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int) -> typer.Exit:
    progress.console().print(
        f"[red]error:[/red] {escape(message)}",  # paths may contain [brackets]
        highlight=False,
        soft_wrap=True,
    )
    return typer.Exit(code)


def _os_error_message(exc: OSError) -> str | None:
    """One sentence for an OS error a user can cause, or None for anything else (a bug)."""
    reason = os_error_reason(exc)
    if reason is None:
        return None
    hint = f"({DEBUG_ENV}=1 shows the traceback)"
    where = " -> ".join(str(name) for name in (exc.filename, exc.filename2) if name is not None)
    if where:
        return f"{where}: {reason} {hint}"
    # pyarrow names the path only in its message
    detail = re.sub(r"^\[Errno \d+\] ", "", (str(exc).splitlines() or [""])[0]).strip()
    return f"{detail or reason} {hint}"


def _user_errors(func: F) -> F:
    """Turn a Moon2Error, or an OS error the user can cause (permissions, missing files, no
    space), into one red sentence on stderr and an exit code, with no traceback; anything
    else is a bug and keeps its traceback. ``MOON2_DEBUG=1`` shows every traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Moon2Error as exc:
            if debug_enabled():
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except OSError as exc:
            message = _os_error_message(exc)
            if message is None or debug_enabled():
                raise
            raise _fail(message, 2) from None
        except KeyboardInterrupt:
            progress.console().print("[red]interrupted[/red]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moon2 {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or info messages.")
    ] = False,
) -> None:
    progress.set_quiet(quiet)


class Kind(str, Enum):
    products = "products"
    queries = "queries"


@app.command()
@_user_errors
def validate(
    path: Annotated[
        Path,
        typer.Argument(
            help="A Parquet file, a directory of part files, a glob, or a catalog directory "
            "holding products/ and queries/ (both are then checked, and every positive_id "
            "and negative id must exist in products).",
            show_default=False,
        ),
    ],
    kind: Annotated[
        Kind | None,
        typer.Option(help="Table kind; inferred from the layout or the id column if omitted."),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="Write invalid rows here (Parquet, with reject_stage and reject_reason)."
        ),
    ] = None,
    check_images: Annotated[
        bool, typer.Option(help="Decode every image (local bytes and paths; URIs are not fetched).")
    ] = True,
    max_examples: Annotated[
        int, typer.Option(min=0, help="Problems listed in full; the rest are counted.")
    ] = 20,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    image_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="Only read local images inside this folder (repeatable; a path outside, "
            "after symlinks and '..', makes its row invalid). Default: MOON2_IMAGE_ROOTS "
            "(os.pathsep-separated), else no limit.",
        ),
    ] = None,
) -> None:
    """Check a catalog against the moon2 data contract, row by row.

    Exit code 0 when every row is valid, 1 when some rows are invalid, 2 when the input
    cannot be read at all (missing path, not Parquet, missing or unconvertible columns).
    """
    import json

    from moon2.data.outdir import check_no_overlap
    from moon2.data.validate import format_report
    from moon2.data.validate import validate as run_validate

    if json_out is not None:
        check_no_overlap(json_out, [path])  # never a file inside the catalog it checks
    report = run_validate(
        path,
        kind=kind.value if kind else None,
        rejects=rejects,
        check_images=check_images,
        max_examples=max_examples,
        image_roots=image_root or None,
    )
    typer.echo(format_report(report))
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
    raise typer.Exit(report.exit_code)


@app.command()
@_user_errors
def synth(
    out_dir: Annotated[
        Path,
        typer.Argument(help="Output directory (gets products/ and queries/).", show_default=False),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML config (see configs/synth/default.yaml); options below override it."
        ),
    ] = None,
    products: Annotated[
        int | None,
        typer.Option(help="Product rows, near-duplicate listings included. [default: 2000]"),
    ] = None,
    queries_per_product: Annotated[
        float | None, typer.Option(help="Queries per product on average. [default: 2.0]")
    ] = None,
    noise: Annotated[
        float | None,
        typer.Option(
            help="Fraction of noisy products and, separately, of noisy queries. [default: 0.1]"
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. [default: 0]")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Shorter image side in pixels. [default: 128]")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (0 = one per core). [default: 0]")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace a catalog generated with another config.")
    ] = False,
) -> None:
    """Generate a synthetic product catalog and query log with known noise.

    46 leaf categories (3-4 levels) each with its own drawn shape; attributes colour, pattern,
    material, style, size (+ department keys and brand); several procedurally drawn photos
    per product; noisy seller titles; text, image and multimodal queries with hard negatives.
    Noise is recorded in truth_* columns. Same seed -> byte-identical Parquet; an interrupted
    run resumes where it stopped.
    """
    from moon2.data.synth.generator import SynthConfig
    from moon2.data.synth.generator import synth as run_synth

    cfg = SynthConfig.from_yaml(
        config,
        products=products,
        queries_per_product=queries_per_product,
        noise=noise,
        seed=seed,
        image_size=image_size,
        workers=workers,
    )
    result = run_synth(cfg, out_dir, overwrite=overwrite)
    manifest = result.manifest
    typer.echo(
        f"wrote {result.products:,} products and {result.queries:,} queries to {out_dir} "
        f"in {result.seconds:.1f} s ({result.parts_written} part files"
        + (f", {result.parts_skipped} already there" if result.parts_skipped else "")
        + ")"
    )
    typer.echo(f"noise: products {manifest['product_noise']}, queries {manifest['query_noise']}")


convert_app = typer.Typer(
    help="Convert public dataset formats into the moon2 data contract.", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")


@convert_app.command("mbe")
@_user_errors
def convert_mbe(
    src: Annotated[
        Path,
        typer.Argument(
            help="MBE v1-style .json / .jsonl / .parquet file, or a directory or glob of them.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Output catalog directory (gets products/).", show_default=False)
    ],
    industry_as_root: Annotated[
        bool, typer.Option(help="Use doc_industry_name as the first category level.")
    ] = False,
    split: Annotated[
        str | None,
        typer.Option(
            help="train or test for every row (default: from file names, e.g. "
            "train.jsonl / test-0001.parquet)."
        ),
    ] = None,
) -> None:
    """Convert MBE-style (Daoze/MM-Bench-E-Commerce, MBE2.0) records into a catalog.

    id -> product_id, doc_title -> title, doc_image (URLs kept as paths, never fetched) ->
    images, doc_cate1..4_name -> category, doc_attributes ("k:v,,k:v", JSON or mapping) ->
    attributes; other columns are kept as mbe_<name>. Query-document pairs (a query /
    query_text and/or query_image column) also give queries/ with positive_id = the row's
    product. mbe_split (train/test) lets build-bench keep the official split
    (split.column: mbe_split). Unusable rows go to OUT/_rejects/ with the reason.
    """
    from moon2.data.adapters.mbe import convert_mbe as run_convert

    result = run_convert(src, out_dir, industry_as_root=industry_as_root, split=split)
    typer.echo(
        f"{result.rows_in:,} records -> {result.products:,} products in {out_dir}/products, "
        f"{result.rejected:,} rejected"
        + (
            f" ({', '.join(f'{k}: {v}' for k, v in result.reasons.items())})"
            if result.rejected
            else ""
        )
    )
    if result.queries or result.queries_rejected:
        typer.echo(
            f"{result.queries:,} queries in {out_dir}/queries, {result.queries_rejected:,} "
            f"rejected; {result.merged_repeats:,} repeated products merged"
        )


@app.command()
@_user_errors
def demo(
    out_dir: Annotated[
        Path, typer.Argument(help="Where the demo writes everything.", show_default=False)
    ] = Path("moon2-demo"),
    products: Annotated[
        int,
        typer.Option(
            min=20,
            help="Products in the demo catalog; at least 60, as fewer can leave the test split "
            "too small for any benchmark task.",
        ),
    ] = 2000,
    noise: Annotated[
        float, typer.Option(min=0, max=0.9, help="Share of noisy products and of noisy queries.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the catalog, the split and training.")] = 0,
    train_config: Annotated[
        Path | None, typer.Option(help="Training recipe. [default: configs/train/tiny-cpu.yaml]")
    ] = None,
    augment_config: Annotated[
        Path | None,
        typer.Option(
            help="Augmentation config. [default: configs/augment/demo.yaml: rule titles, "
            "classic images; configs/augment/default.yaml adds SmolLM2 titles, ~45 min]"
        ),
    ] = None,
    filter_config: Annotated[
        Path | None, typer.Option(help="Curation config. [default: configs/curate/default.yaml]")
    ] = None,
    epochs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Training epochs (the tiny-cpu recipe's 9 take ~21 min on the augmented split "
            "here; 4 keep the demo near 12 min).",
        ),
    ] = 4,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Override optim.max_steps (a quick look).")
    ] = None,
    ray: Annotated[
        bool, typer.Option(help="Augment on a local Ray (--no-ray: a plain loop).")
    ] = True,
    resume: Annotated[
        bool,
        typer.Option(
            help="Skip finished stages and resume the interrupted one (--no-resume: "
            "delete the demo's folders in OUT_DIR and start over)."
        ),
    ] = True,
) -> None:
    """The whole pipeline on the embedded synthetic catalog, offline, in ~12 minutes on 2 CPU
    cores.

    synth (OUT/catalog) -> build-bench (OUT/bench) -> augment the train split (OUT/aug) ->
    filter (OUT/cur) -> train with dynamic filtering (OUT/run) -> eval (OUT/eval) -> report
    (OUT/report/index.html). Each stage is the function behind its own command. Re-running
    after an interruption skips finished stages and resumes the one that was cut.
    """
    from moon2.pipeline import DemoOptions, run_demo

    options = DemoOptions(
        products=products,
        noise=noise,
        seed=seed,
        train_config=str(train_config) if train_config else None,
        augment_config=str(augment_config) if augment_config else None,
        filter_config=str(filter_config) if filter_config else None,
        epochs=epochs,
        max_steps=max_steps,
        ray=ray,
    )
    result = run_demo(out_dir, options, resume=resume)
    _print_demo_summary(result)


def _print_demo_summary(result: Any) -> None:
    from rich.table import Table

    from moon2.bench.config import ALL_TASKS

    stages = Table(title=f"moon2 demo: {result.seconds:.0f} s in all")
    for column in ("stage", "time", "result"):
        stages.add_column(column, justify="right" if column == "time" else "left")
    for stage in result.stages:
        note = " (done earlier)" if stage.skipped else ""
        stages.add_row(stage.name, f"{stage.seconds:.0f} s{note}", _stage_line(stage))
    metrics = Table(title="test split (R@10 / accuracy, %)")
    for task in ALL_TASKS:
        metrics.add_column(task, justify="right")
    metrics.add_row(
        *(
            "-" if result.metrics.get(t) is None else f"{100 * result.metrics[t]:.1f}"
            for t in ALL_TASKS
        )
    )
    console = progress.console()
    console.print(stages)
    console.print(metrics)
    typer.echo(f"report: {result.report}")


def _stage_line(stage: Any) -> str:
    s = stage.summary
    if stage.name == "synth":
        return f"{s['products']:,} products, {s['queries']:,} queries"
    if stage.name == "build-bench":
        line = f"train {s['train_products']:,} products / test {s['test_products']:,}"
        if s.get("skipped_tasks"):
            line += f"; skipped: {', '.join(s['skipped_tasks'])}"
        return line + ("" if s.get("leakage_ok", True) else "; LEAKAGE CHECKS FAILED")
    if stage.name == "augment":
        return f"{s.get('rows_out', 0):,} rows augmented, {s.get('rows_rejected', 0):,} rejected"
    if stage.name == "filter":
        p = s["counts"]["products"]
        q = s["counts"].get("queries", {})
        f1 = f", noise F1 {s['products_f1']:.2f}" if s.get("products_f1") is not None else ""
        return (
            f"kept {p['kept']:,}/{p['rows_in']:,} products, "
            f"{q.get('kept', 0):,}/{q.get('rows_in', 0):,} queries{f1}"
        )
    if stage.name == "train":
        return f"{s['updates']:,} updates, {s['queries_used']:,} queries, {s['filter_policy']}"
    if stage.name == "report":
        return f"{s['plots']} plots" + (
            f", missing: {', '.join(s['missing'])}" if s["missing"] else ""
        )
    return ""


@app.command()
@_user_errors
def ablate(
    data: Annotated[
        Path,
        typer.Argument(
            help="A moon2 demo folder (trains on its aug/, see --data; evaluates on its "
            "bench/), or a training catalog with products/ and queries/ (then give --bench).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Gets one folder per run, ablation.json and ablation.md.",
            show_default=False,
        ),
    ],
    bench: Annotated[
        Path | None, typer.Option(help="The moon2 build-bench output to evaluate on.")
    ] = None,
    train_data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="What a demo folder trains on: aug (the default: augmented, not pre-filtered, "
            "as the paper trained), cur (after moon2 filter) or a catalog PATH.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant (0, 1, ..., N-1).")] = 3,
    variants: Annotated[
        str,
        typer.Option(help="Comma-separated subset of full,no_moe,no_dual,no_coaug,no_filter."),
    ] = "full,no_moe,no_dual,no_coaug,no_filter",
    config: Annotated[
        Path | None,
        typer.Option(help="Training recipe every variant starts from. [default: tiny-cpu]"),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Override optim.epochs (the same for all runs).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(min=1, help="Override optim.max_steps (the same for all).")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Keep finished runs (--no-resume: delete OUT's runs and start over)."),
    ] = True,
) -> None:
    """The paper's ablation grid on your data: the full model, w/o MoE (moe.enabled),
    w/o dual-level alignment (loss.intra), w/o co-augmentation (data.use_augmented) and
    w/o dynamic filtering (filter.enabled).

    Each variant trains with the same recipe, budget and seeds and is evaluated with moon2
    eval; the table (mean +- std over seeds, R@10 / accuracy) goes to OUT/ablation.md next to
    the paper's. Finished runs are skipped on a re-run, an interrupted one resumes, and the
    table covers every finished run in OUT. A recipe or budget under which an ablation's
    switch changes nothing is refused (e.g. a filter.warmup covering the whole run), and each
    run's train_summary.json must show its mechanism ran (full) or not (the ablation). On
    the demo's augmented split (2,777 queries) the tiny-cpu recipe trains ~20 samples/s on 2
    CPU cores: a run of --epochs 2 takes ~5 minutes (15 runs: ~75 minutes), the recipe's 9
    epochs ~21 minutes.
    """
    from moon2.ablate import run_ablation

    result = run_ablation(
        data,
        out_dir,
        bench_dir=bench,
        seeds=range(seeds),
        variants=[v.strip() for v in variants.split(",") if v.strip()],
        config=config,
        epochs=epochs,
        max_steps=max_steps,
        resume=resume,
        train_data=train_data,
    )
    typer.echo(result.markdown)


@app.command()
@_user_errors
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A moon2 demo folder (every section) or a moon2 train output.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path | None,
        typer.Option(help="Where index.html and the PNGs go. [default: RUN_DIR/report]"),
    ] = None,
    eval_dir: Annotated[
        Path | None, typer.Option("--eval", help="A moon2 eval output of this run's model.")
    ] = None,
    bench: Annotated[
        Path | None, typer.Option(help="The benchmark it was evaluated on (retrieval examples).")
    ] = None,
    filter_dir: Annotated[
        Path | None, typer.Option("--filter", help="A moon2 filter output (score histograms).")
    ] = None,
    augment_dir: Annotated[
        Path | None, typer.Option("--augment", help="A moon2 augment output (before/after).")
    ] = None,
    examples: Annotated[
        int, typer.Option(min=0, help="Augmented products shown (half as many queries per task).")
    ] = 6,
) -> None:
    """A self-contained HTML page (and PNG plots) from a run's files: the metric table,
    training curves (loss parts, omega_m, learning rate), expert usage per modality, filter
    scores with the injected noise overlaid, augmentation before/after, retrieval examples.

    Sections whose inputs are missing say so on the page. Images and plots are inlined, so
    index.html can be mailed or attached as it is.
    """
    from moon2.report import build_report

    result = build_report(
        run_dir,
        out,
        examples=examples,
        eval_dir=eval_dir,
        bench_dir=bench,
        filter_dir=filter_dir,
        augment_dir=augment_dir,
    )
    for name, state in result.sections.items():
        typer.echo(f"  {name}: {state}")
    typer.echo(f"report: {result.html} ({len(result.plots)} plots)")


@app.command("build-bench")
@_user_errors
def build_bench(
    catalog: Annotated[
        Path,
        typer.Argument(help="Catalog directory with products/ and queries/.", show_default=False),
    ],
    out_dir: Annotated[
        Path, typer.Argument(help="Benchmark output directory.", show_default=False)
    ],
    config: Annotated[
        Path | None, typer.Option(help="YAML config (see configs/bench/default.yaml).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the split. [default: 0]")] = None,
) -> None:
    """Split a catalog by product and build MBE2.0-style zero-shot tasks.

    Writes OUT/train/{products,queries} (aug_* kept), OUT/test/ (aug_* stripped), one folder
    per task under OUT/test/tasks/ (t2mm, i2mm, mm2mm, t2i, i2t, title2image, image2title:
    queries, candidate pool, qrels; cls: labels; attr: attribute labels) and OUT/manifest.json
    with counts and leakage checks. t2i / i2t: text / image queries against the products' main
    images / titles; title2image / image2title: a product's own title against its own main
    image and back. Near-duplicate products stay on one side; the split is stratified by
    category.
    """
    from moon2.bench.build import build_bench as run_build
    from moon2.bench.config import BenchConfig

    cfg = BenchConfig.from_yaml(config, seed=seed)
    result = run_build(catalog, out_dir, cfg)
    manifest = result.manifest
    splits = manifest["splits"]
    typer.echo(
        f"train: {splits['train']['products']:,} products, {splits['train']['queries']:,} "
        f"queries; test: {splits['test']['products']:,} products, "
        f"{splits['test']['queries']:,} queries; rejected: {manifest['rejected']}"
    )
    for task, counts in manifest["tasks"].items():
        typer.echo(f"  {task}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    for task, reason in manifest["skipped_tasks"].items():
        typer.echo(f"  {task}: skipped ({reason})")
    leakage = manifest["leakage"]
    typer.echo("leakage checks: " + ("passed" if leakage["ok"] else f"FAILED {leakage}"))


@app.command()
@_user_errors
def augment(
    input_path: Annotated[
        str,
        typer.Argument(
            metavar="IN",
            help="Products: a Parquet file, a directory of parts, a glob, or a catalog "
            "directory holding products/ (its queries/ are copied to OUT/queries/ unchanged, "
            "so OUT can go straight to moon2 train).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Gets products/, _rejects/, manifest.json (and queries/ for a catalog).",
            show_default=False,
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="YAML config (configs/augment/default.yaml: offline CPU defaults)."),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address (e.g. ray://head:10001); none: a local Ray."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Augment only the first N rows.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Skip parts a previous run of the same job finished (--no-resume: start over)."
        ),
    ] = True,
    ray: Annotated[
        bool,
        typer.Option(
            help="Run on Ray Data (--no-ray: a plain loop in this process, for debugging)."
        ),
    ] = True,
) -> None:
    """Enrich titles with an (M)LLM and expand images (clean main image, then varied views).

    Every input column is kept; added: aug_title (+ aug_title_source llm/fallback/rule,
    aug_title_gate), aug_entities, aug_images, aug_image_scores, aug_image_ops, aug_engine.
    Rows that cannot be augmented go to OUT/_rejects/ with the reason. Killed runs resume:
    re-run the same command.
    """
    from moon2.augment.config import AugmentConfig
    from moon2.augment.pipeline import augment as run_augment

    cfg = AugmentConfig.from_yaml(config)
    result = run_augment(
        input_path, out_dir, cfg, address=address, limit=limit, resume=resume, use_ray=ray
    )
    _print_augment_summary(result.manifest)


def _print_augment_summary(manifest: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="moon2 augment", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows_in, rows_out = manifest["rows_in"], manifest["rows_out"]
    table.add_row("rows in", f"{rows_in:,}")
    table.add_row("rows out", f"{rows_out:,}")
    table.add_row("rows rejected", f"{manifest['rows_rejected']:,}")
    for reason, count in manifest["reject_reasons"].items():
        table.add_row(f"  rejected: {escape(reason)}", f"{count:,}")
    for source, count in sorted(manifest["title_sources"].items()):
        table.add_row(f"titles: {source}", f"{count:,}")
    for reason, count in list(manifest["gate_failures_first_attempt"].items())[:6]:
        table.add_row(f"  gate failed (1st try): {escape(reason)}", f"{count:,}")
    images = manifest["images"]
    if images:
        table.add_row("images kept", f"{images.get('images_kept', 0):,}")
        table.add_row("images dropped (consistency)", f"{images.get('images_dropped', 0):,}")
    table.add_row(
        "parts (skipped: done before)", f"{manifest['parts']:,} ({manifest['parts_skipped']:,})"
    )
    table.add_row("seconds", f"{manifest['seconds_this_run']:.1f}")
    progress.console().print(table)
    typer.echo(f"rows in {rows_in:,} = out {rows_out:,} + rejected {manifest['rows_rejected']:,}")


@app.command("filter")
@_user_errors
def filter_(
    catalog: Annotated[
        Path,
        typer.Argument(
            help="A catalog directory holding products/ (and queries/, filtered too), e.g. "
            "moon2 augment's OUT or a bench's train/; or a products dataset.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Argument(
            metavar="OUT",
            help="Gets products/ and queries/ (kept), _removed/ (with every score and the "
            "reason), _rejects/, filter_report.json and .md.",
            show_default=False,
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="YAML config (configs/curate/default.yaml: every scorer, defaults)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Encoder for the alignment and cleanlab scorers: a moon2 checkpoint (e.g. "
            "RUN/final), open_clip:<arch>[:<weights>] or hf:<id or path>. Default: the "
            "offline all-MiniLM-L6-v2 text model (no image checks)."
        ),
    ] = None,
    scores: Annotated[
        Path | None,
        typer.Option(
            help="A moon2 train output (RUN/ with scores/epoch-*.parquet): enables the "
            "training-dynamics scorer."
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(help="Run the scan on this Ray cluster (e.g. ray://head:10001)."),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--no-ray",
            help="Scan on Ray Data; default: only when --address is given (one process otherwise).",
            show_default=False,
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Reuse the parts a previous run scanned (--no-resume: start over)."),
    ] = True,
) -> None:
    """Find noisy rows (swapped titles or images, wrong categories, duplicates, bad
    purchases) and remove them, keeping every score.

    Scorers, each writing cur_* columns: alignment (image vs title and title vs the rest of
    the listing from the encoder; for queries the margin of the bought product over the shown
    negatives), cleanlab Datalab (near duplicates, outliers, category label issues on a kNN
    graph of the product vectors), exact duplicates (image bytes, normalised titles) and,
    with --scores, training dynamics. Rule: a row is removed when a check whose action is
    "remove" flags it; cur_reason names the first. Re-running resumes the scan.
    """
    from moon2.curate.config import CurateConfig
    from moon2.curate.pipeline import filter_catalog

    cfg = CurateConfig.from_yaml(config)
    result = filter_catalog(
        catalog,
        out_dir,
        cfg,
        model=model,
        training_scores=scores,
        address=address,
        use_ray=ray,
        resume=resume,
    )
    _print_filter_summary(result.report)
    typer.echo(f"report: {result.out_dir / 'filter_report.md'}")


def _print_filter_summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="moon2 filter")
    for column in ("table", "in", "kept", "removed", "rejected"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for name, counts in report["counts"].items():
        table.add_row(name, *(f"{counts[k]:,}" for k in ("rows_in", "kept", "removed", "rejected")))
    progress.console().print(table)
    for name, reasons in report["removed_by_reason"].items():
        if reasons:
            typer.echo(f"{name} removed: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    for name, result in report.get("evaluation", {}).items():
        figures = [("all noise", result["overall"]), *result.get("per_kind", {}).items()]
        typer.echo(
            f"{name} vs truth_*: "
            + "; ".join(
                f"{kind} P {f['precision']:.2f} R {f['recall']:.2f} F1 {f['f1']:.2f}"
                for kind, f in figures
            )
        )


@app.command("eval")
@_user_errors
def eval_(
    model: Annotated[
        str,
        typer.Argument(
            help="A moon2 checkpoint directory, open_clip:<arch>[:<pretrained tag or "
            "checkpoint path>] (no weights part = random weights), or hf:<model id or path> "
            "(mean-pooled last hidden states).",
            show_default=False,
        ),
    ],
    bench: Annotated[Path, typer.Argument(help="A moon2 build-bench output.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Where results go.", show_default=False)],
    config: Annotated[
        Path | None, typer.Option(help="YAML config (see configs/eval/default.yaml).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Items per forward pass. [default: 32]")
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset of t2mm,i2mm,mm2mm,t2i,i2t,cls,attr,title2image,"
            "image2title."
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:N. [default: auto]")
    ] = None,
    max_images: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images per product given to the model (main image first). Default: for a "
            "moon2 checkpoint, as many as it trained with (its moon2_model.json records "
            "max_images), else 4; this option or max_images in --config overrides it.",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool, typer.Option(help="Allow hub model code to run (hf: models only).")
    ] = False,
) -> None:
    """Zero-shot evaluation: retrieval R@k/MRR/nDCG/mAP, classification and attributes.

    Writes OUT/results.json, OUT/results.md (a table like the paper's), OUT/runs/<task>.trec
    (TREC run files; the benchmark has qrels.trec for trec_eval) and
    OUT/per_query/<task>.parquet (each query's or item's metrics, which the means in
    results.json average; moon2 compare tests differences on them).
    """
    from moon2.bench.config import EvalConfig
    from moon2.bench.evaluate import evaluate

    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    cfg = EvalConfig.from_yaml(
        config,
        batch_size=batch_size,
        tasks=task_list,
        device=device,
        max_images=max_images,
        trust_remote_code=trust_remote_code or None,
    )
    result = evaluate(model, bench, out_dir, cfg)
    from moon2.bench.evaluate import render_markdown

    typer.echo(render_markdown(result.results))


@app.command("compare")
@_user_errors
def compare_(
    evals: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more moon2 eval folders of one benchmark; the first (A) is the "
            "baseline the others are compared with.",
            show_default=False,
        ),
    ],
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="Where compare.json and compare.md go.", show_default=False),
    ],
    metrics: Annotated[
        str,
        typer.Option(
            help="headline (R@10 for retrieval, acc for cls/attr), all, or comma-separated "
            "names (R@1,R@5,R@10,MRR@10,nDCG@10,mAP,acc)."
        ),
    ] = "headline",
    resamples: Annotated[
        int, typer.Option(help="Random sign flips and bootstrap resamples per test.")
    ] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of every test (same seed, same numbers).")] = 0,
) -> None:
    """Paired significance of the differences between eval folders, task by task.

    Per task and metric: each folder's mean, the difference B - A, a two-sided paired
    sign-flip randomization p-value (exact when 2^(queries that differ) <= resamples), a
    paired bootstrap 95% CI of the difference and Holm-corrected p (over the tasks of one
    metric, per compared folder). Needs OUT/per_query/ of moon2 eval. Writes
    OUT/compare.json and OUT/compare.md.
    """
    from moon2.bench.compare import compare

    wanted: str | list[str] = metrics
    if metrics not in ("headline", "all"):
        wanted = [m.strip() for m in metrics.split(",") if m.strip()]
    result = compare(evals, out_dir, metrics=wanted, resamples=resamples, seed=seed)
    typer.echo(result.markdown)


@app.command()
@_user_errors
def train(
    data: Annotated[
        Path,
        typer.Argument(
            help="Directory with products/ and queries/ (a build-bench train split or any "
            "catalog).",
            show_default=False,
        ),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    config: Annotated[
        Path | None,
        typer.Option(help="YAML recipe, e.g. configs/train/tiny-cpu.yaml (the default)."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue from the newest checkpoint in OUT_DIR, on the same data and config "
            "(only epochs, max steps, device, logging, checkpointing and data caches/workers "
            "may change)."
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Train on a Ray cluster ('auto', 'ray://host:10001', or 'local' for "
            "a local Ray instance) with Ray Train's TorchTrainer."
        ),
    ] = None,
    ray_workers: Annotated[
        int, typer.Option(help="Ray Train workers (one training process each).")
    ] = 2,
    ray_gpus: Annotated[bool, typer.Option(help="One GPU per Ray worker.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override optim.epochs.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Override optim.max_steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
) -> None:
    """Train the MOON2.0 model: modality-driven MoE, dual-level alignment, dynamic filtering.

    Single process by default; under torchrun (torchrun --nproc_per_node N -m moon2.cli
    train ...) it runs DDP (gloo on CPU, NCCL on GPU); with --ray-address it runs the same
    training function on Ray Train workers. Writes OUT/final (load with moon2.load_model or
    evaluate with moon2 eval), metrics.jsonl, scores/epoch-NNN.parquet, checkpoints/.
    """
    from moon2.train.recipes import load_recipe

    cfg = load_recipe(config, seed=seed, epochs=epochs, max_steps=max_steps)
    if ray_address is not None:
        from moon2.train.launch import train_on_ray

        result = train_on_ray(data, out_dir, cfg, resume, ray_address, ray_workers, ray_gpus)
    else:
        from moon2.train.trainer import train as run_train

        result = run_train(data, out_dir, cfg, resume=resume)
    if result.summary:
        typer.echo(
            f"trained {result.steps} updates in {result.summary.get('seconds', 0):.0f} s; "
            f"model: {result.final_dir}"
        )


@app.command()
@_user_errors
def embed(
    model: Annotated[
        str,
        typer.Argument(
            help="A moon2 model directory (OUT/final) or any eval MODEL spec.", show_default=False
        ),
    ],
    catalog: Annotated[
        Path, typer.Argument(help="Directory with products/ and/or queries/.", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Argument(help="Output directory.", show_default=False)],
    batch_size: Annotated[int, typer.Option(help="Items per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    max_images: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Images per product. Default: for a moon2 model, as many as it trained with, "
            "else 4.",
        ),
    ] = None,
) -> None:
    """Write product and query embeddings to Parquet (id, embedding: list<float32>)."""
    from moon2.bench.embed import embed_catalog

    written = embed_catalog(
        model, catalog, out_dir, batch_size=batch_size, device=device, max_images=max_images
    )
    for table, rows in written.items():
        typer.echo(f"{table}: {rows:,} embeddings in {out_dir / table}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # e.g. `moon2 validate ... | head`
        sys.stderr.close()


if __name__ == "__main__":
    main()
