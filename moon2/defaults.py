"""The YAML files in ``configs/`` that document each stage's defaults.

They are generated from the typed configs (``python -m moon2.defaults [ROOT]``) and a test
checks they are current, so the documented defaults can never drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moon2.config import Config, commented_yaml


def shipped_configs() -> dict[str, tuple[Config, str]]:
    """configs/<path> -> (config, header)."""
    from moon2.augment.config import recipes as augment_recipes
    from moon2.bench.config import BenchConfig, EvalConfig
    from moon2.curate.config import recipes as curate_recipes
    from moon2.data.synth.generator import SynthConfig
    from moon2.train.recipes import recipes

    shipped: dict[str, tuple[Config, str]] = {
        "synth/default.yaml": (
            SynthConfig(),
            "moon2 synth: the embedded default synthetic catalog (what `moon2 demo` generates).\n"
            "Every field is optional; command-line options override this file.\n"
            "Usage: moon2 synth OUT_DIR --config configs/synth/default.yaml",
        ),
        "bench/default.yaml": (
            BenchConfig(),
            "moon2 build-bench: split a catalog and build MBE2.0-style test tasks.\n"
            "Usage: moon2 build-bench CATALOG OUT --config configs/bench/default.yaml",
        ),
        "eval/default.yaml": (
            EvalConfig(),
            "moon2 eval: zero-shot evaluation of a model on a moon2 benchmark.\n"
            "Usage: moon2 eval MODEL BENCH OUT --config configs/eval/default.yaml",
        ),
    }
    for name, (config, header) in recipes().items():
        shipped[f"train/{name}.yaml"] = (config, header)
    for name, (config, header) in augment_recipes().items():
        shipped[f"augment/{name}.yaml"] = (config, header)
    for name, (config, header) in curate_recipes().items():
        shipped[f"curate/{name}.yaml"] = (config, header)
    return shipped


def render_all() -> dict[str, str]:
    return {
        path: commented_yaml(config, header) for path, (config, header) in shipped_configs().items()
    }


def write_all(root: Path) -> None:
    for path, text in render_all().items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("configs"))
