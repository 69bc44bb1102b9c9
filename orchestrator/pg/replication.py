"""Logical replication between blue and green: publications, subscriptions, catch-up.

Forward (blue -> green) carries the initial copy and then streams; reverse
(green -> blue) carries green's writes back while green takes traffic, so that a
rollback loses nothing. Both use ``origin = none`` when both servers are 16+, which is
what stops a change from looping back to where it came from.

"Caught up" is measured exactly with a heartbeat row: the orchestrator bumps a
counter in a replicated table on the publisher and waits until the subscriber shows
that value. Apply preserves commit order, so every transaction committed on the
publisher before the bump is then applied on the subscriber. Slot positions are
only reported every few seconds by the subscriber and cannot give that guarantee.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.errors import ExternalError, ReleaseFailed
from orchestrator.pg import control_schema
from orchestrator.pg.catalog import Table
from orchestrator.pg.conn import scalar
from orchestrator.pg.names import QualifiedName
from orchestrator.pg.reverse_columns import full_identity_tables, reverse_column_lists

# The reverse publication's column lists live in ``reverse_columns``; callers keep
# using them from here.
__all__ = [
    "HEARTBEAT_TABLE", "REPEATED_ERRORS", "SLOT_PREFIX", "Names", "SlotInfo",
    "SubscriptionOptions", "applied_beat", "beat", "check_healthy", "drop_publication",
    "drop_slot", "drop_subscription", "ensure_enabled", "ensure_heartbeat",
    "ensure_publication", "ensure_subscription", "error_count", "forward",
    "full_identity_tables", "lag_bytes", "orchestrate_slots", "publication_sql", "reverse",
    "reverse_column_lists", "subscription_exists", "subscription_options", "subscription_sql",
    "subscription_state", "wait_applied", "wait_initial_copy",
]

HEARTBEAT_TABLE = control_schema.HEARTBEAT_TABLE
SLOT_PREFIX = "orch_"


# Release names that map to slot names as they always have (dashes become
# underscores, which slot names allow and dashes not): that is invertible only
# without underscores of their own, and releases in flight keep their objects.
_PLAIN_RELEASE = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")


@dataclass(frozen=True)
class Names:
    """Object names for one release and direction (publication = subscription = slot).

    Valid slot names ([a-z0-9_], at most 63 bytes) and distinct for distinct
    releases: a name that cannot map plainly (an underscore, upper case, longer than
    40) gets a readable prefix and a hash of the whole name, after a double
    underscore that no plain mapping can produce (release names start with [a-z0-9]).
    """

    release: str
    direction: str  # "fwd" or "rev"

    @property
    def base(self) -> str:
        if _PLAIN_RELEASE.fullmatch(self.release):
            return f"{SLOT_PREFIX}{self.release.replace('-', '_')}_{self.direction}"
        slug = re.sub(r"[^a-z0-9_]", "_", self.release.lower())[:28]
        digest = hashlib.sha256(self.release.encode()).hexdigest()[:20]
        return f"{SLOT_PREFIX}_{slug}_{digest}_{self.direction}"

    publication = property(lambda self: self.base)
    subscription = property(lambda self: self.base)
    slot = property(lambda self: self.base)


def forward(release: str) -> Names:
    return Names(release, "fwd")


def reverse(release: str) -> Names:
    return Names(release, "rev")


# ---------------------------------------------------------------- heartbeat


def ensure_heartbeat(conn: psycopg.Connection[Any], schema: str) -> str:
    """Create the heartbeat table (on both sides: it is replicated like user data)."""
    control_schema.ensure_peer(conn, schema)
    return QualifiedName(schema, HEARTBEAT_TABLE).display


def beat(conn: psycopg.Connection[Any], schema: str, direction: str) -> int:
    """Commit a heartbeat on the publisher; returns the value to wait for."""
    value = scalar(conn, sql.SQL(
        "INSERT INTO {s}.{t} AS h (direction, beat) VALUES (%s, 1) "
        "ON CONFLICT (direction) DO UPDATE SET beat = h.beat + 1, at = clock_timestamp() "
        "RETURNING beat"
    ).format(s=sql.Identifier(schema), t=sql.Identifier(HEARTBEAT_TABLE)), direction)
    return int(value)


def applied_beat(conn: psycopg.Connection[Any], schema: str, direction: str) -> int:
    value = scalar(conn, sql.SQL("SELECT beat FROM {s}.{t} WHERE direction = %s").format(
        s=sql.Identifier(schema), t=sql.Identifier(HEARTBEAT_TABLE)), direction)
    return int(value) if value is not None else 0


def wait_applied(
    pub: psycopg.Connection[Any],
    sub: psycopg.Connection[Any],
    *,
    schema: str,
    direction: str,
    subscription: str,
    timeout: float,
    poll: float = 0.02,
) -> float:
    """Beat on the publisher and wait until the subscriber applied it. Returns seconds."""
    started = time.monotonic()
    target = beat(pub, schema, direction)
    while True:
        if applied_beat(sub, schema, direction) >= target:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            state = subscription_state(sub, subscription)
            raise ReleaseFailed(
                f"{direction} replication did not catch up within {timeout:.0f}s "
                f"(subscription {subscription}: {state})",
                hint="check the subscriber's server log for apply errors and the "
                "publisher's network reachability",
            )
        check_healthy(sub, subscription)
        time.sleep(poll)


# ---------------------------------------------------------------- publication


def _table_list(tables: list[Table], columns: dict[QualifiedName, list[str]] | None
                ) -> sql.Composable:
    parts: list[sql.Composable] = []
    for t in tables:
        ident: sql.Composable = t.qname.ident
        cols = (columns or {}).get(t.qname)
        if cols:
            ident = sql.Composed([ident, sql.SQL(" ("),
                                  sql.SQL(", ").join(map(sql.Identifier, cols)), sql.SQL(")")])
        parts.append(ident)
    return sql.SQL(", ").join(parts)


def publication_sql(
    name: str, tables: list[Table], columns: dict[QualifiedName, list[str]] | None = None
) -> sql.Composed:
    return sql.SQL(
        "CREATE PUBLICATION {n} FOR TABLE {tables} WITH (publish_via_partition_root = true)"
    ).format(n=sql.Identifier(name), tables=_table_list(tables, columns))


def ensure_publication(
    conn: psycopg.Connection[Any], name: str, tables: list[Table],
    columns: dict[QualifiedName, list[str]] | None = None,
) -> None:
    """Create the publication, or make an existing one publish exactly ``tables``."""
    exists = scalar(conn, "SELECT 1 FROM pg_publication WHERE pubname = %s", name)
    if exists:
        conn.execute(sql.SQL("ALTER PUBLICATION {n} SET TABLE {tables}").format(
            n=sql.Identifier(name), tables=_table_list(tables, columns)))
    else:
        conn.execute(publication_sql(name, tables, columns))


def drop_publication(conn: psycopg.Connection[Any], name: str) -> None:
    conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))


# ---------------------------------------------------------------- subscription


@dataclass(frozen=True)
class SubscriptionOptions:
    copy_data: bool = True
    origin_none: bool = False
    binary: bool = False
    streaming: str = "on"  # "on", "off" or (16+) "parallel"
    # Off: PostgreSQL counts a peer that stopped answering (wal_receiver_timeout, a
    # lost connection) as an apply error too, and with disable_on_error a stall of
    # more than a minute disabled the subscription for good: blue stopped being a
    # rollback target and green's writes stayed on green. Without it the worker
    # restarts by itself when the peer answers again; a real apply error (it
    # repeats every wal_retrieve_retry_interval) is caught by ``check_healthy``
    # from the growth of apply_error_count. See docs/sync.md.
    disable_on_error: bool = False


def subscription_sql(name: str, publisher_conninfo: str, publication: str,
                     opts: SubscriptionOptions) -> sql.Composed:
    """The statement; it embeds the peer's conninfo, so it is shown only redacted."""
    return sql.SQL("CREATE SUBSCRIPTION {n} CONNECTION {c} PUBLICATION {p} WITH ({o})").format(
        n=sql.Identifier(name), c=sql.Literal(publisher_conninfo),
        p=sql.Identifier(publication),
        o=subscription_options(opts, copy_data=opts.copy_data, create_slot=True,
                               slot_name=name))


def subscription_options(opts: SubscriptionOptions, *, copy_data: bool, create_slot: bool,
                         slot_name: str) -> sql.Composed:
    """The WITH (...) list of every subscription orchestrate creates, one policy for
    both ways of creating one (with its own slot, or on the initial copy's slot)."""
    options: list[sql.Composable] = [
        sql.SQL("copy_data = {}").format(sql.Literal(copy_data)),
        sql.SQL("create_slot = {}").format(sql.Literal(create_slot)),
        sql.SQL("slot_name = {}").format(sql.Literal(slot_name)),
        sql.SQL("binary = {}").format(sql.Literal(opts.binary)),
        sql.SQL("streaming = {}").format(sql.Literal(opts.streaming)),
        sql.SQL("disable_on_error = {}").format(sql.Literal(opts.disable_on_error)),
    ]
    if opts.origin_none:
        options.append(sql.SQL("origin = none"))
    return sql.SQL(", ").join(options)


def subscription_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    return bool(scalar(
        conn,
        "SELECT 1 FROM pg_subscription WHERE subname = %s "
        "AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        name,
    ))


def ensure_subscription(conn: psycopg.Connection[Any], name: str, publisher_conninfo: str,
                        publication: str, opts: SubscriptionOptions) -> bool:
    """Create the subscription unless it exists (then make sure it is enabled).

    Returns True when it was created now.
    """
    if subscription_exists(conn, name):
        enabled = scalar(conn, "SELECT subenabled FROM pg_subscription WHERE subname = %s", name)
        if not enabled:
            # Disabled by an apply error (disable_on_error) is not something to paper
            # over by re-enabling: report it.
            check_healthy(conn, name)
            conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))
        return False
    conn.execute(subscription_sql(name, publisher_conninfo, publication, opts))
    return True


def subscription_state(conn: psycopg.Connection[Any], name: str) -> str:
    row = conn.execute(
        """
        SELECT s.subenabled,
               count(r.*) FILTER (WHERE r.srsubstate = 'r') AS ready,
               count(r.*) AS tables,
               (SELECT count(*) FROM pg_stat_subscription st
                 WHERE st.subid = s.oid AND st.pid IS NOT NULL) AS workers
        FROM pg_subscription s LEFT JOIN pg_subscription_rel r ON r.srsubid = s.oid
        WHERE s.subname = %s GROUP BY s.oid, s.subenabled
        """,
        (name,),
    ).fetchone()
    if row is None:
        return "missing"
    enabled, ready, tables, workers = row
    return f"{'enabled' if enabled else 'DISABLED'}, {ready}/{tables} tables ready, " \
           f"{workers} worker(s)"


def error_count(conn: psycopg.Connection[Any], name: str) -> int:
    """Apply and initial-copy errors the subscription's workers reported so far."""
    return int(scalar(conn, """
        SELECT coalesce(st.apply_error_count, 0) + coalesce(st.sync_error_count, 0)
        FROM pg_subscription s LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid
        WHERE s.subname = %s""", name) or 0)


def ensure_enabled(conn: psycopg.Connection[Any], name: str) -> bool:
    """Enable a subscription that was disabled (by disable_on_error in a release
    started before it was turned off, or by a person). True when it was disabled.
    If the cause was a real apply error it fails again, and the catch-up that follows
    says so; if it was a stall, changes flow again."""
    row = conn.execute("SELECT subenabled FROM pg_subscription WHERE subname = %s",
                       (name,)).fetchone()
    if row is None or row[0]:
        return False
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} ENABLE").format(sql.Identifier(name)))
    conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (disable_on_error = false)").format(
        sql.Identifier(name)))
    return True


# Errors in one stage that make a subscription unhealthy. A stall costs one (the
# worker's timeout); an apply error repeats every few seconds.
REPEATED_ERRORS = 3


def check_healthy(conn: psycopg.Connection[Any], name: str,
                  errors_before: int | None = None) -> None:
    """Raise when the subscription was disabled, or (given the count at the start of
    the stage) its workers keep failing."""
    row = conn.execute(
        """
        SELECT s.subenabled, coalesce(st.apply_error_count, 0), coalesce(st.sync_error_count, 0)
        FROM pg_subscription s LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid
        WHERE s.subname = %s
        """,
        (name,),
    ).fetchone()
    if row is None:
        raise ReleaseFailed(f"subscription {name} is missing on {conn.info.host}")
    enabled, apply_errors, sync_errors = row
    if errors_before is not None and apply_errors + sync_errors - errors_before \
            >= REPEATED_ERRORS:
        raise ReleaseFailed(
            f"subscription {name} keeps failing: {apply_errors + sync_errors - errors_before} "
            "worker errors since the stage began",
            hint="read the subscriber's server log (logical replication worker errors); a "
            "migration that dropped or renamed a replicated column is the usual cause")
    if not enabled:
        raise ReleaseFailed(
            f"subscription {name} was disabled after {apply_errors} apply and {sync_errors} "
            "initial-copy error(s)",
            hint="read the subscriber's server log (logical replication worker errors); a "
            "migration that dropped or renamed a replicated column is the usual cause",
        )


def wait_initial_copy(conn: psycopg.Connection[Any], name: str, *, timeout: float,
                      poll: float = 0.5,
                      progress: Callable[[int, int], None] | None = None) -> None:
    """Wait until every table of the subscription reached 'ready'."""
    started = time.monotonic()
    while True:
        row = conn.execute(
            """
            SELECT count(*) FILTER (WHERE r.srsubstate = 'r'), count(*)
            FROM pg_subscription s JOIN pg_subscription_rel r ON r.srsubid = s.oid
            WHERE s.subname = %s
            """,
            (name,),
        ).fetchone()
        ready, total = (row or (0, 0))
        if progress:
            progress(int(ready), int(total))
        if total and ready == total:
            return
        check_healthy(conn, name)
        if time.monotonic() - started > timeout:
            raise ReleaseFailed(
                f"initial copy did not finish within {timeout:.0f}s ({ready}/{total} tables)",
                hint="raise sync.initial_copy_timeout, or check the subscriber's log",
            )
        time.sleep(poll)


def lag_bytes(pub: psycopg.Connection[Any], slot: str) -> int | None:
    """WAL the publisher retains for the slot beyond what the subscriber confirmed."""
    value = scalar(
        pub,
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        slot,
    )
    return None if value is None else int(value)


def lag_seconds(pub: psycopg.Connection[Any], slot: str) -> tuple[float | None, str | None]:
    """How far behind the subscriber's replay is by the walsender's own clock
    (``pg_stat_replication.replay_lag``: 0 once nothing is in flight, None when nobody
    streams the slot), and the slot's confirmed position. ``replay_lag`` is measured
    from the subscriber's replies, so a subscriber stuck mid-transaction (a lock on
    green) leaves it stale: the caller also times how long that position stands still."""
    row = pub.execute(
        "SELECT EXTRACT(epoch FROM r.replay_lag)::float8, r.pid IS NOT NULL, "
        "s.confirmed_flush_lsn::text "
        "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
        "WHERE s.slot_name = %s", (slot,)).fetchone()
    if row is None:
        return None, None
    seconds = None if not row[1] else 0.0 if row[0] is None else float(row[0])
    return seconds, row[2]


def drop_subscription(conn: psycopg.Connection[Any], name: str) -> None:
    """Drop the subscription and, through it, its slot on the publisher.

    When the publisher is unreachable, DROP SUBSCRIPTION would fail: detach the slot
    first, so that the subscription goes, and leave the slot to ``drop_slot``.
    """
    if not subscription_exists(conn, name):
        return
    ident = sql.Identifier(name)
    try:
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))
    except psycopg.OperationalError:
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(ident))
        conn.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(ident))
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(ident))


def drop_slot(pub: psycopg.Connection[Any], slot: str, *, timeout: float = 30.0) -> bool:
    """Drop a replication slot, stopping the walsender that holds it. True if dropped."""
    deadline = time.monotonic() + timeout
    while True:
        row = pub.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            pub.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        try:
            pub.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return True
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise ExternalError(f"replication slot {slot} stays in use; cannot drop it"
                                    ) from None
            time.sleep(0.2)


@dataclass(frozen=True)
class SlotInfo:
    name: str
    active: bool
    retained_bytes: int


def orchestrate_slots(pub: psycopg.Connection[Any]) -> list[SlotInfo]:
    """Slots created by orchestrate, with the WAL each one forces the server to keep."""
    rows = pub.execute(
        "SELECT slot_name, active, "
        "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint "
        "FROM pg_replication_slots WHERE slot_name LIKE %s ORDER BY 1",
        (SLOT_PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    return [SlotInfo(r[0], bool(r[1]), int(r[2])) for r in rows]
