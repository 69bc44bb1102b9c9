"""A real HTTP receiver for notification tests: a threaded http.server on 127.0.0.1
(a port the kernel picks) that records each request's path, headers and exact body
bytes, answers with the statuses it is told, and can be slow on purpose."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tests.local_http import LocalServer, QuietHandler


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self, *, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        # Answers in order, then 200 for ever.
        self.statuses = list(statuses or [])
        self.delay = delay
        self.requests: list[Received] = []
        self._lock = threading.Condition()
        self._release_sleepers = threading.Event()
        receiver = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver._lock.notify_all()
                if receiver.delay:
                    receiver._release_sleepers.wait(receiver.delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except OSError:
                    pass  # the client gave up waiting: that is the point of a slow one

        self._local = LocalServer(Handler)
        self.port = self._local.port

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self.requests) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"got {len(self.requests)} requests, wanted {count}")
                self._lock.wait(left)
            return list(self.requests)

    def events(self) -> list[str]:
        with self._lock:
            return [r.json().get("event", "") for r in self.requests]

    def close(self) -> None:
        self._release_sleepers.set()
        self._local.close()


@contextmanager
def receiver(**kw: Any) -> Iterator[Receiver]:
    made = Receiver(**kw)
    try:
        yield made
    finally:
        made.close()


def closed_port() -> int:
    """A port nothing listens on: bound, then closed (the kernel refuses connects)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
