"""Output folders that cannot cost a user their data.

Every command that writes a folder claims it first with :func:`claim_output`:

- OUT must be new, empty, or a folder the same command wrote before. A command recognises its
  own folders by the marker file it leaves in them (``.moon2-output.json``, naming the
  command); anything else is refused with one sentence and neither written into nor deleted.
- OUT may not overlap any input: not the same folder, not inside one, not holding one.
- While a command writes, it holds an OS file lock on ``OUT/.moon2.lock``; a second run into
  the same OUT is refused until the first ends. The kernel drops the lock when the holder dies,
  so a killed run can be resumed at once.
- Starting over (``--no-resume``) deletes only the entries the command declares as its own
  outputs, and only inside a folder whose marker names the command: never a folder it merely
  expects by name in somebody else's directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from moon2.data.io import atomic_path, read_json_object
from moon2.errors import InputError, os_error_reason

MARKER = ".moon2-output.json"
LOCK = ".moon2.lock"
_OWN_FILES = frozenset({MARKER, LOCK})
_LEGACY_MAX = 1 << 20  # a legacy signature file is small; a larger one is not read


@dataclass
class OutputDir:
    """A claimed output folder: ``path`` belongs to ``command`` while the claim is held."""

    path: Path
    command: str
    outputs: tuple[str, ...] = ()
    fresh: bool = True  # True when the folder was new or empty at the claim
    _lock: FileLock | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Delete the command's declared outputs in this folder (its own, by the marker);
        an output name may be a glob pattern (``part-*.parquet``)."""
        for pattern in self.outputs:
            for target in sorted(self.path.glob(pattern)):
                if target.is_symlink() or target.is_file():
                    target.unlink()
                elif target.is_dir():
                    shutil.rmtree(target)


def _resolved(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser())).resolve()


def check_no_overlap(
    out: str | os.PathLike[str], inputs: Iterable[object], nested: bool = False
) -> None:
    """Refuse an OUT that is, holds or (unless ``nested``) lies inside one of ``inputs``
    (None entries and paths that do not exist, such as model names, are skipped)."""
    target = _resolved(Path(out))
    for item in inputs:
        if item is None or not Path(str(item)).exists():  # e.g. a model spec, not a path
            continue
        source = _resolved(Path(str(item)))
        inside = target.is_relative_to(source) and not nested
        if target == source or inside or source.is_relative_to(target):
            raise InputError(
                f"the output folder {out} overlaps the input {item}; write into a folder "
                "outside the input (and not holding it)"
            )


def _read_marker(path: Path) -> dict[str, object] | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    return read_json_object(marker) or {}


def owner(path: str | os.PathLike[str]) -> str | None:
    """The command whose marker ``path`` holds, or None (no marker, or not a folder)."""
    marker = _read_marker(Path(path))
    if marker is None:
        return None
    command = marker.get("command")
    return command if isinstance(command, str) else "an unknown command"


def _is_own_file(name: str) -> bool:
    """The marker, the lock, or the marker's temporary while it is written."""
    return name in _OWN_FILES or name.startswith(f".{MARKER}.tmp-")


def _legacy_match(out: Path, legacy: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``out`` holds every (file, words) of ``legacy``: the signature of a folder the
    command wrote before it left markers (a small regular file that contains the words)."""
    if not legacy:
        return False
    for name, words in legacy:
        file = out / name
        try:
            if not file.is_file() or file.is_symlink() or file.stat().st_size > _LEGACY_MAX:
                return False
            if words not in file.read_text(encoding="utf-8", errors="replace"):
                return False
        except OSError:
            return False
    return True


def _check_ownership(
    out: Path, command: str, legacy: tuple[tuple[str, str], ...] = ()
) -> bool:
    """True when ``out`` is new or empty, False when it is ``command``'s own; raises otherwise."""
    if not out.exists():
        return True
    if not out.is_dir():
        raise InputError(f"the output {out} exists and is not a folder; choose a new folder")
    found = owner(out)
    if found == command:
        return False
    try:
        entries = [entry.name for entry in out.iterdir() if not _is_own_file(entry.name)]
    except PermissionError:
        raise InputError(f"cannot read the output folder {out}: permission denied") from None
    if not entries:  # nothing but a marker and a lock: a claim that failed at once
        return True
    if found is None and _legacy_match(out, legacy):
        return False
    if found is not None:
        raise InputError(
            f"the output folder {out} was written by moon2 {found}, not moon2 {command}; "
            "choose a new or empty folder"
        )
    raise InputError(
        f"the output folder {out} is not empty and was not written by moon2 {command}; "
        "choose a new or empty folder (moon2 never writes into or deletes other files)"
    )


def check_output(
    out: str | os.PathLike[str],
    command: str,
    inputs: Iterable[object] = (),
    legacy: tuple[tuple[str, str], ...] = (),
) -> None:
    """The checks of :func:`claim_output` that write nothing: for the processes of a
    distributed run that are not the one holding the claim, so that all refuse alike."""
    check_no_overlap(out, inputs)
    _check_ownership(Path(out), command, legacy)


def _os_error(out: Path, exc: OSError) -> InputError:
    reason = os_error_reason(exc) or exc.strerror or type(exc).__name__
    return InputError(f"cannot write into the output folder {out}: {reason}")


def _lock(path: Path) -> FileLock:
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path / LOCK), timeout=0)
        lock.acquire()
    except Timeout:
        raise InputError(
            f"another moon2 run is writing into {path}; wait for it to end or choose another "
            "folder"
        ) from None
    except NotImplementedError:  # a file system without locks (some network mounts)
        raise InputError(
            f"the output folder {path} is on a file system without file locks; choose a "
            "local folder"
        ) from None
    except OSError as exc:
        raise _os_error(path, exc) from None
    return lock


def _write_marker(path: Path, command: str) -> None:
    content = json.dumps({"command": command, "format": 1})
    marker = path / MARKER
    try:
        if marker.is_file() and marker.read_text(encoding="utf-8") == content:
            return
        with atomic_path(marker) as temp:
            temp.write_text(content, encoding="utf-8")
    except OSError as exc:
        raise _os_error(path, exc) from None


@contextlib.contextmanager
def claim_output(
    out: str | os.PathLike[str],
    command: str,
    *,
    inputs: Iterable[object] = (),
    outputs: tuple[str, ...] = (),
    resume: bool = True,
    legacy: tuple[tuple[str, str], ...] = (),
) -> Iterator[OutputDir]:
    """Claim ``out`` for ``command`` (see the module docstring) for the ``with`` block.

    ``inputs``: paths OUT may not overlap (give a glob's files, not the glob). ``outputs``
    names the entries the command writes directly in ``out``; with ``resume=False`` those are
    deleted first, once the folder is known to be the command's. ``legacy``: (file, words)
    pairs that recognise the command's folders from before markers existed, so they resume.
    """
    path = Path(out)
    check_no_overlap(path, inputs)
    fresh = _check_ownership(path, command, legacy)
    lock = _lock(path)
    try:
        if fresh:
            # re-checked under the lock: another run may have claimed the folder meanwhile
            fresh = _check_ownership(path, command, legacy)
        _write_marker(path, command)
        claim = OutputDir(path, command, outputs, fresh, lock)
        if not resume and not fresh:
            claim.reset()
        yield claim
    finally:
        lock.release()
