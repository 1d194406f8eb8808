"""Configs are data: safe YAML, strict keys, shipped defaults equal the code defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from moon2.config import read_yaml
from moon2.data.synth.generator import SynthConfig
from moon2.defaults import render_all, shipped_configs
from moon2.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_configs_are_current_and_load_to_the_defaults():
    for path, text in render_all().items():
        assert (CONFIGS / path).read_text(encoding="utf-8") == text, (
            f"configs/{path} is stale: run python -m moon2.defaults"
        )
        config, _ = shipped_configs()[path]
        assert type(config).from_yaml(CONFIGS / path) == config


def test_yaml_tags_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"products: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SynthConfig.from_yaml(path)
    assert not marker.exists()


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prodcts: 10\n")
    with pytest.raises(ConfigError, match="prodcts: Extra inputs are not permitted"):
        SynthConfig.from_yaml(path)
    path.write_text("noise: 2.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: noise: Input should be less than or equal"):
        SynthConfig.from_yaml(path)


def test_overrides_win_and_none_means_unset(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("products: 10\nseed: 5\n")
    config = SynthConfig.from_yaml(path, products=20, seed=None)
    assert (config.products, config.seed) == (20, 5)


def test_resolved_config_round_trips(tmp_path):
    config = SynthConfig(products=33, query_mix={"text": 1.0, "image": 0.0, "multimodal": 0.0})
    config.to_yaml(tmp_path / "resolved.yaml")
    assert SynthConfig.from_yaml(tmp_path / "resolved.yaml") == config


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        read_yaml(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "empty.yaml") == {}
