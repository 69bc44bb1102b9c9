"""Hostile identifiers through every SQL builder, against a real PostgreSQL 17.

Names with mixed case, spaces, quotes, dots, backslashes, keywords, unicode and up
to 63 bytes (PostgreSQL truncates longer names) are created in two throwaway
databases, then read back by the catalog and run through the builders a release
uses: sequence move, validation (counts, checksums, bisection, row diffs, schema
checks), publications and their column lists, the fence, the SQL ``orchestrate plan``
prints and the names preflight prints. One server per module; a bounded number of
examples, so that this runs in scripts/test.sh.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from orchestrator.config import DatabaseConfig, ValidateConfig
from orchestrator.pg import catalog, fence, replication, sequences, validate
from orchestrator.pg.names import (
    BadName,
    ColumnRef,
    QualifiedName,
    parse_qualified,
    parse_tables,
    quote_ident,
)
from orchestrator.sandbox.pgcluster import PgCluster

CONTROL = "orchestrate"
BLUE, GREEN = "ids_blue", "ids_green"

# Characters that break naive quoting or splitting, and a few that need UTF-8.
_HOSTILE = [*'aZq_09 ."\'\\$%;-()\t', "é", "ß", "Å", "日", "本", "ﬁ", "🙂", "İ"]
_WORDS = ["select", "user", "Table", "order", "json", "a.b", 'x"y', "a\\b", "public.x",
          "a" * 63, "É" * 31 + "x", "Users", "My.Schema", " lead", "trail ", "50%", "a%sb"]


def _fits(name: str) -> bool:
    return 0 < len(name.encode()) <= 63


identifiers = st.one_of(
    st.sampled_from(_WORDS),
    st.text(alphabet=st.sampled_from(_HOSTILE), min_size=1, max_size=24),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
            min_size=1, max_size=20),
).filter(_fits)

# Schema and role names starting with pg_ are reserved; the others are in use.
schema_names = identifiers.filter(
    lambda s: not s.startswith("pg_") and s not in {"public", "information_schema", CONTROL})
role_names = identifiers.filter(
    lambda s: not s.lower().startswith("pg_") and s not in {"postgres", "public", "none"})


@pytest.fixture(scope="module")
def pg(module_sandbox_dir: Path) -> Iterator[PgCluster]:
    with PgCluster("ids", 17, module_sandbox_dir) as cluster:
        for db in (BLUE, GREEN):
            cluster.create_database(db)
        yield cluster


def _db(pg: PgCluster, dbname: str, tmp: Path) -> DatabaseConfig:
    secret = tmp / "pw"
    secret.write_text(pg.password)
    secret.chmod(0o600)
    return DatabaseConfig(host=pg.host, port=pg.port, dbname=dbname, user=pg.superuser,
                          password={"file": str(secret)}, sslmode="disable")


def _conn(pg: PgCluster, dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(pg.conninfo(dbname), autocommit=True)


@pytest.fixture(scope="module")
def conn(pg: PgCluster) -> Iterator[psycopg.Connection[Any]]:
    with _conn(pg, BLUE) as c:
        yield c


# ---------------------------------------------------------------- no server needed


@settings(max_examples=500, deadline=None, database=None)
@given(identifiers, identifiers)
def test_display_parses_back_to_the_same_name(schema: str, name: str) -> None:
    q = QualifiedName(schema, name)
    assert parse_qualified(q.display) == q
    assert parse_tables([q.display, q]) == {q}


def test_config_entries_read_as_written_and_refuse_what_is_ambiguous() -> None:
    assert parse_qualified("public.Users") == QualifiedName("public", "Users")
    assert parse_qualified('"my.schema"."t"') == QualifiedName("my.schema", "t")
    assert parse_qualified('"my.schema".t') == QualifiedName("my.schema", "t")
    assert parse_qualified('public."a ""b"" c"') == QualifiedName("public", 'a "b" c')
    assert parse_qualified("my schema.my table") == QualifiedName("my schema", "my table")
    for bad in ("t", "a.b.c", '"a.b', 'a"b.c', "a..b", "a.", '"".t', '"a"x.t'):
        with pytest.raises(BadName):
            parse_qualified(bad)


def test_a_config_with_an_ambiguous_table_name_is_refused_at_load() -> None:
    from orchestrator.config import SyncConfig

    assert SyncConfig(exclude_tables=['"my.schema".t']).exclude_tables == ['"my.schema".t']
    with pytest.raises(ValueError, match="quote a part that contains a dot"):
        SyncConfig(exclude_tables=["my.schema.t"])
    with pytest.raises(ValueError, match=r"expected schema\.table"):
        ValidateConfig(ignore_columns={"orders": ["x"]})


release_texts = st.one_of(
    st.from_regex(r"\A[a-z0-9]([a-z0-9_-]{0,46}[a-z0-9])?\Z"),  # what the config allows
    st.text(max_size=80),
)
_SLOT = re.compile(r"[a-z0-9_]{1,63}")


@settings(max_examples=300, deadline=None, database=None)
@given(release_texts, release_texts)
def test_replication_names_are_valid_and_distinct(a: str, b: str) -> None:
    for release in (a, b):
        fwd, rev = replication.forward(release), replication.reverse(release)
        for name in (fwd.slot, rev.slot):
            assert _SLOT.fullmatch(name), name
            assert name.startswith(replication.SLOT_PREFIX)
        assert fwd.slot != rev.slot
    if a != b:
        assert {replication.forward(a).slot, replication.reverse(a).slot}.isdisjoint(
            {replication.forward(b).slot, replication.reverse(b).slot})


def test_replication_names_that_collided_before_are_distinct_and_plain_ones_unchanged() -> None:
    assert replication.forward("resume").slot == "orch_resume_fwd"
    assert replication.forward("demo-release").slot == "orch_demo_release_fwd"
    pairs = [("a-b", "a_b"), ("x" * 40 + "-one", "x" * 40 + "-two"), ("Rel", "rel")]
    for a, b in pairs:
        assert replication.forward(a).slot != replication.forward(b).slot


# ---------------------------------------------------------------- against PostgreSQL


def test_display_quotes_like_quote_ident_for_every_keyword(
        conn: psycopg.Connection[Any]) -> None:
    words = [r[0] for r in conn.execute("SELECT word FROM pg_get_keywords()")]
    quoted = conn.execute("SELECT array_agg(quote_ident(w) ORDER BY o) "
                          "FROM unnest(%s::text[]) WITH ORDINALITY AS u(w, o)",
                          (words,)).fetchone()
    assert quoted is not None
    assert [quote_ident(w) for w in words] == quoted[0]


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(identifiers, min_size=1, max_size=20))
def test_display_quotes_like_the_server(conn: psycopg.Connection[Any], names: list[str]
                                        ) -> None:
    row = conn.execute("SELECT array_agg(quote_ident(n) ORDER BY o) "
                       "FROM unnest(%s::text[]) WITH ORDINALITY AS u(n, o)",
                       (names,)).fetchone()
    assert row is not None
    assert [quote_ident(n) for n in names] == row[0]


def _create(conn: psycopg.Connection[Any], s: str, t: str, c: str, v: str, q: str,
            rows: list[tuple[str, int]]) -> None:
    ident = sql.Identifier
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident(s)))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident(s)))
    # The sequence first: the names PostgreSQL picks for the key's index and the
    # identity's sequence then avoid it.
    conn.execute(sql.SQL("CREATE SEQUENCE {}").format(ident(s, q)))
    conn.execute(sql.SQL(
        "CREATE TABLE {t} ({c} int PRIMARY KEY DEFAULT nextval({qt}), {v} text, "
        "{w} bigint GENERATED BY DEFAULT AS IDENTITY)").format(
        t=ident(s, t), c=ident(c), v=ident(v),
        w=ident(next(n for n in ("Id w", "Id w2", "Id w3") if n not in {c, v})),
        qt=sql.Literal(ident(s, q).as_string(conn))))
    conn.execute(sql.SQL("ALTER SEQUENCE {} OWNED BY {}").format(ident(s, q), ident(s, t, c)))
    for text, n in rows:
        for _ in range(n):
            conn.execute(sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
                ident(s, t), ident(v), sql.Literal(text)))


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=schema_names, table=identifiers, col=identifiers, val=identifiers,
       seq=identifiers, role=role_names)
def test_every_builder_round_trips_hostile_names(
    pg: PgCluster, tmp_path: Path, schema: str, table: str, col: str, val: str, seq: str,
    role: str,
) -> None:
    if col == val or seq == table:
        return
    qn = QualifiedName(schema, table)
    sq = QualifiedName(schema, seq)
    blue_db, green_db = _db(pg, BLUE, tmp_path), _db(pg, GREEN, tmp_path)
    with _conn(pg, BLUE) as blue, _conn(pg, GREEN) as green:
        try:
            _create(blue, schema, table, col, val, seq, [("x", 3)])
            _create(green, schema, table, col, val, seq, [("x", 2), ("changed", 1)])

            # The catalog reads them back as names, whatever they hold.
            (t,) = [x for x in catalog.user_tables(blue, exclude_schemas=(CONTROL,))
                    if x.qname == qn]
            assert t.key == [col]
            assert [c.name for c in t.columns][:2] == [col, val]
            owned = {s.qname: s.owned_by for s in catalog.sequences(blue)}
            assert owned[sq] == ColumnRef(qn, col)
            assert catalog.user_tables(blue, exclude_tables=[qn.display]) == [
                x for x in catalog.user_tables(blue) if x.qname != qn]

            # What people read (preflight, reports) pastes back into psql.
            regclass = blue.execute(f"SELECT '{qn.display.replace(chr(39), chr(39) * 2)}'"
                                    "::regclass::oid").fetchone()
            expected = blue.execute(sql.SQL("SELECT {}::regclass::oid").format(
                sql.Literal(qn.ident.as_string(blue)))).fetchone()
            assert regclass == expected
            blue.execute(f"ALTER TABLE {qn} REPLICA IDENTITY FULL")
            blue.execute(f"ALTER TABLE {qn} REPLICA IDENTITY DEFAULT")

            # What `orchestrate plan` prints runs as it is.
            cols = [col, val]
            for checksums in (True, False):
                blue.execute(validate.checksum_sql(qn, cols, checksums).as_string(None))
            pub = "orch_ids_pub"
            blue.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(pub)))
            blue.execute(replication.publication_sql(pub, [t], {qn: [col, val]}).as_string(None))
            replication.ensure_publication(blue, pub, [t], {qn: [col]})
            published = blue.execute("SELECT schemaname, tablename, attnames "
                                     "FROM pg_publication_tables WHERE pubname = %s",
                                     (pub,)).fetchall()
            assert published == [(schema, table, [col])]
            replication.drop_publication(blue, pub)

            # Validation: counts, checksums, bisection and the differing row by key.
            report = validate.validate(blue_db, green_db, ValidateConfig(),
                                       control_schema=CONTROL)
            (result,) = [r for r in report.tables if r.table == qn.display]
            assert [d.kind for d in result.diffs] == ["changed"]
            assert result.diffs[0].changes == {val: ("x", "changed")}
            assert not [p for p in report.problems if not p.startswith(str(qn))]
            assert {s.sequence for s in report.sequences} >= {sq.display}

            # Sequences move past the other side's value: the setval of defect 2.
            moves = {m.sequence: m for m in sequences.sync_past(blue, green, margin=100)}
            assert moves[sq].source_value == 3 and moves[sq].after == 103
            values = {n: (b, g) for n, b, g in sequences.compare(blue, green)}
            assert values[sq] == (3, 103)
            assert green.execute(sql.SQL("SELECT nextval({})").format(
                sql.Literal(sq.ident.as_string(green)))).fetchone() == (104,)

            # The fence: ALTER ROLE .. IN DATABASE and back.
            blue.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            blue.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
            settings_of = ("SELECT s.setconfig FROM pg_db_role_setting s "
                           "JOIN pg_roles r ON r.oid = s.setrole "
                           "JOIN pg_database d ON d.oid = s.setdatabase "
                           "WHERE r.rolname = %s AND d.datname = %s")
            fence.fence(blue, role)
            assert blue.execute(settings_of, (role, BLUE)).fetchone() == (
                ["default_transaction_read_only=on"],)
            blue.execute(fence.fence_sql(role, BLUE).as_string(None))
            fence.unfence(blue, role)
            assert blue.execute(settings_of, (role, BLUE)).fetchone() is None
        finally:
            for conn in (blue, green):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(schema)))
            blue.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_percent_in_a_name_does_not_become_a_placeholder(conn: psycopg.Connection[Any]
                                                           ) -> None:
    from orchestrator.pg.names import with_params

    conn.execute('CREATE TEMP TABLE "t%s" ("a%sb" int, "50%" text)')
    query = sql.SQL("INSERT INTO {} ({}, {}) VALUES (%s, {}) RETURNING {}").format(
        sql.Identifier("t%s"), sql.Identifier("a%sb"), sql.Identifier("50%"),
        sql.Literal("x%sy"), sql.Identifier("50%"))
    with pytest.raises(psycopg.ProgrammingError):
        conn.execute(query, (1,))  # what psycopg does on its own
    assert conn.execute(with_params(query, conn), (1,)).fetchone() == ("x%sy",)
    assert conn.execute('SELECT "a%sb" FROM "t%s"').fetchone() == (1,)


def test_mixed_case_serial_sequences_move_past_the_other_side(pg: PgCluster) -> None:
    """Issue 10, defect 2: what ORMs that keep mixed-case names create."""
    with _conn(pg, BLUE) as blue, _conn(pg, GREEN) as green:
        try:
            for conn, rows in ((blue, 5), (green, 1)):
                conn.execute('DROP TABLE IF EXISTS public."Users"')
                conn.execute('CREATE TABLE public."Users" (id serial PRIMARY KEY, "Name" text)')
                conn.execute('INSERT INTO public."Users" ("Name") '
                             "SELECT 'n' FROM generate_series(1, %s)", (rows,))
            sequences.sync_past(blue, green, margin=100)
            last = green.execute('SELECT last_value FROM public."Users_id_seq"').fetchone()
            assert last == (105,)
            assert green.execute('INSERT INTO public."Users" ("Name") VALUES (%s) RETURNING id',
                                 ("new",)).fetchone() == (106,)
        finally:
            for conn in (blue, green):
                conn.execute('DROP TABLE IF EXISTS public."Users"')
