"""Blue's schema fingerprint: DDL on blue during a release is found, not diverged from.

Green is built from blue's schema at provisioning, and logical replication carries
rows, never DDL. A column added, a type changed, a table or partition created on blue
afterwards makes the two sides drift: apply fails, or changes to a new table are not
published at all. The release records a digest of blue's replicated schema before
green is built and compares it before validation, before each canary stage and
before the switchover.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import psycopg

from orchestrator.errors import ReleaseFailed
from orchestrator.pg.catalog import SYSTEM_SCHEMAS

# One line per fact about a table (its partitions included, filed under the root) or
# materialized view: the relation, each column, constraint and index. Only what the
# data path depends on; comments, grants and statistics are left out.
_QUERY = """
WITH rel AS (
    SELECT c.oid, c.relkind, c.relpersistence, c.relreplident, c.relpartbound,
           coalesce(pg_partition_root(c.oid), c.oid) AS root,
           format('%%I.%%I', n.nspname, c.relname) AS self
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname <> ALL(%(skip)s)
      AND n.nspname NOT LIKE 'pg\\_temp%%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp%%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d
                      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                        AND d.deptype = 'e')
), owner AS (
    SELECT rel.*, n.nspname || '.' || c.relname AS table_name
    FROM rel JOIN pg_class c ON c.oid = rel.root JOIN pg_namespace n ON n.oid = c.relnamespace
)
SELECT table_name, concat_ws(' ', self, 'rel', relkind, relpersistence, relreplident,
                             pg_get_expr(relpartbound, oid))
FROM owner
UNION ALL
SELECT table_name, concat_ws(' ', self, 'col', a.attname,
                             format_type(a.atttypid, a.atttypmod), a.attnotnull,
                             a.attgenerated, a.attidentity,
                             CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid)
                             END)
FROM owner JOIN pg_attribute a ON a.attrelid = owner.oid AND a.attnum > 0
                               AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
UNION ALL
SELECT table_name, concat_ws(' ', self, 'con', co.conname, pg_get_constraintdef(co.oid))
FROM owner JOIN pg_constraint co ON co.conrelid = owner.oid
UNION ALL
SELECT table_name, concat_ws(' ', self, 'idx', pg_get_indexdef(i.indexrelid))
FROM owner JOIN pg_index i ON i.indrelid = owner.oid
"""


def schema_fingerprint(conn: psycopg.Connection[Any], *, exclude_schemas: tuple[str, ...],
                       exclude_tables: tuple[str, ...] = ()) -> dict[str, str]:
    """A short digest per table and materialized view (``schema.name``)."""
    lines: dict[str, list[str]] = defaultdict(list)
    with conn.cursor() as cur:
        cur.execute(_QUERY, {"skip": [*SYSTEM_SCHEMAS, *exclude_schemas]})
        for table, line in cur.fetchall():
            if table not in exclude_tables:
                lines[table].append(line)
    return {t: hashlib.sha256("\n".join(sorted(ls)).encode()).hexdigest()[:16]
            for t, ls in lines.items()}


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What differs, readably: 'changed public.t', 'added public.u', 'dropped public.v'."""
    found = [f"changed {t}" for t in sorted(before.keys() & after.keys())
             if before[t] != after[t]]
    found += [f"added {t}" for t in sorted(after.keys() - before.keys())]
    found += [f"dropped {t}" for t in sorted(before.keys() - after.keys())]
    return found


def verify(conn: psycopg.Connection[Any], recorded: dict[str, str], *, when: str,
           exclude_schemas: tuple[str, ...], exclude_tables: tuple[str, ...] = ()) -> None:
    """Raise when blue's schema is not the one green was built from."""
    found = changes(recorded, schema_fingerprint(conn, exclude_schemas=exclude_schemas,
                                                 exclude_tables=exclude_tables))
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise ReleaseFailed(
            f"blue's schema changed during the release ({shown}), found {when}: green was "
            "built from blue's schema before that, and logical replication does not carry "
            "DDL, so the two sides would silently diverge",
            hint="let the release roll back, then release again (DDL for green belongs in "
            "the release's migrations; run DDL on blue only when no release is running)")
