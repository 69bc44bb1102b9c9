"""What the release shows a person besides its log lines: progress (the initial
copy's bars). Silent when output is a log pipe; on a terminal the live view
(``orchestrator.live``) is the display."""

from __future__ import annotations

from typing import Protocol


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
