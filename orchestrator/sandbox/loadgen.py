"""An open-loop HTTP load generator for the demo application.

Requests are sent on a fixed schedule (``rate`` per second in total, slot k at
start + k / rate) that every worker draws from, whatever the server's latency. A
closed-loop generator (send, wait for the answer, send again) quietly lowers its rate
when the server slows down, which hides exactly what a canary is supposed to show.
Here a slow answer only delays the worker that waits for it; the next slot goes to
another worker. When all workers are busy, slots are sent late rather than skipped,
and ``max_schedule_lag_s`` in the report says how late: a lag near zero means the
target rate was offered.

Writes are POST /orders, reads GET /items/<id>. Every order id acknowledged with a 201
is kept, so a test can check afterwards that no acknowledged write was lost.

    python -m orchestrator.sandbox.loadgen --url http://127.0.0.1:8080 --rate 50 \\
        --duration 60 --acked-file acked.txt
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# Failures where a reused keep-alive connection turned out to be closed by the peer
# before it read our request; worth one retry on a fresh connection.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
)


@dataclass
class LoadReport:
    """What a run did. Latency is the server's response time (send to last byte)."""

    requests: int
    ok: int
    errors: dict[str, int]  # by HTTP status ("503") or exception class ("TimeoutError")
    acked_order_ids: list[int]
    acked_by_colour: dict[str, int]
    # Longest time between two consecutive acknowledged writes (completion times).
    # With fewer than two acknowledged writes it is the whole duration: nothing shows
    # that writes went through.
    max_write_gap_s: float
    p99_latency_s: float
    duration_s: float
    # Requests repeated once on a fresh connection after a reused keep-alive
    # connection was found closed.
    retries: int = 0
    # How far behind its scheduled time the latest request went out: near zero when
    # the target rate was offered, large when every worker was busy waiting.
    max_schedule_lag_s: float = 0.0

    @property
    def rate(self) -> float:
        """Requests completed per second over the run."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class _Tally:
    """Results shared by the workers; guarded by LoadGenerator._lock."""

    requests: int = 0
    ok: int = 0
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    acked_ids: list[int] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    acked_by_colour: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    max_lag: float = 0.0


class _Connection:
    """One worker's keep-alive connection, reopened after any failure."""

    def __init__(self, scheme: str, host: str, port: int | None, timeout: float) -> None:
        self._scheme = scheme
        self._host = host
        self._port = port
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None
        self._used = 0  # requests completed on the current connection

    def request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, int]:
        """(status, body, retries). Raises OSError/HTTPException on failure."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(2):
            reused = self._conn is not None and self._used > 0
            conn = self._conn or self._open()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except _STALE_CONNECTION_ERRORS:
                self.close()
                if reused and attempt == 0:
                    continue
                raise
            except BaseException:
                self.close()
                raise
            self._used += 1
            if response.will_close:
                self.close()
            return response.status, data, attempt
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _open(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        # The timeout bounds the connect and every read of the response.
        self._conn = cls(self._host, self._port, timeout=self._timeout)
        self._used = 0
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LoadGenerator:
    """Background load against the demo app: ``start()``, then ``report()`` or ``stop()``."""

    # The parameters stay positional: that is the signature others were promised.
    def __init__(
        self,
        base_url: str,
        rate: float = 50.0,
        write_ratio: float = 0.3,
        workers: int = 8,
        timeout: float = 2.0,
        max_item_id: int = 2000,
        max_customer_id: int = 5000,
        *,
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        if not rate > 0 or not math.isfinite(rate):
            raise ValueError("rate must be a positive number of requests per second")
        if not 0 <= write_ratio <= 1:
            raise ValueError("write_ratio must be between 0 and 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if max_item_id < 1 or max_customer_id < 1:
            raise ValueError("max_item_id and max_customer_id must be at least 1")
        self.base_url = base_url
        self.rate = rate
        self.write_ratio = write_ratio
        self.workers = workers
        self.timeout = timeout
        self.max_item_id = max_item_id
        self.max_customer_id = max_customer_id
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        # Load shape only, not security: a seeded PRNG makes runs repeatable.
        self._seed = seed if seed is not None else random.randrange(2**32)  # noqa: S311
        self._lock = threading.Lock()
        self._tally = _Tally()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._next_slot = 0
        self._started_at: float | None = None
        self._stopped_at: float | None = None

    # -- control --------------------------------------------------------------------

    def start(self) -> None:
        if self._started_at is not None:
            raise RuntimeError("a LoadGenerator runs once; create a new one")
        self._started_at = time.monotonic()
        for index in range(self.workers):
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"loadgen-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> LoadReport:
        """Stop sending, wait for requests in flight (each bounded by the timeout)."""
        if self._started_at is None:
            raise RuntimeError("the load generator was not started")
        self._stop.set()
        # A request in flight may take the connect timeout plus the read timeout.
        deadline = time.monotonic() + 2 * self.timeout + 1.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._stopped_at is None:
            self._stopped_at = time.monotonic()
        return self.report()

    def report(self) -> LoadReport:
        """A snapshot; safe to call while the load runs."""
        now = time.monotonic()
        started = self._started_at if self._started_at is not None else now
        ended = self._stopped_at if self._stopped_at is not None else now
        duration = max(0.0, ended - started)
        with self._lock:
            t = self._tally
            acked_at = sorted(t.acked_at)
            latencies = sorted(t.latencies)
            snapshot = LoadReport(
                requests=t.requests,
                ok=t.ok,
                errors=dict(t.errors),
                acked_order_ids=list(t.acked_ids),
                acked_by_colour=dict(t.acked_by_colour),
                max_write_gap_s=0.0,
                p99_latency_s=0.0,
                duration_s=duration,
                retries=t.retries,
                max_schedule_lag_s=t.max_lag,
            )
        if len(acked_at) >= 2:
            snapshot.max_write_gap_s = max(b - a for a, b in itertools.pairwise(acked_at))
        else:
            snapshot.max_write_gap_s = duration
        if latencies:
            # Nearest-rank percentile: an observed value, never an interpolation.
            snapshot.p99_latency_s = latencies[math.ceil(0.99 * len(latencies)) - 1]
        return snapshot

    # -- workers --------------------------------------------------------------------

    def _take_slot(self) -> float:
        """The scheduled send time of the next request, shared by all workers."""
        assert self._started_at is not None
        with self._lock:
            slot = self._next_slot
            self._next_slot += 1
        return self._started_at + slot / self.rate

    def _work(self, index: int) -> None:
        rng = random.Random(self._seed + index)  # noqa: S311 -- load shape, not security
        conn = _Connection(self._scheme, self._host or "", self._port, self.timeout)
        try:
            while not self._stop.is_set():
                scheduled = self._take_slot()
                delay = scheduled - time.monotonic()
                if self._stop.wait(delay) if delay > 0 else self._stop.is_set():
                    break
                if rng.random() < self.write_ratio:
                    body = json.dumps(
                        {
                            "customer_id": rng.randint(1, self.max_customer_id),
                            "item_id": rng.randint(1, self.max_item_id),
                            "quantity": rng.randint(1, 5),
                        }
                    ).encode()
                    self._one(conn, "POST", f"{self._prefix}/orders", body, scheduled)
                else:
                    item = rng.randint(1, self.max_item_id)
                    self._one(conn, "GET", f"{self._prefix}/items/{item}", None, scheduled)
        finally:
            conn.close()

    def _one(
        self, conn: _Connection, method: str, path: str, body: bytes | None, scheduled: float
    ) -> None:
        sent = time.monotonic()
        status: int | None = None
        data = b""
        retries = 0
        error: str | None = None
        try:
            status, data, retries = conn.request(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            # socket.timeout is TimeoutError; refused, reset, unreachable keep their names.
            error = type(exc).__name__
        done = time.monotonic()

        order_id: int | None = None
        colour: str | None = None
        if status == 201 and method == "POST":
            try:
                answer = json.loads(data)
                order_id = int(answer["id"])
                colour = str(answer.get("colour", "unknown"))
            except (ValueError, KeyError, TypeError):
                error = "BadResponse"
        elif status is not None and not 200 <= status < 300:
            error = str(status)

        with self._lock:
            t = self._tally
            t.requests += 1
            t.retries += retries
            t.latencies.append(done - sent)
            t.max_lag = max(t.max_lag, sent - scheduled)
            if error is not None:
                t.errors[error] = t.errors.get(error, 0) + 1
                return
            t.ok += 1
            if order_id is not None and colour is not None:
                t.acked_ids.append(order_id)
                t.acked_at.append(done)
                t.acked_by_colour[colour] = t.acked_by_colour.get(colour, 0) + 1


# -- command line -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.sandbox.loadgen",
        description="Open-loop load against the demo app; prints the report as JSON.",
    )
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds")
    parser.add_argument("--write-ratio", type=float, default=0.3)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    parser.add_argument("--max-item-id", type=int, default=2000)
    parser.add_argument("--max-customer-id", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--acked-file", type=Path, help="write acknowledged order ids here")
    args = parser.parse_args(argv)
    if args.duration < 0:
        parser.error("--duration cannot be negative")
    try:
        generator = LoadGenerator(
            args.url,
            rate=args.rate,
            write_ratio=args.write_ratio,
            workers=args.workers,
            timeout=args.timeout,
            max_item_id=args.max_item_id,
            max_customer_id=args.max_customer_id,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))

    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    # SIGTERM/SIGINT end the run early; the report still covers what was sent.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    generator.start()
    deadline = time.monotonic() + args.duration
    while not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        stop.wait(min(remaining, 0.5))
    result = generator.stop()

    if args.acked_file is not None:
        args.acked_file.write_text("".join(f"{i}\n" for i in result.acked_order_ids))
    print(result.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
