"""The receiver's decisions, without HTTP (tested with a fake store).

Blocking: ``handle`` runs on a worker thread. Every wait in it is bounded, so a
stalled state database turns into a 503 (Alertmanager retries) instead of a request
that never answers: a state connection is checked out of a small pool with a
timeout, and the HTTP side aborts a call that overruns ``alerts.state_timeout``.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator import rollback_request
from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError
from orchestrator.logging import get_logger, register_secret, scrub
from orchestrator.matchers import AlertSelector, Matchers
from orchestrator.record import State, Status
from orchestrator.rollback_request import NotRollbackable
from orchestrator.server.payload import Alert
from orchestrator.server.pool import ReceiverStore, StorePool, StoreUnavailable, Ticket
from orchestrator.store import ReleaseRow

log = get_logger("orchestrate.serve")

# The documented refusal, logged verbatim (operators search their logs for it).
REFUSED = "alert refused: missing or wrong bearer token"


@dataclass
class Decision:
    code: int
    body: dict[str, Any]


class _Bounded:
    """The receiver's store as ``rollback_request.record`` sees it: every call goes
    through ``bound`` (``AlertReceiver._with_store``: bounded, retried once)."""

    def __init__(self, store: ReceiverStore, bound: Callable[[Callable[[], Any]], Any]) -> None:
        self.store, self.bound = store, bound

    def get(self, name: str) -> ReleaseRow | None:
        row: ReleaseRow | None = self.bound(lambda: self.store.get(name))
        return row

    def request_rollback(self, name: str, reason: str) -> bool:
        new: bool = self.bound(lambda: self.store.request_rollback(name, reason))
        return new


def _utc(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at.utcoffset() is not None else at.isoformat()


def _since_release(alerts: list[Alert], row: ReleaseRow) -> list[Alert]:
    """The alerts that began after the release did: an older one is about the version
    before it."""
    begun = row.started_at
    if begun is None:
        return alerts
    return [a for a in alerts if a.started is None or a.started >= begun]


@dataclass(frozen=True)
class _Binding:
    """The release a receiver guards, as one value (swapped whole when it follows)."""

    cfg: ReleaseConfig
    matchers: Matchers
    selector: AlertSelector


class AlertReceiver:
    def __init__(
        self,
        cfg: ReleaseConfig,
        *,
        store: ReceiverStore,
        token: str | None,
        lock_is_free: Callable[[], bool],
        run_rollback: Callable[[str], None],
        store_factory: Callable[[], ReceiverStore] | None = None,
        max_stores: int = 4,
        follow: Callable[[ReceiverStore], ReleaseConfig] | None = None,
    ) -> None:
        self._pinned = threading.local()
        self._bind(cfg)
        self.state_timeout = cfg.alerts.state_timeout
        # A config without release.name (a CronJob's recurring releases): which
        # release, and with a pair which side is blue, is read again at each alert,
        # so that a receiver left running guards the release of the day.
        self._follow = follow
        if token is not None:
            register_secret(token)
        self._token = token.encode() if token is not None else None
        # A pool, not one connection behind one lock: an alert stuck on a stalled
        # connection must not hold every later alert behind it.
        self._pool = StorePool(store, store_factory, max_stores, timeout=self.state_timeout)
        self._lock_is_free = lock_is_free
        self._run_rollback = run_rollback
        self._worker: threading.Thread | None = None
        self._worker_lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self._counter_lock = threading.Lock()

    # -- authentication ----------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True  # --insecure on loopback: the operator chose this
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: a timing difference must not reveal the token's prefix.
        return hmac.compare_digest(given.strip().encode(), self._token)

    def count(self, outcome: str) -> None:
        with self._counter_lock:
            self.counters[outcome] = self.counters.get(outcome, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self.counters)

    def unavailable(self, error: str) -> Decision:
        self.count("store_unavailable")
        log.warning("state database unavailable: answering 503", release=self.name,
                    error=error)
        # 503: Alertmanager retries, and the next attempt may find the database back.
        return Decision(503, {"action": "none", "error": error})

    # -- the release followed --------------------------------------------------------

    def _bind(self, cfg: ReleaseConfig) -> None:
        matchers = Matchers(cfg.alerts.matchers, cfg.template_variables())
        self._binding = _Binding(cfg, matchers, AlertSelector(
            cfg.release.name, cfg.alerts.release_label, matchers))

    # A decision, and the rollback it starts, read the release bound when it began
    # (pinned on its thread): an alert that races the start of the next release is
    # judged, recorded and executed against one release, never two.
    @property
    def _current(self) -> _Binding:
        pinned: _Binding | None = getattr(self._pinned, "binding", None)
        return pinned or self._binding

    @property
    def cfg(self) -> ReleaseConfig:
        return self._current.cfg

    @property
    def name(self) -> str:
        return self._current.cfg.release.name

    @property
    def selector(self) -> AlertSelector:
        return self._current.selector


    def _refresh(self, ticket: Ticket) -> Decision | None:
        """Follow the release of the day (``follow``); a 503 when the store cannot say."""
        assert self._follow is not None
        follow = self._follow
        try:
            store = self._pool.checkout(ticket)
            try:
                cfg: ReleaseConfig = self._pool.call(store, ticket, lambda: follow(store))
            finally:
                self._pool.checkin(store, ticket)
        except StoreUnavailable as exc:
            return self.unavailable(str(exc))
        if cfg.release.name != self.name:
            log.info("following release", release=cfg.release.name, previous=self.name)
            self._bind(cfg)
        return None

    # -- decisions ----------------------------------------------------------------

    def handle(self, alerts: list[Alert], ticket: Ticket | None = None) -> Decision:
        ticket = ticket or Ticket()
        if self._follow is not None and any(a.status == "firing" for a in alerts):
            unavailable = self._refresh(ticket)
            if unavailable is not None:
                return unavailable
        self._pinned.binding = self._binding
        try:
            return self._handle(alerts, ticket)
        finally:
            self._pinned.binding = None

    def _handle(self, alerts: list[Alert], ticket: Ticket) -> Decision:
        firing = [a for a in alerts if a.status == "firing"]
        concerned, refused = [], []
        for a in firing:
            why = self.selector.why_not(a.labels)
            if why is None:
                concerned.append(a)
            else:
                refused.append(f"{a.name}: {why}")
        if not concerned:
            reason = ("no alert is firing" if not firing else
                      f"no firing alert matches ({self.selector.describe()}): " + "; ".join(
                          refused[:3]) + (f"; and {len(refused) - 3} more"
                                          if len(refused) > 3 else ""))
            return self._ignored(reason)
        try:
            store = self._pool.checkout(ticket)
            try:
                return self._decide(store, concerned, ticket)
            finally:
                self._pool.checkin(store, ticket)
        except StoreUnavailable as exc:
            if ticket.aborted:
                # The HTTP side already answered 503 and counted it.
                return Decision(503, {"action": "none", "error": str(exc)})
            return self.unavailable(str(exc))

    def _decide(self, store: ReceiverStore, concerned: list[Alert], ticket: Ticket) -> Decision:
        row: ReleaseRow | None = self._pool.call(store, ticket, lambda: store.get(self.name))
        if row is None:
            return self._ignored(f"release {self.name} has not started")
        unprotected = self._unprotected(row)
        if unprotected:
            return self._ignored(unprotected)
        current = _since_release(concerned, row)
        if not current:
            return self._ignored(self._older_than_release(concerned[0], row))
        try:
            recorded = self._request_rollback(store, ticket, row, current)
        except NotRollbackable as exc:
            # The release moved on (cleanup, done) since it was read.
            return self._ignored(exc.message)
        return self._answer(row, current, recorded)

    def _unprotected(self, row: ReleaseRow) -> str | None:
        """Why an alert cannot roll this release back, or None: a running release, and
        a promoted one until its rollback window closes (the window after 100 % is
        when a regression shows; reverse replication keeps blue current until then)."""
        if row.status == Status.RUNNING:
            return None
        if row.status == Status.PROMOTED and row.state == State.WINDOW:
            closes = row.facts.window_closes(self.cfg.rollback.window)
            if closes is None or time.time() < closes:
                return None
            return (f"release {self.name} is promoted and its rollback window closed at "
                    f"{_utc(datetime.fromtimestamp(closes, UTC))}: roll forward instead")
        return (f"release {self.name} is {row.status} (state {row.state}); only a running "
                "release, or a promoted one inside its rollback window, is rolled back")

    def _older_than_release(self, old: Alert, row: ReleaseRow) -> str:
        assert old.started is not None
        assert row.started_at is not None
        return (f"alert {old.name} started at {_utc(old.started)}, before release "
                f"{self.name} started at {_utc(row.started_at)}: it is about the version "
                "before this release")

    def _request_rollback(self, store: ReceiverStore, ticket: Ticket, row: ReleaseRow,
                          concerned: list[Alert]) -> rollback_request.Recorded:
        """Record the request (``rollback_request.record``), each store call bounded."""
        alert = concerned[0]
        reason = alert.describe()
        bounded = _Bounded(store, lambda call: self._pool.call(store, ticket, call))
        recorded = rollback_request.record(bounded, self.name, reason, row=row)
        if recorded.new:
            self._pool.call(store, ticket, lambda: store.log(
                self.name, "warning", f"rollback requested by Alertmanager: {reason}",
                state=row.state, details={
                    "alertname": alert.name, "labels": alert.labels,
                    "fingerprint": alert.fingerprint, "starts_at": alert.starts_at,
                    "matching_alerts": len(concerned)}))
        return recorded

    def _answer(self, row: ReleaseRow, concerned: list[Alert],
                recorded: rollback_request.Recorded) -> Decision:
        """Make sure someone executes the rollback, and say who and why."""
        alert = concerned[0]
        reason = alert.describe()
        started = self._ensure_executor(recorded.reason)
        executor = "receiver" if self.rollback_running() else "orchestrator"
        body = {"release": self.name, "reason": reason, "executor": executor,
                "state": row.state, "matching_alerts": len(concerned)}
        if recorded.new:
            self.count("rollback_requested")
            log.warning("rollback requested", release=self.name, reason=reason,
                        alertname=alert.name, executor=executor)
            return Decision(202, {"action": "rollback_requested", **body})
        if started:
            self.count("rollback_started")
            return Decision(202, {"action": "rollback_started", **body,
                                  "reason": recorded.reason})
        self.count("already_requested")
        return Decision(200, {"action": "none", **body, "reason": (
            "a rollback is already under way" if recorded.rolling_back else
            f"a rollback was already requested: {recorded.reason}")})

    def _ignored(self, reason: str) -> Decision:
        self.count("ignored")
        log.info("alert ignored", release=self.name, reason=reason)
        return Decision(200, {"action": "ignored", "release": self.name, "reason": reason})

    def close(self) -> None:
        self._pool.close()

    # -- rollback by the receiver -------------------------------------------------

    def rollback_running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _ensure_executor(self, reason: str) -> bool:
        """Start a rollback here when nobody runs the release. True if started."""
        with self._worker_lock:
            if self.rollback_running():
                return False
            try:
                free = self._lock_is_free()
            except OrchestrateError as exc:
                log.warning("cannot tell whether an orchestrator runs the release",
                            error=exc.message)
                return False
            if not free:
                return False  # the running orchestrator acts on the request
            log.warning("no orchestrator holds the release: rolling back from here",
                        release=self.name, reason=reason)
            # Not a daemon: a process asked to stop waits for the rollback to finish.
            self._worker = threading.Thread(target=self._rollback,
                                            args=(reason, self._current),
                                            name="orchestrate-rollback", daemon=False)
            self._worker.start()
            return True

    def _rollback(self, reason: str, binding: _Binding) -> None:
        self._pinned.binding = binding  # this thread's release: the one decided on
        try:
            if rollback_request.perform(self._run_rollback, reason) is None:
                log.info("an orchestrator took the release over; it performs the rollback",
                         release=self.name)
        except OrchestrateError as exc:
            self.count("rollback_failed")
            # An error meant for a person: its message says it all, no traceback.
            log.error("rollback from the receiver failed", release=self.name,  # noqa: TRY400
                      error=exc.message, hint=exc.hint)
        except Exception as exc:
            # A thread that dies silently would leave the release half rolled back
            # with nobody saying so.
            self.count("rollback_failed")
            log.exception("rollback from the receiver failed", release=self.name,
                          error=scrub(str(exc)))

    def wait(self, timeout: float | None = None) -> None:
        worker = self._worker
        if worker is not None:
            worker.join(timeout)
