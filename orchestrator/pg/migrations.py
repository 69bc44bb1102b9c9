"""Versioned SQL migrations applied to green, each in its own transaction, tracked.

Files: ``NNNN_name.up.sql`` (required) and ``NNNN_name.down.sql`` (the down script,
stored with the migration). A first line ``-- orchestrate:no-transaction`` runs the
file outside a transaction (CREATE INDEX CONCURRENTLY needs that).

Tracking lives in the database the migrations change (``orchestrate.migrations`` and
``orchestrate.migration_log``), so a migration and its "completed" mark commit
together: after a crash the table tells exactly what was applied. Green inherits
blue's history first, so the table is the whole life of the schema.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from orchestrator.errors import PreflightError, ReleaseFailed
from orchestrator.pg import control_schema

_FILE = re.compile(r"^(?P<version>\d+)_(?P<name>[A-Za-z0-9_\-]+)\.up\.sql$")
NO_TRANSACTION = "-- orchestrate:no-transaction"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    up_sql: str
    down_sql: str | None
    checksum: str

    @property
    def migration_name(self) -> str:
        return f"{self.version}_{self.name}"

    @property
    def transactional(self) -> bool:
        return not self.up_sql.lstrip().lower().startswith(NO_TRANSACTION)


def discover(directory: Path) -> list[Migration]:
    """The migrations in version order. A missing folder means no migrations."""
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise PreflightError(f"migrations.dir {directory} is not a folder")
    found: list[Migration] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".down.sql") or not path.name.endswith(".sql"):
            continue
        match = _FILE.match(path.name)
        if not match:
            raise PreflightError(
                f"migration file {path.name} does not follow NNNN_name.up.sql",
                hint="rename it, e.g. 0003_add_orders_index.up.sql",
            )
        version = match.group("version")
        if version in seen:
            raise PreflightError(
                f"two migrations share version {version}: {seen[version].name}, {path.name}"
            )
        seen[version] = path
        up = path.read_text()
        down_path = path.with_name(path.name.replace(".up.sql", ".down.sql"))
        down = down_path.read_text() if down_path.exists() else None
        found.append(Migration(
            version=version, name=match.group("name"), path=path, up_sql=up, down_sql=down,
            checksum=hashlib.sha256(up.encode()).hexdigest(),
        ))
    return sorted(found, key=lambda m: int(m.version))


# ------------------------------------------------------------------------ lint


@dataclass
class LintFinding:
    migration: str
    level: str  # "error" or "warning"
    message: str


@dataclass
class LintReport:
    findings: list[LintFinding] = field(default_factory=list)

    @property
    def errors(self) -> list[LintFinding]:
        return [f for f in self.findings if f.level == "error"]


def _statements(text: str) -> list[str]:
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return [s.strip() for s in text.split(";") if s.strip()]


# Each rule: a pattern on one statement, a level, and why it matters while logical
# replication from blue (old schema) to green (new schema) is running.
_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"\bDROP\s+COLUMN\b", re.I),
     "error", "drops a column that blue still replicates: the apply on green fails; drop it "
              "in a later release (expand/contract)"),
    (re.compile(r"\bRENAME\b", re.I),
     "error", "renames a table or column that blue still replicates under the old name; add "
              "the new column, backfill, and drop the old one in a later release"),
    (re.compile(r"\bDROP\s+TABLE\b", re.I),
     "error", "drops a table that blue still replicates"),
    (re.compile(r"\bADD\s+(COLUMN\s+)?(?:IF\s+NOT\s+EXISTS\s+)?\w+\s+[^,]*\bNOT\s+NULL\b"
                r"(?![^,]*\bDEFAULT\b)", re.I | re.S),
     "error", "adds a NOT NULL column without a DEFAULT: rows replicated from blue have no "
              "value for it and the apply fails"),
    (re.compile(r"\bALTER\s+COLUMN\s+\w+\s+(SET\s+DATA\s+)?TYPE\b", re.I),
     "warning", "changes a column type: replicated values must still convert, and the "
                "rewrite locks the table"),
    (re.compile(r"\bSET\s+NOT\s+NULL\b", re.I),
     "warning", "SET NOT NULL: a NULL replicated from blue would stop the apply"),
    (re.compile(r"\bCREATE\s+UNIQUE\s+INDEX\b|\bADD\s+(CONSTRAINT\s+\w+\s+)?UNIQUE\b", re.I),
     "warning", "a new unique constraint can reject rows blue still accepts"),
    (re.compile(r"^\s*(TRUNCATE|DELETE\s+FROM|UPDATE)\b", re.I),
     "warning", "changes data on green that blue also changes; validation will report "
                "differences unless the columns are green-only"),
]


def lint(migrations: list[Migration]) -> LintReport:
    report = LintReport()
    for m in migrations:
        for stmt in _statements(m.up_sql):
            for pattern, level, why in _RULES:
                if pattern.search(stmt):
                    snippet = " ".join(stmt.split())[:80]
                    report.findings.append(LintFinding(m.migration_name, level,
                                                       f"{why} [{snippet}]"))
            if m.transactional and re.search(r"\bCONCURRENTLY\b", stmt, re.I):
                report.findings.append(LintFinding(
                    m.migration_name, "error",
                    f"CONCURRENTLY cannot run inside a transaction; put '{NO_TRANSACTION}' on "
                    "the first line of the file"))
        if m.down_sql is None:
            report.findings.append(LintFinding(
                m.migration_name, "warning", "no down script (.down.sql): it cannot be reverted"))
    return report


# ---------------------------------------------------------------------- apply


def ensure_tracking(conn: psycopg.Connection[Any], schema: str) -> None:
    """The tracking tables live with the rest of green's control schema."""
    control_schema.ensure_green(conn, schema)


def history(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.migrations",)).fetchone()
    if not exists or exists[0] is None:
        return []
    cur = conn.execute(sql.SQL(
        "SELECT migration_name, version, description, sql_file, checksum, status::text, "
        "applied_at, applied_by, execution_time, rollback_sql, release, error "
        "FROM {}.migrations ORDER BY version::numeric, id").format(sql.Identifier(schema)))
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def inherit_history(green: psycopg.Connection[Any], rows: list[dict[str, Any]],
                    schema: str) -> int:
    """Copy blue's completed migrations into green's table (once; idempotent)."""
    copied = 0
    for r in rows:
        if r["status"] != "completed":
            continue
        cur = green.execute(sql.SQL(
            "INSERT INTO {}.migrations (migration_name, version, description, sql_file, "
            "checksum, status, applied_at, applied_by, execution_time, rollback_sql, release) "
            "VALUES (%s, %s, %s, %s, %s, 'completed', %s, %s, %s, %s, %s) "
            "ON CONFLICT (migration_name) DO NOTHING").format(sql.Identifier(schema)),
            (r["migration_name"], r["version"], r["description"], r["sql_file"], r["checksum"],
             r["applied_at"], r["applied_by"], r["execution_time"], r["rollback_sql"],
             r["release"]))
        copied += cur.rowcount
    return copied


@dataclass
class Applied:
    name: str
    seconds: float
    skipped: bool


def _log(conn: psycopg.Connection[Any], schema: str, mig_id: int, level: str, message: str,
         seconds: float | None = None, details: dict[str, Any] | None = None) -> None:
    conn.execute(sql.SQL(
        "INSERT INTO {}.migration_log (migration_id, log_level, message, execution_time, "
        "error_details) VALUES (%s, %s, %s, make_interval(secs => %s), %s)"
    ).format(sql.Identifier(schema)),
        (mig_id, level, message, seconds, Jsonb(details) if details else None))


def apply_all(conn: psycopg.Connection[Any], migrations: list[Migration], *, schema: str,
              release: str) -> list[Applied]:
    """Apply what is not applied yet, in order. Safe to re-run after any crash."""
    ensure_tracking(conn, schema)
    done = {r["migration_name"]: r for r in history(conn, schema)}
    results: list[Applied] = []
    for m in migrations:
        prior = done.get(m.migration_name)
        if prior and prior["status"] == "completed":
            if prior["checksum"] != m.checksum:
                raise ReleaseFailed(
                    f"migration {m.migration_name} was changed after it was applied "
                    f"(checksum {prior['checksum'][:12]} in the database, {m.checksum[:12]} "
                    "on disk)",
                    hint="never edit an applied migration; add a new one",
                )
            results.append(Applied(m.migration_name, 0.0, skipped=True))
            continue
        if prior and prior["status"] == "running" and not m.transactional:
            raise ReleaseFailed(
                f"non-transactional migration {m.migration_name} was interrupted; part of it "
                "may have run",
                hint="inspect green (e.g. invalid indexes), fix by hand, then mark it in "
                f"{schema}.migrations and run again",
            )
        results.append(_apply_one(conn, m, schema=schema, release=release))
    return results


def _apply_one(conn: psycopg.Connection[Any], m: Migration, *, schema: str,
               release: str) -> Applied:
    s = sql.Identifier(schema)
    row = conn.execute(sql.SQL(
        "INSERT INTO {}.migrations (migration_name, version, description, sql_file, checksum, "
        "status, applied_by, rollback_sql, release) VALUES (%s, %s, %s, %s, %s, 'running', %s, "
        "%s, %s) ON CONFLICT (migration_name) DO UPDATE SET status = 'running', checksum = "
        "excluded.checksum, rollback_sql = excluded.rollback_sql, release = excluded.release, "
        "error = NULL RETURNING id").format(s),
        (m.migration_name, m.version, m.name.replace("_", " "), m.path.name, m.checksum,
         getpass.getuser(), m.down_sql, release)).fetchone()
    assert row is not None
    mig_id = int(row[0])
    _log(conn, schema, mig_id, "info", f"applying {m.migration_name}")
    started = time.monotonic()
    try:
        if m.transactional:
            with conn.transaction():
                conn.execute(m.up_sql.encode())
                elapsed = time.monotonic() - started
                _mark_completed(conn, schema, mig_id, elapsed)
        else:
            conn.execute(m.up_sql.encode())
            elapsed = time.monotonic() - started
            _mark_completed(conn, schema, mig_id, elapsed)
    except psycopg.Error as exc:
        elapsed = time.monotonic() - started
        diag = exc.diag
        details = {"sqlstate": exc.sqlstate, "message": diag.message_primary,
                   "detail": diag.message_detail, "position": diag.statement_position,
                   "hint": diag.message_hint}
        conn.execute(sql.SQL("UPDATE {}.migrations SET status = 'failed', error = %s, "
                             "execution_time = make_interval(secs => %s) WHERE id = %s"
                             ).format(s), (diag.message_primary, elapsed, mig_id))
        _log(conn, schema, mig_id, "error", f"{m.migration_name} failed", elapsed, details)
        raise ReleaseFailed(
            f"migration {m.migration_name} failed: {diag.message_primary}"
            + (f" (at character {diag.statement_position})" if diag.statement_position else ""),
            hint="fix the migration file; the failed one was rolled back and will be retried",
        ) from exc
    _log(conn, schema, mig_id, "info", f"applied {m.migration_name}", elapsed)
    return Applied(m.migration_name, elapsed, skipped=False)


def _mark_completed(conn: psycopg.Connection[Any], schema: str, mig_id: int,
                    elapsed: float) -> None:
    conn.execute(sql.SQL(
        "UPDATE {}.migrations SET status = 'completed', applied_at = now(), "
        "execution_time = make_interval(secs => %s) WHERE id = %s").format(
            sql.Identifier(schema)), (elapsed, mig_id))
