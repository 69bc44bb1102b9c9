"""Progress display for a person watching; silent when output is a log pipe."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class Display(Protocol):
    def progress(self, key: str, description: str, done: float, total: float) -> None: ...

    def finish(self, key: str) -> None: ...

    def close(self) -> None: ...


class NoDisplay:
    def progress(self, key: str, description: str, done: float, total: float) -> None:
        return None

    def finish(self, key: str) -> None:
        return None

    def close(self) -> None:
        return None


class RichDisplay:
    """Bars on stderr, alongside the console log lines."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
            console=Console(file=sys.stderr), transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._started = False

    def progress(self, key: str, description: str, done: float, total: float) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        if key not in self._tasks:
            self._tasks[key] = self._progress.add_task(description, total=total)
        self._progress.update(self._tasks[key], completed=done, total=total,
                              description=description)

    def finish(self, key: str) -> None:
        task = self._tasks.pop(key, None)
        if task is not None:
            self._progress.remove_task(task)

    def close(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False

    def __enter__(self) -> RichDisplay:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def make_display(fmt: str) -> Display:
    if fmt == "console" and sys.stderr.isatty():
        return RichDisplay()
    return NoDisplay()
