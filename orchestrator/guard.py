"""What can end a canary stage, or the rollback window, besides its metrics.

Argo Rollouts and Flagger judge a canary by its HTTP metrics alone. They cannot see
a paused server (Prometheus still holds the last scrape), nor a subscription that
stopped applying or fell behind: green then drifts from blue, its reads go stale and
a later rollback is slow or lossy, however good the metrics. The guard looks at
three things, each call:

* a rollback request (an alert through ``orchestrate serve``, ``orchestrate
  rollback`` or ``abort`` from any process, a signal) — every call;
* both sides' own health, probed in the background (``SideProbe``) — every call;
* once per interval, the data path (``ReplicationPair.health``), on a worker thread:
  on a server that has just stopped answering it waits up to
  ``canary.probe.timeout``, and a rollback request must not wait behind it.

During a stage, a stopped replication path, or lag over ``sync.max_lag_bytes`` or
``sync.max_lag_seconds`` in ``sync.lag_failure_limit`` checks in a row, ends the
stage. In the rollback window the same findings are recorded and reported, but do
not roll back by themselves: after promotion the reverse path is what a rollback
needs, and rolling back onto a blue that is missing green's writes is the one thing
never done. A lagging or stopped reverse path is an alert (the PrometheusRule) and a
note, for a person.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

from orchestrator.context import ReleaseContext
from orchestrator.datapath import Lag, ReplicationCheck, ReplicationPair
from orchestrator.pg.probe import SideProbe


@dataclass
class LagStreaks:
    """Consecutive over-limit lag checks per direction, kept across the stages of one
    run (a lag that began at the end of a stage goes on counting in the next), and
    since when each slot's confirmed position has stood still while behind."""

    clock: Callable[[], float] = time.monotonic
    counts: dict[str, int] = field(default_factory=dict)
    still: dict[str, tuple[str, float]] = field(default_factory=dict)
    judged: dict[str, float | None] = field(default_factory=dict)

    def judge(self, lag: Lag, *, max_bytes: int, max_seconds: float) -> tuple[str, int]:
        """What is over the limit ("" when within limits, which ends the streak) and
        how many checks in a row it has been so."""
        seconds = self.judged[lag.direction] = self._seconds(lag)
        over = []
        if lag.bytes is not None and lag.bytes > max_bytes:
            over.append(f"{lag.bytes} bytes > {max_bytes}")
        if seconds is not None and seconds > max_seconds:
            over.append(f"{seconds:.1f}s > {max_seconds:g}s")
        count = self.counts.get(lag.direction, 0) + 1 if over else 0
        self.counts[lag.direction] = count
        return (f"{lag.direction} replication lag {', '.join(over)}" if over else ""), count

    def seconds(self, lag: Lag) -> float | None:
        """The lag in seconds as the last ``judge`` of its direction saw it:
        ``replay_lag``, or how long the confirmed position has not moved while WAL
        waits, whichever is longer."""
        return self.judged.get(lag.direction)

    def _seconds(self, lag: Lag) -> float | None:
        now = self.clock()
        if lag.confirmed is None or not lag.bytes:
            self.still.pop(lag.direction, None)
            return lag.seconds
        position, since = self.still.get(lag.direction, (lag.confirmed, now))
        if position != lag.confirmed:
            since = now
        self.still[lag.direction] = (lag.confirmed, since)
        return max(lag.seconds or 0.0, now - since)


@contextmanager
def probes(ctx: ReleaseContext, interval: float, *, blue_too: bool) -> Iterator[list[SideProbe]]:
    """Green's (and blue's) own health, probed in the background for a stage or the
    window: a paused server is invisible to Prometheus."""
    sides = [(ctx.green_endpoint, "green")] + (
        [(ctx.blue_endpoint, "blue")] if blue_too else [])
    probe = ctx.cfg.canary.probe
    each = [SideProbe(db, side, interval=probe.interval or interval, timeout=probe.timeout,
                      failure_limit=probe.failure_limit) for db, side in sides]
    with ExitStack() as stack:
        for p in each:
            stack.enter_context(p)
        yield each


# What the window's guard answers when a stop (signal, deadline) ends the watch: not
# a reason to roll back.
STOP_WAITING = "stop waiting: the release stays promoted"


class Guard:
    """``should_abort`` for ``canary.analysis.run_stage``: the reason to end now, or
    None. ``stage`` is the 0-based index the measurements are stored under."""

    def __init__(self, ctx: ReleaseContext, pair: ReplicationPair, *, stage: int,
                 weight: int, interval: float, side_probes: list[SideProbe],
                 data_checks: ThreadPoolExecutor, streaks: LagStreaks,
                 in_window: bool = False) -> None:
        self.ctx = ctx
        self.pair = pair
        self.stage = stage
        self.weight = weight
        self.interval = interval
        self.side_probes = side_probes
        self.data_checks = data_checks
        self.streaks = streaks
        self.in_window = in_window
        self._last = float("-inf")
        self._running: Future[ReplicationCheck] | None = None
        self._reported: set[str] = set()

    def __call__(self) -> str | None:
        reason = self.ctx.journal.rollback_requested() or self.ctx.stop.check()
        if reason:
            return reason
        if self.in_window and self.ctx.stop.stop_waiting():
            # A signal or the deadline in the window: stop watching, stay promoted.
            return STOP_WAITING
        problem = self.probe_problem()
        if problem:
            return problem
        if self._running is not None:
            if not self._running.done():
                return None
            check, self._running = self._running.result(), None
            return self._judge(check)
        now = time.monotonic()
        if now - self._last < self.interval:
            return None
        self._last = now
        if any(p.failing for p in self.side_probes):
            # Its probe judges a side that does not answer; the replication check
            # would only block on it.
            return None
        self._running = self.data_checks.submit(self.pair.health, self.stage)
        return None

    def probe_problem(self) -> str | None:
        for probe in self.side_probes:
            for result in probe.drain():
                self.ctx.journal.measure(
                    stage=self.stage, weight=self.weight, check=f"probe:{result.side}",
                    value=round(result.seconds, 4), baseline=self.ctx.cfg.canary.probe.timeout,
                    verdict="pass" if result.ok else "fail", detail=result.detail)
                if not result.ok:
                    self.ctx.note(f"{result.side} probe failed: {result.detail}", "warning")
            problem = probe.problem()
            if problem:
                return problem
        return None

    def _judge(self, check: ReplicationCheck) -> str | None:
        """On the machine's thread: the store's connection is not shared."""
        if check.postponed:
            # One blip is not a verdict: the probes count failures against their
            # limit and fail the stage; this check waits for the next interval.
            self.ctx.note(f"replication check postponed: {check.postponed}", "warning")
            return None
        sync = self.ctx.cfg.sync
        # (what it is about, the reason): in the window each is reported once a streak.
        reasons = [(check.problem, check.problem)] if check.problem else []
        for lag in check.lags:
            over, count = self.streaks.judge(lag, max_bytes=sync.max_lag_bytes,
                                             max_seconds=sync.max_lag_seconds)
            failed = count >= sync.lag_failure_limit
            self._measure_lag(lag, self.streaks.seconds(lag), bool(over), failed)
            if count == 1 and not failed:
                self.ctx.note(f"{over} (1 of {sync.lag_failure_limit} checks before the "
                              "stage fails)", "warning", direction=lag.direction)
            if failed:
                # Keyed by direction: the values in the text change every check.
                reasons.append((f"lag:{lag.direction}", f"{over} in {count} checks in a row"))
        if not reasons:
            self._reported.clear()
            return None
        if not self.in_window:
            return reasons[0][1]
        for key, reason in reasons:
            if key not in self._reported:
                self._reported.add(key)
                self.ctx.note(f"in the rollback window: {reason}; not rolling back on it "
                              "(a rollback needs this path); a person must look", "error")
        return None

    def _measure_lag(self, lag: Lag, seconds: float | None, over: bool, failed: bool) -> None:
        sync = self.ctx.cfg.sync
        for check, value, limit, detail in (
                (f"replication-lag:{lag.direction}", lag.bytes, float(sync.max_lag_bytes),
                 "slot lag in bytes (WAL the subscriber has not confirmed)"),
                (f"replication-lag-seconds:{lag.direction}", seconds, sync.max_lag_seconds,
                 "replay lag in seconds (replay_lag, or how long the slot stood still)")):
            this_over = over and value is not None and value > limit
            verdict = ("fail" if failed else "inconclusive") if this_over else "pass"
            self.ctx.journal.measure(
                stage=self.stage, weight=self.weight, check=check,
                value=None if value is None else float(value), baseline=limit,
                verdict=verdict, detail=detail)
