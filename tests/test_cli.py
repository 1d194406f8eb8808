"""The command line: help texts, version, demo, and kill-then-resume of a real process."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moon2 import __version__
from moon2.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["synth"],
        ["validate"],
        ["convert", "mbe"],
        ["demo"],
        ["filter"],
        ["ablate"],
        ["report"],
        ["compare"],
    ],
)
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"moon2 {__version__}"


def test_bad_config_is_one_sentence_exit_2(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("products: -3\n")
    result = runner.invoke(app, ["synth", str(tmp_path / "out"), "--config", str(config)])
    assert result.exit_code == 2
    assert "error: invalid SynthConfig in" in result.stderr
    assert "Traceback" not in result.stderr


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


def test_killed_synth_resumes_to_identical_output(tmp_path):
    args = [
        "--products",
        "300",
        "--queries-per-product",
        "1",
        "--image-size",
        "24",
        "--workers",
        "1",
        "--seed",
        "11",
    ]
    config = tmp_path / "c.yaml"
    config.write_text("rows_per_part: 30\n")
    command = [sys.executable, "-m", "moon2.cli", "-q", "synth"]
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*command, str(killed), "--config", str(config), *args],
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    deadline = time.monotonic() + 60
    try:
        while not (killed / "products" / "part-00003.parquet").exists():
            assert process.poll() is None, "synth finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (killed / "manifest.json").exists()
    subprocess.run([*command, str(killed), "--config", str(config), *args], check=True)
    fresh = tmp_path / "fresh"
    subprocess.run([*command, str(fresh), "--config", str(config), *args], check=True)
    assert _digests(killed) == _digests(fresh)
    assert len(_digests(fresh)) == 20
