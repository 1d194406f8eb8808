"""Issue #27, items 1-4 and 7: a command writes only into a new or empty folder or one it wrote
itself, never where its input is, never beside a run that is still writing, and fails with one
sentence when it cannot write at all."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from moon2.cli import app
from moon2.data import outdir
from moon2.data.outdir import LOCK, MARKER, claim_output, owner
from moon2.errors import InputError

runner = CliRunner()


def _digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its content hash: what "left untouched" means."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rows(folder: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


def _refused(result, *words: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output and "error:" in output, output
    for word in words:
        assert word in output, output


def _claim(*args, **kwargs) -> None:
    with claim_output(*args, **kwargs):
        pass


# --- the rule itself ---------------------------------------------------------------------------


def test_claim_new_empty_own_and_foreign_folders(tmp_path):
    with claim_output(tmp_path / "new", "augment") as claim:
        assert claim.fresh
        (claim.path / "products").mkdir()
    assert owner(tmp_path / "new") == "augment"
    with claim_output(tmp_path / "new", "augment") as claim:  # its own: accepted again
        assert not claim.fresh
    (tmp_path / "empty").mkdir()
    with claim_output(tmp_path / "empty", "filter"):
        pass
    with pytest.raises(InputError, match="written by moon2 augment, not moon2 filter"):
        _claim(tmp_path / "new", "filter")
    mine = tmp_path / "mine"
    (mine / "products").mkdir(parents=True)
    (mine / "products" / "notes.txt").write_text("keep me")
    for resume in (True, False):
        with pytest.raises(InputError, match="not empty and was not written by moon2 augment"):
            _claim(mine, "augment", outputs=("products",), resume=resume)
    assert _digest(mine) == {"products/notes.txt": _digest(mine)["products/notes.txt"]}
    assert not (mine / MARKER).exists() and not (mine / LOCK).exists()


def test_no_resume_deletes_only_the_declared_outputs_of_its_own_folder(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, "augment", outputs=("products", "part-*.parquet")):
        (out / "products").mkdir()
        (out / "products" / "part-00000.parquet").write_bytes(b"x")
        (out / "part-00001.parquet").write_bytes(b"x")
    (out / "my-notes.txt").write_text("a person's file in a moon2 folder")
    with claim_output(out, "augment", outputs=("products", "part-*.parquet"), resume=False):
        pass
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, MARKER, "my-notes.txt"])


@pytest.mark.parametrize(
    ("out", "inputs"),
    [("cat", ["cat"]), ("cat/aug", ["cat"]), ("work", ["work/cat/products"])],
)
def test_output_may_not_overlap_an_input(tmp_path, out, inputs):
    (tmp_path / "cat").mkdir()
    (tmp_path / "work" / "cat" / "products").mkdir(parents=True)
    with pytest.raises(InputError, match="overlaps the input"):
        _claim(tmp_path / out, "augment", inputs=[tmp_path / i for i in inputs])


def test_a_second_run_is_refused_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with (
        claim_output(out, "augment"),
        pytest.raises(InputError, match="another moon2 run is writing into"),
    ):
        _claim(out, "augment")
    with claim_output(out, "augment"):  # released with the first run
        pass


def test_a_killed_run_releases_its_lock(tmp_path):
    out = tmp_path / "out"
    holder = textwrap.dedent(
        f"""
        import time
        from moon2.data.outdir import claim_output
        with claim_output({str(out)!r}, "augment"):
            print("claimed", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "claimed"
        with pytest.raises(InputError, match="another moon2 run"):
            _claim(out, "augment")
    finally:
        process.kill()
        process.wait(timeout=30)
    with claim_output(out, "augment"):  # the kernel dropped the dead run's lock
        pass


# --- the commands, as the issue found them ------------------------------------------------------


def test_embed_never_writes_over_a_catalog(demo_dir: Path, tmp_path):
    """Item 1: `cp -r cat c2; moon2 embed MODEL bench/test c2` replaced c2/products."""
    copy = tmp_path / "c2"
    shutil.copytree(demo_dir / "catalog", copy)
    before = _digest(copy)
    model = str(demo_dir / "run" / "final")
    _refused(runner.invoke(app, ["embed", model, str(demo_dir / "bench" / "test"), str(copy)]))
    assert _digest(copy) == before
    # `moon2 embed MODEL c3 c3`: deleted the input, then failed
    _refused(runner.invoke(app, ["embed", model, str(copy), str(copy)]), "overlaps the input")
    assert _digest(copy) == before


@pytest.mark.parametrize("command", ["augment", "filter"])
def test_in_equal_to_out_is_refused_and_no_resume_deletes_nothing(demo_dir, tmp_path, command):
    """Items 2 and 3: `moon2 augment s s --no-resume` deleted s/products (filter s/queries too);
    `moon2 augment s s` doubled s/products."""
    catalog = tmp_path / "s"
    shutil.copytree(demo_dir / "catalog", catalog)
    before = _digest(catalog)
    for extra in ([], ["--no-resume"]):
        result = runner.invoke(app, [command, str(catalog), str(catalog), "--no-ray", *extra])
        _refused(result, "overlaps the input")
    assert _digest(catalog) == before


@pytest.mark.parametrize("command", ["augment", "filter"])
def test_a_folder_holding_another_catalog_is_refused(demo_dir, tmp_path, command):
    """Item 3: augment added its parts beside another catalog's products/ (128 rows left)."""
    other = tmp_path / "other"
    shutil.copytree(demo_dir / "bench" / "train", other)
    before = _digest(other)
    for extra in ([], ["--no-resume"]):
        args = [command, str(demo_dir / "catalog"), str(other), "--no-ray", *extra]
        _refused(runner.invoke(app, args), "not empty and was not written by moon2")
    assert _digest(other) == before


def test_ablate_no_resume_keeps_a_users_folders(demo_dir, tmp_path):
    """Item 2: `moon2 ablate aug a --bench bench --no-resume` deleted a/full/ and a/no_moe/."""
    mine = tmp_path / "a"
    for name in ("full", "no_moe"):
        (mine / name).mkdir(parents=True)
        (mine / name / "results.txt").write_text("a person's results")
    before = _digest(mine)
    args = ["ablate", str(demo_dir / "aug"), str(mine), "--bench", str(demo_dir / "bench")]
    _refused(runner.invoke(app, [*args, "--no-resume"]), "not empty and was not written")
    assert _digest(mine) == before


def test_a_second_augment_is_refused_while_the_first_runs(demo_dir, tmp_path):
    """Item 4: a second run with --no-resume mixed its rows into a running first one (254 rows,
    54 ids twice); now it is refused while the first holds OUT's lock, and OUT is not touched."""
    out = tmp_path / "aug"
    with claim_output(out, "augment"):
        (out / "products").mkdir()
        args = ["augment", str(demo_dir / "catalog"), str(out), "--no-ray", "--no-resume"]
        _refused(runner.invoke(app, args), "another moon2 run is writing into")
        assert (out / "products").is_dir()


def test_augment_reruns_into_its_own_folder_without_mixing(demo_dir, tmp_path):
    """The same command into its own OUT resumes (or, with --no-resume, starts over) and the row
    accounting holds each time."""
    out = tmp_path / "aug"
    config = Path(__file__).parents[2] / "configs" / "augment" / "demo.yaml"
    args = ["augment", str(demo_dir / "catalog"), str(out), "--no-ray", "--config", str(config)]
    args += ["--limit", "12"]
    for extra in ([], [], ["--no-resume"]):
        if extra:  # a leftover of the first runs, which --no-resume must delete
            (out / "products" / "part-99999.parquet").write_bytes(b"stale")
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        rejected = _rows(out / "_rejects") if (out / "_rejects").is_dir() else 0
        assert _rows(out / "products") + rejected == 12
    assert not (out / "products" / "part-99999.parquet").exists()


# --- item 7: OUT that cannot be written ---------------------------------------------------------

READ_ONLY = "/sys/moon2-read-only-out"  # sysfs: not even root may create a folder there


def _commands(demo: Path, recipe: Path, mbe: Path) -> dict[str, list[str]]:
    model = str(demo / "run" / "final")
    return {
        "synth": ["synth", READ_ONLY, "--products", "60"],
        "validate": ["validate", str(demo / "catalog"), "--rejects", READ_ONLY],
        "build-bench": ["build-bench", str(demo / "catalog"), READ_ONLY],
        "augment": ["augment", str(demo / "catalog"), READ_ONLY, "--no-ray"],
        "filter": ["filter", str(demo / "aug"), READ_ONLY],
        "train": ["train", str(demo / "cur"), READ_ONLY, "--config", str(recipe)],
        "eval": ["eval", model, str(demo / "bench"), READ_ONLY],
        "embed": ["embed", model, str(demo / "catalog"), READ_ONLY],
        "report": ["report", str(demo), "--out", READ_ONLY],
        "demo": ["demo", READ_ONLY, "--products", "60"],
        "convert mbe": ["convert", "mbe", str(mbe), READ_ONLY],
        "ablate": ["ablate", str(demo / "aug"), READ_ONLY, "--bench", str(demo / "bench")],
    }


@pytest.mark.parametrize(
    "command",
    [
        "synth",
        "validate",
        "build-bench",
        "augment",
        "filter",
        "train",
        "eval",
        "embed",
        "report",
        "demo",
        "ablate",
        "convert mbe",
    ],
)
def test_an_output_folder_that_cannot_be_made_is_one_sentence(
    demo_dir, tiny_recipe, tmp_path, command
):
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /sys, where no folder can be created, even by root")
    assert not Path(READ_ONLY).exists()
    mbe = tmp_path / "mbe.jsonl"
    mbe.write_text(json.dumps({"doc_id": "1", "doc_title": "red mug"}) + "\n")
    started = time.perf_counter()
    result = runner.invoke(app, _commands(demo_dir, tiny_recipe, mbe)[command])
    _refused(result, READ_ONLY)
    assert time.perf_counter() - started < 60  # refused before any real work


def test_os_errors_a_user_causes_are_one_sentence_and_bugs_keep_their_traceback(monkeypatch):
    import typer

    from moon2.cli import _user_errors

    @_user_errors
    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/data/out/x.parquet")

    @_user_errors
    def bug() -> None:
        raise OSError(5, "Input/output error")  # not a user's doing: stays visible

    with pytest.raises(typer.Exit) as exit_info:
        denied()
    assert exit_info.value.exit_code == 2
    with pytest.raises(OSError):
        bug()
    monkeypatch.setenv("MOON2_DEBUG", "1")
    with pytest.raises(PermissionError):
        denied()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_an_existing_folder_that_cannot_be_written_is_one_sentence(tmp_path, monkeypatch, code):
    """An existing (empty) OUT on a read-only mount, without permission or without space."""
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(out / MARKER))

    monkeypatch.setattr(outdir, "atomic_path", refuse)
    args = ["synth", str(out), "--products", "60"]
    _refused(runner.invoke(app, args), str(out))


def test_folders_written_before_markers_existed_are_still_their_commands(tmp_path):
    """A run folder from an earlier moon2 (no marker) resumes; a look-alike of another command
    does not pass."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.yaml").write_text("# moon2 train: resolved config of this run\nseed: 0\n")
    legacy = (("train_config.yaml", "moon2 train"),)
    with claim_output(run, "train", legacy=legacy) as claim:
        assert not claim.fresh
    assert owner(run) == "train"
    other = tmp_path / "other"
    other.mkdir()
    (other / "train_config.yaml").write_text("seed: 0\n")  # a person's file of that name
    with pytest.raises(InputError, match="not empty and was not written by moon2 train"):
        _claim(other, "train", legacy=legacy)


def test_a_folder_left_with_only_a_marker_is_free_for_any_command(tmp_path):
    """A claim that failed at once (bad model, say) leaves only its marker and lock behind."""
    out = tmp_path / "out"
    with claim_output(out, "eval"):
        pass
    with claim_output(out, "embed") as claim:
        assert claim.fresh
    assert owner(out) == "embed"


def test_pyarrow_errors_name_the_path(capsys):
    import typer

    from moon2.cli import _user_errors

    @_user_errors
    def missing() -> None:
        raise FileNotFoundError("/data/cat/products/part-0.parquet")  # errno None, as pyarrow

    with pytest.raises(typer.Exit) as exit_info:
        missing()
    assert exit_info.value.exit_code == 2
    message = capsys.readouterr().err
    assert "/data/cat/products/part-0.parquet" in message and "MOON2_DEBUG" in message
