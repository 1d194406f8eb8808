"""The README's main command at full size, killed during training and run again (slow: ~15
minutes on 2 cores; `python -m pytest -m slow`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moon2.pipeline import STAGES


def _demo(out: Path, log: Path) -> subprocess.Popen:
    # files, not pipes: nobody reads a pipe while the test polls, and a full one blocks
    with open(log.with_suffix(".out"), "w") as stdout, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "moon2.cli", "demo", str(out)],
            stdout=stdout,
            stderr=err,
            text=True,
            start_new_session=True,
        )


@pytest.mark.slow
def test_full_demo_killed_in_training_resumes_and_learns(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    first = _demo(out, tmp_path / "first")
    checkpoints = out / "run" / "checkpoints"
    deadline = time.monotonic() + 1800
    try:
        while not any(checkpoints.glob("step-*/trainer.json")):
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training checkpoint after 30 minutes"
            time.sleep(2)
    finally:  # killed at its first checkpoint, or when the test fails: never left running
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    logged = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert not (out / "_stages" / "train.json").exists()

    second = _demo(out, tmp_path / "second")
    second.wait(timeout=3600)
    stdout, stderr = ((tmp_path / f"second.{k}").read_text() for k in ("out", "err"))
    assert second.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "demo.json").read_text())
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == list(STAGES)
    assert all(stages[name]["skipped"] for name in ("synth", "build-bench", "augment", "filter"))
    assert "resuming from step-" in stderr
    # the records before the checkpoint are the killed run's own
    resumed = (out / "run" / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in logged if line in resumed]
    assert kept and resumed[: len(kept)] == kept
    # far above chance (~3 %): the pipeline learned something on every retrieval view
    metrics = summary["metrics"]
    assert metrics["t2mm"] > 0.3 and metrics["mm2mm"] > 0.4 and metrics["i2mm"] > 0.2, metrics
    assert (out / "report" / "index.html").stat().st_size > 100_000
    assert "test split" in stderr + stdout
