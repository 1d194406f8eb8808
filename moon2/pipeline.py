"""The end-to-end demo pipeline behind ``moon2 demo``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from moon2 import progress
from moon2.data.synth.generator import SynthConfig, synth
from moon2.data.validate import format_report, validate


@dataclass
class DemoResult:
    out_dir: Path
    summary: str
    exit_code: int


def run_demo(out_dir: str | os.PathLike[str], products: int = 2000, seed: int = 0) -> DemoResult:
    """synth -> validate on the embedded defaults; resumable (finished parts are kept)."""
    out = Path(out_dir)
    catalog = out / "catalog"
    progress.info(
        f"[bold]1/2 synth[/bold]: {products:,} products -> {escape(str(catalog))}", markup=True
    )
    config = SynthConfig(products=products, seed=seed)
    made = synth(config, catalog)
    progress.info(f"[bold]2/2 validate[/bold]: {escape(str(catalog))}", markup=True)
    report = validate(catalog, rejects=out / "_rejects")
    (out / "validation.json").write_text(json.dumps(report.to_dict(), indent=2))
    lines = [
        f"catalog: {made.products:,} products, {made.queries:,} queries in {catalog} "
        f"({made.seconds:.1f} s)",
        format_report(report),
        f"validation report: {out / 'validation.json'}",
    ]
    return DemoResult(out, "\n".join(lines), report.exit_code)
