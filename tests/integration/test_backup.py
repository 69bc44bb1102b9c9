"""Backing up blue against a real PostgreSQL 16: verification against the catalog
(partitions, names with spaces, quotes, dots and mixed case), private files from
creation, and no partial dump left behind."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from orchestrator.config import BackupConfig, DatabaseConfig, SecretRef
from orchestrator.errors import ExternalError, ReleaseFailed
from orchestrator.pg import backup, catalog
from orchestrator.pg.tools import PgTools, find_tools
from orchestrator.sandbox.pgcluster import PgCluster
from tests.conftest import short_tmpdir
from tests.integration import helpers as h

CONTROL = "orchestrate"

SCHEMA = """
CREATE SCHEMA "c d";
CREATE TABLE "c d"."a b" (id int PRIMARY KEY, v text);
-- pg_restore --list prints this one's data entry exactly like "c d"."a b"'s.
CREATE SCHEMA c;
CREATE TABLE c."d a b" (id int PRIMARY KEY, v text);
CREATE SCHEMA "Mixed ""Quoted"" Schema";
CREATE TABLE "Mixed ""Quoted"" Schema"."Tä ble.""x"" Ω" (id int PRIMARY KEY, v text);
CREATE TABLE "UPPER" (id int PRIMARY KEY);
CREATE TABLE measurements (id bigint NOT NULL, at date NOT NULL, region text NOT NULL,
                           v numeric, PRIMARY KEY (id, at, region)) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements
  FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (region);
CREATE TABLE measurements_2024_eu PARTITION OF measurements_2024 FOR VALUES IN ('eu');
CREATE TABLE "measurements 2024 rest" PARTITION OF measurements_2024 DEFAULT;
CREATE TABLE "c d"."measurements 2025" PARTITION OF measurements
  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_default PARTITION OF measurements DEFAULT;
-- Partitioned, no partition yet: no rows anywhere, nothing to expect.
CREATE TABLE hashed (id int) PARTITION BY HASH (id);
CREATE SCHEMA orchestrate;
CREATE TABLE orchestrate.releases (name text PRIMARY KEY);
INSERT INTO "c d"."a b" SELECT g, 'v' || g FROM generate_series(1, 100) g;
INSERT INTO c."d a b" SELECT g, 'w' || g FROM generate_series(1, 100) g;
INSERT INTO "Mixed ""Quoted"" Schema"."Tä ble.""x"" Ω" VALUES (1, 'é');
INSERT INTO measurements
  SELECT g, '2023-06-01'::date + g % 900, (ARRAY['eu', 'us', 'ap'])[1 + g % 3], g
  FROM generate_series(1, 3000) g;
-- Big enough that the dump is still writing when a test ends its session.
CREATE TABLE bulk AS SELECT g AS id, repeat(md5(g::text), 20) AS v
  FROM generate_series(1, 200000) g;
"""

LEAVES = {("c d", "a b"), ("c", "d a b"), ('Mixed "Quoted" Schema', 'Tä ble."x" Ω'),
          ("public", "UPPER"), ("public", "measurements_2024_eu"),
          ("public", "measurements 2024 rest"), ("c d", "measurements 2025"),
          ("public", "measurements_default"), ("public", "bulk")}


@pytest.fixture(scope="module")
def blue() -> Iterator[tuple[PgCluster, DatabaseConfig, PgTools]]:
    with short_tmpdir("orch-bk-") as base:
        cluster = PgCluster("b16", 16, base)
        cluster.start()
        try:
            cluster.create_database("shop")
            with psycopg.connect(cluster.conninfo("shop"), autocommit=True) as conn:
                conn.execute(SCHEMA.encode())
            os.environ["ORCH_TEST_PW_BK16"] = cluster.password
            db = DatabaseConfig(host=cluster.host, port=cluster.port, dbname="shop",
                                user=cluster.superuser, sslmode="disable",
                                password=SecretRef(env="ORCH_TEST_PW_BK16"))
            yield cluster, db, find_tools(16)
        finally:
            cluster.stop()


@pytest.fixture
def folder() -> Iterator[Path]:
    with short_tmpdir("orch-bkdir-") as base:
        yield base / "backups"


def _expected(db: DatabaseConfig) -> list[backup.TableData]:
    with psycopg.connect(db.conninfo(), autocommit=True) as conn:
        tables = catalog.user_tables(conn, exclude_schemas=(CONTROL,))
        return backup.expected_data(conn, tables)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """Files default to 0666/0777: any privacy must come from the code itself."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_backup_of_partitions_and_odd_names_verifies_and_is_private(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path, fmt: str) -> None:
    _, db, tools = blue
    expected = _expected(db)
    assert {(t.schema, t.name) for t in expected} == LEAVES
    by_name = {(t.schema, t.name): t for t in expected}
    assert by_name[("public", "measurements 2024 rest")].table == ("public", "measurements")
    cfg = BackupConfig(dir=folder, format=fmt, jobs=2)
    result = backup.backup(db, tools, cfg, release="r1", tables=expected)
    path = Path(result.path)
    assert path.exists() and result.tables_with_data >= len(LEAVES)
    assert _mode(folder) == 0o700
    if fmt == "custom":
        assert _mode(path) == 0o600
    else:
        assert _mode(path) == 0o700
        files = list(path.iterdir())
        assert files and all(_mode(f) == 0o600 for f in files)
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
    # A resumed run trusts the verified file.
    again = backup.backup(db, tools, cfg, release="r1", tables=expected,
                          previous=result.as_fact())
    assert again.sha256 == result.sha256 and again.seconds == 0.0


def _dump_without(db: DatabaseConfig, tools: PgTools, out: Path, *patterns: str) -> None:
    excludes = [a for p in patterns for a in ("--exclude-table-data", p)]
    subprocess.run([tools.path("pg_dump"), "--format", "custom", "--file", str(out),
                    *excludes, "--dbname", db.conninfo(with_password=False)],
                   env={**os.environ, **db.subprocess_env()}, check=True, timeout=120)


def test_dump_really_missing_data_is_rejected_with_the_right_hint(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path) -> None:
    _, db, tools = blue
    expected = _expected(db)
    folder.mkdir()
    out = folder / "partial.dump"
    # c."d a b" keeps its data: a check by printed names would take it for "c d"."a b".
    _dump_without(db, tools, out, '"c d"."a b"', "public.measurements_2024_eu")
    with pytest.raises(ReleaseFailed) as err:
        backup.verify(out, tools, db, expected)
    message = err.value.message
    assert message.startswith(f"the backup of {db.describe()} lacks the data of ")
    assert '"c d"."a b"' in message
    assert '"public"."measurements_2024_eu" (partition of "public"."measurements")' in message
    assert '"c"."d a b"' not in message
    assert "measurements 2025" not in message
    hint = err.value.hint or ""
    assert "not a permission problem" in hint and "while the backup ran" in hint
    # The full dump of the same database passes.
    _dump_without(db, tools, out)
    toc, with_data = backup.verify(out, tools, db, expected)
    assert with_data >= len(LEAVES) and toc > with_data


def test_existing_wide_folder_is_tightened(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path) -> None:
    _, db, tools = blue
    folder.mkdir()
    os.chmod(folder, 0o755)
    cfg = BackupConfig(dir=folder)
    result = backup.backup(db, tools, cfg, release="r2", tables=_expected(db))
    assert _mode(folder) == 0o700
    assert _mode(Path(result.path)) == 0o600


@pytest.mark.usefixtures("open_umask")
def test_folder_not_ours_is_left_alone_and_the_dump_is_private(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path) -> None:
    """A mounted volume (root's, open to the pod's group) cannot be tightened; the
    dump in it is private by its own mode."""
    _, db, tools = blue
    folder.mkdir()
    os.chmod(folder, 0o2777)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)
    else:
        folder = Path("/tmp")  # root's, 1777
    before = _mode(folder)
    release = f"r4_{os.getpid()}"
    result = backup.backup(db, tools, BackupConfig(dir=folder), release=release,
                           tables=_expected(db))
    try:
        assert _mode(folder) == before
        assert _mode(Path(result.path)) == 0o600
    finally:
        Path(result.path).unlink()


@pytest.mark.usefixtures("open_umask")
@pytest.mark.parametrize("fmt", ["custom", "directory"])
def test_dump_failing_midway_leaves_nothing_and_rerun_is_safe(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path, fmt: str) -> None:
    """pg_dump is held behind a lock with its output already created, its session is
    ended: the partial output was private all along and is gone afterwards."""
    cluster, db, tools = blue
    cfg = BackupConfig(dir=folder, format=fmt)
    expected = _expected(db)
    suffix = ".dump" if fmt == "custom" else ".dir"
    partial = folder / f".r3-blue{suffix}.partial"
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            backup.backup(db, tools, cfg, release="r3", tables=expected)
        except BaseException as exc:
            outcome.append(exc)

    with psycopg.connect(cluster.conninfo("shop")) as locker:
        locker.execute("LOCK TABLE bulk IN ACCESS EXCLUSIVE MODE")
        worker = threading.Thread(target=run)
        worker.start()
        try:
            with psycopg.connect(cluster.conninfo("shop"), autocommit=True) as admin:
                def dump_waits() -> bool:
                    return bool(admin.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'orchestrate' "
                        "AND wait_event_type = 'Lock'").fetchone())
                assert h.wait_for(dump_waits, interval=0.05), (
                    f"pg_dump never queued behind the lock: {outcome}")
                assert partial.exists()
                assert _mode(folder) == 0o700
                assert _mode(partial) == (0o600 if fmt == "custom" else 0o700)
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE application_name = 'orchestrate'")
            worker.join(60)
        finally:
            locker.rollback()
            worker.join(60)
    assert len(outcome) == 1 and isinstance(outcome[0], ExternalError), outcome
    assert "pg_dump of blue failed" in outcome[0].message
    assert not partial.exists()
    assert list(folder.iterdir()) == []
    # A killed run's leftover (junk under the partial name) does not disturb the next.
    partial.write_bytes(b"half a dump")
    result = backup.backup(db, tools, cfg, release="r3", tables=expected)
    assert sorted(p.name for p in folder.iterdir()) == [Path(result.path).name]


def test_retention_keeps_the_newest_verified_backups(
        blue: tuple[PgCluster, DatabaseConfig, PgTools], folder: Path) -> None:
    _, db, tools = blue
    expected = _expected(db)
    cfg = BackupConfig(dir=folder, keep=2)
    paths = [Path(backup.backup(db, tools, cfg, release=f"r{n}", tables=expected).path)
             for n in (1, 2)]
    (folder / "notes.txt").write_text("not a backup: never removed")
    assert sorted(p.name for p in backup.backups_in(folder)) == ["r1-blue.dump", "r2-blue.dump"]
    # A dump that fails verification removes nothing.
    missing = [*expected, backup.TableData(1, "public", "gone", ("public", "gone"))]
    with pytest.raises(ReleaseFailed):
        backup.backup(db, tools, cfg, release="r3", tables=missing)
    assert all(p.exists() for p in paths)
    third = Path(backup.backup(db, tools, cfg, release="r3", tables=expected).path)
    assert [p.name for p in backup.backups_in(folder)] == ["r2-blue.dump", "r3-blue.dump"]
    assert not paths[0].exists() and third.exists()
    assert (folder / "notes.txt").exists()
