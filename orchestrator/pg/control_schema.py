"""The control schema (``orchestrate`` by default): every object orchestrate creates.

One ordered list of versioned steps. Each step belongs to the sides of a release it
lives on, and nowhere else:

- ``state``: the state database (blue's by default): the release record
  (``releases``, ``release_log``, ``stage_measurements``) and, for a database pair,
  which side is live (``live_side``).
- ``green``: the database the migrations change: migration tracking, the provision
  marker, the replication heartbeat, the initial copy's progress and saved settings.
- ``peer``: the other end of replication (blue while green is built): only the
  heartbeat, which is replicated like user data so it must exist on both ends.

``{schema}.schema_version`` in each database records the steps that ran there. It is a
set, not a high-water mark: one database can serve several sides (blue is the state
database and, having been green once, holds migration tracking), so each side runs
the steps of its own that are not recorded yet. Every step is idempotent (IF NOT
EXISTS), so a database whose control schema predates this module (``schema_version``
then holds 1 for the whole release record, or is missing on green) is upgraded in
place: its steps rerun as no-ops and get recorded. Steps only ever get appended; an
upgrade is a new step, never an edit of a recorded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg import sql

Side = Literal["state", "green", "peer"]

MARKER_TABLE = "provisioned"
HEARTBEAT_TABLE = "heartbeat"
COPY_STATE_TABLE = "initial_copy"
DEFERRED_TABLE = "initial_copy_deferred"
SETTINGS_TABLE = "initial_copy_settings"


@dataclass(frozen=True)
class Step:
    version: int
    sides: frozenset[Side]
    what: str
    ddl: str  # a psycopg ``sql.SQL`` template; ``{schema}`` is the control schema


_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.schema_version (
  version integer PRIMARY KEY,
  applied_at timestamptz NOT NULL DEFAULT now()
);
"""

_MARKER_DDL = ("CREATE TABLE IF NOT EXISTS {schema}.provisioned (release text PRIMARY KEY, "
               "at timestamptz NOT NULL DEFAULT now())")

STEPS: tuple[Step, ...] = (
    Step(1, frozenset({"state", "green"}), "the log_level enum", """
DO $$ BEGIN
  CREATE TYPE {schema}.log_level AS ENUM ('debug', 'info', 'warning', 'error', 'critical');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
"""),
    Step(2, frozenset({"state"}), "the release record", """
CREATE TABLE IF NOT EXISTS {schema}.releases (
  name text PRIMARY KEY,
  state text NOT NULL,
  status text NOT NULL CHECK (status IN ('running', 'promoted', 'rolled_back', 'failed')),
  config_sha256 text NOT NULL,
  config jsonb NOT NULL,
  facts jsonb NOT NULL DEFAULT '{{}}',
  owner text,
  error text,
  rollback_requested text,
  approved_stage integer,
  started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now(),
  finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {schema}.release_log (
  id bigserial PRIMARY KEY,
  release text NOT NULL REFERENCES {schema}.releases(name) ON DELETE CASCADE,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  level {schema}.log_level NOT NULL DEFAULT 'info',
  state text,
  message text NOT NULL,
  details jsonb,
  duration interval
);
CREATE INDEX IF NOT EXISTS release_log_release_idx ON {schema}.release_log (release, id);
CREATE TABLE IF NOT EXISTS {schema}.stage_measurements (
  id bigserial PRIMARY KEY,
  release text NOT NULL REFERENCES {schema}.releases(name) ON DELETE CASCADE,
  stage integer NOT NULL,
  weight integer NOT NULL,
  at timestamptz NOT NULL DEFAULT clock_timestamp(),
  check_name text NOT NULL,
  value double precision,
  baseline double precision,
  verdict text NOT NULL CHECK (verdict IN ('pass', 'fail', 'inconclusive')),
  detail text
);
CREATE INDEX IF NOT EXISTS stage_measurements_release_idx
  ON {schema}.stage_measurements (release, stage, id);
"""),
    Step(3, frozenset({"green"}), "migration tracking", """
DO $$ BEGIN
  CREATE TYPE {schema}.migration_status AS ENUM
    ('pending', 'running', 'completed', 'failed', 'rolled_back');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE IF NOT EXISTS {schema}.migrations (
  id serial PRIMARY KEY,
  migration_name text NOT NULL UNIQUE,
  version text NOT NULL,
  description text,
  sql_file text,
  checksum text NOT NULL,
  status {schema}.migration_status NOT NULL DEFAULT 'pending',
  applied_at timestamptz,
  applied_by text,
  execution_time interval,
  rollback_sql text,
  release text,
  error text
);
CREATE TABLE IF NOT EXISTS {schema}.migration_log (
  id bigserial PRIMARY KEY,
  migration_id integer REFERENCES {schema}.migrations(id) ON DELETE CASCADE,
  log_level {schema}.log_level NOT NULL DEFAULT 'info',
  message text NOT NULL,
  timestamp timestamptz NOT NULL DEFAULT clock_timestamp(),
  execution_time interval,
  error_details jsonb
);
"""),
    # Written by psql in the transaction that restores blue's schema (``marker_sql``),
    # so a provisioned green always has it; the step covers a green made otherwise.
    Step(4, frozenset({"green"}), "the provision marker", _MARKER_DDL + ";"),
    Step(5, frozenset({"green", "peer"}), "the replication heartbeat", """
CREATE TABLE IF NOT EXISTS {schema}.heartbeat (direction text PRIMARY KEY,
  beat bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
"""),
    Step(6, frozenset({"green"}), "the initial copy's progress", """
CREATE TABLE IF NOT EXISTS {schema}.initial_copy (slot text PRIMARY KEY, phase text NOT NULL,
  consistent_point text, jobs int, started_at timestamptz NOT NULL DEFAULT now(),
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {schema}.initial_copy_deferred (
  id bigserial PRIMARY KEY, step int NOT NULL, kind text NOT NULL,
  schema_name text NOT NULL, table_name text NOT NULL, object_name text NOT NULL,
  statements text[] NOT NULL, validate boolean NOT NULL DEFAULT false,
  ref_schema text, ref_table text,
  UNIQUE (kind, schema_name, table_name, object_name));
"""),
    Step(7, frozenset({"green"}), "the sync settings saved for the copy", """
CREATE TABLE IF NOT EXISTS {schema}.initial_copy_settings (name text PRIMARY KEY,
  previous text);
"""),
    # A config with ``pair`` (a and b instead of blue and green): which side is live.
    # One row per control schema; ``release`` is the release that made it live and
    # ``previous`` the side it left, which ``orchestrator.pairing`` may recreate.
    Step(8, frozenset({"state"}), "the live side of a database pair", """
CREATE TABLE IF NOT EXISTS {schema}.live_side (
  pair text PRIMARY KEY,
  live text NOT NULL CHECK (live IN ('a', 'b')),
  previous text CHECK (previous IN ('a', 'b')),
  release text,
  updated_at timestamptz NOT NULL DEFAULT now()
);
"""),
)

VERSION = max(s.version for s in STEPS)


def _run(conn: psycopg.Connection[Any], schema: str, side: Side) -> list[int]:
    s = sql.Identifier(schema)
    ran: list[int] = []
    # Several orchestrators may bootstrap at once; serialise on a transaction lock so
    # CREATE TYPE/TABLE IF NOT EXISTS do not race each other.
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                     (f"orchestrate-ddl:{schema}",))
        conn.execute(sql.SQL(_BOOTSTRAP).format(schema=s))
        done = {int(r[0]) for r in conn.execute(
            sql.SQL("SELECT version FROM {}.schema_version").format(s)).fetchall()}
        for step in STEPS:
            if side not in step.sides or step.version in done:
                continue
            conn.execute(sql.SQL(step.ddl).format(schema=s))
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s) "
                                 "ON CONFLICT DO NOTHING").format(s), (step.version,))
            ran.append(step.version)
    return ran


def ensure_state(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """The release record on the state database; returns the versions that ran."""
    return _run(conn, schema, "state")


def ensure_green(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """Everything orchestrate keeps on green; returns the versions that ran."""
    return _run(conn, schema, "green")


def ensure_peer(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    """The heartbeat on the other end of replication; returns the versions that ran."""
    return _run(conn, schema, "peer")


def marker_sql(schema: str, release: str) -> str:
    """The marker, as text for psql: it commits with the restore of blue's schema."""
    s = sql.Identifier(schema)
    ddl = sql.SQL(_MARKER_DDL).format(schema=s).as_string(None)
    insert = sql.SQL("INSERT INTO {}.provisioned (release) VALUES ({}) ON CONFLICT DO NOTHING;"
                     ).format(s, sql.Literal(release)).as_string(None)
    return f"CREATE SCHEMA IF NOT EXISTS {s.as_string(None)}; {ddl}; {insert}"
