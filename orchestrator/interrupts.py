"""What ends a run early, and what it does then: SIGTERM (a node drain, a Job's
``activeDeadlineSeconds``), SIGINT (Ctrl-C), ``release.deadline`` and the end of the
maintenance window (``orchestrator.schedule``).

What a stop does depends on how far the release got (``Stop.phase``):

- before the canary moved any user to green (backup, copy, validation, a 0 % stage):
  nothing user-facing to undo, so the run stops where it is (``Interrupted``, raised
  from the signal handler itself so that a long copy or a ``pg_dump`` is cut short)
  and the next run resumes it;
- during the canary (users on green, not promoted): the release rolls back through
  the machine's own rollback, every acknowledged write kept. The signal handler only
  records the signal (no database work in a handler); the stage guard, the approval
  wait and the machine's driver see it within one poll (``Stop.check``);
- while rolling back: the rollback finishes, whatever the number of signals;
- promoted: it stays promoted; a run waiting in the rollback window stops waiting.

A run outside every window of ``schedule.windows`` does nothing at all (``closed``):
no row, no lock, exit 0, because for a CronJob that is a schedule firing, not a
failure. The exit code of a stopped run is ``STOPPED_EXIT`` (4).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from enum import StrEnum
from types import FrameType

from orchestrator.config import ReleaseConfig
from orchestrator.errors import STOPPED_EXIT, Interrupted
from orchestrator.record import TERMINAL, Facts, Outcome, Pause, State, Status
from orchestrator.schedule import (
    Limit,
    canary_seconds,
    current_window,
    next_opening,
    run_limit,
)
from orchestrator.store import ReleaseRow

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Phase(StrEnum):
    BEFORE = "before the canary"
    CANARY = "canary"
    ROLLING_BACK = "rolling back"
    PROMOTED = "promoted"


def traffic_moved(facts: Facts) -> bool:
    """Whether users (or their writes) reached green, or the switchover began (blue
    fenced, the forward path dropped): then only a rollback undoes it."""
    target = facts.weights_target
    return facts.green_writable or facts.switched_over or facts.blue_fenced or (
        facts.forward_dropped) or (target is not None and target.green > 0)


class Stop:
    """One run's reasons to stop. ``Stop()`` never stops (``orchestrate rollback``,
    the receiver); ``Stop.for_run`` is the CLI's, with the deadline and the window."""

    def __init__(self, limit: Limit | None = None, *, cfg: ReleaseConfig | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.limit = limit
        self.cfg = cfg
        self.clock = clock
        self.closed: str | None = None  # outside every window: why nothing is done
        self.signalled: str | None = None
        self.signals = 0
        self.acted = False  # a stop decided this run's end
        self.state: State | None = None  # where the machine is; set by its driver
        self.facts_of: Callable[[], Facts] = Facts  # bound by the release's context

    @classmethod
    def for_run(cls, cfg: ReleaseConfig, *, force: bool = False,
                clock: Callable[[], float] = time.time) -> Stop:
        now = clock()
        windows = [] if force else cfg.schedule.windows
        window = current_window(windows, now) if windows else None
        stop = cls(run_limit(cfg, started=now, window=window), cfg=cfg, clock=clock)
        if windows and window is None:
            upcoming = next_opening(windows, now)
            after = f"; the next one opens at {upcoming.describe(upcoming.opens)}" if (
                upcoming) else ""
            stop.closed = (f"release {cfg.release.name}: outside every maintenance window "
                           f"(schedule.windows), nothing done{after}. `--force` runs it now")
        return stop

    def left_unfinished(self, row: ReleaseRow | None) -> Stop:
        """Outside every window, a release a killed run left with users on green (or
        half rolled back) is not left so until the next window: this run finishes it,
        its limit already passed (a canary rolls back at once). Otherwise ``self``."""
        if not self.closed or row is None or row.state in TERMINAL:
            return self
        if row.state != State.ROLLBACK and not traffic_moved(row.facts):
            return self
        return Stop(Limit(self.clock(), "outside every maintenance window "
                          f"(schedule.windows), with {row.name} left in {row.state}"),
                    cfg=self.cfg, clock=self.clock)

    # ------------------------------------------------------------- the machine

    def phase(self) -> Phase:
        if self.state in {State.WINDOW, State.CLEANUP, State.DONE}:
            return Phase.PROMOTED
        facts = self.facts_of()
        # The reason is recorded as the rollback starts, before its state is entered.
        if self.state in {State.ROLLBACK, State.ROLLED_BACK, State.FAILED} or (
                facts.rollback_reason is not None):
            return Phase.ROLLING_BACK
        return Phase.CANARY if traffic_moved(facts) else Phase.BEFORE

    def reason(self) -> str | None:
        """Why this run must stop, if it must (whatever the phase)."""
        if self.signalled:
            return f"{self.signalled} received"
        if self.limit is not None and self.clock() >= self.limit.at:
            return f"deadline: {self.limit.what}"
        return None

    def at(self, state: State) -> str | None:
        """The driver, entering ``state``: ``check`` there."""
        self.state = state
        return self.check()

    def check(self) -> str | None:
        """The reason to roll back now (during the canary), or None. Before the canary
        moved any traffic a stop raises ``Interrupted`` instead: nothing to undo."""
        reason = self.reason()
        if reason is None:
            return None
        phase = self.phase()
        if phase == Phase.BEFORE:
            self.acted = True
            raise Interrupted(f"{reason} before the canary moved any traffic: stopped, "
                              "nothing to undo; run the same command again to resume")
        if phase == Phase.CANARY:
            self.acted = True
            return f"{reason}: all traffic back to blue"
        return None

    def stop_waiting(self) -> bool:
        """In the rollback window: whether to stop waiting (the release stays
        promoted; the next run, or the window's end, cleans up)."""
        return self.reason() is not None

    def before_canary(self) -> Pause | None:
        """A pause instead of a canary that cannot end before the run's limit. Not a
        rollback: green is copied and validated, and the next run (the next window)
        starts the canary from there; nothing user-facing has changed."""
        if self.limit is None or self.cfg is None or traffic_moved(self.facts_of()):
            return None
        need = canary_seconds(self.cfg, self.facts_of().stage)
        left = self.limit.at - self.clock()
        if need <= left:
            return None
        self.acted = True
        return Pause(f"canary not started: its stages take {need:.0f}s, and only "
                     f"{max(left, 0):.0f}s are left before the rollback margin "
                     f"({self.limit.what}); traffic untouched, the next run resumes here")

    def exit_code(self, outcome: Outcome) -> int:
        if outcome.status != Status.PROMOTED and self.acted:
            return STOPPED_EXIT
        return outcome.exit_code

    # ----------------------------------------------------------------- signals

    @contextmanager
    def handling_signals(self) -> Iterator[Stop]:
        """SIGTERM and SIGINT handled as the module says while the run lasts, and a
        SIGALRM at the limit, which cuts a long copy short before the canary."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are the main thread's alone
            return
        previous = {each: signal.signal(each, self._on_signal)
                    for each in (*HANDLED, signal.SIGALRM)}
        if self.limit is not None:
            signal.setitimer(signal.ITIMER_REAL, max(self.limit.at - self.clock(), 0.001))
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for each, handler in previous.items():
                signal.signal(each, handler)

    def deliver(self, signum: int) -> None:
        """What a signal does (the handler's body; tests call it directly)."""
        phase = self.phase()
        # Before the driver entered a state, the release's facts are not loaded yet
        # (a resumed canary would read as "before"): its first state decides.
        started = self.state is not None
        if signum == signal.SIGALRM:
            # The limit has passed: the guard reads the clock during the canary; only
            # a run still before it has to be interrupted where it blocks.
            if phase == Phase.BEFORE and started:
                self.check()
            return
        name = signal.Signals(signum).name
        self.signals += 1
        self.signalled = self.signalled or name
        if phase == Phase.BEFORE:
            if started:
                self.check()  # raises Interrupted
            _say(f"orchestrate: {name} received while starting: acted on at its first state")
            return
        if self.state == State.PROMOTE:
            _say(f"orchestrate: {name} received (promoting): the promotion finishes, then "
                 "the release stays promoted; stopping")
            return
        what = {
            Phase.CANARY: "rolling back: all traffic back to blue, then exiting"
            if self.signals == 1 else "still rolling back; finishing it, not leaving "
            "traffic split",
            Phase.ROLLING_BACK: "finishing the rollback first, not leaving traffic split",
            Phase.PROMOTED: "the release stays promoted; stopping",
        }[phase]
        _say(f"orchestrate: {name} received ({phase.value}): {what}")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.deliver(signum)


def _say(message: str) -> None:
    # os.write, not the logger: a signal handler may run inside a logging call, and
    # the logging locks are not reentrant-safe for the stream they guard.
    with suppress(OSError):
        os.write(2, (message + "\n").encode())
