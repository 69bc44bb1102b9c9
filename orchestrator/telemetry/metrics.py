"""The orchestrator's metrics, kept from the release's events (``orchestrator.events``).

Every metric lives in a private ``CollectorRegistry`` (one per process, see
``orchestrator.telemetry.sink``): the global registry of prometheus_client would also
export the process's Python collectors and anything an imported library registers,
and tests would share it across releases.

Labels are bounded: ``release`` (one per release a process runs), ``state`` and
``status`` (the machine's enums), ``direction`` (forward, reverse), ``reason_kind``
(``REASON_KINDS``). Free text (a rollback's reason) never becomes a label value.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.events import Event, Kind
from orchestrator.record import State, Status

# Seconds: states last from milliseconds (promote) to hours (a large initial copy, the
# rollback window).
DURATION_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
REASON_KINDS = ("alert", "request", "check", "probe", "failure", "deadline")
LAG_CHECK = "replication-lag:"
ROWS_CHECK = "initial-copy:rows"
VALIDATION_CHECK = "validation:differences"

# "canary failed: stage 50%: ..." -> "canary"; what a failure reason starts with.
_FAILED_STATE = re.compile(r"^(\w+) failed: (.*)$", re.DOTALL)
# What a canary abort carries after its own words: the request, alert or probe problem.
_ABORTED = re.compile(r"(?:aborted while waiting for approval|% aborted): (.*)$", re.DOTALL)
_PROMOTED_STATES = {s.value: Status.PROMOTED for s in (State.WINDOW, State.CLEANUP, State.DONE)}
_DEADLINE_WORDS = ("deadline", "sigterm", "sigint", "signal", "maintenance window")


def reason_kind(reason: str | None) -> str:
    """The bounded kind of a free-text rollback reason (``REASON_KINDS``).

    The reasons are the machine's own phrases: ``<state> failed: <why>`` for a state
    that failed (the canary's failures name a check, or a probe's "does not answer"),
    ``alert <name> firing`` for Alertmanager's, anything else a person's request.
    """
    text = (reason or "").strip()
    lowered = text.lower()
    if lowered.startswith("alert "):
        return "alert"
    if any(word in lowered for word in _DEADLINE_WORDS):
        return "deadline"
    failed = _FAILED_STATE.match(text)
    if failed is None:
        return "request"
    state, why = failed.groups()
    if state != State.CANARY.value:
        return "failure"
    aborted = _ABORTED.search(why)
    if aborted is not None:
        inner = aborted.group(1)
        if "does not answer" in inner or "replication stopped" in inner:
            return "probe"
        return reason_kind(inner)
    return "check"


_R = ("release",)
# attribute: (type, name, help, labels)
_METRICS: dict[str, tuple[type[Gauge | Counter | Histogram], str, str, tuple[str, ...]]] = {
    "state": (Gauge, "orchestrate_release_state",
              "1 for the state the release is in, 0 for the others.", ("release", "state")),
    "status": (Gauge, "orchestrate_release_status", "1 for the release's status (running, "
               "promoted, rolled_back, failed), 0 for the others.", ("release", "status")),
    "stage": (Gauge, "orchestrate_release_stage",
              "The canary stage running or last passed, 1-based.", _R),
    "stages": (Gauge, "orchestrate_release_stages", "Canary stages configured.", _R),
    "weight": (Gauge, "orchestrate_release_green_weight_percent",
               "Percent of traffic the release last sent to green.", _R),
    "duration": (Histogram, "orchestrate_state_duration_seconds",
                 "How long each state that ended well took.", ("state",)),
    "rows": (Counter, "orchestrate_rows_copied_total",
             "Rows the initial copy wrote to green.", ()),
    "lag": (Gauge, "orchestrate_replication_lag_bytes", "WAL the subscriber has not "
            "confirmed, per direction, at the last canary measurement.",
            ("release", "direction")),
    "lag_limit": (Gauge, "orchestrate_replication_lag_limit_bytes",
                  "sync.max_lag_bytes: the lag a canary stage tolerates.", _R),
    "differences": (Gauge, "orchestrate_validation_differences",
                    "Unexplained differences the last validation found.", _R),
    "rollbacks": (Counter, "orchestrate_rollbacks_total",
                  "Rollbacks started, by the kind of their reason.", ("reason_kind",)),
    "failures": (Counter, "orchestrate_failures_total",
                 "States that failed and stopped the release for a person.", ("state",)),
    "last_success": (Gauge, "orchestrate_last_success_timestamp_seconds",
                     "When a release last got promoted (unix time).", ()),
    "started": (Gauge, "orchestrate_release_started_timestamp_seconds",
                "When the release started (unix time).", _R),
    "ended": (Gauge, "orchestrate_release_ended_timestamp_seconds",
              "When the release was done, rolled back or failed (unix time).", _R),
    "window_closes": (Gauge, "orchestrate_rollback_window_close_timestamp_seconds",
                      "When the rollback window of a promoted release closes (unix time).",
                      _R),
    "deadline": (Gauge, "orchestrate_release_deadline_timestamp_seconds",
                 "When the release must be over (unix time), where one is set.", _R),
}


class ReleaseMetrics:
    """The metrics and the event -> metric mapping. ``observe`` is cheap and never
    does I/O: it runs on the release's thread."""

    # Made from _METRICS in __init__.
    state: Gauge
    status: Gauge
    stage: Gauge
    stages: Gauge
    weight: Gauge
    duration: Histogram
    rows: Counter
    lag: Gauge
    lag_limit: Gauge
    differences: Gauge
    rollbacks: Counter
    failures: Counter
    last_success: Gauge
    started: Gauge
    ended: Gauge
    window_closes: Gauge
    deadline: Gauge

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lock = threading.Lock()
        self._windows: dict[str, float] = {}
        for attr, (metric, name, doc, labels) in _METRICS.items():
            setattr(self, attr, Histogram(name, doc, labels, registry=r,
                                          buckets=DURATION_BUCKETS)
                    if metric is Histogram else metric(name, doc, labels, registry=r))
        # Every kind present from the start: a rate over a series that appears at 1
        # would miss the first rollback.
        for kind in REASON_KINDS:
            self.rollbacks.labels(kind)

    # ----------------------------------------------------------------- mapping

    def configure(self, release: str, *, stages: int, max_lag_bytes: int,
                  window_s: float) -> None:
        """What the config says about a release: set once, before its events."""
        with self._lock:
            self.stages.labels(release).set(stages)
            self.lag_limit.labels(release).set(max_lag_bytes)
            self._windows[release] = window_s

    def observe(self, event: Event) -> None:
        with self._lock:
            self._observe(event)

    def _observe(self, e: Event) -> None:
        name = e.release
        if e.state is not None and e.kind != Kind.MEASUREMENT:
            self._set_state(name, e.state)
        if e.stage is not None and e.kind in {Kind.MEASUREMENT, Kind.STAGE_PASSED}:
            self.stage.labels(name).set(e.stage)
        if e.stages is not None:
            self.stages.labels(name).set(e.stages)
        if e.weight is not None:
            self.weight.labels(name).set(e.weight)
        handler = self._handlers.get(e.kind)
        if handler is not None:
            handler(e)
        deadline = e.details.get("deadline_at")
        if isinstance(deadline, int | float):
            self.deadline.labels(name).set(float(deadline))

    @property
    def _handlers(self) -> dict[Kind, Callable[[Event], None]]:
        return {Kind.STARTED: self._started, Kind.STATE: self._state,
                Kind.STATE_DONE: self._state_done, Kind.MEASUREMENT: self._measurement,
                Kind.ROLLING_BACK: self._rolling_back, Kind.ROLLED_BACK: self._rolled_back,
                Kind.FAILED: self._failed, Kind.PROMOTED: self._promoted,
                Kind.WINDOW_CLOSED: self._window_closed, Kind.DONE: self._done}

    def _started(self, e: Event) -> None:
        self._set_status(e.release, Status.RUNNING)
        self.started.labels(e.release).set(e.at)

    def _state(self, e: Event) -> None:
        # Resumed or going on: what the machine records for this state (a release in
        # its window or cleanup is promoted, not running).
        self._set_status(e.release, _PROMOTED_STATES.get(e.state or "", Status.RUNNING))

    def _state_done(self, e: Event) -> None:
        duration = e.details.get("duration_s")
        if isinstance(duration, int | float) and e.state is not None:
            self.duration.labels(e.state).observe(float(duration))

    def _rolling_back(self, e: Event) -> None:
        self._set_status(e.release, Status.RUNNING)
        self.rollbacks.labels(reason_kind(e.reason)).inc()

    def _rolled_back(self, e: Event) -> None:
        self._set_status(e.release, Status.ROLLED_BACK)
        self.weight.labels(e.release).set(0)
        self.ended.labels(e.release).set(e.at)
        self._forget(self.window_closes, e.release)

    def _failed(self, e: Event) -> None:
        self._set_status(e.release, Status.FAILED)
        self.failures.labels(e.state or "unknown").inc()
        self.ended.labels(e.release).set(e.at)

    def _promoted(self, e: Event) -> None:
        self._set_status(e.release, Status.PROMOTED)
        self.weight.labels(e.release).set(100)
        self.last_success.set(e.at)
        window = self._windows.get(e.release)
        if window is not None:
            self.window_closes.labels(e.release).set(e.at + window)

    def _window_closed(self, e: Event) -> None:
        self._forget(self.window_closes, e.release)

    def _done(self, e: Event) -> None:
        self._set_status(e.release, Status.PROMOTED)
        self.ended.labels(e.release).set(e.at)

    def _measurement(self, e: Event) -> None:
        check = str(e.details.get("check", ""))
        value = e.details.get("value")
        if not isinstance(value, int | float):
            return
        if check.startswith(LAG_CHECK):
            self.lag.labels(e.release, check.removeprefix(LAG_CHECK)).set(value)
        elif check == ROWS_CHECK:
            self.rows.inc(max(0.0, float(value)))
        elif check == VALIDATION_CHECK:
            self.differences.labels(e.release).set(value)

    def _set_state(self, release: str, state: str) -> None:
        for known in State:
            self.state.labels(release, known.value).set(1 if known.value == state else 0)

    def _set_status(self, release: str, status: Status) -> None:
        for known in Status:
            self.status.labels(release, known.value).set(1 if known == status else 0)

    @staticmethod
    def _forget(gauge: Gauge, *labels: str) -> None:
        with contextlib.suppress(KeyError):  # never set
            gauge.remove(*labels)
