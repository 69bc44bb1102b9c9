"""Discovery, checksums and the lint of changes that break replication."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import PreflightError
from orchestrator.pg import migrations


def write(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text)


def test_discovery_orders_and_checksums(tmp_path: Path) -> None:
    write(tmp_path, "0010_b.up.sql", "SELECT 2;")
    write(tmp_path, "0002_a.up.sql", "SELECT 1;")
    write(tmp_path, "0002_a.down.sql", "SELECT -1;")
    found = migrations.discover(tmp_path)
    assert [m.migration_name for m in found] == ["0002_a", "0010_b"]
    assert found[0].down_sql == "SELECT -1;" and found[1].down_sql is None
    assert len(found[0].checksum) == 64 and found[0].checksum != found[1].checksum


def test_bad_names_and_duplicates_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "add_column.sql", "SELECT 1;")
    with pytest.raises(PreflightError, match=r"NNNN_name\.up\.sql"):
        migrations.discover(tmp_path)
    (tmp_path / "add_column.sql").unlink()
    write(tmp_path, "0001_a.up.sql", "SELECT 1;")
    write(tmp_path, "0001_b.up.sql", "SELECT 1;")
    with pytest.raises(PreflightError, match="share version 0001"):
        migrations.discover(tmp_path)


@pytest.mark.parametrize(
    ("sql", "level", "needle"),
    [
        ("ALTER TABLE orders DROP COLUMN note;", "error", "drops a column"),
        ("ALTER TABLE orders RENAME COLUMN a TO b;", "error", "renames"),
        ("ALTER TABLE orders ADD COLUMN s text NOT NULL;", "error", "NOT NULL column without"),
        ("CREATE INDEX CONCURRENTLY i ON t(a);", "error", "CONCURRENTLY"),
        ("ALTER TABLE t ALTER COLUMN a TYPE bigint;", "warning", "column type"),
        ("CREATE UNIQUE INDEX u ON t(a);", "warning", "unique"),
        ("UPDATE orders SET amount = 0;", "warning", "changes data"),
    ],
)
def test_lint_flags_replication_breakers(tmp_path: Path, sql: str, level: str, needle: str) -> None:
    write(tmp_path, "0001_x.up.sql", sql)
    write(tmp_path, "0001_x.down.sql", "SELECT 1;")
    report = migrations.lint(migrations.discover(tmp_path))
    hits = [f for f in report.findings if needle in f.message]
    assert hits and hits[0].level == level


def test_lint_accepts_expand_only_changes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_x.up.sql",
        "-- adds a column\nALTER TABLE orders ADD COLUMN status text NOT NULL DEFAULT 'new';\n"
        "CREATE INDEX orders_status_idx ON orders(status);",
    )
    write(tmp_path, "0001_x.down.sql", "ALTER TABLE orders DROP COLUMN status;")
    report = migrations.lint(migrations.discover(tmp_path))
    assert report.findings == []


def test_no_transaction_directive_allows_concurrently(tmp_path: Path) -> None:
    write(
        tmp_path,
        "0001_x.up.sql",
        "-- orchestrate:no-transaction\nCREATE INDEX CONCURRENTLY i ON t(a);",
    )
    write(tmp_path, "0001_x.down.sql", "DROP INDEX i;")
    found = migrations.discover(tmp_path)
    assert not found[0].transactional
    assert migrations.lint(found).errors == []
