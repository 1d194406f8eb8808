"""Shared fixtures: small synthetic catalogs, quiet progress output."""

from __future__ import annotations

from pathlib import Path

import pytest

from moon2 import progress


@pytest.fixture(autouse=True)
def _quiet() -> None:
    progress.set_quiet(True)


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 160-product synthetic catalog with 20% noise and small images (built once)."""
    from moon2.data.synth.generator import SynthConfig, synth

    progress.set_quiet(True)
    out = tmp_path_factory.mktemp("catalog")
    config = SynthConfig(
        products=160,
        queries_per_product=1.5,
        noise=0.2,
        seed=7,
        image_size=32,
        rows_per_part=64,
        workers=1,
    )
    synth(config, out)
    return out


@pytest.fixture(scope="session")
def trained(small_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on ``small_catalog`` (final/, scores/epoch-*.parquet, ...)."""
    from moon2.train.trainer import train
    from tests.factories import TRAINED_EPOCHS, tiny_config

    out = tmp_path_factory.mktemp("run") / "run"
    train(small_catalog, out, tiny_config(optim={"epochs": TRAINED_EPOCHS}))
    return out


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """factories.TINY as a YAML recipe, one epoch (what the CLI and the demo take)."""
    import json

    import yaml

    from tests.factories import TINY

    config = json.loads(json.dumps(TINY))
    config["optim"]["epochs"] = 1
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def demo_dir(tiny_recipe: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``moon2 demo`` on 60 products with the tiny recipe and no Ray: every stage's output."""
    from moon2.pipeline import DemoOptions, run_demo

    progress.set_quiet(True)
    out = tmp_path_factory.mktemp("demo")
    run_demo(
        out, DemoOptions(products=60, noise=0.2, train_config=str(tiny_recipe), epochs=1, ray=False)
    )
    return out
