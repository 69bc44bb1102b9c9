"""The release's persisted state: a control schema in PostgreSQL.

Tables (schema ``orchestrate`` by default, in blue's database unless ``state.database``
says otherwise):

- ``releases``: one row per release: current state, status, facts gathered by the
  states (backup file and checksum, LSNs, the canary stage reached, the weights last
  set), the redacted config and its checksum.
- ``release_log``: what happened, with a level (debug .. critical), per state.
- ``stage_measurements``: every canary evaluation, for ``status`` and the report.

Their DDL, and its upgrades, are in ``orchestrator.pg.control_schema``.

A session-level advisory lock, held on a dedicated connection for the whole run,
keeps two orchestrators off the same control schema; PostgreSQL drops it the moment
the holder's connection dies (kill -9 included), so a crashed run never wedges the
next one.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orchestrator.config import ReleaseConfig
from orchestrator.errors import ConnectError, LockedError, StateUnavailable
from orchestrator.logging import scrub
from orchestrator.pg import control_schema
from orchestrator.pg.endpoint import Endpoint
from orchestrator.record import (
    NO_ROLLBACK_FROM,
    TERMINAL,
    Facts,
    State,
    Status,
    parse_state,
    parse_status,
)


@dataclass
class ReleaseRow:
    name: str
    state: State
    status: Status
    config_sha256: str
    facts: Facts = field(default_factory=Facts)
    owner: str | None = None
    error: str | None = None
    rollback_requested: str | None = None
    approved_stage: int | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_storage(cls, row: dict[str, Any]) -> ReleaseRow:
        """A ``releases`` row as selected by ``StateStore.get``."""
        name = row["name"]
        return cls(**{**row, "state": parse_state(name, row["state"]),
                      "status": parse_status(name, row["status"]),
                      "facts": Facts.from_storage(row["facts"] or {}, release=name)})


F = TypeVar("F", bound=Callable[..., Any])


def _state_call(method: F) -> F:
    """A call on the control schema that lost its server becomes StateUnavailable.

    Without it a paused state database (blue, by default) surfaced as an unexpected
    psycopg error, or, worse, the failure handler tried to log the failure to the
    same frozen server. The connection is dropped, so the next call reconnects."""

    @functools.wraps(method)
    def wrapper(self: StateStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (psycopg.OperationalError, ConnectError) as exc:
            if self._conn is not None and not self._conn.closed:
                self._conn.close()
            self._conn = None
            text = exc.message if isinstance(exc, ConnectError) else str(exc)
            raise StateUnavailable(
                f"the release state database {self.db.describe()} does not answer: "
                f"{scrub(text).strip()}",
                hint="the release stopped where its last recorded state says (`orchestrate "
                "status`); when the database answers again, run the same command to "
                "resume") from exc

    return wrapper  # type: ignore[return-value]


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StateStore:
    """Reads and writes the control schema. One instance per process."""

    def __init__(self, db: Endpoint, schema: str = "orchestrate") -> None:
        self.db = db
        self.schema = schema
        self._conn: psycopg.Connection[Any] | None = None
        self._lock_conn: psycopg.Connection[Any] | None = None
        # Set for a database pair (``orchestrator.pairing``): the side that becomes live
        # when a release reaches done, recorded in the same transaction as ``done``.
        self.live_on_done: str | None = None

    @classmethod
    def for_config(cls, cfg: ReleaseConfig) -> StateStore:
        return cls(Endpoint(cfg.state_db, "state"), cfg.state.schema_name)

    # connection management -------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self.db.connect("state")
        return self._conn

    def close(self) -> None:
        for c in (self._conn, self._lock_conn):
            if c is not None and not c.closed:
                c.close()
        self._conn = self._lock_conn = None

    def _q(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(schema=sql.Identifier(self.schema))

    def _rows(self, template: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._q(template), params)
            return list(cur.fetchall())

    @_state_call
    def ensure_schema(self) -> None:
        control_schema.ensure_state(self.conn, self.schema)

    @_state_call
    def exists(self) -> bool:
        row = self.conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.releases",)
        ).fetchone()
        return bool(row and row[0])

    # locking -----------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Hold the control schema for this process, or raise LockedError."""
        if self._lock_conn is not None and not self._lock_conn.closed:
            return
        conn = self.db.connect("lock")
        key = f"orchestrate-release:{self.schema}"
        got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,))
        row = got.fetchone()
        if not (row and row[0]):
            conn.close()
            holder = self._lock_holder()
            raise LockedError(
                f"another orchestrator is running a release on {self.db.describe()}"
                + (f" ({holder})" if holder else ""),
                hint="wait for it, or check `orchestrate status`; the lock frees itself "
                "when that process exits",
            )
        self._lock_conn = conn

    def _lock_holder(self) -> str | None:
        if not self.exists():
            return None
        row = self.conn.execute(
            self._q("SELECT name, owner FROM {schema}.releases WHERE status = %s "
                    "ORDER BY updated_at DESC LIMIT 1"), (Status.RUNNING,)
        ).fetchone()
        return f"release {row[0]} owned by {row[1]}" if row else None

    def release_lock(self) -> None:
        if self._lock_conn is not None and not self._lock_conn.closed:
            self._lock_conn.close()
        self._lock_conn = None

    # releases ----------------------------------------------------------------
    @_state_call
    def get(self, name: str) -> ReleaseRow | None:
        if not self.exists():
            return None
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                self._q(
                    "SELECT name, state, status, config_sha256, facts, owner, error, "
                    "rollback_requested, approved_stage, started_at, updated_at, finished_at "
                    "FROM {schema}.releases WHERE name = %s"
                ),
                (name,),
            )
            row = cur.fetchone()
        return ReleaseRow.from_storage(row) if row else None

    @_state_call
    def latest(self) -> ReleaseRow | None:
        if not self.exists():
            return None
        row = self.conn.execute(
            self._q("SELECT name FROM {schema}.releases ORDER BY started_at DESC LIMIT 1")
        ).fetchone()
        return self.get(row[0]) if row else None

    @_state_call
    def active_other_than(self, name: str) -> ReleaseRow | None:
        if not self.exists():
            return None
        row = self.conn.execute(
            self._q("SELECT name FROM {schema}.releases WHERE status = %s AND name <> %s "
                    "LIMIT 1"),
            (Status.RUNNING, name),
        ).fetchone()
        return self.get(row[0]) if row else None

    @_state_call
    def unfinished(self) -> ReleaseRow | None:
        """The newest release not yet over: running, or promoted and not cleaned up."""
        if not self.exists():
            return None
        row = self.conn.execute(
            self._q("SELECT name FROM {schema}.releases WHERE state <> ALL(%s) "
                    "ORDER BY started_at DESC LIMIT 1"), ([s.value for s in TERMINAL],)
        ).fetchone()
        return self.get(row[0]) if row else None

    @_state_call
    def finished_names(self) -> set[str]:
        """The releases that are over (done, rolled back, failed)."""
        if not self.exists():
            return set()
        rows = self.conn.execute(
            self._q("SELECT name FROM {schema}.releases WHERE state = ANY(%s)"),
            ([s.value for s in TERMINAL],)).fetchall()
        return {r[0] for r in rows}

    @_state_call
    def create(self, name: str, state: State, config_sha256: str,
               config: dict[str, Any]) -> None:
        self.conn.execute(
            self._q(
                "INSERT INTO {schema}.releases (name, state, status, config_sha256, config, owner) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING"
            ),
            (name, state, Status.RUNNING, config_sha256, Jsonb(config), _owner()),
        )

    @_state_call
    def claim(self, name: str) -> None:
        self.conn.execute(
            self._q("UPDATE {schema}.releases SET owner = %s, updated_at = now() WHERE name = %s"),
            (_owner(), name),
        )

    @_state_call
    def set_state(self, name: str, state: State, *, status: Status | None = None,
                  error: str | None = None, clear_error: bool = False) -> None:
        finished = status is not None and status != Status.RUNNING
        # One transaction: a crash cannot leave a done release whose side is not live,
        # which would send the next run's green onto the database users are on.
        with self.conn.transaction():
            self.conn.execute(
                self._q(
                    "UPDATE {schema}.releases SET state = %s, status = coalesce(%s, status), "
                    "error = CASE WHEN %s THEN NULL ELSE coalesce(%s, error) END, "
                    "updated_at = now(), "
                    "finished_at = CASE WHEN %s THEN now() ELSE NULL END "
                    "WHERE name = %s"
                ),
                (state, status, clear_error, error, finished, name),
            )
            if state == State.DONE and self.live_on_done is not None:
                self._set_live(self.live_on_done, release=name)

    # the live side of a database pair ---------------------------------------------
    PAIR = "pair"  # one pair per control schema: its lock and its releases are one

    @_state_call
    def live_side(self) -> tuple[str, str | None, str | None] | None:
        """(live, previous, release that made it live), or None before any record."""
        row = self.conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", (f"{self.schema}.live_side",)).fetchone()
        if not (row and row[0]):
            return None
        found = self.conn.execute(
            self._q("SELECT live, previous, release FROM {schema}.live_side WHERE pair = %s"),
            (self.PAIR,)).fetchone()
        return (found[0], found[1], found[2]) if found else None

    def _set_live(self, live: str, *, release: str | None) -> None:
        self.conn.execute(
            # ``previous``: the side the release left, the other one of the two.
            self._q("INSERT INTO {schema}.live_side (pair, live, previous, release) "
                    "VALUES (%s, %s, CASE WHEN %s = 'a' THEN 'b' ELSE 'a' END, %s) "
                    "ON CONFLICT (pair) DO UPDATE SET live = excluded.live, "
                    "previous = excluded.previous, release = excluded.release, "
                    "updated_at = now()"),
            (self.PAIR, live, live, release))

    @_state_call
    def record_live(self, live: str, *, release: str | None = None) -> None:
        """Record ``live`` as the live side (idempotent)."""
        self._set_live(live, release=release)

    @_state_call
    def merge_facts(self, name: str, facts: Facts | None = None, **fields: Any) -> Facts:
        """Set the facts given (those set in ``facts``, then the keyword ones, checked
        by ``Facts``); the others stay as stored. The release's facts after it."""
        patch = {**(facts.for_storage() if facts is not None else {}),
                 **Facts.model_validate(fields).for_storage()}
        row = self.conn.execute(
            self._q("UPDATE {schema}.releases SET facts = facts || %s, updated_at = now() "
                    "WHERE name = %s RETURNING facts"),
            (Jsonb(patch), name),
        ).fetchone()
        return Facts.from_storage(row[0], release=name) if row else Facts()

    @_state_call
    def request_rollback(self, name: str, reason: str) -> bool:
        """Ask the process running ``name`` to roll back. True if the request was new.

        A promoted release in its rollback window can still be rolled back, so the
        request is taken in every state from which a rollback is possible, not only
        while the status is ``running`` (cleanup, done and the terminal states refuse:
        the caller reads the row to say why)."""
        row = self.conn.execute(
            self._q("UPDATE {schema}.releases SET rollback_requested = %s, updated_at = now() "
                    "WHERE name = %s AND rollback_requested IS NULL "
                    "AND state <> ALL(%s) RETURNING name"),
            (reason, name, [s.value for s in NO_ROLLBACK_FROM]),
        ).fetchone()
        return row is not None

    @_state_call
    def approve_stage(self, name: str, stage: int) -> None:
        self.conn.execute(
            self._q("UPDATE {schema}.releases SET approved_stage = greatest(coalesce("
                    "approved_stage, -1), %s), updated_at = now() WHERE name = %s"),
            (stage, name),
        )

    # log and measurements -------------------------------------------------------
    @_state_call
    def log(self, name: str, level: str, message: str, *, state: str | None = None,
            details: dict[str, Any] | None = None, duration_s: float | None = None) -> None:
        self.conn.execute(
            self._q(
                "INSERT INTO {schema}.release_log (release, level, state, message, details, "
                "duration) VALUES (%s, %s, %s, %s, %s, make_interval(secs => %s))"
            ),
            (name, level, state, message,
             Jsonb(json.loads(json.dumps(details, default=str))) if details else None,
             duration_s),
        )

    @_state_call
    def log_entries(self, name: str, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT at, level::text AS level, state, message, details, "
            "extract(epoch FROM duration)::float8 AS duration_s "
            "FROM (SELECT * FROM {schema}.release_log WHERE release = %s "
            "ORDER BY id DESC LIMIT %s) l ORDER BY at",
            (name, limit))

    @_state_call
    def record_measurement(self, name: str, *, stage: int, weight: int, check: str,
                           value: float | None, baseline: float | None, verdict: str,
                           detail: str | None = None) -> None:
        self.conn.execute(
            self._q(
                "INSERT INTO {schema}.stage_measurements (release, stage, weight, check_name, "
                "value, baseline, verdict, detail) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            (name, stage, weight, check, value, baseline, verdict, detail),
        )

    @_state_call
    def measurements(self, name: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT stage, weight, check_name, count(*) AS evaluations, "
            "count(*) FILTER (WHERE verdict = 'fail') AS failed, "
            "count(*) FILTER (WHERE verdict = 'inconclusive') AS inconclusive, "
            "max(value) AS max_value, avg(value) AS avg_value "
            "FROM {schema}.stage_measurements WHERE release = %s "
            "GROUP BY stage, weight, check_name ORDER BY stage, check_name",
            (name,))

    @_state_call
    def latest_measurements(self, name: str) -> list[dict[str, Any]]:
        """Each check's (probe's, hook's, lag's) last measurement: the live view."""
        return self._rows(
            "SELECT DISTINCT ON (check_name) stage, weight, at, check_name, value, "
            "baseline, verdict, detail FROM {schema}.stage_measurements "
            "WHERE release = %s ORDER BY check_name, id DESC",
            (name,))
