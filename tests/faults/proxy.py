"""A TCP proxy in front of a real server that can cut its live connections.

Modelled on psycopg's ``tests/fix_proxy.py``: tests connect to the proxy instead
of the server, and the proxy is the fault. ``cut()`` resets every live connection
(SO_LINGER 0: the peers see ECONNRESET, as after a router or firewall drop);
``stop()`` refuses new ones too (connection refused, as for a server that is down)
until ``start()``. ``tests/faults/netns.py`` reuses the forwarding with a listener
inside a network namespace, for a path that blackholes instead.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType

from tests.faults import during


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class Forwarder:
    """Accepts on a listening socket (made by ``listen``) and forwards every
    connection to ``target``."""

    def __init__(self, target: tuple[str, int],
                 listen: Callable[[], socket.socket]) -> None:
        self.target = target
        self._listen = listen
        self._listener: socket.socket | None = None
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self.accepted = 0

    def start(self) -> None:
        if self._listener is not None:
            return
        self._listener = self._listen()
        threading.Thread(target=self._accept, args=(self._listener,), name="proxy-accept",
                         daemon=True).start()

    def stop(self) -> None:
        """Refuse new connections and reset the live ones."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.cut()

    def cut(self) -> int:
        """Reset every live connection, both ways; how many there were."""
        with self._lock:
            pairs, self._pairs = list(self._pairs), set()
        for a, b in pairs:
            _reset(a)
            _reset(b)
        return len(pairs)

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._pairs)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(pair,), name="proxy-pump",
                             daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        sel = selectors.DefaultSelector()
        try:
            sel.register(a, selectors.EVENT_READ, b)
            sel.register(b, selectors.EVENT_READ, a)
            while True:
                for key, _ in sel.select(timeout=0.5):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
                with self._lock:
                    if pair not in self._pairs:
                        return  # cut
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            with self._lock:
                self._pairs.discard(pair)
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()


def _loopback_listener(port: int) -> Callable[[], socket.socket]:
    def listen() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock
    return listen


class Proxy(Forwarder):
    """127.0.0.1:``port`` forwarding to ``target``; a context manager."""

    def __init__(self, target: tuple[str, int], port: int) -> None:
        super().__init__(target, _loopback_listener(port))
        self.host, self.port = "127.0.0.1", port

    def __enter__(self) -> Proxy:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def down(self) -> contextlib.AbstractContextManager[None]:
        """Refusing connections for the block; always started again."""
        return during(self.stop, self.start)
