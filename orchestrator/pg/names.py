"""Names of database objects as types, never as dotted text.

A table is identified by its schema and its name, each any string PostgreSQL
allows (mixed case, spaces, quotes, dots, unicode). Text such as ``a.b.c`` cannot
say whether it means ``"a.b"."c"`` or ``"a"."b.c"``, and SQL built from it folds
case, so names travel as ``QualifiedName`` and reach SQL only through
``sql.Identifier`` (or ``format('%I')`` on the server).

The one place text is read back into names is the config (``sync.exclude_tables``,
``validate.column_map``, ``validate.ignore_columns``): ``parse_qualified``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from psycopg import sql
from psycopg.abc import AdaptContext

# Keywords PostgreSQL's quote_ident() quotes (every category but unreserved), the
# union over the supported majors (15-18): pg_get_keywords() WHERE catcode <> 'U'.
# A word quoted needlessly on an older major is still read back as the same name.
_KEYWORDS = """
    all analyse analyze and any array as asc asymmetric authorization between bigint
    binary bit boolean both case cast char character check coalesce collate collation
    column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user dec decimal
    default deferrable desc distinct do else end except exists extract false fetch float
    for foreign freeze from full grant greatest group grouping having ilike in initially
    inner inout int integer intersect interval into is isnull join json json_array
    json_arrayagg json_exists json_object json_objectagg json_query json_scalar
    json_serialize json_table json_value lateral leading least left like limit localtime
    localtimestamp merge_action national natural nchar none normalize not notnull null
    nullif numeric offset on only or order out outer overlaps overlay placing position
    precision primary real references returning right row select session_user setof
    similar smallint some substring symmetric system_user table tablesample then time
    timestamp to trailing treat trim true union unique user using values varchar
    variadic verbose when where window with xmlattributes xmlconcat xmlelement xmlexists
    xmlforest xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable
"""
_QUOTED_KEYWORDS = frozenset(_KEYWORDS.split())

_SAFE_FIRST = frozenset("abcdefghijklmnopqrstuvwxyz_")
_SAFE = _SAFE_FIRST | frozenset("0123456789")


def quote_ident(name: str) -> str:
    """``name`` as PostgreSQL's quote_ident() writes it: bare only when that reads back
    as the same name (lower-case ASCII, digits, underscores, not a keyword)."""
    if (name and name[0] in _SAFE_FIRST and all(ch in _SAFE for ch in name)
            and name not in _QUOTED_KEYWORDS):
        return name
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified object name (table, sequence, index, ...)."""

    schema: str
    name: str

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def display(self) -> str:
        """For people and for pasting into psql: quoted the way PostgreSQL quotes."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def __str__(self) -> str:
        return self.display

    def __format__(self, spec: str) -> str:
        return format(self.display, spec)

    def child(self, name: str) -> QualifiedName:
        """Another object in the same schema (an index of this table, say)."""
        return QualifiedName(self.schema, name)


@dataclass(frozen=True, order=True)
class ColumnRef:
    """A column of a table: what a sequence is owned by."""

    table: QualifiedName
    column: str

    @property
    def display(self) -> str:
        return f"{self.table.display}.{quote_ident(self.column)}"

    def __str__(self) -> str:
        return self.display


class BadName(ValueError):
    """A config entry that does not read as schema.table."""


def parse_qualified(text: str) -> QualifiedName:
    """``schema.table`` from the config, with SQL's double quotes where a part holds a
    dot or a double quote: ``"my.schema"."t"``, or ``public."a ""b"" c"`` for the table
    named a "b" c.

    Unquoted parts are taken exactly as written, not folded to lower case: that is
    how these entries have always matched (``public.Users`` names the table
    ``"Users"``), and a config must keep meaning what it meant.
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            buf: list[str] = []
            i += 1
            while True:
                j = text.find('"', i)
                if j < 0:
                    raise BadName(f"{text!r}: a double quote is not closed")
                buf.append(text[i:j])
                if j + 1 < n and text[j + 1] == '"':
                    buf.append('"')
                    i = j + 2
                    continue
                i = j + 1
                break
            part = "".join(buf)
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            part = text[i:j]
            if '"' in part:
                raise BadName(f"{text!r}: a double quote inside an unquoted name; quote "
                                 'the whole part and double the quote ("a""b")')
            i = j
        if not part:
            raise BadName(f"{text!r}: an empty name; write schema.table")
        parts.append(part)
        if i == n:
            break
        if text[i] != ".":
            raise BadName(f"{text!r}: expected a dot after the quoted name {part!r}")
        i += 1
        if i == n:
            raise BadName(f"{text!r}: ends with a dot; write schema.table")
    if len(parts) != 2:
        raise BadName(
            f"{text!r}: reads as {len(parts)} name(s), expected schema.table; quote a "
            'part that contains a dot: "my.schema".table')
    return QualifiedName(parts[0], parts[1])


def parse_tables(items: Iterable[str | QualifiedName]) -> frozenset[QualifiedName]:
    return frozenset(i if isinstance(i, QualifiedName) else parse_qualified(i) for i in items)


def unnest_params(pairs: Iterable[Sequence[str]]) -> tuple[list[str], list[str]]:
    """(schema, table) pairs as the two parallel text arrays that
    ``unnest(%s::text[], %s::text[])`` takes: one round trip for any number of tables."""
    listed = list(pairs)
    return [p[0] for p in listed], [p[1] for p in listed]


def with_params(query: sql.Composable, context: AdaptContext | None) -> sql.Composed:
    """``query`` ready to run with parameters (even an empty list of them).

    psycopg looks for placeholders in the whole rendered text, quoted names and
    literals included, so a name holding ``%`` (``"50%"``, ``"a%sb"``) breaks the
    query or, worse, shifts its parameters: psycopg/psycopg2#825, still so in
    psycopg 3. Inside names and literals every ``%`` is doubled, which psycopg turns
    back into one ``%`` when it binds the parameters.
    """
    return sql.Composed(_percent_safe(query, context))


def _percent_safe(query: sql.Composable, context: AdaptContext | None
                  ) -> list[sql.Composable]:
    if isinstance(query, sql.Composed):
        return [p for part in query for p in _percent_safe(part, context)]
    if isinstance(query, (sql.Identifier, sql.Literal)):
        text = query.as_string(context)
        return [sql.SQL(text.replace("%", "%%")) if "%" in text else query]
    return [query]
