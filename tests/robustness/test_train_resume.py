"""``moon2 train --resume`` continues only the run its checkpoint belongs to (issue #27, item 8),
and a checkpoint of another model shape or an unavailable device is one sentence (item 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from moon2.cli import app
from moon2.errors import ConfigError
from tests.factories import TINY, tiny_config

# three updates, a checkpoint at update 2: the cheapest run that leaves something to resume
STEPS = {"epochs": 1, "max_steps": 3}
EVERY = {"every_steps": 2}


def _recipe(folder: Path, **sections: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    tiny_config(optim=dict(STEPS), checkpoint=dict(EVERY), **sections).to_yaml(path)
    return path


def _train(data: Path, out: Path, recipe: Path, *extra: str):
    args = ["train", str(data), str(out), "--config", str(recipe), *extra]
    return CliRunner().invoke(app, args)


def _one_sentence(result) -> str:
    """The refusal: exit 2, one 'error:' line on stderr, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run(small_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data, out): a 3-update run with a checkpoint at update 2 (only ever read by tests)."""
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    shutil.copytree(small_catalog, data)
    out = root / "run"
    result = _train(data, out, _recipe(root / "recipe"))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "step-0000002" / "plan.json").exists()
    return data, out


def _copy_run(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy" / "run"
    shutil.copytree(out, copy)
    return copy


def test_resume_with_another_seed_is_refused_and_leaves_the_config(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    data, out = run
    before = (out / "train_config.yaml").read_bytes()
    result = _train(data, out, _recipe(tmp_path / "r"), "--resume", "--seed", "5")
    line = _one_sentence(result)
    assert "different seed;" in line and "without --resume" in line
    assert (out / "train_config.yaml").read_bytes() == before


def test_resume_with_other_data_is_refused(run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = run
    other = tmp_path / "other"
    shutil.copytree(data, other)
    first = sorted((other / "queries").glob("*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(1), first)  # one query fewer
    before = (out / "train_config.yaml").read_bytes()
    line = _one_sentence(_train(other, out, _recipe(tmp_path / "r"), "--resume"))
    assert "different data;" in line
    assert (out / "train_config.yaml").read_bytes() == before


def test_resume_with_another_model_shape_names_the_fields(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    data, out = run
    recipe = _recipe(tmp_path / "r", moe={"num_experts": 3}, seed=1)
    line = _one_sentence(_train(data, out, recipe, "--resume"))
    assert "different seed, moe.num_experts;" in line


def test_checkpoint_of_an_older_moon2_says_so(run: tuple[Path, Path], tmp_path: Path) -> None:
    """A checkpoint whose plan lacks a field this moon2 added cannot be matched by any config:
    the refusal says so instead of asking for the checkpoint's config."""
    data, out = run
    copy = _copy_run(out, tmp_path)
    for path in (copy / "checkpoints").glob("step-*/plan.json"):
        plan = json.loads(path.read_text())
        del plan["config"]["moe"]["wstar_lr"]
        path.write_text(json.dumps(plan))
    line = _one_sentence(_train(data, copy, _recipe(tmp_path / "r"), "--resume"))
    assert "older moon2 (before moe.wstar_lr)" in line and "new folder" in line


def test_checkpoint_without_plan_of_another_shape_is_one_sentence(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Checkpoints written before they kept their plan: the loader names the checkpoint."""
    data, out = run
    copy = _copy_run(out, tmp_path)
    for plan in (copy / "checkpoints").glob("step-*/plan.json"):
        plan.unlink()
    recipe = _recipe(tmp_path / "r", model={"tiny": {**TINY["model"]["tiny"], "hidden_size": 64}})
    line = _one_sentence(_train(data, copy, recipe, "--resume"))
    assert "checkpoint" in line and "step-0000002" in line and "another model shape" in line


def test_resume_with_the_same_data_and_config_continues(
    run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A longer run (max_steps may change) on the same data and config resumes, also with the
    data moved elsewhere (copied with its modification times, as mv or cp -p do)."""
    from moon2.train import trainer

    data, out = run
    copy = _copy_run(out, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    loaded = []
    original = trainer.load_checkpoint

    def recording(path, *args, **kwargs):
        loaded.append(path.name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(trainer, "load_checkpoint", recording)
    result = _train(moved, copy, _recipe(tmp_path / "r"), "--resume", "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert loaded == ["step-0000002"]
    assert json.loads((copy / "train_summary.json").read_text())["updates"] == 4


# --- devices ------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine, whatever it has, seen as one without CUDA or MPS."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_check_device_says_what_the_machine_has(
    no_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moon2.models.base import check_device

    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device cuda is not available: this machine has no CUDA"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="device mps is not available: this machine has no MPS"):
        check_device("mps")
    with pytest.raises(ConfigError, match="'nonsense' is not a device name"):
        check_device("nonsense")
    with pytest.raises(ConfigError, match="device meta is not available"):
        check_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"cuda:7 is not available: .* 1 CUDA GPU \(cuda:0\)$"):
        check_device("cuda:7")


def test_every_device_resolver_refuses_an_unavailable_device(no_gpu: None) -> None:
    from moon2.augment.text import resolve_device as augment_device
    from moon2.models.base import resolve_device
    from moon2.train.trainer import _setup_distributed

    with pytest.raises(ConfigError, match="cuda:7 is not available"):
        resolve_device("cuda:7")
    with pytest.raises(ConfigError, match="cuda:7 is not available"):
        augment_device("cuda:7")
    with pytest.raises(ConfigError, match="cuda:7 is not available"):
        _setup_distributed(tiny_config(device="cuda:7"))
    assert augment_device("cpu") == "cpu" and resolve_device("auto") == torch.device("cpu")


def test_eval_and_embed_refuse_an_unavailable_device(
    run: tuple[Path, Path], tmp_path: Path, no_gpu: None
) -> None:
    from moon2.bench.build import build_bench
    from moon2.bench.config import BenchConfig

    data, out = run
    bench = tmp_path / "bench"
    build_bench(data, bench, BenchConfig())
    model = str(out / "final")
    for args in (
        ["eval", model, str(bench), str(tmp_path / "eval"), "--device", "cuda:7"],
        ["embed", model, str(data), str(tmp_path / "emb"), "--device", "cuda:7"],
    ):
        line = _one_sentence(CliRunner().invoke(app, args))
        assert "device cuda:7 is not available: this machine has no CUDA GPU" in line


def test_a_run_with_checkpoints_is_refused_without_resume(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Refused by check_resume, which every process runs before any of them writes (under
    DDP the others used to wait for the main process, which alone refused)."""
    data, out = run
    copy = _copy_run(out, tmp_path)
    before = (copy / "train_config.yaml").read_bytes()
    line = _one_sentence(_train(data, copy, _recipe(tmp_path / "r")))
    assert "holds checkpoints of an earlier run; pass --resume" in line
    assert (copy / "train_config.yaml").read_bytes() == before
