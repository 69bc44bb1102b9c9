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
from typing import Any, Literal

import psycopg

from orchestrator.pg import catalog, generated, sequences
from orchestrator.pg.names import QualifiedName, parse_tables, quote_ident

Severity = Literal["problem", "note"]
Side = Literal["blue", "green"]

_SYSTEM_SCHEMAS = ["pg_catalog", "information_schema", "pg_toast"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    kind: str  # table, column, generated, not_null, index, constraint, sequence, extension, config
    object: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "object": self.object,
                "message": self.message}


def problem(kind: str, obj: str, message: str) -> Finding:
    return Finding("problem", kind, obj, message)


def note(kind: str, obj: str, message: str) -> Finding:
    return Finding("note", kind, obj, message)


# ---------------------------------------------------------------- columns


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
    findings: list[Finding] = []
    blue_by = {c.name: c for c in blue_cols}
    green_by = {c.name: c for c in green_cols}
    for mapped_green, mapped_blue in sorted(mapping.items()):
        if mapped_green not in green_by:
            findings.append(problem("config", f"{table}.{mapped_green}",
                                    f"validate.column_map for {table}: green has no column "
                                    f"{mapped_green}"))
        if mapped_blue not in blue_by:
            findings.append(problem("config", f"{table}.{mapped_blue}",
                                    f"validate.column_map for {table}: blue has no column "
                                    f"{mapped_blue}"))
    green_for = {b: g for g, b in mapping.items() if g in green_by and b in blue_by}
    taken_on_green = set(green_for.values())
    pairs: list[ColumnPair] = []
    used: set[str] = set()
    same = same_expression or _same_text
    for b in blue_cols:
        g_name: str | None = green_for.get(b.name)
        if g_name is None and b.name in green_by and b.name not in taken_on_green:
            g_name = b.name
        if b.name in ignore:
            if g_name is not None:
                used.add(g_name)
                findings += _generation(table, b, green_by[g_name], same, ignored=True)
            continue
        if g_name is None:
            findings.append(problem(
                "column", f"{table}.{b.name}",
                f"column {table}.{b.name} is on blue but not on green (if the migration drops "
                "it on purpose, list it in validate.ignore_columns, or map it with "
                "validate.column_map)"))
            continue
        g = green_by[g_name]
        used.add(g_name)
        findings += _generation(table, b, g, same, ignored=False)
        if b.virtual or g.virtual:
            continue
        same_type = b.type == g.type
        if not same_type:
            findings.append(note(
                "column", f"{table}.{g_name}",
                f"{table}.{g_name}: type {b.type} on blue, {g.type} on green; compared by "
                "text form"))
        if b.not_null and not g.not_null:
            findings.append(problem("not_null", f"{table}.{g_name}",
                                    f"NOT NULL on {table}.{g_name} is missing on green"))
        elif g.not_null and not b.not_null:
            findings.append(note("not_null", f"{table}.{g_name}",
                                 f"{table}.{g_name} is NOT NULL on green only"))
        pairs.append(ColumnPair(
            blue=b.name, green=g_name, blue_type=b.type, green_type=g.type,
            base=b.base if same_type else "", nullable=not (b.not_null and g.not_null)))
    green_only = [c.name for c in green_cols if c.name not in used and c.name not in ignore]
    if green_only:
        findings.append(note("column", table.display,
                             f"{table}: columns only on green (new in this release, not "
                             f"compared): {', '.join(green_only)}"))
    return pairs, green_only, findings


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


def _indexes(conn: psycopg.Connection[Any], skip: list[str], tables: set[QualifiedName]
             ) -> dict[tuple[QualifiedName, str], _Index]:
    rows = conn.execute(_INDEXES, {"skip": skip}).fetchall()
    found = {(QualifiedName(r[0], r[1]), r[2]): _Index(bool(r[3]), bool(r[4]), str(r[5]))
             for r in rows}
    return {k: v for k, v in found.items() if k[0] in tables}


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
    rows = conn.execute(_CONSTRAINTS, {"skip": skip}).fetchall()
    found = {(QualifiedName(r[0], r[1]), r[2]): _Constraint(str(r[3]), bool(r[4]), str(r[5]))
             for r in rows}
    return {k: v for k, v in found.items() if k[0] in tables}


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
