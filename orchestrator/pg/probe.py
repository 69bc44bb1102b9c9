"""Is the other side still answering? A probe per side, in a thread of its own.

Prometheus cannot see a paused PostgreSQL: the kernel still completes TCP handshakes,
HAProxy's checks pass, and an application whose requests hang reports no errors
until its own timeouts fire. So the release asks the server itself, every interval:
connect and run ``SELECT 1`` within ``timeout``. The probe runs in its own thread so
that a probe stuck on a frozen server never delays the stage's other duties (a
rollback request must be seen within a second); the stage reads its verdict.
"""

from __future__ import annotations

import threading
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import psycopg

from orchestrator.errors import OrchestrateError
from orchestrator.logging import scrub
from orchestrator.pg.endpoint import Endpoint


@dataclass(frozen=True)
class ProbeResult:
    side: str
    ok: bool
    seconds: float
    detail: str


@dataclass(eq=False)
class SideProbe:
    """Probes one database every ``interval`` until stopped."""

    db: Endpoint
    side: str
    _: KW_ONLY
    interval: float
    timeout: float
    failure_limit: int
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _pending: list[ProbeResult] = field(default_factory=list, init=False)
    _failures: int = field(default=0, init=False)
    _last_error: str = field(default="", init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _conn: psycopg.Connection[Any] | None = field(default=None, init=False)

    def __enter__(self) -> SideProbe:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"probe-{self.side}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # At most one probe's timeout: the thread is a daemon and never blocks
            # longer than the deadline of its statement.
            self._thread.join(timeout=self.timeout + 3.0)
        if self._conn is not None and not self._conn.closed:
            self._conn.close()

    def drain(self) -> list[ProbeResult]:
        """Results since the last call, for the caller to record."""
        with self._lock:
            results, self._pending = self._pending, []
        return results

    def problem(self) -> str | None:
        """Why the stage must fail, once ``failure_limit`` probes in a row failed."""
        with self._lock:
            if self._failures < self.failure_limit:
                return None
            return (f"{self.side} does not answer: {self._failures} probes in a row failed "
                    f"(last: {self._last_error})")

    @property
    def failing(self) -> bool:
        with self._lock:
            return self._failures > 0

    def probe_once(self) -> ProbeResult:
        started = time.monotonic()
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self.db.connect(f"probe-{self.side}", attempts=1,
                                             deadline=self.timeout,
                                             connect_timeout=self.timeout)
            self._conn.execute("SELECT 1")
            result = ProbeResult(self.side, True, time.monotonic() - started, "answered")
        except (OrchestrateError, psycopg.Error) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            text = exc.message if isinstance(exc, OrchestrateError) else str(exc)
            result = ProbeResult(self.side, False, time.monotonic() - started,
                                 scrub(text).strip().splitlines()[0] if text else "failed")
        with self._lock:
            self._pending.append(result)
            if result.ok:
                self._failures = 0
            else:
                self._failures += 1
                self._last_error = result.detail
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            self.probe_once()
            self._stop.wait(self.interval)
