"""What every part of a release works with: the config, the two endpoints, the
router, the metrics source, the store, and a journal bound to the release.

The machine (``orchestrator.machine``), the data path (``orchestrator.datapath``)
and the canary stages (``orchestrator.stages``) each take one ``ReleaseContext``
instead of reaching into one another: this module imports none of them, so no
import cycle can appear between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.canary.metrics import MetricsSource
from orchestrator.config import ReleaseConfig
from orchestrator.errors import OrchestrateError
from orchestrator.events import Event, Events, Kind
from orchestrator.interrupts import Stop
from orchestrator.logging import get_logger
from orchestrator.pg import catalog, fingerprint
from orchestrator.pg.endpoint import Endpoint
from orchestrator.record import Facts
from orchestrator.routers.base import TrafficRouter, WeightDriftError, Weights
from orchestrator.store import StateStore
from orchestrator.ui import Display, NoDisplay

log = get_logger("orchestrate")


class Journal:
    """What the release writes about itself, bound to it: notes (the release log and
    the process log), facts, canary measurements, and the events its listeners
    (notifications, metrics) hear. ``facts`` is the release's facts as last stored."""

    def __init__(self, store: StateStore, name: str, events: Events | None = None) -> None:
        self.store = store
        self.name = name
        self.facts = Facts()
        self.events = events or Events()

    def emit(self, kind: Kind, **fields: Any) -> None:
        """Tell the listeners; never raises, never waits (``orchestrator.events``)."""
        self.events.emit(Event(kind, self.name, **fields))

    def fact(self, **facts: Any) -> None:
        """Record facts (checked by ``Facts``: a misspelt one is an error) and take
        the release's facts as stored after it."""
        self.facts = self.store.merge_facts(self.name, **facts)

    def note(self, message: str, level: str = "info", **details: Any) -> None:
        self.store.log(self.name, level, message, details=details or None)
        getattr(log, level if level != "critical" else "error")(message, release=self.name,
                                                                 **details)

    def measure(self, *, stage: int, weight: int, check: str, value: float | None,
                baseline: float | None, verdict: str, detail: str | None = None) -> None:
        self.store.record_measurement(self.name, stage=stage, weight=weight, check=check,
                                      value=value, baseline=baseline, verdict=verdict,
                                      detail=detail)
        self.emit(Kind.MEASUREMENT, stage=stage + 1, weight=weight, details={
            "check": check, "value": value, "baseline": baseline, "verdict": verdict})

    def rollback_requested(self) -> str | None:
        row = self.store.get(self.name)
        return row.rollback_requested if row else None


@dataclass
class ReleaseContext:
    cfg: ReleaseConfig
    store: StateStore
    router: TrafficRouter
    metrics: MetricsSource
    sleep: Callable[[float], None] = time.sleep
    display: Display = field(default_factory=NoDisplay)
    events: Events = field(default_factory=Events)
    stop: Stop = field(default_factory=Stop)  # signals, deadline, window end
    journal: Journal = field(init=False)
    blue_endpoint: Endpoint = field(init=False)
    green_endpoint: Endpoint = field(init=False)

    def __post_init__(self) -> None:
        self.journal = Journal(self.store, self.name, self.events)
        self.stop.facts_of = lambda: self.journal.facts
        # Built once: every session, client tool and peer conninfo of the release
        # comes from these two.
        self.blue_endpoint = Endpoint(self.cfg.blue, "blue")
        self.green_endpoint = Endpoint(self.cfg.green, "green")

    @property
    def name(self) -> str:
        return self.cfg.release.name

    @property
    def schema(self) -> str:
        """The control schema, left out of everything compared or replicated."""
        return self.cfg.state.schema_name

    @property
    def excluded(self) -> tuple[str, ...]:
        """``sync.exclude_tables``: neither replicated nor compared."""
        return tuple(self.cfg.sync.exclude_tables)

    @property
    def facts(self) -> Facts:
        return self.journal.facts

    def note(self, message: str, level: str = "info", **details: Any) -> None:
        self.journal.note(message, level, **details)

    def fact(self, **facts: Any) -> None:
        self.journal.fact(**facts)

    def validated(self, report: dict[str, Any]) -> None:
        """The validation's report, recorded; its count of unexplained differences told
        to the listeners (the metrics' ``orchestrate_validation_differences``)."""
        self.fact(validation=report)
        problems = len(report.get("problems", []))
        self.journal.emit(Kind.MEASUREMENT, state="validate", details={
            "check": "validation:differences", "value": problems, "baseline": 0,
            "verdict": "pass" if problems == 0 else "fail"})

    # ------------------------------------------------------------- connections

    def blue(self, **kw: Any) -> psycopg.Connection[Any]:
        return self.blue_endpoint.connect(**kw)

    def green(self, **kw: Any) -> psycopg.Connection[Any]:
        return self.green_endpoint.connect(**kw)

    def green_if_exists(self) -> psycopg.Connection[Any] | None:
        """Green's database, or None when it was never created or cannot be reached."""
        try:
            # Short: a paused green must not hold up sending users back to blue.
            timeout = self.cfg.canary.probe.timeout
            return self.green(attempts=2, connect_timeout=timeout, deadline=timeout * 2)
        except OrchestrateError as exc:
            self.note(f"green not reachable: {exc.message}", "warning")
            return None

    def tables(self, conn: psycopg.Connection[Any]) -> list[catalog.Table]:
        return catalog.user_tables(conn, exclude_schemas=(self.schema,),
                                   exclude_tables=self.excluded)

    # ------------------------------------------------------------ blue's schema

    def record_blue_schema(self, blue: psycopg.Connection[Any]) -> None:
        """Once, before green is built from blue's schema (kept on resume)."""
        if self.facts.blue_fingerprint is None:
            self.fact(blue_fingerprint=fingerprint.schema_fingerprint(
                blue, exclude_schemas=(self.schema,),
                exclude_tables=self.excluded))

    def verify_blue_schema(self, blue: psycopg.Connection[Any], when: str) -> None:
        if self.facts.blue_fingerprint is not None:
            fingerprint.verify(blue, self.facts.blue_fingerprint, when=when,
                               exclude_schemas=(self.schema,),
                               exclude_tables=self.excluded)

    # ------------------------------------------------------------------ traffic
    # Here, not with the stages: the switchover and the rollback move traffic too.

    def set_weights(self, target: Weights) -> None:
        expected = self.facts.weights
        self.fact(weights_target=target)
        try:
            actual = self.router.set_weights(target, expected=expected)
        except WeightDriftError as drift:
            # A crash between the router change and recording it leaves the router at
            # the target we were moving to: that is ours, not a drift.
            if drift.actual != target:
                raise
            actual = drift.actual
        self.fact(weights=actual)
        log.info("weights", release=self.name, weights=str(actual))

    def route_to_blue(self) -> None:
        if self.facts.weights is None and self.facts.weights_target is None:
            return
        target = Weights.green_at(0)
        actual = self.router.set_weights(target)
        self.fact(weights=actual)
        self.note("traffic back on blue", weights=str(actual))
