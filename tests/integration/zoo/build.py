"""Builds the schema zoo in blue's application database.

Everything a real schema holds, with deterministic seed data: partitioned tables of
every kind, key-less tables with REPLICA IDENTITY FULL, hostile identifiers (mixed
case, spaces, quotes, dots, unicode, 63-byte names) for schemas, tables, columns,
sequences and roles, identity and serial columns, stored generated columns, rich
types, deferrable keys, exclusion constraints, partial and expression indexes, views,
materialized views, triggers, functions, row-level security, comments, grants, and
the extensions both servers ship.

The SQL is written out, not generated from a model, so that a reader sees exactly
what the release has to carry; ``q()`` quotes an identifier as PostgreSQL does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from orchestrator.sandbox.pgcluster import PgCluster
from orchestrator.sandbox.stack import APP_DATABASE, APP_ROLE, Sandbox


def q(name: str) -> str:
    """A quoted identifier, as quote_ident would write it (always quoted)."""
    return '"' + name.replace('"', '""') + '"'


def _exactly_63(prefix: str) -> str:
    name = prefix + "x" * (63 - len(prefix.encode()))
    assert len(name.encode()) == 63, name
    return name


# Schemas ----------------------------------------------------------------------------
ZOO = "zoo"
MIXED = "Mixed Case Schema"
DOTTED = "dotted.schema"
UNICODE = "ünï€ødé"
LONG_SCHEMA = _exactly_63("zoo_schema_named_with_sixty_three_bytes_")
SCHEMAS = (ZOO, MIXED, DOTTED, UNICODE, LONG_SCHEMA)

# Tables, columns, sequences with hostile names ---------------------------------------
USERS = "Users"                      # serial -> sequence "Users_id_seq" (mixed case)
KEYLESS_MIXED = "Key Less"           # REPLICA IDENTITY FULL, no key, name with a space
QUOTED_TABLE = 'quote"d table'
QUOTED_COLUMN = 'col "q"'
DOTTED_TABLE = "dotted.table"
UNICODE_TABLE = "tâble ñ"
UNICODE_COLUMN = "çolumn ü"
LONG_TABLE = _exactly_63("table_named_with_sixty_three_bytes_")
LONG_COLUMN = _exactly_63("column_named_with_sixty_three_bytes_")
LONG_SEQUENCE = _exactly_63("sequence_named_with_sixty_three_bytes_")
MIXED_SEQUENCE = "Invoice Numbers"   # a standalone sequence whose name needs quotes

# Roles (cluster-wide: created on blue and green) --------------------------------------
OWNER_ROLE = "Zoo Owner"
READER_ROLE = "zoo_reader"
UNICODE_ROLE = 'rôle.ünï "q"'
LONG_ROLE = _exactly_63("role_named_with_sixty_three_bytes_")
ROLES = (OWNER_ROLE, READER_ROLE, UNICODE_ROLE, LONG_ROLE)

# Extensions the zoo uses when both servers ship them.
WANTED_EXTENSIONS = ("pgcrypto", "citext", "hstore", "pg_trgm", "btree_gist")

SEED_ROWS = 2000


@dataclass
class Zoo:
    extensions: list[str]
    # Extension -> why the zoo does without it. Recorded, never silent.
    skipped: dict[str, str] = field(default_factory=dict)


def available_extensions(cluster: PgCluster) -> set[str]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}


def create_roles(cluster: PgCluster) -> None:
    """The zoo's roles, on one server. NOLOGIN: they own and are granted, never connect."""
    for role in ROLES:
        cluster.create_role(role, "unused-password", login=False)


def build_zoo(sb: Sandbox) -> Zoo:
    """Roles on both servers, then the zoo in blue's application database."""
    on_blue, on_green = available_extensions(sb.blue), available_extensions(sb.green)
    zoo = Zoo(extensions=[])
    for ext in WANTED_EXTENSIONS:
        missing = [side for side, have in (("blue", on_blue), ("green", on_green))
                   if ext not in have]
        if missing:
            zoo.skipped[ext] = f"not in pg_available_extensions on {' and '.join(missing)}"
        else:
            zoo.extensions.append(ext)
    for cluster in (sb.blue, sb.green):
        create_roles(cluster)
    with psycopg.connect(sb.blue.conninfo(APP_DATABASE), autocommit=True) as conn:
        for statement in zoo_sql(set(zoo.extensions)):
            conn.execute(statement)
    return zoo


def zoo_sql(ext: set[str]) -> list[str]:
    """The zoo's DDL and seed data, one statement per item (run in autocommit)."""
    z, m, d, u, lg = (q(s) for s in SCHEMAS)
    email_type = "citext" if "citext" in ext else "text"
    out: list[str] = [f"CREATE EXTENSION IF NOT EXISTS {e}" for e in sorted(ext)]
    out += [f"CREATE SCHEMA {s}" for s in (z, m, d, u, lg)]
    out += [f"COMMENT ON SCHEMA {m} IS 'mixed case; the ORMs'' favourite'",
            f"GRANT USAGE ON SCHEMA {z}, {m}, {d}, {u}, {lg} TO {APP_ROLE}, {q(READER_ROLE)}",
            f"GRANT {q(READER_ROLE)} TO {q(UNICODE_ROLE)}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {z} GRANT SELECT ON TABLES TO {q(READER_ROLE)}"]

    # -- types -------------------------------------------------------------------------
    out += [
        f"CREATE TYPE {z}.mood AS ENUM ('sad', 'ok', 'happy', 'ünïcode ☃')",
        f"CREATE DOMAIN {z}.positive_int AS integer CHECK (VALUE > 0)",
        f"CREATE DOMAIN {z}.sku AS text CHECK (VALUE ~ '^[A-Z]{{3}}-[0-9]+$')",
        f"CREATE TYPE {z}.address AS (street text, city text, zip varchar(10))",
        f"CREATE TYPE {m}.{q('Point Pair')} AS (a point, b point)",
        f"CREATE TYPE {z}.floatrange AS RANGE (subtype = float8)",
        f"COMMENT ON TYPE {z}.mood IS 'an enum with a unicode label'",
    ]

    # -- functions with $$ bodies ------------------------------------------------------
    out += [
        f"""CREATE FUNCTION {z}.touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.version := coalesce(OLD.version, 0) + 1;
  RETURN NEW;
END $$""",
        f"""CREATE FUNCTION {m}.{q('Compute Score')}(n integer) RETURNS integer
LANGUAGE sql IMMUTABLE AS $fn$ SELECT (n * 7919) % 1000 $fn$""",
        f"""CREATE FUNCTION {z}.nested_dollars() RETURNS text LANGUAGE plpgsql AS $outer$
BEGIN
  RETURN $$it's "quoted" $$ || $inner$ and $$ nested $$ $inner$;
END $outer$""",
        f"""CREATE FUNCTION {z}.audit_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {z}.invoice_audit (invoice_id, note) VALUES (NEW.id, 'created ' || NEW.id);
  RETURN NEW;
END $$""",
        f"COMMENT ON FUNCTION {m}.{q('Compute Score')}(integer) IS 'deterministic score'",
    ]

    # -- range partitioned, with a default and a hash sub-partitioned partition ----------
    out += [
        f"""CREATE TABLE {z}.events (
  id bigserial,
  created_at timestamptz NOT NULL,
  kind {z}.mood NOT NULL DEFAULT 'ok',
  payload jsonb NOT NULL DEFAULT '{{}}',
  day date GENERATED ALWAYS AS ((created_at AT TIME ZONE 'UTC')::date) STORED,
  lk text NOT NULL,
  lv integer NOT NULL,
  PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at)""",
        f"CREATE TABLE {z}.events_2024 PARTITION OF {z}.events "
        "FOR VALUES FROM ('2024-01-01 00:00+00') TO ('2025-01-01 00:00+00')",
        f"CREATE TABLE {z}.events_2025 PARTITION OF {z}.events "
        "FOR VALUES FROM ('2025-01-01 00:00+00') TO ('2026-01-01 00:00+00') "
        "PARTITION BY HASH (id)",
        f"CREATE TABLE {z}.events_2025_h0 PARTITION OF {z}.events_2025 "
        "FOR VALUES WITH (MODULUS 2, REMAINDER 0)",
        f"CREATE TABLE {z}.events_2025_h1 PARTITION OF {z}.events_2025 "
        "FOR VALUES WITH (MODULUS 2, REMAINDER 1)",
        f"CREATE TABLE {z}.{q('events default')} PARTITION OF {z}.events DEFAULT",
        f"CREATE INDEX events_lk ON {z}.events (lk)",
        f"CREATE INDEX events_payload ON {z}.events USING gin (payload jsonb_path_ops)",
        f"COMMENT ON TABLE {z}.events IS 'range partitioned; 2025 is hash sub-partitioned'",
    ]

    # -- list partitioned (identity ALWAYS), default partition ---------------------------
    out += [
        f"""CREATE TABLE {z}.regions (
  id integer GENERATED ALWAYS AS IDENTITY,
  region text NOT NULL,
  name text NOT NULL,
  lk text NOT NULL,
  lv integer NOT NULL,
  PRIMARY KEY (region, id)
) PARTITION BY LIST (region)""",
        f"CREATE TABLE {z}.regions_eu PARTITION OF {z}.regions FOR VALUES IN ('eu')",
        f"CREATE TABLE {z}.regions_us PARTITION OF {z}.regions FOR VALUES IN ('us')",
        f"CREATE TABLE {z}.{q('Regions APAC')} PARTITION OF {z}.regions "
        "FOR VALUES IN ('apac', 'latam')",
        f"CREATE TABLE {z}.regions_other PARTITION OF {z}.regions DEFAULT",
    ]

    # -- hash partitioned (identity BY DEFAULT) ------------------------------------------
    out += [
        f"""CREATE TABLE {z}.shards (
  id bigint GENERATED BY DEFAULT AS IDENTITY (START WITH 1000 INCREMENT BY 3) PRIMARY KEY,
  body text NOT NULL,
  lk text NOT NULL,
  lv integer NOT NULL
) PARTITION BY HASH (id)""",
        *[f"CREATE TABLE {z}.shards_{i} PARTITION OF {z}.shards "
          f"FOR VALUES WITH (MODULUS 4, REMAINDER {i})" for i in range(4)],
    ]

    # -- key-less, REPLICA IDENTITY FULL -------------------------------------------------
    out += [
        f"""CREATE TABLE {z}.audit_log (
  at timestamptz NOT NULL,
  actor text,
  detail jsonb,
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"ALTER TABLE {z}.audit_log REPLICA IDENTITY FULL",
        f"""CREATE TABLE {m}.{q(KEYLESS_MIXED)} (
  {q('Some Value')} numeric,
  {q('Tags')} text[],
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"ALTER TABLE {m}.{q(KEYLESS_MIXED)} REPLICA IDENTITY FULL",
    ]

    # -- mixed case: serial with a mixed-case sequence, generated column, trigger --------
    out += [
        f"""CREATE TABLE {m}.{q(USERS)} (
  id serial PRIMARY KEY,
  {q('Email')} {email_type} NOT NULL,
  {q('First')} text NOT NULL,
  {q('Last')} text NOT NULL,
  {q('FullName')} text GENERATED ALWAYS AS ({q('First')} || ' ' || {q('Last')}) STORED,
  {q('Score')} integer GENERATED ALWAYS AS ({m}.{q('Compute Score')}(length({q('Last')})))
      STORED,
  version integer NOT NULL DEFAULT 0,
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"CREATE UNIQUE INDEX {q('Users Email')} ON {m}.{q(USERS)} (lower({q('Email')}))",
        f"CREATE TRIGGER {q('Users Touch')} BEFORE INSERT OR UPDATE ON {m}.{q(USERS)} "
        f"FOR EACH ROW EXECUTE FUNCTION {z}.touch()",
        f"COMMENT ON COLUMN {m}.{q(USERS)}.{q('FullName')} IS 'generated, stored'",
        f"CREATE SEQUENCE {m}.{q(MIXED_SEQUENCE)} START 500 INCREMENT 5",
    ]

    # -- dotted schema and table, quoted names, unicode, 63-byte names -------------------
    out += [
        f"""CREATE TABLE {d}.{q(DOTTED_TABLE)} (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  {q(QUOTED_COLUMN)} text,
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"""CREATE TABLE {z}.{q(QUOTED_TABLE)} (
  id bigserial PRIMARY KEY,
  {q(QUOTED_COLUMN)} text NOT NULL,
  invoice_no bigint NOT NULL DEFAULT nextval('{m.replace("'", "''")}.{q(MIXED_SEQUENCE)}')
)""",
        f"""CREATE TABLE {u}.{q(UNICODE_TABLE)} (
  id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
  {q(UNICODE_COLUMN)} text NOT NULL,
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"CREATE SEQUENCE {lg}.{q(LONG_SEQUENCE)} INCREMENT -1 START -1 MAXVALUE -1",
        f"""CREATE TABLE {lg}.{q(LONG_TABLE)} (
  id serial PRIMARY KEY,
  {q(LONG_COLUMN)} text NOT NULL,
  countdown bigint NOT NULL DEFAULT nextval('{lg}.{q(LONG_SEQUENCE)}'),
  lk text NOT NULL,
  lv integer NOT NULL
)""",
        f"COMMENT ON TABLE {lg}.{q(LONG_TABLE)} IS 'its serial sequence name is truncated'",
    ]

    # -- every type, TOASTed bytea, NaN, generated column --------------------------------
    hstore_col = "  attrs hstore,\n" if "hstore" in ext else ""
    digest_col = ("  body_sha text GENERATED ALWAYS AS (encode(public.digest(blob, 'sha256'), "
                  "'hex')) STORED,\n" if "pgcrypto" in ext else "")
    out += [
        f"""CREATE TABLE {z}.types_zoo (
  id bigint PRIMARY KEY,
  mood {z}.mood NOT NULL,
  moods {z}.mood[] NOT NULL,
  qty {z}.positive_int NOT NULL,
  code {z}.sku NOT NULL,
  addr {z}.address,
  addrs {z}.address[],
  pair {m}.{q('Point Pair')},
  ints integer[] NOT NULL,
  words text[],
  grid integer[][],
  during tstzrange,
  span int4range,
  fr {z}.floatrange,
  doc jsonb,
  js json,
  blob bytea NOT NULL,
  price numeric(12, 3),
  ratio numeric,
  f8 double precision,
  ip inet,
  net cidr,
  mac macaddr,
  tsv tsvector,
  at timestamptz NOT NULL,
  d date,
  t time,
  tz timetz,
  iv interval,
  flag boolean,
  uid uuid,
  bits bit varying(16),
  {q(UNICODE_COLUMN)} text,
{hstore_col}{digest_col}  total numeric GENERATED ALWAYS AS (qty * price) STORED,
  CONSTRAINT types_zoo_price_check CHECK (price IS NULL OR price >= 0 OR price = 'NaN')
)""",
        f"CREATE INDEX types_zoo_partial ON {z}.types_zoo (at) WHERE mood = 'happy'",
        f"CREATE INDEX types_zoo_expr ON {z}.types_zoo ((lower(code)), (doc->>'k'))",
        f"CREATE INDEX types_zoo_tsv ON {z}.types_zoo USING gin (tsv)",
    ]
    if "pg_trgm" in ext:
        out.append(f"CREATE INDEX types_zoo_trgm ON {z}.types_zoo "
                   f"USING gin ({q(UNICODE_COLUMN)} gin_trgm_ops)")

    # -- deferrable foreign keys, checks, exclusion, RLS, triggers -----------------------
    exclusion = ("EXCLUDE USING gist (room WITH =, during WITH &&)" if "btree_gist" in ext
                 else "EXCLUDE USING gist (during WITH &&)")
    out += [
        f"""CREATE TABLE {z}.invoices (
  id integer PRIMARY KEY,
  customer text NOT NULL CHECK (customer <> ''),
  first_line integer,
  issued date NOT NULL
)""",
        f"""CREATE TABLE {z}.invoice_lines (
  id integer PRIMARY KEY,
  invoice_id integer NOT NULL REFERENCES {z}.invoices (id)
      DEFERRABLE INITIALLY DEFERRED,
  amount numeric(10, 2) NOT NULL CHECK (amount > 0),
  note text
)""",
        # A cycle: only deferrable keys let both rows go in one transaction.
        f"ALTER TABLE {z}.invoices ADD CONSTRAINT invoices_first_line FOREIGN KEY "
        f"(first_line) REFERENCES {z}.invoice_lines (id) DEFERRABLE INITIALLY IMMEDIATE",
        f"""CREATE TABLE {z}.invoice_audit (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  invoice_id integer NOT NULL,
  note text NOT NULL
)""",
        f"CREATE TRIGGER invoices_audit AFTER INSERT ON {z}.invoices "
        f"FOR EACH ROW EXECUTE FUNCTION {z}.audit_insert()",
        f"""CREATE TABLE {z}.bookings (
  id integer PRIMARY KEY,
  room integer NOT NULL,
  during tstzrange NOT NULL,
  {exclusion}
)""",
        f"""CREATE TABLE {z}.tenant_notes (
  id integer PRIMARY KEY,
  tenant name NOT NULL,
  note text NOT NULL
)""",
        f"ALTER TABLE {z}.tenant_notes ENABLE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {z}.tenant_notes USING (tenant = current_user)",
        f"CREATE POLICY {q('Readers See All')} ON {z}.tenant_notes FOR SELECT "
        f"TO {q(READER_ROLE)} USING (true)",
    ]

    # -- seed data (deterministic) -------------------------------------------------------
    n = SEED_ROWS
    hstore_val = "hstore(ARRAY['k', 'n'], ARRAY['v' || i, i::text])," if "hstore" in ext else ""
    hstore_name = "attrs," if "hstore" in ext else ""
    out += [
        f"""INSERT INTO {z}.events (created_at, kind, payload, lk, lv)
SELECT timestamptz '2024-06-01 00:00+00' + (i * interval '7 hours 13 minutes'),
       (ARRAY['sad', 'ok', 'happy', 'ünïcode ☃'])[1 + i % 4]::{z}.mood,
       jsonb_build_object('i', i, 'tags', jsonb_build_array('a', i % 7), 'nul', null),
       'S-' || i, i
FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {z}.regions (region, name, lk, lv)
SELECT (ARRAY['eu', 'us', 'apac', 'latam', 'mars'])[1 + i % 5], 'region ' || i, 'S-' || i, i
FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {z}.shards (body, lk, lv)
SELECT repeat(md5(i::text), 1 + i % 3), 'S-' || i, i FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {z}.audit_log (at, actor, detail, lk, lv)
SELECT timestamptz '2025-01-01 00:00+00' + i * interval '1 minute',
       CASE WHEN i % 10 = 0 THEN NULL ELSE 'actor ' || (i % 13) END,
       jsonb_build_object('i', i), 'S-' || i, i
FROM generate_series(1, {n}) i""",
        # Duplicate rows on purpose: a key-less table may hold identical rows.
        f"""INSERT INTO {m}.{q(KEYLESS_MIXED)} ({q('Some Value')}, {q('Tags')}, lk, lv)
SELECT CASE WHEN i % 50 = 0 THEN 'NaN'::numeric ELSE i / 7.0 END,
       ARRAY['t' || (i % 3), 'ü'], 'S-' || (i % 1500), i % 1500
FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {m}.{q(USERS)} ({q('Email')}, {q('First')}, {q('Last')}, lk, lv)
SELECT 'User' || i || '@Example.COM', 'Fïrst' || i, 'Last' || repeat('x', i % 9), 'S-' || i, i
FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {d}.{q(DOTTED_TABLE)} ({q(QUOTED_COLUMN)}, lk, lv)
SELECT 'va"lue ' || i, 'S-' || i, i FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {z}.{q(QUOTED_TABLE)} ({q(QUOTED_COLUMN)})
SELECT 'q''' || i FROM generate_series(1, {n // 4}) i""",
        f"""INSERT INTO {u}.{q(UNICODE_TABLE)} ({q(UNICODE_COLUMN)}, lk, lv)
SELECT 'ünï ' || i || ' €', 'S-' || i, i FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {lg}.{q(LONG_TABLE)} ({q(LONG_COLUMN)}, lk, lv)
SELECT 'long ' || i, 'S-' || i, i FROM generate_series(1, {n}) i""",
    ]
    # blob: md5 chains, 3.2 kB each, incompressible, so TOASTed out of line.
    out.append(f"""INSERT INTO {z}.types_zoo (id, mood, moods, qty, code, addr, addrs, pair, ints,
  words, grid, during, span, fr, doc, js, blob, price, ratio, f8, ip, net, mac, tsv, at, d, t,
  tz, iv, flag, uid, bits, {hstore_name} {q(UNICODE_COLUMN)})
SELECT i,
  (ARRAY['sad', 'ok', 'happy', 'ünïcode ☃'])[1 + i % 4]::{z}.mood,
  ARRAY['ok', 'happy']::{z}.mood[],
  1 + i % 17,
  'ABC-' || i,
  ROW('Straße ' || i, 'Zürich', lpad((i % 99999)::text, 5, '0'))::{z}.address,
  ARRAY[ROW('a "quoted", street', 'x', NULL)::{z}.address],
  ROW(point(i, -i), point(0.5, 1e-3))::{m}.{q('Point Pair')},
  ARRAY[i, -i, 0],
  CASE WHEN i % 5 = 0 THEN NULL ELSE ARRAY['w' || i, 'NULL', '', 'a,b', 'q"q'] END,
  ARRAY[[i, 2], [3, 4]],
  tstzrange(timestamptz '2025-01-01 00:00+00' + i * interval '1 hour',
            timestamptz '2025-01-01 00:00+00' + (i + 1) * interval '1 hour', '[)'),
  CASE WHEN i % 7 = 0 THEN 'empty'::int4range ELSE int4range(i, i + 10) END,
  {z}.floatrange(i / 3.0, i / 2.0 + 1),
  jsonb_build_object('k', 'v' || i, 'n', i, 'f', i / 8.0, 'arr', jsonb_build_array(1, 'ü', null)),
  json_build_object('raw', i, 'dup', 1),
  (SELECT decode(string_agg(md5(i::text || '-' || g), '' ORDER BY g), 'hex')
     FROM generate_series(1, 200) g),
  CASE WHEN i % 11 = 0 THEN 'NaN'::numeric ELSE (i * 1.125)::numeric(12, 3) END,
  CASE WHEN i % 13 = 0 THEN 'NaN'::numeric WHEN i % 17 = 0 THEN 'Infinity'::numeric
       ELSE i / 3.0 END,
  CASE WHEN i % 19 = 0 THEN 'NaN'::float8 WHEN i % 23 = 0 THEN '-Infinity'::float8
       ELSE i / 7.0 END,
  ('10.' || (i % 256) || '.' || (i / 256 % 256) || '.1')::inet,
  CASE WHEN i % 2 = 0 THEN '2001:db8::/32'::cidr ELSE '192.168.0.0/16'::cidr END,
  ('08:00:2b:01:02:' || lpad(to_hex(i % 256), 2, '0'))::macaddr,
  to_tsvector('english', 'The quick brown fox ' || i || ' jumps over lazy dogs'),
  timestamptz '2025-03-30 00:30:00+00' + i * interval '17 minutes 3.25 seconds',
  date '2000-02-29' + i,
  time '00:00' + i * interval '1 second',
  timetz '12:00+05:30',
  make_interval(0, i % 14, 0, i % 31, i % 24, i % 60, i / 1000.0),
  CASE WHEN i % 3 = 0 THEN NULL ELSE i % 2 = 0 END,
  md5('uuid' || i)::uuid,
  (i % 65536)::bit(16)::varbit,
  {hstore_val}
  CASE WHEN i % 9 = 0 THEN NULL ELSE 'çà ' || i || ' ☃ 𝄞' END
FROM generate_series(1, {n}) i""")
    out += [
        # The key cycle in one transaction is what deferrable keys are for.
        f"""DO $$
BEGIN
  SET CONSTRAINTS ALL DEFERRED;
  INSERT INTO {z}.invoices (id, customer, first_line, issued)
  SELECT i, 'customer ' || (i % 97), i * 10, date '2025-01-01' + i % 365
  FROM generate_series(1, {n // 2}) i;
  INSERT INTO {z}.invoice_lines (id, invoice_id, amount, note)
  SELECT i * 10 + j, i, (i % 50 + j + 1) * 1.25, CASE WHEN j = 0 THEN 'first' END
  FROM generate_series(1, {n // 2}) i, generate_series(0, 2) j;
END $$""",
        f"""INSERT INTO {z}.bookings (id, room, during)
SELECT i, i % 10, tstzrange(timestamptz '2025-01-01 00:00+00' + (i / 10) * interval '2 hours',
                            timestamptz '2025-01-01 00:00+00' + (i / 10) * interval '2 hours'
                              + interval '90 minutes')
FROM generate_series(1, {n}) i""" if "btree_gist" in ext else
        f"""INSERT INTO {z}.bookings (id, room, during)
SELECT i, i % 10, tstzrange(timestamptz '2025-01-01 00:00+00' + i * interval '2 hours',
                            timestamptz '2025-01-01 00:00+00' + i * interval '2 hours'
                              + interval '90 minutes')
FROM generate_series(1, {n}) i""",
        f"""INSERT INTO {z}.tenant_notes (id, tenant, note)
SELECT i, 'tenant' || (i % 5), 'note ' || i FROM generate_series(1, {n // 4}) i""",
    ]

    # -- views and materialized views (over tables the ledger does not write, so blue's
    #    refreshed contents are also what green's must be) ------------------------------
    out += [
        f"""CREATE VIEW {m}.{q('Active Users')} AS
SELECT id, {q('FullName')}, {q('Email')} FROM {m}.{q(USERS)} WHERE lv % 2 = 0""",
        f"""CREATE VIEW {z}.event_days AS
SELECT day, count(*) AS n FROM {z}.events GROUP BY day""",
        f"""CREATE MATERIALIZED VIEW {z}.invoice_totals AS
SELECT i.id AS invoice_id, i.customer, sum(l.amount) AS total, count(*) AS lines
FROM {z}.invoices i JOIN {z}.invoice_lines l ON l.invoice_id = i.id
GROUP BY i.id, i.customer""",
        f"CREATE UNIQUE INDEX invoice_totals_id ON {z}.invoice_totals (invoice_id)",
        f"""CREATE MATERIALIZED VIEW {m}.{q('Big Customers')} AS
SELECT customer, sum(total) AS total FROM {z}.invoice_totals
GROUP BY customer HAVING sum(total) > 1000""",
        f"""CREATE MATERIALIZED VIEW {z}.mood_counts AS
SELECT mood, count(*) AS n, sum(total) FILTER (WHERE total <> 'NaN') AS total
FROM {z}.types_zoo GROUP BY mood""",
        f"COMMENT ON MATERIALIZED VIEW {z}.invoice_totals IS 'has a unique index'",
    ]

    # -- ownership and grants ------------------------------------------------------------
    ledger_tables = [f"{z}.events", f"{z}.regions", f"{z}.shards", f"{z}.audit_log",
                     f"{m}.{q(KEYLESS_MIXED)}", f"{m}.{q(USERS)}", f"{d}.{q(DOTTED_TABLE)}",
                     f"{u}.{q(UNICODE_TABLE)}", f"{lg}.{q(LONG_TABLE)}"]
    out += [
        f"ALTER TABLE {z}.tenant_notes OWNER TO {q(OWNER_ROLE)}",
        f"ALTER TABLE {z}.bookings OWNER TO {q(OWNER_ROLE)}",
        # A view's owner needs what it reads: a refresh runs as the owner.
        f"GRANT SELECT ON {z}.types_zoo TO {q(OWNER_ROLE)}",
        f"GRANT USAGE ON SCHEMA {z} TO {q(OWNER_ROLE)}",
        f"ALTER MATERIALIZED VIEW {z}.mood_counts OWNER TO {q(OWNER_ROLE)}",
        f"ALTER SCHEMA {u} OWNER TO {q(OWNER_ROLE)}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {z}, {m}, {d}, {u}, {lg} TO {q(READER_ROLE)}",
        f"GRANT SELECT ({q('Email')}), UPDATE ({q('First')}) ON {m}.{q(USERS)} "
        f"TO {q(UNICODE_ROLE)}",
        f"GRANT SELECT ON {z}.invoice_totals TO {q(LONG_ROLE)}",
        f"GRANT EXECUTE ON FUNCTION {m}.{q('Compute Score')}(integer) TO {q(LONG_ROLE)}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {', '.join(ledger_tables)} TO {APP_ROLE}",
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {z}, {m}, {d}, {u}, {lg} TO {APP_ROLE}",
        "ANALYZE",
    ]
    return out


def describe(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Counts of what the zoo holds, for the test's own sanity checks."""
    row = conn.execute(
        """SELECT
          (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE c.relkind = 'p' AND n.nspname = 'zoo'),
          (SELECT count(*) FROM pg_class WHERE relkind = 'm'),
          (SELECT count(*) FROM pg_class WHERE relreplident = 'f'
             AND relnamespace::regnamespace::text <> 'pg_catalog'),
          (SELECT count(*) FROM pg_sequences WHERE schemaname <> 'public'),
          (SELECT count(*) FROM pg_policy)""").fetchone()
    assert row is not None
    return dict(zip(("partitioned", "matviews", "full_identity", "sequences", "policies"),
                    row, strict=True))
