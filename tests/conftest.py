"""Shared fixtures for the tests that run real servers (PostgreSQL, HAProxy, Prometheus)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.sandbox.ports import DEFAULT_RANGE, RANGE_ENV
from tests.fakes.kube_api import FakeKubeApi
from tests.local_http import LocalServer, QuietHandler
from tests.workers import worker_count, worker_index

# fix_pg: the `pg` version marker; pytester: its tests run it in a pytest of their own.
pytest_plugins = ["tests.fix_pg", "pytester"]


def _worker_port_range() -> None:
    """Under pytest-xdist, give each worker its own slice of the sandbox port range,
    so that two workers starting servers at once never pick the same port."""
    index = worker_index()
    if index is None or RANGE_ENV in os.environ:
        return
    count = max(worker_count(), index + 1)
    span = (DEFAULT_RANGE[1] - DEFAULT_RANGE[0]) // count
    low = DEFAULT_RANGE[0] + index * span
    os.environ[RANGE_ENV] = f"{low}-{low + span - 1}"


_worker_port_range()


@contextlib.contextmanager
def short_tmpdir(prefix: str = "orch-t-") -> Iterator[Path]:
    """A fresh directory directly under /tmp.

    Not pytest's tmp_path: its deep paths overflow the 107-byte limit of unix socket
    paths (PostgreSQL's and HAProxy's sockets live in the base directory).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


@pytest.fixture(scope="module")
def module_sandbox_dir() -> Iterator[Path]:
    with short_tmpdir() as path:
        yield path


class ColourServer:
    """A tiny HTTP server standing in for one app instance.

    GET /healthz answers 200; GET /metrics answers ``metrics_text``; anything else
    answers ``status`` with the colour as body, so a client can tell who served it.
    """

    def __init__(self, colour: str, status: int = 200, metrics_text: str = "") -> None:
        self.colour = colour
        self.status = status
        self.metrics_text = metrics_text
        self.hits = 0
        self._lock = threading.Lock()
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    code, body, ctype = 200, b"ok", "text/plain"
                elif self.path == "/metrics":
                    code, body = 200, server.metrics_text.encode()
                    ctype = "text/plain; version=0.0.4"
                else:
                    with server._lock:
                        server.hits += 1
                    code, body, ctype = server.status, server.colour.encode(), "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._local = LocalServer(Handler)
        self.port = self._local.port
        self.address = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._local.close()


@pytest.fixture(scope="module")
def colour_server() -> Iterator[Callable[..., ColourServer]]:
    """Factory: ``colour_server('blue')``; the servers are closed after the module."""
    servers: list[ColourServer] = []

    def make(colour: str, status: int = 200, metrics_text: str = "") -> ColourServer:
        server = ColourServer(colour, status, metrics_text)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# The fake Kubernetes API and a kubeconfig pointing at it, in the namespace the
# router tests use (tests/test_kube_*.py).
KUBE_NAMESPACE = "shop"


@pytest.fixture
def kube() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        yield api


@pytest.fixture
def kubeconfig(kube: FakeKubeApi, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig", namespace=KUBE_NAMESPACE)
