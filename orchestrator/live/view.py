"""The live view in a terminal: a rich ``Live`` region redrawn in place.

``LiveView`` is both the release's ``Display`` (the initial copy's progress bars)
and an ``EventSink``: ``orchestrate release`` feeds it the machine's events.
``watch`` draws the same model, read from the control schema every interval, for
``orchestrate status --watch``. While the region is live, whatever the process
writes to stderr (the console log lines) and to a terminal's stdout is printed
through the region's console, above it, so log lines scroll and never tear the
view. Off a terminal nothing here runs: logs stay JSON lines, and ``watch`` prints
a JSON line each time the model changes.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from rich.console import Console, RenderableType
from rich.live import Live

from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError, StateUnavailable
from orchestrator.events import Event, EventSink
from orchestrator.live.model import Bar, ViewModel, from_store
from orchestrator.live.render import render
from orchestrator.logging import get_logger
from orchestrator.record import Status
from orchestrator.store import StateStore
from orchestrator.ui import Display, NoDisplay

log = get_logger("orchestrate.live")

# Redraws per second: the time left ticks, and a terminal over ssh keeps up.
REFRESH_PER_SECOND = 2


def _live(console: Console, get_renderable: Callable[[], RenderableType]) -> Live:
    # stdout is redirected only when it is a terminal too: `release > outcome.txt`
    # must not find the view's output in its file.
    return Live(console=console, get_renderable=get_renderable,
                refresh_per_second=REFRESH_PER_SECOND, transient=False,
                redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)


class LiveView:
    """The model a release's events build, drawn live on stderr."""

    def __init__(self, model: ViewModel, *, console: Console | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.model = model
        self.console = console or Console(file=sys.stderr)
        self._clock = clock
        # The machine's thread applies events, the copy's threads report progress,
        # and rich's refresh thread renders.
        self._lock = threading.Lock()
        # Apart: starting the region renders it, which takes ``_lock``.
        self._starting = threading.Lock()
        self._live: Live | None = None

    def renderable(self) -> RenderableType:
        with self._lock:
            return render(self.model, self._clock())

    def _start(self) -> None:
        with self._starting:
            if self._live is None:
                self._live = _live(self.console, self.renderable)
                self._live.start()

    # EventSink ---------------------------------------------------------------
    def emit(self, event: Event) -> None:
        with self._lock:
            self.model.apply(event)
        self._start()
        live = self._live
        if live is not None:
            # Now, not at the next tick: a log line printed before the tick would
            # redraw the frame from before the event.
            live.refresh()

    # Display -----------------------------------------------------------------
    def progress(self, key: str, description: str, done: float, total: float) -> None:
        with self._lock:
            self.model.progress[key] = Bar(description, done, total)
        self._start()

    def finish(self, key: str) -> None:
        with self._lock:
            self.model.progress.pop(key, None)

    def close(self) -> None:
        """Stop redrawing and leave the last frame on the screen (also on Ctrl-C:
        rich puts the cursor back)."""
        with self._starting:
            live, self._live = self._live, None
        if live is not None:
            live.stop()


def make_display(fmt: str, cfg: ReleaseConfig) -> Display:
    """The live view on a terminal with console logs; nothing otherwise."""
    if fmt == "console" and sys.stderr.isatty():
        return LiveView(ViewModel.for_config(cfg))
    return NoDisplay()


def sinks_for(display: Any, cfg: ReleaseConfig, store: StateStore) -> list[EventSink]:
    """The release's event sinks a display brings: a live view listens, starting from
    what the store holds (a resumed release shows the states it already passed)."""
    if not isinstance(display, LiveView):
        return []
    try:
        recorded = from_store(store, cfg)
    except OrchestrateError as exc:
        # The machine reports an unreadable store itself, in its own words.
        log.debug("live view starts empty", error=exc.message)
    else:
        if recorded.started:
            display.model = recorded
    return [display]


# ------------------------------------------------------------ status --watch


def _read(store: StateStore, cfg: ReleaseConfig, last: ViewModel | None) -> ViewModel:
    try:
        return from_store(store, cfg)
    except StateUnavailable as lost:
        # A watcher outlives a paused state database: it says so and tries again.
        model = last or ViewModel.for_config(cfg)
        model.stale = lost.message
        return model


def _exit_code(model: ViewModel) -> int:
    return 0 if model.status == Status.PROMOTED.value else 1


def watch(cfg: ReleaseConfig, store: StateStore, *, interval: float,
          tty: bool | None = None, console: Console | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Until the release ends (or stops for a person): 0 promoted, 1 rolled back or
    failed, 130 on Ctrl-C."""
    console = console or Console(file=sys.stderr)
    tty = console.is_terminal if tty is None else tty
    try:
        if not tty:
            return _watch_lines(cfg, store, interval, sleep)
        return _watch_live(cfg, store, interval, console, sleep)
    except KeyboardInterrupt:
        return 130


def _watch_live(cfg: ReleaseConfig, store: StateStore, interval: float, console: Console,
                sleep: Callable[[float], None]) -> int:
    current = [_read(store, cfg, None)]
    with _live(console, lambda: render(current[0], time.time())) as live:
        while not current[0].finished:
            sleep(interval)
            current[0] = _read(store, cfg, current[0])
        live.refresh()
    return _exit_code(current[0])


def _watch_lines(cfg: ReleaseConfig, store: StateStore, interval: float,
                 sleep: Callable[[float], None]) -> int:
    last = None
    model = _read(store, cfg, None)
    while True:
        line = json.dumps(asdict(model), default=str, sort_keys=True)
        if line != last:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            last = line
        if model.finished:
            return _exit_code(model)
        sleep(interval)
        model = _read(store, cfg, model)
