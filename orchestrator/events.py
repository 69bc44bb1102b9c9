"""What happened to a release, told to whoever listens: notifications, metrics, a
live view.

The machine, the stages and the journal emit an ``Event`` at each milestone
(``Kind``); ``Events`` hands it to every ``EventSink`` the release was built with.
A sink is off the release's path by contract: ``emit`` must return at once (a sink
that talks to the network queues the event and sends it from its own thread), and
whatever a sink raises is logged and swallowed here, once, so that a dead webhook
or a full disk under a metrics file never slows, stops or fails a release.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from orchestrator.logging import get_logger

log = get_logger("orchestrate.events")


class Kind(StrEnum):
    STARTED = "started"  # preflight passed, the release row exists
    STATE = "state"  # a state begins (``state``)
    STATE_DONE = "state_done"  # a state ended well (``details.duration_s``)
    STAGE_PASSED = "stage_passed"  # a canary stage passed (``stage``, ``weight``)
    AWAITING_APPROVAL = "awaiting_approval"  # a gate waits for `orchestrate promote`
    MEASUREMENT = "measurement"  # a check, probe or lag value (``details``)
    ROLLING_BACK = "rolling_back"  # a rollback starts (``reason``)
    ROLLED_BACK = "rolled_back"  # traffic and data are back on blue (``reason``)
    FAILED = "failed"  # a state failed and the release stopped for a person
    PROMOTED = "promoted"  # green takes all traffic; the window is open
    WINDOW_CLOSED = "window_closed"  # past the rollback window; cleanup follows
    DONE = "done"  # cleanup finished


@dataclass(frozen=True)
class Event:
    kind: Kind
    release: str
    state: str | None = None
    # Stage numbers are 1-based here, as people read them ("stage 2/4").
    stage: int | None = None
    stages: int | None = None
    weight: int | None = None
    reason: str | None = None
    at: float = field(default_factory=time.time)
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"event": self.kind.value, "release": self.release, "state": self.state,
                "stage": self.stage, "stages": self.stages, "weight": self.weight,
                "reason": self.reason, "at": self.at, "details": self.details}


class EventSink(Protocol):
    def emit(self, event: Event) -> None:
        """Take the event; return at once, never block on the network."""

    def close(self) -> None:
        """The release process is ending: flush what can be flushed, briefly."""


class Events:
    """The sinks of one release; emitting never raises."""

    def __init__(self, sinks: Iterable[EventSink] = ()) -> None:
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception as exc:
                log.warning("event sink failed", sink=type(sink).__name__,
                            kind=event.kind.value, error=str(exc))

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("event sink failed to close", sink=type(sink).__name__,
                            error=str(exc))


class RecordingSink:
    """Keeps every event: for tests, and for a caller that wants the list."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass

    def kinds(self) -> list[Kind]:
        return [e.kind for e in self.events]
