"""Free TCP ports on the loopback interface, handed out once per process.

Why not ``bind(0)``: the kernel then picks from its ephemeral range, the same range
every outgoing connection takes its local port from. A sandbox picks its ports
first and starts its servers seconds later; meanwhile a client connection (to
PostgreSQL, to Prometheus) may take that port, the server then fails to bind, and
whatever holds the port answers instead (seen in CI: a demo app that exited at once
and a Prometheus target that never came up). So ports come from below the ephemeral
range, each is checked free, and none is handed out twice by one process.

``ORCHESTRATE_SANDBOX_PORTS=low-high`` narrows the range; the test suite gives each
parallel worker its own so that two workers never race for one port.
"""

from __future__ import annotations

import os
import random
import socket
import threading

DEFAULT_RANGE = (20000, 32000)  # below Linux's default ephemeral range (32768-60999)
RANGE_ENV = "ORCHESTRATE_SANDBOX_PORTS"

_given: set[int] = set()
_lock = threading.Lock()


def port_range() -> tuple[int, int]:
    """The inclusive range to pick from: the environment's, else the default."""
    text = os.environ.get(RANGE_ENV, "")
    if text:
        low, _, high = text.partition("-")
        try:
            lo, hi = int(low), int(high)
        except ValueError:
            raise ValueError(
                f"{RANGE_ENV}={text!r}: expected two ports, like 20000-24999") from None
        if not 1024 <= lo < hi <= 65535:
            raise ValueError(f"{RANGE_ENV}={text!r}: expected 1024 <= low < high <= 65535")
        return lo, hi
    return DEFAULT_RANGE


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port free a moment ago on 127.0.0.1, never handed out before by this process.

    Another program may still take it before it is bound; the servers then report a
    bind error in their logs.
    """
    low, high = port_range()
    with _lock:
        for _ in range(200):
            port = random.randint(low, high)  # noqa: S311 - spreading, not secrecy
            if port not in _given and _is_free(port):
                _given.add(port)
                return port
    raise RuntimeError(f"no free port found in {low}-{high} after 200 tries")
