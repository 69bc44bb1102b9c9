"""Schema checks of a validation: is everything blue has also on green, and valid?

Tables, columns (with NOT NULL), indexes, constraints (primary key, unique, FOREIGN
KEY, CHECK, exclusion), sequences and extensions. Whatever blue has and green lacks,
or holds invalid (an index left invalid by a failed CREATE INDEX CONCURRENTLY, a
constraint added NOT VALID and never validated), is a *problem*: the release fails.
Whatever only green has is a *note*: a migration adds things on purpose.

Objects are matched by name, which pg_dump and the migration keep. When a name is
missing on green but an object with the same definition exists under another name
(a migration renamed an index), that is a note, not a problem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import psycopg

from orchestrator.pg import catalog, sequences

# Columns are read and paired in their own module; their names stay importable here.
from orchestrator.pg.columns import (
    ColumnInfo,
    ColumnPair,
    SameExpression,
    Side,
    column_info,
    pair_columns,
)
from orchestrator.pg.findings import Finding, Severity, note, problem
from orchestrator.pg.names import QualifiedName, parse_tables, quote_ident

__all__ = [
    "CONSTRAINT_KINDS", "ColumnInfo", "ColumnPair", "Finding", "SameExpression",
    "SequenceResult", "Severity", "Side", "check_constraints", "check_extensions",
    "check_indexes", "check_sequences", "check_tables", "column_info", "note",
    "pair_columns", "problem",
]

_T = TypeVar("_T")

_SYSTEM_SCHEMAS = ["pg_catalog", "information_schema", "pg_toast"]


# ---------------------------------------------------------------- tables


def check_tables(blue: list[catalog.Table], green: list[catalog.Table]) -> list[Finding]:
    b = {t.qname for t in blue}
    g = {t.qname for t in green}
    out = [problem("table", name.display, f"table {name} is on blue but not on green")
           for name in sorted(b - g)]
    out += [note("table", name.display, f"table {name} exists only on green (new in this "
                 "release)") for name in sorted(g - b)]
    return out


# ---------------------------------------------------------------- indexes

_INDEXES = """
    SELECT n.nspname, t.relname, i.relname, ix.indisvalid AND ix.indisready,
           ix.indisunique,
           replace(pg_get_indexdef(ix.indexrelid), 'INDEX ' || quote_ident(i.relname) || ' ON ',
                   'INDEX ON ')
    FROM pg_index ix
    JOIN pg_class i ON i.oid = ix.indexrelid
    JOIN pg_class t ON t.oid = ix.indrelid
    JOIN pg_namespace n ON n.oid = t.relnamespace
    WHERE n.nspname <> ALL(%(skip)s) AND n.nspname NOT LIKE 'pg\\_%%'
      -- An index that implements a constraint is checked as the constraint.
      AND NOT EXISTS (SELECT 1 FROM pg_constraint x
                      WHERE x.conindid = ix.indexrelid AND x.conrelid = ix.indrelid
                        AND x.contype IN ('p', 'u', 'x'))
"""


@dataclass(frozen=True)
class _Index:
    valid: bool
    unique: bool
    definition: str  # without the index name


def _by_table_and_name(conn: psycopg.Connection[Any], query: str, skip: list[str],
                       tables: set[QualifiedName], make: Callable[[tuple[Any, ...]], _T]
                       ) -> dict[tuple[QualifiedName, str], _T]:
    """Rows of ``query`` (schema, table, name, then the object's own columns) of
    ``tables`` only, keyed by table and name; ``make`` builds the object from the rest."""
    rows = conn.execute(query, {"skip": skip}).fetchall()
    found = {(QualifiedName(r[0], r[1]), r[2]): make(tuple(r[3:])) for r in rows}
    return {k: v for k, v in found.items() if k[0] in tables}


def _indexes(conn: psycopg.Connection[Any], skip: list[str], tables: set[QualifiedName]
             ) -> dict[tuple[QualifiedName, str], _Index]:
    return _by_table_and_name(conn, _INDEXES, skip, tables,
                              lambda r: _Index(bool(r[0]), bool(r[1]), str(r[2])))


def check_indexes(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], *,
                  exclude_schemas: tuple[str, ...], tables: set[QualifiedName]
                  ) -> list[Finding]:
    """Indexes of ``tables`` (on both sides) compared by name."""
    skip = _SYSTEM_SCHEMAS + list(exclude_schemas)
    b = _indexes(blue, skip, tables)
    g = _indexes(green, skip, tables)
    out: list[Finding] = []
    renamed: set[tuple[QualifiedName, str]] = set()
    for (table, name), bi in sorted(b.items()):
        # Indexes live in their table's schema: schema.index names the object.
        obj = table.child(name).display
        gi = g.get((table, name))
        if gi is None:
            same = sorted(n for (t, n), x in g.items()
                          if t == table and x.definition == bi.definition and (t, n) not in b)
            if same:
                renamed.add((table, same[0]))
                out.append(note("index", obj, f"index {name} on {table} exists on green as "
                                              f"{same[0]}"))
            else:
                out.append(problem("index", obj, f"index {name} on {table} is missing on green "
                                                 f"({bi.definition})"))
            continue
        if bi.valid and not gi.valid:
            out.append(problem("index", obj,
                               f"index {name} on {table} is not valid on green (a failed "
                               "CREATE INDEX CONCURRENTLY leaves it so; drop and recreate it)"))
        if bi.unique and not gi.unique:
            out.append(problem("index", obj,
                               f"index {name} on {table} is unique on blue but not on green"))
        elif bi.definition != gi.definition:
            out.append(note("index", obj, f"index {name} on {table} differs: blue "
                                          f"{bi.definition!r}, green {gi.definition!r}"))
    for table, name in sorted(set(g) - set(b) - renamed):
        out.append(note("index", table.child(name).display,
                        f"index {name} on {table} exists only on green"))
    return out


# ---------------------------------------------------------------- constraints

CONSTRAINT_KINDS = {"p": "primary key", "f": "foreign key", "c": "check constraint",
                    "u": "unique constraint", "x": "exclusion constraint",
                    "t": "constraint trigger"}

# NOT NULL is checked per column (attnotnull): PostgreSQL 18 also records it as a
# constraint (contype 'n'), older majors do not, so comparing those would only add noise.
_CONSTRAINTS = """
    SELECT n.nspname, c.relname, x.conname, x.contype::text, x.convalidated,
           pg_get_constraintdef(x.oid)
    FROM pg_constraint x
    JOIN pg_class c ON c.oid = x.conrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname <> ALL(%(skip)s) AND n.nspname NOT LIKE 'pg\\_%%'
      AND x.contype IN ('p', 'f', 'c', 'u', 'x', 't')
"""


@dataclass(frozen=True)
class _Constraint:
    kind: str
    valid: bool
    definition: str


def _constraints(conn: psycopg.Connection[Any], skip: list[str], tables: set[QualifiedName]
                 ) -> dict[tuple[QualifiedName, str], _Constraint]:
    return _by_table_and_name(conn, _CONSTRAINTS, skip, tables,
                              lambda r: _Constraint(str(r[0]), bool(r[1]), str(r[2])))


def check_constraints(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], *,
                      exclude_schemas: tuple[str, ...], tables: set[QualifiedName]
                      ) -> list[Finding]:
    skip = _SYSTEM_SCHEMAS + list(exclude_schemas)
    b = _constraints(blue, skip, tables)
    g = _constraints(green, skip, tables)
    out: list[Finding] = []
    renamed: set[tuple[QualifiedName, str]] = set()
    for (table, name), bc in sorted(b.items()):
        what = CONSTRAINT_KINDS.get(bc.kind, "constraint")
        obj = f"{table}.{quote_ident(name)}"
        gc = g.get((table, name))
        if gc is None:
            same = sorted(n for (t, n), x in g.items() if t == table and (t, n) not in b
                          and x.kind == bc.kind and x.definition == bc.definition)
            if same:
                renamed.add((table, same[0]))
                out.append(note("constraint", obj,
                                f"{what} {name} on {table} exists on green as {same[0]}"))
            else:
                out.append(problem("constraint", obj, f"{what} {name} on {table} is missing on "
                                                      f"green ({bc.definition})"))
            continue
        if bc.valid and not gc.valid:
            out.append(problem("constraint", obj,
                               f"{what} {name} on {table} is NOT VALID on green (run ALTER TABLE "
                               f"{table} VALIDATE CONSTRAINT {quote_ident(name)})"))
        if gc.kind != bc.kind:
            out.append(problem("constraint", obj, f"{name} on {table} is a {what} on blue but a "
                               f"{CONSTRAINT_KINDS.get(gc.kind, gc.kind)} on green"))
        elif gc.definition != bc.definition:
            out.append(note("constraint", obj, f"{what} {name} on {table} differs: blue "
                                               f"{bc.definition!r}, green {gc.definition!r}"))
    for key in sorted(set(g) - set(b) - renamed):
        gc = g[key]
        out.append(note("constraint", f"{key[0]}.{quote_ident(key[1])}",
                        f"{CONSTRAINT_KINDS.get(gc.kind, 'constraint')} {key[1]} on {key[0]} "
                        "exists only on green"))
    return out


# ---------------------------------------------------------------- extensions


def check_extensions(blue: psycopg.Connection[Any], green: psycopg.Connection[Any]
                     ) -> list[Finding]:
    b = catalog.extensions(blue)
    g = catalog.extensions(green)
    out: list[Finding] = []
    for name in sorted(b):
        if name not in g:
            out.append(problem("extension", name, f"extension {name} ({b[name]}) is on blue but "
                                                  "not on green"))
        elif g[name] != b[name]:
            out.append(note("extension", name, f"extension {name} is version {b[name]} on blue, "
                                               f"{g[name]} on green"))
    out += [note("extension", name, f"extension {name} exists only on green")
            for name in sorted(set(g) - set(b))]
    return out


# ---------------------------------------------------------------- sequences


@dataclass(frozen=True)
class SequenceResult:
    sequence: str  # as PostgreSQL quotes it (QualifiedName.display)
    blue: int | None
    green: int | None
    status: Literal["ahead", "equal", "behind", "missing"]

    def as_dict(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "blue": self.blue, "green": self.green,
                "status": self.status}


def check_sequences(blue: psycopg.Connection[Any], green: psycopg.Connection[Any], *,
                    exclude_schemas: tuple[str, ...],
                    exclude_tables: Iterable[str | QualifiedName],
                    expect_ahead: bool) -> tuple[list[SequenceResult], list[Finding]]:
    """Green's sequences against blue's.

    Logical replication does not carry sequences: before green takes writes orchestrate
    moves them past blue. Until then "behind" is expected (a note); once green takes
    writes (``expect_ahead``) a sequence behind blue would hand out keys blue already
    used, which is a problem.
    """
    meta = {s.qname: s for s in catalog.sequences(blue, exclude_schemas=exclude_schemas)}
    excluded = parse_tables(exclude_tables)
    results: list[SequenceResult] = []
    out: list[Finding] = []
    for name, b, g in sequences.compare(blue, green, exclude_schemas=exclude_schemas):
        owner = meta[name].owned_by if name in meta else None
        if owner and owner.table in excluded:
            continue
        if g is None:
            results.append(SequenceResult(name.display, b, g, "missing"))
            out.append(problem("sequence", name.display,
                               f"sequence {name} is on blue but not on green"))
            continue
        up = meta[name].increment >= 0 if name in meta else True
        if b is None or g == b:
            status: Literal["ahead", "equal", "behind", "missing"] = "equal"
        elif (g > b) == up:
            status = "ahead"
        else:
            status = "behind"
        results.append(SequenceResult(name.display, b, g, status))
        if status == "behind":
            if expect_ahead:
                out.append(problem("sequence", name.display,
                                   f"sequence {name} on green ({g}) is behind blue ({b}): green "
                                   "would hand out values blue already used"))
            else:
                out.append(note("sequence", name.display,
                                f"sequence {name} on green ({g}) is behind blue ({b}); it is "
                                "moved past blue before green takes writes"))
    return results, out
