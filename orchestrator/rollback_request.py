"""One rollback request, for both faces: `orchestrate rollback` and the alert receiver.

The policy, whoever asks:

1. **Record** the request on the release's row (``StateStore.request_rollback``).
   Recording is idempotent: while a request is pending, or a rollback is under way,
   nothing new is written and the caller is told which. A release that has not
   started, has finished, or is past its rollback window (cleanup) is refused with
   ``NotRollbackable``, saying which state it is in.
2. **Execute**, exactly one process:

   - if a running orchestrator holds the release (its lock), it obeys the request at
     its next poll (within a second while it waits in a stage or in the window);
   - if nobody holds it, the caller does the rollback itself: the CLI synchronously
     (``request_and_wait``), the receiver in its background thread, so that it answers
     Alertmanager at once (``perform``). A ``LockedError`` from the caller's own
     attempt means an orchestrator took the release in between: that one obeys.

``request_and_wait`` tries the rollback first, since taking the lock is the only race-free
test of "nobody holds it"; while it is held it records the request once and polls every
second: a rollback failure the holder logs after the request is reported at once, a
lock that frees (the holder exited without acting, or crashed) is taken and the
rollback done here, and at ``timeout`` it gives up and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from orchestrator.errors import LockedError, OrchestrateError
from orchestrator.record import State
from orchestrator.store import ReleaseRow

T = TypeVar("T")

# How often a waiting requester looks at the lock and the holder's log.
POLL_S = 1.0


class RequestStore(Protocol):
    """What recording a request needs of ``StateStore``."""

    def get(self, name: str) -> ReleaseRow | None: ...

    def request_rollback(self, name: str, reason: str) -> bool: ...


class WatchStore(RequestStore, Protocol):
    """What waiting for the lock holder needs of ``StateStore``."""

    def log_entries(self, name: str, limit: int = 50) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


class NotRollbackable(OrchestrateError):
    """The release is not in a state a rollback can start from."""


@dataclass(frozen=True)
class Recorded:
    """What recording the request found."""

    new: bool  # this call recorded it
    requested: str | None = None  # the request that was already pending
    rolling_back: bool = False  # the release is already in state rollback
    reason: str = ""  # the reason the rollback carries: this call's, or the earlier one


def record(store: RequestStore, name: str, reason: str, *,
           row: ReleaseRow | None = None) -> Recorded:
    """Record a rollback request for ``name`` (step 1 of the policy).

    ``row``, when the caller has just read it, spares a write when it already shows a
    request or a rollback."""
    if row is not None and (pending := _pending(row, reason)) is not None:
        return pending
    if store.request_rollback(name, reason):
        return Recorded(new=True, reason=reason)
    # The write matched nothing: a request or a rollback got there first, or the
    # release is in no state to roll back from. The row says which.
    row = store.get(name)
    pending = _pending(row, reason) if row is not None else None
    if pending is not None:
        return pending
    state = row.state if row is not None else "not started"
    raise NotRollbackable(f"release {name} cannot be rolled back: it is {state}",
                          hint="a release past its rollback window rolls forward with a "
                          "new release")


def _pending(row: ReleaseRow, reason: str) -> Recorded | None:
    rolling_back = row.state == State.ROLLBACK
    if not (rolling_back or row.rollback_requested):
        return None
    # A rollback the machine started on its own (a failed stage) carries its error.
    return Recorded(new=False, requested=row.rollback_requested, rolling_back=rolling_back,
                    reason=row.rollback_requested or row.error or reason)


@dataclass(frozen=True)
class Done(Generic[T]):
    """The rollback ran in this process; ``outcome`` is what ``run`` returned."""

    outcome: T


def perform(run: Callable[[str], T], reason: str) -> Done[T] | None:
    """Roll back here (step 2, nobody holds the release). None when an orchestrator
    holds it: it obeys the recorded request. ``run`` takes the lock itself."""
    try:
        return Done(run(reason))
    except LockedError:
        return None


@dataclass(frozen=True)
class Waited(Generic[T]):
    """How ``request_and_wait`` ended; neither field set: the timeout passed."""

    outcome: T | None = None  # the rollback this process did
    holder_failure: str | None = None  # the failure the lock holder logged


def request_and_wait(
    name: str,
    reason: str,
    *,
    run: Callable[[str], T],
    open_store: Callable[[], WatchStore],
    timeout: float,
    on_recorded: Callable[[Recorded], None],
    poll: float = POLL_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Waited[T]:
    """Roll back here, or, while another process holds the release, ask it to and wait
    (the synchronous caller of the policy). ``on_recorded`` hears once what recording
    found; ``NotRollbackable`` comes through."""
    deadline = clock() + timeout
    asked = False
    before: datetime | None = None
    while True:
        # Before trying the lock again: the holder may have failed and exited since
        # the last poll, and retrying its rollback at once would only fail the same way.
        failure = holder_failure(open_store, name, before) if asked else None
        if failure:
            return Waited(holder_failure=failure)
        done = perform(run, reason)
        if done is not None:
            return Waited(outcome=done.outcome)
        if not asked:
            before, asked = _ask(open_store, name, reason, on_recorded), True
        if clock() >= deadline:
            return Waited()
        sleep(poll)


def _ask(open_store: Callable[[], WatchStore], name: str, reason: str,
         on_recorded: Callable[[Recorded], None]) -> datetime | None:
    """Record the request for the lock holder; the time of its newest log entry then
    (None if it has none), to tell what it logs afterwards."""
    store = open_store()
    try:
        recorded = record(store, name, reason)
        entries = store.log_entries(name, limit=1)
    finally:
        store.close()
    on_recorded(recorded)
    at = entries[-1]["at"] if entries else None
    return at if isinstance(at, datetime) else None


def holder_failure(open_store: Callable[[], WatchStore], name: str,
                   since: datetime | None) -> str | None:
    """The rollback failure the lock holder logged after ``since``, if any. Not the
    row's status: a failed rollback stays resumable (state rollback, status running)."""
    store = open_store()
    try:
        entries = store.log_entries(name, limit=20)
    finally:
        store.close()
    for entry in reversed(entries):
        if since is not None and entry["at"] <= since:
            break
        if entry["level"] == "error" and entry["state"] == State.ROLLBACK:
            return str(entry["message"])
    return None
