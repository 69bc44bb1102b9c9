"""The subscription on the copy's slot, and the plain path's sync-worker tuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.pg import control_schema as ddl
from orchestrator.pg import replication
from orchestrator.pg.conn import scalar, server_major
from orchestrator.pg.copy.state import ident, set_phase

SETTINGS_TABLE = ddl.SETTINGS_TABLE


def streaming_options(blue_major: int, green_major: int, *, origin_none: bool,
                      copy_data: bool) -> replication.SubscriptionOptions:
    """Subscription options for this pair of majors.

    binary needs 16+ on both sides to be safe for every type (and in 16+ applies to
    the initial sync too); streaming = parallel (16+) applies large transactions
    with parallel workers instead of spooling them to disk first.
    """
    both16 = min(blue_major, green_major) >= 16
    return replication.SubscriptionOptions(
        copy_data=copy_data, origin_none=origin_none, binary=both16,
        streaming="parallel" if both16 else "on")


def subscribe_from_slot(green: psycopg.Connection[Any], name: str, publisher_conninfo: str,
                        publication: str, opts: replication.SubscriptionOptions, *,
                        slot_name: str, control_schema: str | None) -> bool:
    """Create a subscription on an existing slot (no copy, no new slot). True if created.

    With ``control_schema``, the copy's phase becomes ``streaming`` in the same
    transaction. The statement embeds the peer's conninfo: it is never logged.
    """
    if replication.subscription_exists(green, name):
        return False
    options = replication.subscription_options(opts, copy_data=False, create_slot=False,
                                               slot_name=slot_name)
    with green.transaction():
        # Without create_slot the statement may run in a transaction: the phase and
        # the subscription commit together.
        green.execute(sql.SQL(
            "CREATE SUBSCRIPTION {n} CONNECTION {c} PUBLICATION {p} WITH ({o})").format(
                n=sql.Identifier(name), c=sql.Literal(publisher_conninfo),
                p=sql.Identifier(publication), o=options))
        if control_schema is not None:
            set_phase(green, control_schema, slot_name, "streaming")
    return True



# ------------------------------------------------------------------ plain path tuning


@dataclass
class TuneResult:
    applied: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# Reloadable (sighup): set for the run with ALTER SYSTEM + pg_reload_conf().
_RELOADABLE = ("max_sync_workers_per_subscription",
               "max_parallel_apply_workers_per_subscription")


def tune_sync_workers(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], jobs: int,
                      *, control_schema: str) -> TuneResult:
    """Let ``jobs`` tables sync at once, as far as the servers' fixed limits allow.

    max_sync_workers_per_subscription (and on 16+ the parallel apply workers) only
    need a reload and are changed for the run; the previous values are saved on
    green first, so ``restore_sync_settings`` can put them back even after a crash.
    max_logical_replication_workers and max_worker_processes on green, and
    max_wal_senders / max_replication_slots on blue (each sync worker holds a
    temporary slot), need a restart: orchestrate does not restart a server, it only
    reports when they cap the parallelism.
    """
    result = TuneResult()
    ddl.ensure_green(green, control_schema)

    def num(conn: psycopg.Connection[Any], name: str) -> int:
        return int(scalar(conn, "SELECT setting FROM pg_settings WHERE name = %s", name) or 0)

    workers = num(green, "max_logical_replication_workers")
    procs = num(green, "max_worker_processes")
    senders = num(blue, "max_wal_senders") - int(scalar(
        blue, "SELECT count(*) FROM pg_stat_replication") or 0)
    slots = num(blue, "max_replication_slots") - int(scalar(
        blue, "SELECT count(*) FROM pg_replication_slots") or 0)
    # The apply worker itself takes one of each; it needs its own slot and sender.
    cap = min(workers - 1, procs - 2, senders - 1, slots - 1)
    wanted = max(1, min(jobs, cap))
    if wanted < jobs:
        result.warnings.append(
            f"only {wanted} table(s) can sync at once: raise max_logical_replication_workers "
            f"({workers}) / max_worker_processes ({procs}) on green or max_wal_senders / "
            "max_replication_slots on blue (restart needed)")
    values = {"max_sync_workers_per_subscription": str(wanted)}
    if server_major(green) >= 16:
        values["max_parallel_apply_workers_per_subscription"] = str(max(2, wanted // 2))
    for name, value in values.items():
        row = green.execute(
            "SELECT setting, coalesce(sourcefile, '') FROM pg_settings WHERE name = %s",
            (name,)).fetchone()
        if row is None:
            continue
        # A value ALTER SYSTEM set before is written back; anything else (the default,
        # postgresql.conf) comes back by RESET, which leaves no trace in .auto.conf.
        previous = row[0] if str(row[1]).endswith("postgresql.auto.conf") else None
        green.execute(sql.SQL("INSERT INTO {}.{} (name, previous) VALUES (%s, %s) "
                              "ON CONFLICT (name) DO NOTHING").format(
            sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE)), (name, previous))
        green.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
            sql.Identifier(name), sql.Literal(value)))
        result.applied[name] = value
    green.execute("SELECT pg_reload_conf()")
    return result


def restore_sync_settings(green: psycopg.Connection[Any], *, control_schema: str
                          ) -> list[str]:
    """Put back what ``tune_sync_workers`` changed. Idempotent; returns the names."""
    if not scalar(green, "SELECT to_regclass(%s) IS NOT NULL",
                  ident(control_schema, SETTINGS_TABLE).as_string(green)):
        return []
    rows = green.execute(sql.SQL("SELECT name, previous FROM {}.{}").format(
        sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE))).fetchall()
    for name, previous in rows:
        if name not in _RELOADABLE:
            continue
        if previous is None:
            green.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        else:
            green.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                sql.Identifier(name), sql.Literal(previous)))
    green.execute("SELECT pg_reload_conf()")
    green.execute(sql.SQL("DELETE FROM {}.{}").format(
        sql.Identifier(control_schema), sql.Identifier(SETTINGS_TABLE)))
    return [r[0] for r in rows]
