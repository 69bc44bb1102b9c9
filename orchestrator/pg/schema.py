"""Provisioning green: the database, then blue's schema.

The schema comes from ``pg_dump --schema-only`` of blue (without orchestrate's own
schema, publications and subscriptions) and is restored by psql in one transaction
together with a marker row: either green has the whole schema and the marker, or
nothing, so a crash in the middle leaves nothing to clean up.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.errors import ExternalError, PreflightError
from orchestrator.pg import catalog, control_schema
from orchestrator.pg.conn import scalar
from orchestrator.pg.endpoint import Endpoint, EndpointLike
from orchestrator.pg.tools import PgTools, run_tool

MARKER_TABLE = control_schema.MARKER_TABLE
marker_sql = control_schema.marker_sql


def database_settings(blue: psycopg.Connection[Any]) -> dict[str, str]:
    row = blue.execute(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
        "WHERE datname = current_database()").fetchone()
    assert row is not None
    return {"encoding": row[0], "lc_collate": row[1], "lc_ctype": row[2]}


def create_database_sql(name: str, settings: dict[str, str]) -> sql.Composed:
    return sql.SQL(
        "CREATE DATABASE {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}"
    ).format(sql.Identifier(name), sql.Literal(settings["encoding"]),
             sql.Literal(settings["lc_collate"]), sql.Literal(settings["lc_ctype"]))


def ensure_database(green: Endpoint, settings: dict[str, str]) -> bool:
    """Create green's database like blue's (encoding, collation). True if created."""
    with green.connection("provision", dbname="postgres") as conn:
        if catalog.database_exists(conn, green.dbname):
            return False
        if not green.create_database:
            raise PreflightError(
                f"database {green.dbname} does not exist on green ({green.server})",
                hint="create it, or set green.create_database: true")
        try:
            conn.execute(create_database_sql(green.dbname, settings))
        except psycopg.errors.DuplicateDatabase:
            return False
        except psycopg.Error as exc:
            # The collation of blue may not exist on green's machine: fall back to the
            # server default, which validation will then compare on ordering-free checks.
            if "locale" not in str(exc).lower() and "collation" not in str(exc).lower():
                raise
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING {}").format(
                sql.Identifier(green.dbname), sql.Literal(settings["encoding"])))
        return True


def is_provisioned(green: psycopg.Connection[Any], schema: str, release: str) -> bool:
    exists = scalar(green, "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
                    schema, MARKER_TABLE)
    if not exists:
        return False
    return bool(scalar(green, sql.SQL("SELECT 1 FROM {}.{} WHERE release = %s").format(
        sql.Identifier(schema), sql.Identifier(MARKER_TABLE)), release))


def foreign_tables(green: psycopg.Connection[Any], schema: str) -> list[str]:
    """User tables already on green that a schema copy would collide with."""
    return [t.qname.display for t in catalog.user_tables(green, exclude_schemas=(schema,))]


def dump_schema_cmd(tools: PgTools, blue: Endpoint, schema: str, out: Path) -> list[str]:
    return [tools.path("pg_dump"), "--schema-only", "--no-publications", "--no-subscriptions",
            "--exclude-schema", schema, "--file", str(out),
            "--dbname", blue.tool_conninfo()]


def copy_schema(blue: EndpointLike, green: EndpointLike,
                tools: PgTools, *, schema: str, release: str, timeout: float = 1800.0) -> None:
    """Restore blue's schema into green in one transaction, with the marker row."""
    blue, green = Endpoint.of(blue, "blue"), Endpoint.of(green, "green")
    with tempfile.TemporaryDirectory(prefix="orchestrate-schema-") as tmp:
        out = Path(tmp) / "schema.sql"
        run_tool(dump_schema_cmd(tools, blue, schema, out), blue, timeout=timeout,
                 what="pg_dump --schema-only")
        restore = [tools.path("psql"), "--no-psqlrc", "--quiet", "--set", "ON_ERROR_STOP=1",
                   "--single-transaction", "--file", str(out),
                   "--command", marker_sql(schema, release),
                   "--dbname", green.tool_conninfo()]
        try:
            run_tool(restore, green, timeout=timeout, what="restoring blue's schema into green")
        except ExternalError as exc:
            if "role" in exc.message and "does not exist" in exc.message:
                raise ExternalError(exc.message, hint="create the roles blue's objects "
                                    "belong to on green first") from exc
            raise
