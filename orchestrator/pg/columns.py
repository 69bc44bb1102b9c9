"""Columns in a validation: reading a table's columns, pairing blue's with green's.

Each blue column is paired with the green column holding the same data: the one
of the same name, or the one validate.column_map names. What cannot be paired, a
NOT NULL that green lost, a type or generation expression that changed, becomes
a finding (``findings``); the pairs are what the row comparison (``diff``) reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import psycopg

from orchestrator.pg import generated
from orchestrator.pg.findings import Finding, note, problem
from orchestrator.pg.names import QualifiedName

Side = Literal["blue", "green"]


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type: str  # format_type(), e.g. "character varying(20)"
    base: str  # the built-in base type (domains resolved), '' for non-built-in types
    not_null: bool
    generated: bool
    virtual: bool = False  # generated on read (PostgreSQL 18), not stored
    expression: str = ""  # the generation expression, deparsed (generated.expressions)


@dataclass(frozen=True)
class ColumnPair:
    """A blue column and the green column holding the same data."""

    blue: str
    green: str
    blue_type: str
    green_type: str
    # Built-in base type shared by both sides; '' when the types differ or are not
    # built-in, and the column is then compared through its text form.
    base: str
    nullable: bool  # on either side

    def name(self, side: Side) -> str:
        return self.blue if side == "blue" else self.green

    @property
    def label(self) -> str:
        return self.blue if self.blue == self.green else f"{self.green} (blue {self.blue})"


def column_info(conn: psycopg.Connection[Any], table: QualifiedName) -> list[ColumnInfo]:
    """Columns of the table in order, with the base type of domains resolved."""
    rows = conn.execute(
        """
        SELECT a.attname, format_type(a.atttypid, a.atttypmod),
               CASE WHEN bn.nspname = 'pg_catalog' THEN bt.typname::text ELSE '' END,
               a.attnotnull, a.attgenerated <> '', a.attgenerated = 'v'
        FROM pg_class c
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid
        JOIN pg_type t ON t.oid = a.atttypid
        JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
        JOIN pg_namespace bn ON bn.oid = bt.typnamespace
        WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        (table.schema, table.name),
    ).fetchall()
    exprs = generated.expressions(conn, table.schema, table.name) if any(r[4] for r in rows) else {}
    return [ColumnInfo(r[0], r[1], r[2], bool(r[3]), bool(r[4]), bool(r[5]), exprs.get(r[0], ""))
            for r in rows]


# (green column, blue's generation expression, green's) -> do they compute the same?
SameExpression = Callable[[str, str, str], bool]


def pair_columns(
    table: QualifiedName,
    blue_cols: list[ColumnInfo],
    green_cols: list[ColumnInfo],
    *,
    mapping: dict[str, str],
    ignore: set[str],
    same_expression: SameExpression | None = None,
) -> tuple[list[ColumnPair], list[str], list[Finding]]:
    """Which green column holds each blue column; (pairs, green-only columns, findings).

    ``mapping`` is {green column: blue column} from validate.column_map. Stored
    generated columns are paired like any other (their values are data the
    application reads); virtual ones are not stored, so only their expressions are
    compared (``_generation``). ``same_expression(green column, blue text, green
    text)`` decides whether two generation expressions are the same; by default
    their text, layout aside.
    """
    blue_by = {c.name: c for c in blue_cols}
    green_by = {c.name: c for c in green_cols}
    findings = _check_mapping(table, mapping, blue_by, green_by)
    pairs: list[ColumnPair] = []
    used: set[str] = set()
    same = same_expression or _same_text
    for b, g in _match(blue_cols, green_by, mapping):
        if g is not None:
            used.add(g.name)
        if b.name in ignore:
            if g is not None:
                findings += _generation(table, b, g, same, ignored=True)
            continue
        if g is None:
            findings.append(problem(
                "column", f"{table}.{b.name}",
                f"column {table}.{b.name} is on blue but not on green (if the migration drops "
                "it on purpose, list it in validate.ignore_columns, or map it with "
                "validate.column_map)"))
            continue
        pair, found = _pair(table, b, g, same)
        findings += found
        if pair is not None:
            pairs.append(pair)
    skip = used | ignore
    green_only = [c.name for c in green_cols if c.name not in skip]
    if green_only:
        findings.append(_green_only(table, green_only))
    return pairs, green_only, findings


def _green_only(table: QualifiedName, names: list[str]) -> Finding:
    return note("column", table.display, f"{table}: columns only on green (new in this "
                f"release, not compared): {', '.join(names)}")


def _pair(table: QualifiedName, b: ColumnInfo, g: ColumnInfo, same: SameExpression
          ) -> tuple[ColumnPair | None, list[Finding]]:
    """The pair of two matched columns (None when one is virtual), with its findings."""
    findings = _generation(table, b, g, same, ignored=False)
    if b.virtual or g.virtual:
        return None, findings
    findings += _shape(table, b, g)
    return ColumnPair(
        blue=b.name, green=g.name, blue_type=b.type, green_type=g.type,
        base=b.base if b.type == g.type else "", nullable=not (b.not_null and g.not_null)
    ), findings


def _match(blue_cols: list[ColumnInfo], green_by: dict[str, ColumnInfo],
           mapping: dict[str, str]) -> list[tuple[ColumnInfo, ColumnInfo | None]]:
    """Each blue column with the green column holding its data, None when green has none.

    The mapping wins; otherwise the column of the same name, unless the mapping gave
    that green column to another blue column.
    """
    blue_names = {c.name for c in blue_cols}
    green_for = {b: g for g, b in mapping.items() if g in green_by and b in blue_names}
    taken_on_green = set(green_for.values())
    out: list[tuple[ColumnInfo, ColumnInfo | None]] = []
    for b in blue_cols:
        g_name: str | None = green_for.get(b.name)
        if g_name is None and b.name in green_by and b.name not in taken_on_green:
            g_name = b.name
        out.append((b, green_by[g_name] if g_name is not None else None))
    return out


def _check_mapping(table: QualifiedName, mapping: dict[str, str],
                   blue_by: dict[str, ColumnInfo], green_by: dict[str, ColumnInfo]
                   ) -> list[Finding]:
    """validate.column_map entries naming a column the table does not have."""
    findings: list[Finding] = []
    for mapped_green, mapped_blue in sorted(mapping.items()):
        if mapped_green not in green_by:
            findings.append(problem("config", f"{table}.{mapped_green}",
                                    f"validate.column_map for {table}: green has no column "
                                    f"{mapped_green}"))
        if mapped_blue not in blue_by:
            findings.append(problem("config", f"{table}.{mapped_blue}",
                                    f"validate.column_map for {table}: blue has no column "
                                    f"{mapped_blue}"))
    return findings


def _shape(table: QualifiedName, b: ColumnInfo, g: ColumnInfo) -> list[Finding]:
    """What differs in a stored column's type and NOT NULL between the pair."""
    findings: list[Finding] = []
    if b.type != g.type:
        findings.append(note(
            "column", f"{table}.{g.name}",
            f"{table}.{g.name}: type {b.type} on blue, {g.type} on green; compared by "
            "text form"))
    if b.not_null and not g.not_null:
        findings.append(problem("not_null", f"{table}.{g.name}",
                                f"NOT NULL on {table}.{g.name} is missing on green"))
    elif g.not_null and not b.not_null:
        findings.append(note("not_null", f"{table}.{g.name}",
                             f"{table}.{g.name} is NOT NULL on green only"))
    return findings


def _same_text(_column: str, blue: str, green: str) -> bool:
    return generated.normalise(blue) == generated.normalise(green)


def _how(c: ColumnInfo) -> str:
    return "virtual generated" if c.virtual else "stored generated" if c.generated else \
        "not generated"


def _generation(table: QualifiedName, b: ColumnInfo, g: ColumnInfo, same: SameExpression, *,
                ignored: bool) -> list[Finding]:
    """What differs in how a column is generated; nothing when both sides agree.

    A different expression of a stored column is a note: its values are compared,
    and the rows it computes differently are the problems. A virtual column's values
    are not compared, so there the expression is all that is checked: a problem.
    Columns in validate.ignore_columns (a migration changes them on purpose) get a
    note either way, so an intended change is visible but does not fail.
    """
    obj = f"{table}.{g.name}"
    out: list[Finding] = []
    stored = not (b.virtual or g.virtual)
    values = ("values not compared (in validate.ignore_columns)" if ignored else
              "its stored values are compared" if stored else
              "its values are computed on read and not compared")
    if _how(b) != _how(g):
        out.append(note("generated", obj, f"{obj} is {_how(b)} on blue, {_how(g)} on green; "
                                          f"{values}"))
    if b.generated and g.generated and not same(g.name, b.expression, g.expression):
        hint = ("" if ignored else " (a migration that changes it on purpose: list the column "
                "in validate.ignore_columns)")
        message = (f"generation expression of {obj} differs: blue {b.expression!r}, green "
                   f"{g.expression!r}; {values}{hint}")
        out.append(note("generated", obj, message) if ignored or stored
                   else problem("generated", obj, message))
    return out

