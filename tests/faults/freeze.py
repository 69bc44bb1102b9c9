"""Freeze a real PostgreSQL cluster the way a paused VM does: every process stopped
(SIGSTOP), sockets kept open, so the kernel still completes TCP handshakes and
acknowledges data while nothing answers. Always resumed (SIGCONT), even when the
test fails, so that the next test and the fixture's shutdown find a live server."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.sandbox.pgcluster import PgCluster


def child_pids(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command may hold spaces and parentheses: the ppid follows the last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def postmaster_pid(cluster: PgCluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])


class Freeze:
    """Stop and resume every process of one cluster."""

    def __init__(self, cluster: PgCluster) -> None:
        self.cluster = cluster
        self.pids: list[int] = []

    def stop(self) -> None:
        if self.pids:
            return
        postmaster = postmaster_pid(self.cluster)
        # The postmaster first: stopped, it cannot fork a backend we would miss.
        os.kill(postmaster, signal.SIGSTOP)
        self.pids = [postmaster]
        for child in child_pids(postmaster):
            try:
                os.kill(child, signal.SIGSTOP)
                self.pids.append(child)
            except ProcessLookupError:
                pass

    def resume(self) -> None:
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.pids = []

    @property
    def frozen(self) -> bool:
        return bool(self.pids)


@contextmanager
def frozen(cluster: PgCluster) -> Iterator[Freeze]:
    freeze = Freeze(cluster)
    freeze.stop()
    try:
        yield freeze
    finally:
        freeze.resume()
