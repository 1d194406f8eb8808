"""The one place where library code reports progress and messages.

Everything goes to stderr through rich so that stdout stays free for reports and machine
readable output. Tests and embedding applications silence it with ``set_quiet(True)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console = Console(stderr=True)
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or re-enable) all messages and progress bars."""
    global _quiet
    _quiet = quiet


def console() -> Console:
    """The stderr console used for messages (for callers that render rich objects)."""
    return _console


def info(message: str, markup: bool = False) -> None:
    """Print a message; ``markup=True`` interprets rich markup (escape any paths in it)."""
    if not _quiet:
        _console.print(message, highlight=False, markup=markup)


def warn(message: str) -> None:
    if not _quiet:
        _console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)


class Task:
    """Handle for one progress bar; ``advance`` is cheap and safe to call often."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.advance(self._task_id, amount)


class _RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: object) -> Text:
        speed = getattr(task, "speed", None)
        return Text("" if speed is None else f"{speed:.1f} {self.unit}/s")


@contextlib.contextmanager
def task(description: str, total: float | None, unit: str | None = None) -> Iterator[Task]:
    """A progress bar for a long piece of work of ``total`` units (None when unknown); with
    ``unit`` it also shows the rate (``12.5 rows/s``)."""
    if _quiet:
        yield Task(None, None)
        return
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if unit is not None:
        columns.append(_RateColumn(unit))
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    progress = Progress(*columns, console=_console, transient=False)
    with progress:
        task_id = progress.add_task(escape(description), total=total)
        yield Task(progress, task_id)
