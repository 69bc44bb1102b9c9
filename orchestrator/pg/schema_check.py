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
from typing import Any, Generic, Literal, Protocol, TypeVar

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
    "CONSTRAINT_CHECK", "CONSTRAINT_KINDS", "INDEX_CHECK", "ColumnInfo", "ColumnPair",
    "Finding", "NamedCheck", "SameExpression", "SequenceResult", "Severity", "Side",
    "check_by_name", "check_extensions", "check_sequences", "check_tables", "column_info",
    "note", "pair_columns", "problem",
]

_T = TypeVar("_T")

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


class _Defined(Protocol):
    @property
    def definition(self) -> str: ...


_D = TypeVar("_D", bound=_Defined)


@dataclass(frozen=True)
class NamedCheck(Generic[_D]):
    """How one kind of object is read, named and compared when matching by name."""

    section: str
    # schema, table, name, then the object's own columns, built into one by ``make``.
    query: str
    make: Callable[[tuple[Any, ...]], _D]
    # Whether green's object under another name is blue's, renamed by a migration.
    alike: Callable[[_D, _D], bool]
    # The object in findings: ``obj`` the key, ``label`` the words of a message.
    obj: Callable[[QualifiedName, str], str]
    label: Callable[[QualifiedName, str, _D], str]
    # Findings for an object both sides have: table, name, label, obj, blue's, green's.
    differ: Callable[[QualifiedName, str, str, str, _D, _D], list[Finding]]


def check_by_name(kind: NamedCheck[_D], blue: psycopg.Connection[Any],
                  green: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...],
                  tables: set[QualifiedName]) -> list[Finding]:
    """Objects of ``tables`` (indexes: ``INDEX_CHECK``, constraints: ``CONSTRAINT_CHECK``)
    matched by table and name: what blue has and green lacks
    is a problem unless green has it under another name (a note), what both have is
    compared, and what only green has is a note."""
    skip = [*catalog.SYSTEM_SCHEMAS, *exclude_schemas]

    def by_table_and_name(conn: psycopg.Connection[Any]) -> dict[tuple[QualifiedName, str], _D]:
        rows = conn.execute(kind.query, {"skip": skip}).fetchall()
        found = {(QualifiedName(r[0], r[1]), r[2]): kind.make(tuple(r[3:])) for r in rows}
        return {k: v for k, v in found.items() if k[0] in tables}

    b, g = by_table_and_name(blue), by_table_and_name(green)
    out: list[Finding] = []
    renamed: set[tuple[QualifiedName, str]] = set()
    for (table, name), bo in sorted(b.items()):
        obj, label = kind.obj(table, name), kind.label(table, name, bo)
        go = g.get((table, name))
        if go is not None:
            out += kind.differ(table, name, label, obj, bo, go)
            continue
        same = sorted(n for (t, n), x in g.items()
                      if t == table and (t, n) not in b and kind.alike(bo, x))
        if same:
            renamed.add((table, same[0]))
            out.append(note(kind.section, obj, f"{label} exists on green as {same[0]}"))
        else:
            out.append(problem(kind.section, obj,
                               f"{label} is missing on green ({bo.definition})"))
    for table, name in sorted(set(g) - set(b) - renamed):
        out.append(note(kind.section, kind.obj(table, name),
                        f"{kind.label(table, name, g[table, name])} exists only on green"))
    return out


class _Validated(_Defined, Protocol):
    @property
    def valid(self) -> bool: ...


def _differs(section: str, obj: str, label: str, blue: _Validated, green: _Validated, *,
             invalid: str, mismatch: str | None) -> list[Finding]:
    """What an index and a constraint share: not valid on green is a problem; then a
    ``mismatch`` of kind is a problem, else another definition a note."""
    out: list[Finding] = []
    if blue.valid and not green.valid:
        out.append(problem(section, obj, f"{label} {invalid}"))
    if mismatch is not None:
        out.append(problem(section, obj, mismatch))
    elif blue.definition != green.definition:
        out.append(note(section, obj, f"{label} differs: blue "
                                      f"{blue.definition!r}, green {green.definition!r}"))
    return out


def _index_differs(_table: QualifiedName, _name: str, label: str, obj: str, bi: _Index,
                   gi: _Index) -> list[Finding]:
    return _differs("index", obj, label, bi, gi,
                    invalid="is not valid on green (a failed CREATE INDEX CONCURRENTLY "
                            "leaves it so; drop and recreate it)",
                    mismatch=(f"{label} is unique on blue but not on green"
                              if bi.unique and not gi.unique else None))


INDEX_CHECK = NamedCheck(
    "index", _INDEXES, make=lambda r: _Index(bool(r[0]), bool(r[1]), str(r[2])),
    alike=lambda x, y: x.definition == y.definition,
    # Indexes live in their table's schema: schema.index names the object.
    obj=lambda table, name: table.child(name).display,
    label=lambda table, name, _: f"index {name} on {table}",
    differ=_index_differs)


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


def _constraint_differs(table: QualifiedName, name: str, label: str, obj: str,
                        bc: _Constraint, gc: _Constraint) -> list[Finding]:
    return _differs("constraint", obj, label, bc, gc,
                    invalid=f"is NOT VALID on green (run ALTER TABLE {table} VALIDATE "
                            f"CONSTRAINT {quote_ident(name)})",
                    mismatch=(f"{name} on {table} is a "
                              f"{CONSTRAINT_KINDS.get(bc.kind, 'constraint')} on blue but a "
                              f"{CONSTRAINT_KINDS.get(gc.kind, gc.kind)} on green"
                              if gc.kind != bc.kind else None))


CONSTRAINT_CHECK = NamedCheck(
    "constraint", _CONSTRAINTS, make=lambda r: _Constraint(str(r[0]), bool(r[1]), str(r[2])),
    alike=lambda x, y: x.kind == y.kind and x.definition == y.definition,
    obj=lambda table, name: f"{table}.{quote_ident(name)}",
    label=lambda table, name, c: f"{CONSTRAINT_KINDS.get(c.kind, 'constraint')} {name} on {table}",
    differ=_constraint_differs)


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
