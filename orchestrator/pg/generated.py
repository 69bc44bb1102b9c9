"""Generated columns in a validation: reading and comparing generation expressions.

A stored generated column (``attgenerated = 's'``) is data the application reads;
green computes it itself (logical replication does not carry it before PostgreSQL
18, and the initial copy leaves it out), so a different expression on green gives
different values in every row. Its values are compared like any column's, and its
expression is compared here so that the report says *why* the rows differ. A
virtual one (PostgreSQL 18, ``'v'``) is computed on read and not stored: only its
expression can be compared.

Expressions are compared as the servers deparse them (``pg_get_expr``), with the
session's search_path pinned, since deparsing qualifies every name the path does
not reach and the two roles' paths may differ. The text of one expression is the
same on 15, 16, 17 and 18 for everything we tried; should two majors deparse one
expression differently, the texts are compared once more after green has parsed
and deparsed both of them itself (``canonical``): green then writes both in its
own dialect, so only a real difference remains.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

from orchestrator.pg.names import QualifiedName

# Deparsing qualifies names by the search_path; pinned so both sides write alike.
_PIN_PATH = "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true)"

_EXPRESSIONS = """
    SELECT a.attname, pg_catalog.pg_get_expr(d.adbin, d.adrelid)
    FROM pg_catalog.pg_attribute a
    JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> ''
"""

# Quoted literals and identifiers stay as they are; whitespace between tokens is
# layout (CASE is deparsed over several lines).
_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\s+|[^'\"\s]+|['\"]")

_PROBE = "orch_expr_probe"


def expressions(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str]:
    """{column: generation expression} of the generated columns of schema.table."""
    # Rolled back: the pinned path must not outlive the read, even in a caller's
    # transaction (a savepoint released would keep it).
    with conn.transaction(force_rollback=True):
        conn.execute(_PIN_PATH)
        row = conn.execute(
            "SELECT c.oid FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s", (schema, table)).fetchone()
        if row is None:
            return {}
        return {str(r[0]): str(r[1]) for r in conn.execute(_EXPRESSIONS, (row[0],)).fetchall()}


def normalise(expression: str) -> str:
    """The expression with layout whitespace collapsed (quoted text left alone)."""
    out: list[str] = []
    for token in _TOKENS.findall(expression.strip()):
        out.append(" " if token.isspace() else token)
    return "".join(out)


def _one_expression(text: str) -> bool:
    """No statement end, comment or unbalanced parenthesis outside quotes.

    The texts come from pg_get_expr and never hold these; the check keeps a text
    sent back to a server from being anything but the one expression it claims.
    """
    depth = 0
    for token in _TOKENS.findall(text):
        if token[0] in "'\"":
            if len(token) == 1:
                return False  # an unterminated quote
            continue
        if any(bad in token for bad in (";", "--", "/*", "$")):
            return False
        for ch in token:
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth < 0:
                return False
    return depth == 0


def canonical(green: psycopg.Connection[Any], table: QualifiedName, column: str,
              blue_expression: str, green_expression: str) -> tuple[str, str] | None:
    """Both expressions as green parses and deparses them, or None if it cannot.

    The probe is a temporary copy of the table's columns (no rows, so no user
    function runs) with both expressions added as generated columns of the column's
    type, in a transaction that is rolled back. It needs to create temporary tables
    on green; without that right (or in a read-only session) the texts as read are
    all there is to compare.
    """
    if not (_one_expression(blue_expression) and _one_expression(green_expression)):
        return None
    probe = sql.Identifier(_PROBE)
    try:
        with green.transaction(force_rollback=True):
            green.execute(_PIN_PATH)
            green.execute(sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {})").format(
                probe, table.ident))
            row = green.execute(
                "SELECT a.attrelid, pg_catalog.format_type(a.atttypid, a.atttypmod) "
                "FROM pg_catalog.pg_attribute a WHERE a.attname = %s AND a.attrelid = "
                "pg_catalog.to_regclass('pg_temp.' || pg_catalog.quote_ident(%s))",
                (column, _PROBE)).fetchone()
            if row is None:
                return None
            # format_type's output under the pinned path: quoted and qualified.
            type_ = sql.SQL(str(row[1]))
            for name, text in (("orch_blue", blue_expression), ("orch_green", green_expression)):
                # Text a server deparsed: one expression, names quoted, literals escaped.
                green.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {} GENERATED ALWAYS AS ({}) "
                                      "STORED").format(probe, sql.Identifier(name), type_,
                                                       sql.SQL(text)))
            got = {str(r[0]): str(r[1])
                   for r in green.execute(_EXPRESSIONS, (row[0],)).fetchall()}
    except psycopg.Error:
        return None
    if "orch_blue" not in got or "orch_green" not in got:
        return None
    return got["orch_blue"], got["orch_green"]


def same(green: psycopg.Connection[Any] | None, table: QualifiedName, column: str,
         blue_expression: str, green_expression: str) -> bool:
    """Do the two generation expressions compute the same thing, as far as text tells?"""
    if normalise(blue_expression) == normalise(green_expression):
        return True
    if green is None:
        return False
    both = canonical(green, table, column, blue_expression, green_expression)
    return both is not None and normalise(both[0]) == normalise(both[1])
