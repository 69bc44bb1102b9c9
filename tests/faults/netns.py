"""An address that stops answering: a server reached through a network namespace
whose link can be taken down, so that packets vanish (no RST, no FIN, no ICMP).

A SIGSTOPped server (tests/faults/freeze.py) still has a kernel that acknowledges
every packet; a blackholed path does not, and only TCP retransmission timeouts,
keepalives and ``tcp_user_timeout`` can notice it. Here::

    client (host) --> 10.213.N.2:port  [veth, namespace orch-N]  forwarder --> 127.0.0.1:server

The forwarder runs in this process: its listening socket is created inside the
namespace (a thread switches its own network namespace with setns(2), creates the
socket, and switches back), the upstream connections in the host's. ``blackhole()``
takes the namespace's end of the veth down; ``restore()`` brings it back, and TCP
resumes the very same connections. Needs root (CAP_NET_ADMIN) and iproute2.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType

from tests.faults import during
from tests.faults.proxy import Forwarder
from tests.workers import worker_index

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count(1)


def _third_octet() -> int:
    """Distinct per pytest-xdist worker (two workers must never share a subnet);
    outside xdist, from the process id."""
    index = worker_index()
    return os.getpid() % 100 if index is None else 100 + index % 150


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _socket_in(namespace: str, address: tuple[str, int]) -> socket.socket:
    """A listening socket bound inside ``namespace`` (made on a helper thread, whose
    namespace is its own: the caller's never changes)."""
    made: list[socket.socket | BaseException] = []

    def run() -> None:
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                _setns(there)
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(address)
                    sock.listen(64)
                    made.append(sock)
                finally:
                    _setns(here)
            finally:
                os.close(there)
        except BaseException as exc:  # handed to the caller
            made.append(exc)
        finally:
            os.close(here)

    thread = threading.Thread(target=run, name="netns-socket")
    thread.start()
    thread.join(10)
    result = made[0] if made else TimeoutError("creating the socket in the namespace")
    if isinstance(result, BaseException):
        raise result
    return result


class IsolatedAddress:
    """``host:port`` (inside a namespace of its own) forwarding to ``target``."""

    def __init__(self, target: tuple[str, int], port: int = 5432) -> None:
        n = next(_counter) % 250 + 1
        tag = f"{os.getpid() % 10000}x{n}"
        self.namespace = f"orch-{tag}-{secrets.token_hex(2)}"
        self.host_link, self.ns_link = f"ob{tag}"[:15], f"on{tag}"[:15]
        # A /30 per fixture: 10.213.<pid-derived>.<4n>
        subnet = (_third_octet(), (n % 60) * 4)
        self.host_ip = f"10.213.{subnet[0]}.{subnet[1] + 1}"
        self.host = f"10.213.{subnet[0]}.{subnet[1] + 2}"
        self.port = port
        self.forwarder = Forwarder(target, lambda: _socket_in(self.namespace,
                                                             (self.host, self.port)))

    # -- lifecycle ---------------------------------------------------------------
    def __enter__(self) -> IsolatedAddress:
        try:
            self._up()
        except BaseException:
            self._down()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._down()

    def _up(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link)
        _ip("link", "set", self.ns_link, "netns", self.namespace)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.host}/30", "dev", self.ns_link)
        _ip("-n", self.namespace, "link", "set", self.ns_link, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")
        self.forwarder.start()

    def _down(self) -> None:
        self.forwarder.stop()
        for args in (("link", "del", self.host_link), ("netns", "del", self.namespace)):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip(*args)

    # -- faults ------------------------------------------------------------------
    def blackhole(self) -> None:
        """Packets to and from the address vanish from now on."""
        _ip("-n", self.namespace, "link", "set", self.ns_link, "down")

    def restore(self) -> None:
        """The path works again (same addresses, same connections), once the veth
        reports carrier: a connection opened before that is reset."""
        _ip("-n", self.namespace, "link", "set", self.ns_link, "up")
        deadline = time.monotonic() + 10
        carrier = Path(f"/sys/class/net/{self.host_link}/operstate")
        while carrier.read_text().strip() != "up" and time.monotonic() < deadline:
            time.sleep(0.05)

    def blackholed(self) -> contextlib.AbstractContextManager[None]:
        """Blackholed for the block; always restored."""
        return during(self.blackhole, self.restore)
