"""The forward slot, created with an exported snapshot that every copy pipe imports."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from psycopg import pq, sql

from orchestrator.errors import ExternalError
from orchestrator.logging import scrub
from orchestrator.pg.conn import server_major
from orchestrator.pg.copy.state import app_name
from orchestrator.pg.endpoint import Endpoint


@dataclass(frozen=True)
class ExportedSlot:
    name: str
    consistent_point: str
    snapshot: str


@contextlib.contextmanager
def exported_slot(db: Endpoint, slot: str, *, timeout: float) -> Iterator[ExportedSlot]:
    """Create the logical slot over a replication connection, exporting its snapshot.

    The snapshot is importable while this context is open (the connection is idle).
    The slot itself is permanent: it outlives the context, for the subscription.
    """
    # No lock_timeout: creating the slot waits for blue's open transactions (a lock
    # wait), which ``timeout`` bounds below with a hint; the application name lets a
    # rerun find this session.
    conn = db.connect("", replication="database", application_name=app_name(slot),
                      lock_timeout_ms=0, statement_timeout_ms=0, deadline=None)
    try:
        major = server_major(conn)
        ident = sql.Identifier(slot).as_string(conn)
        # The option list is PostgreSQL 15+ syntax; the bare keyword is older (and
        # still accepted by 15-18, but may not be forever).
        command = (f"CREATE_REPLICATION_SLOT {ident} LOGICAL pgoutput (SNAPSHOT 'export')"
                   if major >= 15 else
                   f"CREATE_REPLICATION_SLOT {ident} LOGICAL pgoutput EXPORT_SNAPSHOT")
        # The command waits for transactions open on blue to finish; a statement
        # timeout does not apply to replication commands, so a timer cancels it.
        timer = threading.Timer(timeout, conn.cancel_safe)
        timer.start()
        try:
            result = conn.pgconn.exec_(command.encode())
        finally:
            timer.cancel()
        if result.status != pq.ExecStatus.TUPLES_OK:
            message = (result.error_message or b"").decode(errors="replace").strip()
            hint = None
            if "canceling" in message:
                hint = (f"a transaction on blue stayed open for more than {timeout:.0f}s; "
                        "end it or raise sync.initial_copy.slot_timeout")
            raise ExternalError(f"creating replication slot {slot} on blue failed: "
                                f"{scrub(message)}", hint=hint)
        values = [result.get_value(0, i) for i in range(3)]
        yield ExportedSlot(slot, (values[1] or b"").decode(), (values[2] or b"").decode())
    finally:
        conn.close()

